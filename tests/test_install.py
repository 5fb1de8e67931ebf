"""A regular (non-editable) install works from any folder: build the wheel, install it without dependencies
into a temporary folder and, from another working directory with only that folder on PYTHONPATH, run the
``cgns`` command: ``--help``, a tiny ``cgns pretrain --config demo`` (the packaged config, found by name)
and ``cgns evaluate --task zero_shot`` with the packaged prompts."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the demo config made tiny: 24 studies at 64 px, 2 x 2 optimiser steps
TINY = ["--num_images", "24", "--image_size", "64", "--projection_dim", "32", "--num_clusters", "4",
        "--decoder_channels", "16", "8", "--per_device_train_batch_size", "8", "--max_text_length", "48",
        "--stage1_epochs", "1", "--stage2_epochs", "1", "--report_to", "none", "--log_level", "warning"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder, environment) of the wheel installed with --no-deps --target."""
    root = tmp_path_factory.mktemp("install")
    wheels, site, source = root / "wheels", root / "site", root / "source"
    # built from a copy without the checkout's own build/ (setuptools would reuse a stale build/lib in it)
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "outputs", "*.egg-info", "__pycache__", ".hf_tests", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(source)], check=True, timeout=300, capture_output=True)
    (wheel,) = wheels.glob("cm_cgns-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, timeout=300, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    return site, env


def run(command, env, cwd, timeout=300):
    result = subprocess.run(command, env=env, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


def test_the_wheel_holds_the_packages_and_their_data(installed):
    site, _ = installed
    for path in ("cgns/cli.py", "cgns/pretraining/loop.py", "cgns/downstream/zero_shot.py",
                 "cgns/experiments/demo.py", "cgns/configs/demo.json", "cgns/configs/mimic_resnet50.json",
                 "cgns/downstream/zero_shot_prompts.json", "modeling_cgns/modeling_cgns.py",
                 "data_scripts/synthetic_cxr.py"):
        assert (site / path).is_file(), path
    # no top-level scripts or generic package names leak into site-packages
    for name in ("train_pretrain.py", "train_downstream.py", "demo.py", "pretrain_callbacks.py", "downstream",
                 "configs", "tests", "benchmarks"):
        assert not (site / name).exists(), name


def test_the_installed_command_runs_from_another_folder(installed, tmp_path):
    site, env = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([sys.executable, "-c", "import cgns, modeling_cgns, data_scripts; "
                 "print(cgns.__file__, modeling_cgns.__file__, data_scripts.__file__)"], env, elsewhere)
    assert all(path.startswith(str(site)) for path in where.split()), where
    assert "evaluate" in run([str(site / "bin" / "cgns"), "--help"], env, elsewhere)


def test_installed_pretrain_and_zero_shot_run_from_another_folder(installed, tmp_path):
    """A tiny pretraining with the packaged config, then zero-shot with the packaged prompts, each in a fresh
    process started outside the clone (29 s on an idle 2-core machine, about 95 s beside the rest of the tier)."""
    site, env = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cgns = str(site / "bin" / "cgns")
    run([cgns, "pretrain", "--config", "demo", "--output_dir", "run", "--cache_dir", "cache", *TINY], env, elsewhere)
    final = elsewhere / "run" / "final"
    assert (final / "model.safetensors").is_file() and (final / "processor_config.json").is_file()
    assert json.loads((elsewhere / "run" / "args.json").read_text())["vision_model"] == "resnet10t"   # demo's

    run([cgns, "evaluate", "--task", "zero_shot", "--dataset", "synthetic_cxr", "--model", "run/final",
         "--output_dir", "zero_shot", "--cache_dir", "cache", "--quiet", "true",
         "--dataset_options", "num_images=24", "image_size=73"], env, elsewhere)
    results = json.loads((elsewhere / "zero_shot" / "results.json").read_text())
    assert results["prompts_file"] == str(site / "cgns" / "downstream" / "zero_shot_prompts.json")
    assert results["num_examples"] > 0 and "auroc" in results["test"]
