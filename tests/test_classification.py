"""Linear classification protocol (docs/method.md E.1): CGNSForImageClassification, metrics, train_downstream.

Tiny in-code towers (resnet18 / ViT-tiny at 64 px) and the synthetic dataset at 64 px keep the whole
file well under two minutes on two CPU cores.
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from sklearn.metrics import accuracy_score, roc_auc_score  # noqa: E402
from transformers import (  # noqa: E402
                          AutoModelForImageClassification,
                          BertConfig,
                          BertModel,
                          TimmWrapperConfig,
                          )

import data_scripts  # noqa: E402
from cgns.downstream import cli as td  # noqa: E402
from cgns.downstream import classification as probe  # noqa: E402
from cgns.downstream.common import SPLITS  # noqa: E402
from modeling_cgns import CGNSConfig, CGNSForImageClassification, CGNSImageProcessor, CGNSModel  # noqa: E402
from modeling_cgns.metrics import (  # noqa: E402
                                   UndefinedMetricWarning,
                                   classification_metrics,
                                   flat_numeric_metrics,
                                   )

IMAGE_SIZE = 64
NUM_IMAGES = 100  # synthetic: 80 train / 10 validation / 10 test
LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def probe_config(arch: str = "resnet18", **overrides) -> CGNSConfig:
    model_args = {"img_size": IMAGE_SIZE} if arch.startswith("vit") else None
    kwargs = dict(
        vision_config=TimmWrapperConfig(architecture=arch, model_args=model_args),
        text_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, vocab_size=100),
        projection_dim=32, attention_pool_heads=4, sentence_pool_heads=4, decoder_channels=[16, 8],
        decoder_heads=4, decoder_layers=1, decoder_ffn_dim=32, image_size=IMAGE_SIZE, num_clusters=4,
        max_text_length=64,
    )
    kwargs.update(overrides)
    return CGNSConfig(**kwargs)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A CGNS export (full CGNSModel) with a resnet18 tower."""
    path = str(tmp_path_factory.mktemp("cgns_export"))
    torch.manual_seed(0)
    CGNSModel(probe_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def synthetic_argv(export_dir, cache_dir, output_dir, *extra):
    return ["--dataset", "synthetic_cxr", "--cache_dir", cache_dir, "--model", export_dir,
            "--output_dir", str(output_dir), "--dataset_options", f"num_images={NUM_IMAGES}",
            f"image_size={IMAGE_SIZE}", "--batch_size", "16", "--quiet", *extra]


def tiny_dataset_dict(rows_per_split=(12, 6, 6), num_labels=5, seed=0) -> datasets.DatasetDict:
    """In-test DatasetDict with the classification contract's columns (multi-label)."""
    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(),
                                  "labels": datasets.List(datasets.Value("float32"), length=num_labels),
                                  "image_id": datasets.Value("string")})
    splits = {}
    for name, n in zip(SPLITS, rows_per_split):
        labels = (rng.random((n, num_labels)) < 0.5).astype(np.float32)
        labels[0], labels[1] = 1.0, 0.0  # every class has a positive and a negative
        splits[name] = datasets.Dataset.from_dict(
            {"image": [rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8) for _ in range(n)],
             "labels": labels.tolist(), "image_id": [f"{name}-{i}" for i in range(n)]}, features=features)
    return datasets.DatasetDict(splits)


def probe_args(tmp_path, *extra):
    return td.parse_args(["--dataset", "synthetic_cxr", "--model", "unused", "--output_dir", str(tmp_path),
                          "--batch_size", "4", "--quiet", *extra])


MULTI_LABEL_SPEC = data_scripts.TaskSpec("multi_label_classification", LABELS, "auroc")


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------

def test_multilabel_auroc_equals_sklearn():
    rng = np.random.default_rng(0)
    labels = (rng.random((50, 5)) < 0.4).astype(np.float32)
    logits = rng.normal(size=(50, 5)) + 1.5 * labels
    metrics = classification_metrics(logits, labels, "multi_label_classification", LABELS)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, logits, average="macro"), abs=1e-12)
    expected = roc_auc_score(labels, logits, average=None)
    assert [metrics["auroc_per_class"][n] for n in LABELS] == pytest.approx(list(expected), abs=1e-12)


def test_single_label_accuracy_and_auroc_equal_sklearn():
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3)) + 2.0 * np.eye(3)[classes]
    metrics = classification_metrics(logits, classes, "single_label_classification", ("a", "b", "c"))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(classes, logits.argmax(1)))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = roc_auc_score(classes, probs, multi_class="ovr", average="macro")
    assert metrics["auroc"] == pytest.approx(expected)


