"""Checkpoints and resume never go silently wrong (issue 13, "Training and resume").

Each test reproduces one defect: a fresh run over an earlier run's checkpoints, a non-finite gradient saved
as a good checkpoint, a resume with changed arguments or another number of processes, a dataset without a
single sentence, and a full disk. The end-to-end ones use the tiny setup of test_pretrain.py (1-layer BERT of
width 32, resnet18 at 64 px, 16 pairs, batch 4: 4 optimiser steps per epoch) and only a few steps each;
the checkpoint-writing ones call ``save_checkpoint`` on a two-parameter model.
"""
import errno
import json
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from cgns.pretraining.checkpointing import (list_checkpoints, read_trainer_state, resolve_checkpoint, save_checkpoint,
                                            write_manifest)
from cgns.pretraining.loop import NoSentencesError, NonFiniteGradientError
from cgns.pretraining.state import PretrainingRun
from modeling_cgns import CGNSModel
from test_pretrain import assets, fresh_accelerate_state, model_tensors, read_jsonl, run_main  # noqa: F401

SHORT = ("--stage2_epochs", "0", "--do_eval", "false")     # stage 1 only, no validation: a few seconds a step


def checkpoint_steps(output_dir):
    return [step for step, _ in list_checkpoints(str(output_dir))]


def train_steps(output_dir):
    return [r["step"] for r in read_jsonl(os.path.join(output_dir, "metrics.jsonl")) if r["split"] == "train"]


# --------------------------------------------------------------------------------------------------
# a fresh run over an earlier run's checkpoints
# --------------------------------------------------------------------------------------------------

def test_fresh_run_over_checkpoints_is_refused_unless_overwrite(assets, tmp_path):
    out = tmp_path / "run"
    run_main(assets, out, *SHORT, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "2")
    assert checkpoint_steps(out) == [2, 3]
    old_args = (out / "args.json").read_text()

    # before: the rotation kept the old run's step_2/step_3 and deleted this run's, and `latest` resumed the old run
    with pytest.raises(FileExistsError, match="holds checkpoints of an earlier run.*--overwrite_output_dir"):
        run_main(assets, out, *SHORT, "--max_steps", "1", "--save_steps", "1", "--save_total_limit", "2")
    assert checkpoint_steps(out) == [2, 3] and (out / "args.json").read_text() == old_args   # nothing touched

    # resuming from an older checkpoint while newer ones exist would mix two futures
    with pytest.raises(FileExistsError, match=r"holds newer checkpoints \(step_3\)"):
        run_main(assets, out, *SHORT, "--resume_from_checkpoint", str(out / "checkpoints" / "step_2"))

    run_main(assets, out, *SHORT, "--max_steps", "1", "--save_steps", "1", "--save_total_limit", "2",
             "--overwrite_output_dir", "true")
    assert checkpoint_steps(out) == [1]
    assert resolve_checkpoint("latest", str(out)).endswith("step_1")
    assert train_steps(out) == [1]                      # the old run's log is gone too
    assert json.loads((out / "args.json").read_text())["max_steps"] == 1


def _tiny_run(tmp_path, save_total_limit):
    """A PretrainingRun around a 2-parameter model: enough for save_checkpoint."""
    torch.manual_seed(0)
    training = SimpleNamespace(per_device_train_batch_size=4, save_total_limit=save_total_limit)
    return PretrainingRun(
        config=SimpleNamespace(training=training), accelerator=Accelerator(cpu=True), model=torch.nn.Linear(2, 1),
        processor=None, train_dataloader=None, eval_dataloader=None, train_sampler=None,
        output_dir=str(tmp_path))


def test_rotation_keeps_only_this_runs_history(tmp_path):
    foreign = tmp_path / "checkpoints" / "step_99"          # e.g. resumed from an external checkpoint folder
    foreign.mkdir(parents=True)
    (foreign / "trainer_state.json").write_text("{}")
    run = _tiny_run(tmp_path, save_total_limit=2)
    for step in (1, 2, 3):
        run.progress.global_step = step
        save_checkpoint(run)
    # before: the highest step numbers were kept, so step_2 and step_3 of this run were deleted
    assert checkpoint_steps(tmp_path) == [2, 3, 99]
    assert run.checkpoint_history == [(2, str(tmp_path / "checkpoints" / "step_2")),
                                      (3, str(tmp_path / "checkpoints" / "step_3"))]


# --------------------------------------------------------------------------------------------------
# non-finite gradients and state
# --------------------------------------------------------------------------------------------------

class NaNGradient(torch.autograd.Function):
    """0 in the forward pass (the loss stays finite), NaN in the backward pass."""

    @staticmethod
    def forward(ctx, x):
        return x * 0.0

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _nan_gradient_at_step(monkeypatch, bad_call: int):
    original_forward = CGNSModel.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == bad_call:
                out.loss = out.loss + NaNGradient.apply(self.logit_scale)
        return out

    monkeypatch.setattr(CGNSModel, "forward", forward)


