"""What a person reads: the console of a tiny pretraining and of a tiny linear probe on its export, run as a
user runs them (``python -m cgns.pretraining`` / ``python -m cgns.downstream`` in a subprocess, output to a
pipe, not a terminal). A closing summary, each event once, rounded numbers, and none of the noise a user can do
nothing about (issue 27). Also the loss-curve panel of a term logged once."""
import json
import os
import re
import subprocess
import sys

import pytest

from cgns.processes import child_env
from test_pretrain import make_pretrain_assets

# a float printed with all its digits ("macro AUROC 0.44767892156862743"); timestamps and rates have fewer
LONG_FLOAT = re.compile(r"\d\.\d{6,}")
NOISE = ("Writing model shards", "LOAD REPORT", "Requested torchvision backend", "FutureWarning", "\x1b[",
         "{'loss'", "{'eval_loss'", "{'train_runtime'", "mtime may not be reliable")


def assert_quiet(out):
    """None of the noise a user can do nothing about, and no float printed with all its digits."""
    for noise in NOISE:
        assert noise not in out, noise
    assert not LONG_FLOAT.findall(out)


def run_module(module, *argv):
    env = child_env({**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    env.pop("TRANSFORMERS_VERBOSITY", None)          # what a user gets: transformers' default verbosity
    done = subprocess.run([sys.executable, "-m", module, *argv], env=env, capture_output=True, text=True,
                          timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def consoles(tmp_path_factory):
    """(pretraining output, probe output, pretraining output_dir): a 2-epoch run stopped by --max_steps on the
    last batch of epoch 1, then a one-seed probe on its export."""
    root = tmp_path_factory.mktemp("console")
    assets = make_pretrain_assets(root)
    run_dir = str(root / "run")
    pretraining = run_module(
        "cgns.pretraining", "--dataset", assets["pairs"], "--text_model", assets["bert"], "--vision_model",
        "resnet18", "--image_size", "64", "--projection_dim", "32", "--num_clusters", "4", "--max_text_length", "64",
        "--decoder_channels", "16", "8", "--stage1_epochs", "1", "--stage2_epochs", "1",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-4", "--logging_steps", "1", "--save_steps", "0",
        "--report_to", "none", "--max_steps", "2", "--output_dir", run_dir)
    probe = run_module(
        "cgns.downstream", "--task", "classification", "--dataset", "synthetic_cxr", "--cache_dir", str(root / "data"),
        "--dataset_options", "num_images=10", "image_size=64", "--model", os.path.join(run_dir, "final"),
        "--output_dir", str(root / "probe"), "--seeds", "0", "--max_epochs", "2", "--batch_size", "8")
    return pretraining, probe, run_dir


@pytest.mark.slow       # two fresh processes that train: about a minute on an idle 2-core machine
def test_pretraining_console_reads_like_a_report(consoles):
    out, _, run_dir = consoles
    assert_quiet(out)
    # --max_steps 2 = the last batch of epoch 1 (16 pairs, batch 8): that epoch is still validated, once
    evals = [line for line in out.splitlines() if "eval after epoch" in line]
    assert len(evals) == 1 and "eval after epoch 1/2" in evals[0], evals
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert [(r["step"], r["epoch"]) for r in records if r["split"] == "eval"] == [(2, 1)]
    summary = out[out.index("pretraining done:"):]
    assert "resnet18" in summary and "2 optimiser steps, 1 of 2 epochs" in summary
    assert "stopped by --max_steps 2" in summary
    assert re.search(r"validation after epoch 1: loss \d+\.?\d* \| bml ", summary), summary
    assert f"export: {os.path.join(run_dir, 'final')}" in summary


@pytest.mark.slow       # two fresh processes that train: about a minute on an idle 2-core machine
def test_probe_console_reads_like_a_report(consoles):
    _, out, _ = consoles
    assert_quiet(out)
    assert re.search(r"seed 0: test auroc (\d+\.\d %|undefined) \(best epoch \d\)", out), out[-2000:]
    assert "| auroc |" in out                          # the results row, in percent like the seed line


def test_loss_curve_of_a_term_logged_once_is_drawn(tmp_path):
    from cgns.pretraining.plots import loss_curves_figure

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in (
        {"split": "train", "step": 1, "loss": 1.0, "global_loss": 0.5},
        {"split": "train", "step": 2, "loss": 0.9, "global_loss": 0.4, "reconstruction_loss": 2.0})) + "\n")
    figure = loss_curves_figure(str(metrics))
    panels = {ax.get_title(): ax for ax in figure.axes}
    lines = panels["reconstruction_loss"].get_lines()
    assert len(lines) == 1 and lines[0].get_marker() not in (None, "", "None")
    assert list(lines[0].get_xdata()) == [2]


def test_prepare_lists_the_datasets_of_data_scripts():
    import data_scripts
    from cgns.cli import PREPARE_DATASETS

    assert set(PREPARE_DATASETS) == set(data_scripts.DATASETS)


def test_help_of_prepare_and_pretrain_imports_no_torch():
    """`cgns prepare --help` / `cgns pretrain --help` print their options without loading torch (seconds of CPU:
    benchmarks/bench_cli_help.py)."""
    code = ("import sys\nfrom cgns.cli import main\nfor command in ('prepare', 'pretrain'):\n"
            "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'data_scripts' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: cgns prepare" in done.stdout and "--reports_path" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "False False"