def test_class_without_positives_is_undefined_not_a_crash():
    rng = np.random.default_rng(2)
    labels = (rng.random((30, 5)) < 0.5).astype(np.float32)
    labels[:, 3] = 0.0  # "Edema": no positive
    labels[:, 4] = 1.0  # "Pleural Effusion": no negative
    logits = rng.normal(size=(30, 5))
    with pytest.warns(UndefinedMetricWarning) as record:
        metrics = classification_metrics(logits, labels, "multi_label_classification", LABELS, split="test")
    messages = [str(w.message) for w in record]
    assert any("'Edema' on the test split" in m and "no positive" in m for m in messages)
    assert any("'Pleural Effusion'" in m and "no negative" in m for m in messages)
    assert metrics["auroc_per_class"]["Edema"] is None
    assert metrics["auroc_per_class"]["Pleural Effusion"] is None
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels[:, :3], logits[:, :3], average="macro"))
    assert "auroc_per_class/Edema" not in flat_numeric_metrics(metrics)
    with pytest.warns(UndefinedMetricWarning):
        nothing = classification_metrics(logits[:, :1], np.zeros((30, 1)), "multi_label_classification")
    assert nothing["auroc"] is None


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------

def test_load_from_cgns_export_keeps_tower_weights(export_dir):
    source = CGNSModel.from_pretrained(export_dir)
    probe = CGNSForImageClassification.from_pretrained(
        export_dir, num_labels=5, problem_type="multi_label_classification")
    source_state = source.vision_model.state_dict()
    probe_state = probe.vision_model.state_dict()
    assert source_state.keys() == probe_state.keys()
    assert all(torch.equal(source_state[k], probe_state[k]) for k in source_state)
    trainable = [n for n, p in probe.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]
    assert isinstance(AutoModelForImageClassification.from_pretrained(export_dir, num_labels=2),
                      CGNSForImageClassification)
    random_tower = CGNSForImageClassification.from_pretrained(export_dir, init="random", num_labels=3)
    assert random_tower.classifier.out_features == 3
    assert not torch.equal(random_tower.vision_model.timm_model.conv1.weight,
                           probe.vision_model.timm_model.conv1.weight)