def test_nonfinite_gradient_step_is_skipped_and_never_saved(assets, tmp_path, monkeypatch):
    _nan_gradient_at_step(monkeypatch, bad_call=2)
    out = tmp_path / "run"
    summary = run_main(assets, out, *SHORT, "--max_steps", "3", "--save_steps", "1")
    assert summary["global_step"] == 3
    # before: step_2 was saved with a NaN logit_scale and the run went on from there
    tensors = {step: load_file(out / "checkpoints" / f"step_{step}" / "model.safetensors") for step in (1, 2, 3)}
    for step, state in tensors.items():
        assert all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point()), step
    # the skipped update left every parameter as it was after step 1 (the buffers still moved: the k-means
    # and the batch-norm statistics)
    buffers = ("clustering.", "running_mean", "running_var", "num_batches_tracked")
    params = [k for k in tensors[1] if not any(b in k for b in buffers)]
    assert all(torch.equal(tensors[1][k], tensors[2][k]) for k in params)
    assert not all(torch.equal(tensors[2][k], tensors[3][k]) for k in params)
    records = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"}
    assert "nonfinite_grad_skipped_steps" not in records[1]
    assert records[2]["nonfinite_grad_skipped_steps"] == records[3]["nonfinite_grad_skipped_steps"] == 1.0
    assert read_trainer_state(str(out / "checkpoints" / "step_3"))["skipped_steps"] == 1


def test_nonfinite_gradient_stops_with_flag(assets, tmp_path, monkeypatch):
    _nan_gradient_at_step(monkeypatch, bad_call=2)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteGradientError) as error:
        run_main(assets, out, *SHORT, "--max_steps", "3", "--save_steps", "1", "--nonfinite_grad", "stop")
    message = str(error.value)
    assert "optimiser step 2" in message and "logit_scale" in message and "finite loss" in message
    assert "step_1" in message                        # the last good checkpoint
    assert checkpoint_steps(out) == [1]


def test_checkpoint_with_nonfinite_state_is_not_written(tmp_path):
    run = _tiny_run(tmp_path, save_total_limit=0)
    run.progress.global_step = 1
    save_checkpoint(run)
    with torch.no_grad():
        run.model.bias.fill_(float("nan"))             # stands for a NaN parameter or k-means buffer
    run.progress.global_step = 2
    # before: written like any other checkpoint (RuntimeError is NonFiniteStateError's base)
    with pytest.raises(RuntimeError, match=r"not writing .*step_2: 1 tensor\(s\) .*bias") as error:
        save_checkpoint(run)
    assert type(error.value).__name__ == "NonFiniteStateError"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_1"]


# --------------------------------------------------------------------------------------------------
# a full disk
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                 "data/0: file write failed")])
def test_full_disk_removes_the_partial_checkpoint(tmp_path, monkeypatch, failure):
    run = _tiny_run(tmp_path, save_total_limit=0)
    run.progress.global_step = 1
    first = save_checkpoint(run)

    def full_disk(self, output_dir=None, **kwargs):
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "optimizer.bin"), "wb") as f:
            f.write(b"\0" * 1000)                     # what got written before the disk filled up
        raise failure

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    run.progress.global_step = 2
    with pytest.raises(OSError) as error:            # CheckpointWriteError is an OSError
        save_checkpoint(run)
    assert type(error.value).__name__ == "CheckpointWriteError"
    message = str(error.value)
    root = str(tmp_path / "checkpoints")
    assert f"could not write checkpoint {os.path.join(root, 'step_2')}" in message
    assert f"free on the disk of {root}" in message and "iB free" in message
    assert f"the last complete one is {first}" in message and "\n" not in message
    assert sorted(os.listdir(root)) == ["step_1"]     # no step_2.tmp left behind
    assert isinstance(error.value.__cause__, type(failure))


# --------------------------------------------------------------------------------------------------
# resuming with other arguments
# --------------------------------------------------------------------------------------------------