def test_features_are_mean_pool_for_resnet_and_cls_for_vit():
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    resnet = CGNSForImageClassification(probe_config(num_labels=5))
    grid = resnet.vision_model(pixel_values).last_hidden_state
    assert torch.allclose(resnet.extract_features(pixel_values), grid.mean((2, 3)))
    vit = CGNSForImageClassification(probe_config("vit_tiny_patch16_224", num_labels=3))
    tokens = vit.vision_model(pixel_values).last_hidden_state
    assert tokens.shape[1] == 1 + (IMAGE_SIZE // 16) ** 2
    assert torch.allclose(vit.extract_features(pixel_values), tokens[:, 0])
    out = vit(pixel_values=pixel_values, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0  # cross-entropy with integer labels


def test_cached_features_give_the_same_logits_as_the_tower(tmp_path):
    torch.manual_seed(0)
    model = CGNSForImageClassification(probe_config(num_labels=5, problem_type="multi_label_classification"))
    dataset_dict = tiny_dataset_dict()
    processor = CGNSImageProcessor(image_size=IMAGE_SIZE, resize_size=72)
    cached = probe.build_datasets(model, dataset_dict, processor, MULTI_LABEL_SPEC.problem_type, "cached",
                               batch_size=5, quiet=True)
    uncached = probe.build_datasets(model, dataset_dict, processor, MULTI_LABEL_SPEC.problem_type, "uncached")
    test_images = torch.stack([uncached["test"][i]["pixel_values"] for i in range(len(uncached["test"]))])
    with torch.no_grad():
        from_features = model(features=cached["test"].features).logits
        from_pixels = model(pixel_values=test_images).logits
    assert torch.allclose(from_features, from_pixels, atol=1e-5)
    assert torch.equal(cached["test"].labels, torch.tensor(dataset_dict["test"]["labels"]))


def test_training_changes_only_the_head(tmp_path):
    """Uncached training runs the tower every step in train mode: weights AND BN statistics stay put."""
    torch.manual_seed(0)
    model = CGNSForImageClassification(probe_config(num_labels=5, problem_type="multi_label_classification"))
    processor = CGNSImageProcessor(image_size=IMAGE_SIZE, resize_size=72)
    splits = probe.build_datasets(model, tiny_dataset_dict(), processor, MULTI_LABEL_SPEC.problem_type,
                               "augment", batch_size=6, quiet=True)
    tower_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    head_before = model.classifier.weight.detach().clone()
    args = probe_args(tmp_path, "--augment", "--max_epochs", "2", "--lr", "0.05")
    probe.train_probe(model, splits, MULTI_LABEL_SPEC, args, seed=0, output_dir=str(tmp_path))
    tower_after = model.vision_model.state_dict()
    assert any("running_mean" in k for k in tower_after)
    changed = [k for k in tower_before if not torch.equal(tower_before[k], tower_after[k])]
    assert changed == []
    assert not torch.equal(head_before, model.classifier.weight)
    assert not model.vision_model.training


def test_train_mode_keeps_every_tower_module_in_eval():
    """train() takes a short path when nothing changes; every path leaves all tower modules in eval."""
    model = CGNSForImageClassification(probe_config(num_labels=5, problem_type="multi_label_classification"))

    def tower_modes():
        return {m.training for m in model.vision_model.modules()}

    for calls in ([True], [True, True, True], [False, True], [True, False, True, True]):
        for mode in calls:
            model.train(mode)
        assert model.training is calls[-1] and model.classifier.training is calls[-1]
        assert tower_modes() == {False}
    model.vision_model.train()               # a user puts the tower in train mode: the next call undoes it
    model.train()
    assert tower_modes() == {False}
    model.train()
    model.classifier.eval()                  # a head switched by hand follows the next call
    model.train()
    assert model.classifier.training and tower_modes() == {False}
    model.eval()
    assert not model.training and not model.classifier.training and tower_modes() == {False}


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------

def test_export_without_vision_tower_is_refused(tmp_path, export_dir):
    bert_dir = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(bert_dir)
    with pytest.raises(ValueError, match="not a CGNS export.*'bert'"):
        CGNSForImageClassification.from_pretrained(str(bert_dir), num_labels=5)
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    for name in os.listdir(export_dir):
        if name != "model.safetensors":
            (text_only / name).write_bytes(open(os.path.join(export_dir, name), "rb").read())
    state = load_file(os.path.join(export_dir, "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("vision_model.")},
              str(text_only / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no \\(complete\\) vision tower"):
        CGNSForImageClassification.from_pretrained(str(text_only), num_labels=5)
    with pytest.raises(OSError, match="cannot read a CGNS export"):
        CGNSForImageClassification.from_pretrained(str(tmp_path / "missing"), num_labels=5)


def test_imagenet_init_offline_says_why(export_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="offline mode"):
        CGNSForImageClassification.from_pretrained(export_dir, init="imagenet", num_labels=5)


def test_dataset_without_task_labels_is_refused():
    dataset_dict = tiny_dataset_dict()
    with pytest.raises(ValueError, match="no 'labels' column"):
        probe.check_classification_data(
            datasets.DatasetDict({k: v.remove_columns("labels") for k, v in dataset_dict.items()}),
            MULTI_LABEL_SPEC, "tiny")
    wrong_width = data_scripts.TaskSpec("multi_label_classification", ("Pneumonia",), "auroc")
    with pytest.raises(ValueError, match="list of 1 floats"):
        probe.check_classification_data(dataset_dict, wrong_width, "tiny")
    multiclass = data_scripts.TaskSpec("single_label_classification", ("a", "b", "c"), "accuracy")
    with pytest.raises(ValueError, match="ClassLabel with 3 classes"):
        probe.check_classification_data(dataset_dict, multiclass, "tiny")
    with pytest.raises(ValueError, match="lacks the split"):
        probe.check_classification_data(datasets.DatasetDict({"train": dataset_dict["train"]}), MULTI_LABEL_SPEC,
                                     "tiny")


def test_train_class_without_positives_warns():
    dataset_dict = tiny_dataset_dict()
    labels = np.array(dataset_dict["train"]["labels"])
    labels[:, 1] = 0.0
    dataset_dict["train"] = dataset_dict["train"].remove_columns("labels").add_column(
        "labels", labels.tolist(), feature=dataset_dict["train"].features["labels"])
    with pytest.warns(UserWarning, match="'Cardiomegaly' has no positive example in the train split"):
        probe.check_classification_data(dataset_dict, MULTI_LABEL_SPEC, "tiny")


@pytest.mark.parametrize("pct", ["0", "1.5", "-0.1", "ten"])
def test_data_pct_outside_unit_interval_is_refused(pct, capsys):
    with pytest.raises(SystemExit):
        td.parse_args(["--dataset", "rsna", "--model", "m", "--output_dir", "o", "--data_pct", pct])
    assert "--data_pct" in capsys.readouterr().err


def test_task_defaults_follow_the_protocol():
    args = td.parse_args(["--dataset", "chexpert", "--model", "m", "--output_dir", "o"])
    assert (args.dataset_task, args.max_epochs, args.batch_size, args.lr, args.weight_decay) == \
        ("classification", 100, 48, 5e-4, 1e-6)
    args = td.parse_args(["--task", "segmentation", "--dataset", "siim", "--model", "m", "--output_dir", "o",
                          "--weight_decay", "0.01"])
    assert (args.dataset_task, args.max_epochs, args.batch_size, args.weight_decay) == ("segmentation", 50, 16, 0.01)
    with pytest.raises(ValueError, match="not a classification task"):
        td.check_task(td.parse_args(["--dataset", "rsna", "--dataset_task", "detection", "--model", "m",
                                     "--output_dir", "o"]))


# --------------------------------------------------------------------------------------------------
# data_pct and the end-to-end script on synthetic data
# --------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*has no positive example in the train split")
def test_data_pct_sampling_is_exact_and_deterministic(cache_dir, tmp_path):
    def train_ids(pct, data_seed=42):
        args = td.parse_args(["--dataset", "synthetic_cxr", "--model", "m", "--output_dir", str(tmp_path),
                              "--cache_dir", cache_dir, "--data_pct", str(pct), "--data_seed", str(data_seed),
                              "--dataset_options", f"num_images={NUM_IMAGES}", f"image_size={IMAGE_SIZE}"])
        spec = data_scripts.get_task_spec("synthetic_cxr", "classification")
        dataset_dict = probe.load_data(args, spec)
        # validation and test are never subsampled
        assert len(dataset_dict["validation"]) == len(dataset_dict["test"]) == NUM_IMAGES // 10
        return dataset_dict["train"]["image_id"]

    full = train_ids(1.0)
    assert len(full) == 80
    for pct, expected in ((0.1, 8), (0.5, 40), (0.01, 1)):
        ids = train_ids(pct)
        assert len(ids) == expected
        assert ids == train_ids(pct)
        assert set(ids) <= set(full)
    assert train_ids(0.1) != train_ids(0.1, data_seed=7)


@pytest.mark.filterwarnings("ignore::modeling_cgns.metrics.UndefinedMetricWarning")
def test_end_to_end_multilabel_probe_on_synthetic_data(export_dir, cache_dir, tmp_path):
    results = td.main(synthetic_argv(export_dir, cache_dir, tmp_path, "--seeds", "0", "1",
                                     "--max_epochs", "4", "--patience", "2", "--data_pct", "0.5"))
    assert results["num_examples"] == {"train": 40, "validation": 10, "test": 10}
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["summary"] == results["summary"]
    assert set(on_disk["seeds"]) == {"0", "1"}
    for seed in ("0", "1"):
        seed_result = on_disk["seeds"][seed]
        defined = [v for v in seed_result["test"]["auroc_per_class"].values() if v is not None]
        assert defined and all(0.0 <= v <= 1.0 for v in defined)
        assert seed_result["test"]["auroc"] == pytest.approx(np.mean(defined))
        assert json.loads((tmp_path / f"seed_{seed}" / "metrics.json").read_text()) == seed_result
        assert 1 <= seed_result["epochs_trained"] <= 4
    summary = results["summary"]["auroc"]
    assert summary["n"] == 2 and summary["mean"] is not None and summary["std"] >= 0
    table = (tmp_path / "results.md").read_text().splitlines()
    assert len(table) == 3 and "synthetic_cxr" in table[2] and "auroc" in table[2]
    assert not (tmp_path / "seed_0" / "checkpoints").exists()


@pytest.mark.filterwarnings("ignore::modeling_cgns.metrics.UndefinedMetricWarning")
def test_end_to_end_cached_equals_uncached(export_dir, cache_dir, tmp_path):
    """Same seed, no augmentation: training on cached features or through the tower gives the same probe."""
    common = ("--seeds", "3", "--max_epochs", "2", "--patience", "5", "--data_pct", "0.5")
    cached = td.main(synthetic_argv(export_dir, cache_dir, tmp_path / "cached", *common))
    uncached = td.main(synthetic_argv(export_dir, cache_dir, tmp_path / "uncached", "--no_cache", *common))
    assert cached["mode"] == "cached" and uncached["mode"] == "uncached"
    a, b = cached["seeds"]["3"], uncached["seeds"]["3"]
    assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-5)
    assert a["best_validation_loss"] == pytest.approx(b["best_validation_loss"], abs=1e-5)
    for name, value in a["test"]["auroc_per_class"].items():
        assert value == pytest.approx(b["test"]["auroc_per_class"][name], abs=1e-6)


@pytest.mark.filterwarnings("ignore::modeling_cgns.metrics.UndefinedMetricWarning")
def test_feature_cache_is_reused_per_model_init_and_split(export_dir, tmp_path, monkeypatch):
    """A second run reads the features it would extract (same numbers); another data_pct re-extracts only
    train; another init all splits; --no_feature_cache extracts and writes nothing."""
    extracted = []
    real = probe.extract_features

    def counting(model, images, *args, **kwargs):
        extracted.append(len(images))
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(probe, "extract_features", counting)
    data_cache = tmp_path / "data"
    features_dir = data_cache / "features"
    common = ("--seeds", "0", "--max_epochs", "2", "--patience", "5")

    def run(name, *extra):
        extracted.clear()
        results = td.main(synthetic_argv(export_dir, str(data_cache), tmp_path / name, *common, *extra))
        return results, list(extracted), len(list(features_dir.glob("probe-*.safetensors")))

    first, calls, files = run("first", "--data_pct", "0.5")
    assert calls == [40, 10, 10] and files == 3
    again, calls, files = run("again", "--data_pct", "0.5")
    assert calls == [] and files == 3
    assert again["seeds"]["0"]["test_loss"] == first["seeds"]["0"]["test_loss"]
    assert again["seeds"]["0"]["test"] == first["seeds"]["0"]["test"]
    _, calls, files = run("full", "--data_pct", "1.0")
    assert calls == [80] and files == 4
    _, calls, files = run("random", "--data_pct", "1.0", "--init", "random")
    assert calls == [80, 10, 10] and files == 7
    uncached, calls, files = run("uncached", "--data_pct", "0.5", "--no_feature_cache")
    assert calls == [40, 10, 10] and files == 7
    assert uncached["seeds"]["0"]["test_loss"] == pytest.approx(first["seeds"]["0"]["test_loss"], abs=1e-6)


@pytest.mark.filterwarnings("ignore::modeling_cgns.metrics.UndefinedMetricWarning")
def test_end_to_end_multiclass_reports_accuracy(export_dir, cache_dir, tmp_path):
    results = td.main(synthetic_argv(export_dir, cache_dir, tmp_path, "--dataset_task",
                                     "classification_multiclass", "--seeds", "0", "--max_epochs", "2"))
    assert results["metric"] == "accuracy" and results["problem_type"] == "single_label_classification"
    accuracy = results["seeds"]["0"]["test"]["accuracy"]
    assert 0.0 <= accuracy <= 1.0
    assert results["summary"]["accuracy"]["mean"] == pytest.approx(accuracy)
    assert f"{100 * accuracy:.1f} ± 0.0" in (tmp_path / "results.md").read_text()


__all__ = []


def test_standardized_features_fold_into_the_saved_head():
    """--standardize_features: train split z-scored; the folded head gives the same logits on raw features."""
    torch.manual_seed(0)
    config = probe_config()
    config.num_labels = 5
    config.problem_type = "multi_label_classification"
    model = CGNSForImageClassification(config)
    width = model.classifier.in_features
    features = {split: torch.randn(n, width) * 0.01 + 0.05 for split, n in (("train", 20), ("validation", 6),
                                                                             ("test", 6))}
    data = {split: probe.FeatureDataset(f.clone(), torch.zeros(len(f), 5)) for split, f in features.items()}
    mean, std = probe.standardize_features(data)
    torch.testing.assert_close(data["train"].features.mean(dim=0), torch.zeros(width), atol=1e-4, rtol=0)
    torch.testing.assert_close(data["train"].features.std(dim=0, unbiased=False), torch.ones(width), atol=1e-3,
                               rtol=0)
    torch.nn.init.normal_(model.classifier.weight)
    with torch.no_grad():
        on_standardized = model(features=data["test"].features).logits
        probe.fold_standardization(model, mean, std)
        on_raw = model(features=features["test"]).logits
    torch.testing.assert_close(on_raw, on_standardized, atol=1e-4, rtol=1e-4)


def test_standardize_features_needs_cached_mode():
    with pytest.raises(SystemExit):
        td.parse_args(["--dataset", "synthetic_cxr", "--model", "x", "--output_dir", "y", "--augment",
                       "--standardize_features"])