def test_resume_refuses_changed_arguments_and_names_the_fields(assets, tmp_path, caplog):
    out = tmp_path / "run"
    run_main(assets, out, *SHORT, "--max_steps", "1")
    resume = ("--resume_from_checkpoint", "latest")

    # before: lr ignored, batch size skipped the wrong number of batches, stage 1 ran again: all silently
    with pytest.raises(ValueError) as error:
        run_main(assets, out, *SHORT, *resume, "--learning_rate", "1e-3", "--per_device_train_batch_size", "2")
    message = str(error.value)
    assert "learning_rate: 0.0001 -> 0.001" in message and "per_device_train_batch_size: 4 -> 2" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="stage1_epochs: 1 -> 2"):
        run_main(assets, out, *SHORT, *resume, "--stage1_epochs", "2")
    with pytest.raises(ValueError, match="num_clusters: 4 -> 6; projection_dim: 32 -> 64"):
        run_main(assets, out, *SHORT, *resume, "--num_clusters", "6", "--projection_dim", "64")

    # safe changes are allowed; a missing RNG file is a warning (it was an INFO line)
    os.remove(out / "checkpoints" / "step_1" / "random_states_0.pkl")
    with caplog.at_level(logging.INFO):
        summary = run_main(assets, out, *SHORT, *resume, "--max_steps", "2", "--logging_steps", "2",
                           "--save_steps", "7", "--dataloader_num_workers", "0", "--report_to", "none")
    assert summary["global_step"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("random_states_0.pkl is missing" in w for w in warnings), warnings

    # a checkpoint that records no arguments (an older version's, which had no manifest either): the shape
    # mismatch still names the config field
    state_path = out / "checkpoints" / "step_2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["args"], state["manifest"]
    os.remove(out / "checkpoints" / "step_2" / "manifest.json")
    state_path.write_text(json.dumps(state))
    os.remove(out / "args.json")
    with pytest.raises(ValueError) as error:
        run_main(assets, out, *SHORT, *resume, "--num_clusters", "6")
    message = str(error.value)
    assert "holds a model of another shape" in message and "num_clusters" in message
    assert "clustering.centroid_vectors [4, 32] in the checkpoint, [6, 32] here" in message
    assert "size mismatch for" not in message


def test_resume_on_another_process_count_continues_at_the_right_sample(assets, tmp_path):
    """A checkpoint taken after 1 step of 2 processes x 4 (8 samples) resumed on 1 process must skip 2
    batches of 4, not 1, and continue the schedule where it stood; here it then equals an uninterrupted run.

    The 2-process checkpoint is a 1-process one after 2 steps (the same 8 samples, the same model and
    optimiser state) whose position in the epoch is rewritten as the 2-process run records it, without
    ``samples_in_epoch`` as in older checkpoints. Its global step stays 2, so that step-numbered events
    (the dead-cluster re-seeding every 2 steps) fall where they do in the uninterrupted run."""
    straight = run_main(assets, tmp_path / "straight", *SHORT, "--max_steps", "4")
    out = tmp_path / "run"
    first = run_main(assets, out, *SHORT, "--max_steps", "2")
    state_path = os.path.join(first["last_checkpoint"], "trainer_state.json")
    state = json.loads(open(state_path).read())
    state.update(num_processes=2, step_in_epoch=1)
    state.pop("samples_in_epoch", None)
    with open(state_path, "w") as f:
        json.dump(state, f)
    write_manifest(first["last_checkpoint"])           # as if written so: the manifest vouches for the edit

    resumed = run_main(assets, out, *SHORT, "--resume_from_checkpoint", "latest")
    # before: 1 batch skipped, so samples 4-7 were trained twice and the epoch took 3 more steps
    assert resumed["global_step"] == 4 and resumed["epoch"] == 1
    expected, actual = model_tensors(straight["final_dir"]), model_tensors(resumed["final_dir"])
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, different[:5]
    state = read_trainer_state(resumed["last_checkpoint"])
    assert state["num_processes"] == 1 and state["step_in_epoch"] == 0 and state["epoch"] == 1


# --------------------------------------------------------------------------------------------------
# a dataset without sentences
# --------------------------------------------------------------------------------------------------

def test_run_without_any_sentence_stops(assets, tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n):
        return datasets.Dataset.from_dict({
            "image": [Image.fromarray(rng.integers(0, 256, (72, 72), dtype=np.uint8)) for _ in range(n)],
            "sentences": [[] for _ in range(n)]}).cast_column("image", datasets.Image())

    pairs = tmp_path / "no_sentences"
    datasets.DatasetDict({"train": split(8), "validation": split(4)}).save_to_disk(str(pairs))
    out = tmp_path / "run"
    # before: the run finished (exit 0) with the global loss at chance. The epoch (2 batches) is shorter than
    # sentence_check_batches (20), so the check decides at its end.
    with pytest.raises(ValueError, match="none of the first 2 train batches holds a sentence") as error:
        run_main(assets, out, *SHORT, "--dataset", str(pairs))
    assert isinstance(error.value, NoSentencesError)
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


@pytest.mark.distributed
def test_two_process_checkpoint_resumes_on_one_process_at_the_right_sample(assets, tmp_path):
    """The same with a real 2-process (gloo) checkpoint: 1 step of 2 x 4 samples, then 1 process skips 2
    batches and needs 2 more steps to finish the epoch of 4 batches (before: it skipped 1 and took 3)."""
    import subprocess
    import sys

    from test_pretrain import ROOT, _free_port

    out = tmp_path / "run"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": ROOT}
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()),
               "-m", "cgns.pretraining", "--config", assets["config"], "--output_dir", str(out),
               *SHORT, "--max_steps", "1"]
    result = subprocess.run(command, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    state = read_trainer_state(str(out / "checkpoints" / "step_1"))
    assert (state["num_processes"], state["step_in_epoch"], state["samples_in_epoch"]) == (2, 1, 8)

    resumed = run_main(assets, out, *SHORT, "--resume_from_checkpoint", "latest")
    assert resumed["global_step"] == 3 and resumed["epoch"] == 1
    assert train_steps(out) == [1, 2, 3]
