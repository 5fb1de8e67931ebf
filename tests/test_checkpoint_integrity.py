"""Checkpoints that prove themselves, and one writer per output folder (issue 26).

A damaged newest checkpoint (truncated, emptied or deleted file, a flipped bit, an unparsable state) made
``--resume_from_checkpoint latest`` crash with a library parse error or, for a flipped bit, resume silently
from the damaged weights; two runs on one output folder interleaved their logs and checkpoints; and
``--overwrite_output_dir`` left partial ``step_N.tmp`` folders behind.

The fault matrix runs on checkpoints of a prepared ``nn.Linear`` with Adam and a schedule (what
``accelerator.save_state`` writes for the real model, in milliseconds); one end-to-end resume per kind of
fault runs on the tiny pretraining setup of test_pretrain.py, the bit flip in the fast tier, the rest slow.
"""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from cgns.pretraining import lock as lock_module
from cgns.pretraining.arguments import parse_args
from cgns.pretraining.checkpointing import (MANIFEST_NAME, CheckpointIntegrityError, file_sha256,
                                            find_intact_checkpoint, prepare_output_dir,
                                            resolve_checkpoint, save_checkpoint, verify_checkpoint)
from cgns.pretraining.lock import LOCK_FILE, OutputDirLock, OutputDirLockedError
from cgns.pretraining.state import PretrainingRun
from test_pretrain import ROOT, _free_port, assets, fresh_accelerate_state, model_tensors, run_main  # noqa: F401

SHORT = ("--stage2_epochs", "0", "--do_eval", "false")     # stage 1 only, no validation


# --------------------------------------------------------------------------------------------------
# checkpoints of a small prepared model, and the ways they get damaged
# --------------------------------------------------------------------------------------------------

def _prepared_run(output_dir):
    """A PretrainingRun whose accelerator has a model, an Adam and a schedule registered: ``save_state`` writes
    model.safetensors, optimizer.bin, scheduler.bin and random_states_0.pkl, as for the real model."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(16, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    training = SimpleNamespace(per_device_train_batch_size=4, save_total_limit=0)
    return PretrainingRun(
        config=SimpleNamespace(training=training), accelerator=accelerator, model=model, processor=None,
        train_dataloader=None, eval_dataloader=None, train_sampler=None, output_dir=str(output_dir),
        optimizer=optimizer, scheduler=scheduler)


def _two_checkpoints(output_dir):
    run = _prepared_run(output_dir)
    paths = []
    for step in (1, 2):
        run.model(torch.randn(4, 16)).pow(2).mean().backward()
        run.optimizer.step()
        run.scheduler.step()
        run.progress.global_step = step
        paths.append(save_checkpoint(run))
    return paths


def _truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def _flip_weight_bit(path):
    """Flip one bit of the last tensor byte of a safetensors file: the header still parses."""
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x10
    open(path, "wb").write(bytes(data))


def _strip_manifest(checkpoint):
    """What an earlier version wrote: no manifest.json, nothing in trainer_state.json about one."""
    os.remove(os.path.join(checkpoint, MANIFEST_NAME))
    state_path = os.path.join(checkpoint, "trainer_state.json")
    state = json.load(open(state_path))
    state.pop("manifest")
    json.dump(state, open(state_path, "w"))


# fault -> (what it does to a checkpoint folder, the file named, a piece of the reason)
FAULTS = {
    "empty_model": (lambda c: _truncate(os.path.join(c, "model.safetensors"), 0), "model.safetensors",
                    "has 0 bytes"),
    "truncated_model": (lambda c: _truncate(os.path.join(c, "model.safetensors")), "model.safetensors",
                        "truncated"),
    "deleted_model": (lambda c: os.remove(os.path.join(c, "model.safetensors")), "model.safetensors",
                      "is missing"),
    "flipped_weight_bit": (lambda c: _flip_weight_bit(os.path.join(c, "model.safetensors")), "model.safetensors",
                           "fails its checksum"),
    "truncated_optimizer": (lambda c: _truncate(os.path.join(c, "optimizer.bin")), "optimizer.bin", "truncated"),
    "truncated_scheduler": (lambda c: _truncate(os.path.join(c, "scheduler.bin")), "scheduler.bin", "truncated"),
    "truncated_trainer_state": (lambda c: _truncate(os.path.join(c, "trainer_state.json")), "trainer_state.json",
                                "truncated"),
    "truncated_rng": (lambda c: _truncate(os.path.join(c, "random_states_0.pkl")), "random_states_0.pkl",
                      "truncated"),
    "truncated_manifest": (lambda c: _truncate(os.path.join(c, MANIFEST_NAME)), MANIFEST_NAME, "is unparsable"),
    "deleted_manifest": (lambda c: os.remove(os.path.join(c, MANIFEST_NAME)), MANIFEST_NAME, "is missing"),
}


def test_checkpoint_carries_a_manifest_of_every_file(tmp_path):
    _, second = _two_checkpoints(tmp_path)
    manifest = json.load(open(os.path.join(second, MANIFEST_NAME)))
    files = manifest["files"]
    # before: no manifest, so nothing could tell a damaged file from a good one
    assert sorted(files) == ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin",
                             "trainer_state.json"]
    for name, entry in files.items():
        path = os.path.join(second, name)
        assert entry == {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    assert json.load(open(os.path.join(second, "trainer_state.json")))["manifest"] == MANIFEST_NAME
    assert verify_checkpoint(second) is True
    assert not any(name.endswith(".partial") for name in os.listdir(second))


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_damaged_checkpoint_is_skipped_by_latest_and_refused_by_name(tmp_path, caplog, fault):
    first, second = _two_checkpoints(tmp_path)
    damage, file, reason = FAULTS[fault]
    damage(second)
    # before: `latest` returned the damaged step_2, and load_state failed with the library's parse error (or, for
    # a flipped bit, loaded the damaged weights silently)
    with caplog.at_level(logging.WARNING):
        found, skipped = find_intact_checkpoint(str(tmp_path))
    assert found == first
    assert [(path, error.file) for path, error in skipped] == [(second, file)]
    assert reason in skipped[0][1].reason
    lines = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(lines) == 1 and second in lines[0] and file in lines[0] and reason in lines[0], lines
    assert resolve_checkpoint("latest", str(tmp_path)) == first

    with pytest.raises(CheckpointIntegrityError) as error:
        resolve_checkpoint(second, str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"cannot resume from {second}: {file} ") and reason in message
    assert (error.value.file, error.value.checkpoint_dir) == (file, second)
    assert resolve_checkpoint(first, str(tmp_path)) == first


def test_missing_rng_file_is_left_to_the_resume_warning(tmp_path):
    """The earlier rule stands: a deleted RNG file only costs exactness and is a warning at load time."""
    _, second = _two_checkpoints(tmp_path)
    os.remove(os.path.join(second, "random_states_0.pkl"))
    assert verify_checkpoint(second) is True


@pytest.mark.parametrize("fault", ["empty_model", "truncated_model", "deleted_model", "truncated_optimizer",
                                   "truncated_scheduler", "truncated_trainer_state", "truncated_rng"])
def test_checkpoint_without_manifest_gets_structural_checks(tmp_path, caplog, fault):
    """Checkpoints of the previous version have no manifest: accepted with a warning when their files are whole,
    skipped when a file is missing or truncated (a flipped bit inside a safetensors tensor goes unnoticed)."""
    first, second = _two_checkpoints(tmp_path)
    for checkpoint in (first, second):
        _strip_manifest(checkpoint)
    with caplog.at_level(logging.WARNING):
        assert verify_checkpoint(second) is False
        assert resolve_checkpoint("latest", str(tmp_path)) == second
    assert any(f"{second} has no {MANIFEST_NAME}" in r.getMessage() for r in caplog.records)

    damage, file, _ = FAULTS[fault]
    damage(second)
    found, skipped = find_intact_checkpoint(str(tmp_path))
    assert found == first and [(path, error.file) for path, error in skipped] == [(second, file)]
    with pytest.raises(CheckpointIntegrityError, match=f"cannot resume from {second}: {file} "):
        resolve_checkpoint(second, str(tmp_path))


def test_changed_byte_in_an_archive_without_manifest_fails_its_crc(tmp_path):
    _, second = _two_checkpoints(tmp_path)
    _strip_manifest(second)
    path = os.path.join(second, "optimizer.bin")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="optimizer.bin"):
        verify_checkpoint(second)


# --------------------------------------------------------------------------------------------------
# the output-dir policy around damaged and partial checkpoints
# --------------------------------------------------------------------------------------------------

def _config(assets, output_dir, *overrides):
    return parse_args(["--config", assets["config"], "--output_dir", str(output_dir), *overrides])


def test_overwrite_and_resume_delete_partial_checkpoints(assets, tmp_path, caplog):
    out = tmp_path / "run"
    partial = out / "checkpoints" / "step_3.tmp"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 4096)          # an interrupted save of an earlier run
    # before: the fresh run with --overwrite_output_dir found no complete checkpoint and kept step_3.tmp
    with caplog.at_level(logging.WARNING):
        prepare_output_dir(_config(assets, out, "--overwrite_output_dir", "true"), Accelerator(cpu=True))
    assert not partial.exists()

    first, _ = _two_checkpoints(out)
    partial.mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        resume_dir = prepare_output_dir(_config(assets, out, "--resume_from_checkpoint", "latest"),
                                        Accelerator(cpu=True))
    assert resume_dir.endswith("step_2") and not partial.exists()
    assert any(f"deleted {partial}" in r.getMessage() and "interrupted save" in r.getMessage()
               for r in caplog.records)


def test_latest_sets_damaged_checkpoints_aside(assets, tmp_path, caplog):
    out = tmp_path / "run"
    first, second = _two_checkpoints(out)
    _truncate(os.path.join(second, "optimizer.bin"))
    # before: step_2 was resumed and torch.load failed on the truncated optimizer.bin; it would also count as a
    # newer checkpoint beside step_1 and block the resume
    with caplog.at_level(logging.WARNING):
        resume_dir = prepare_output_dir(_config(assets, out, "--resume_from_checkpoint", "latest"),
                                        Accelerator(cpu=True))
    assert resume_dir == first
    assert sorted(os.listdir(out / "checkpoints")) == ["step_1", "step_2.corrupt"]
    assert any("renamed the damaged checkpoint" in r.getMessage() for r in caplog.records)

    # now nothing intact is left: refused, not a fresh start
    _flip_weight_bit(os.path.join(first, "model.safetensors"))
    with pytest.raises(CheckpointIntegrityError, match=r"no intact checkpoint in .*step_1: model.safetensors fails"):
        prepare_output_dir(_config(assets, out, "--resume_from_checkpoint", "latest"), Accelerator(cpu=True))


# --------------------------------------------------------------------------------------------------
# end to end: a flipped bit in the newest checkpoint (the fault that used to resume silently)
# --------------------------------------------------------------------------------------------------

def _resume_past_damage(assets, tmp_path, caplog, fault):
    """Two steps with a checkpoint after each; damage step_2; resume `latest` to 2 steps. The resumed run must
    take step_1 and end identical to the uninterrupted run; naming step_2 explicitly is refused."""
    out = tmp_path / "run"
    straight = run_main(assets, out, *SHORT, "--max_steps", "2", "--save_steps", "1")
    expected = model_tensors(straight["final_dir"])
    assert not (out / LOCK_FILE).exists()                      # a clean exit leaves no lock behind
    damage, file, reason = FAULTS[fault]
    damage(str(out / "checkpoints" / "step_2"))

    with pytest.raises(CheckpointIntegrityError, match=f"cannot resume from .*step_2: {file} .*{reason}"):
        run_main(assets, out, *SHORT, "--max_steps", "2",
                 "--resume_from_checkpoint", str(out / "checkpoints" / "step_2"))
    with caplog.at_level(logging.WARNING):
        resumed = run_main(assets, out, *SHORT, "--max_steps", "2", "--save_steps", "1",
                           "--resume_from_checkpoint", "latest")
    skips = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skips) == 1 and "step_2" in skips[0] and file in skips[0], skips
    assert resumed["global_step"] == 2
    actual = model_tensors(resumed["final_dir"])
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, different[:5]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_1", "step_2", "step_2.corrupt"]
    assert verify_checkpoint(str(out / "checkpoints" / "step_2"))
    assert not (out / LOCK_FILE).exists()


def test_resume_latest_falls_back_past_a_flipped_bit(assets, tmp_path, caplog):
    # before: resumed silently from the damaged weights (121 tensors differed at the end of a longer run)
    _resume_past_damage(assets, tmp_path, caplog, "flipped_weight_bit")


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(set(FAULTS) - {"flipped_weight_bit"}))
def test_resume_latest_falls_back_past_each_fault(assets, tmp_path, caplog, fault):
    _resume_past_damage(assets, tmp_path, caplog, fault)


@pytest.mark.slow
def test_resume_from_checkpoints_without_manifest(assets, tmp_path, caplog):
    """Checkpoints of the previous version resume (with a warning); a truncated one is skipped."""
    out = tmp_path / "run"
    straight = run_main(assets, out, *SHORT, "--max_steps", "2", "--save_steps", "1")
    expected = model_tensors(straight["final_dir"])
    for step in (1, 2):
        _strip_manifest(str(out / "checkpoints" / f"step_{step}"))
    _truncate(str(out / "checkpoints" / "step_2" / "optimizer.bin"))
    with caplog.at_level(logging.WARNING):
        resumed = run_main(assets, out, *SHORT, "--max_steps", "2", "--resume_from_checkpoint", "latest")
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipping" in m and "optimizer.bin" in m for m in messages), messages
    assert any("step_1 has no manifest.json" in m for m in messages), messages
    actual = model_tensors(resumed["final_dir"])
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


# --------------------------------------------------------------------------------------------------
# one writer per output folder
# --------------------------------------------------------------------------------------------------

HOLDER = ("import sys; sys.path.insert(0, sys.argv[2]); from cgns.pretraining.lock import OutputDirLock; "
          "OutputDirLock(sys.argv[1]).acquire(); print('locked', flush=True); sys.stdin.read()")


def _hold_lock_in_another_process(output_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output_dir), ROOT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_run_on_a_locked_folder_is_refused_and_a_killed_runs_lock_is_taken_over(assets, tmp_path, caplog):
    out = tmp_path / "run"
    holder = _hold_lock_in_another_process(out)
    try:
        # before: the second run started, and the two interleaved metrics.jsonl and wrote the same checkpoints
        with pytest.raises(OutputDirLockedError) as error:
            run_main(assets, out, *SHORT, "--max_steps", "1")
        message = str(error.value)
        assert f"is in use by another run: process {holder.pid} on host {socket.gethostname()}" in message
        assert "another --output_dir" in message and "\n" not in message
        assert sorted(os.listdir(out)) == [LOCK_FILE]          # nothing else touched
    finally:
        holder.kill()                                         # SIGKILL: no clean-up, the record stays
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid

    logger = logging.getLogger("test_lock")
    with caplog.at_level(logging.WARNING, logger="test_lock"):
        lock = OutputDirLock(str(out), logger).acquire()
    try:
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        lines = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
        assert lines and f"process {holder.pid} no longer exists on this host" in lines[0], lines
    finally:
        lock.release()
    assert not (out / LOCK_FILE).exists()


def test_lock_recorded_by_another_host_is_stale_only_without_heartbeat(tmp_path, caplog):
    """Where flock is not shared between hosts, a lock written on another host is judged by its heartbeat."""
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"host": "gpu-node-17", "pid": 4242, "started": "2026-12-07 03:00:00 UTC"}))
    with pytest.raises(OutputDirLockedError, match="process 4242 on host gpu-node-17.*may not share locks"):
        OutputDirLock(str(tmp_path)).acquire()
    old = time.time() - lock_module.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    logger = logging.getLogger("test_lock")
    with caplog.at_level(logging.WARNING, logger="test_lock"):
        lock = OutputDirLock(str(tmp_path), logger).acquire()
    lock.release()
    assert any("gpu-node-17" in r.getMessage() and "last heartbeat" in r.getMessage() for r in caplog.records)


def test_live_process_record_on_this_host_is_respected(tmp_path):
    """A record naming a live process of this host whose heartbeat is fresh is not taken over."""
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(OutputDirLockedError, match=f"process {os.getppid()} on host.*is alive on this host"):
        OutputDirLock(str(tmp_path)).acquire()


def test_lock_heartbeat_touches_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.05)
    lock = OutputDirLock(str(tmp_path)).acquire()
    try:
        old = time.time() - 1000
        os.utime(tmp_path / LOCK_FILE, (old, old))
        time.sleep(0.5)
        assert time.time() - os.path.getmtime(tmp_path / LOCK_FILE) < 100
    finally:
        lock.release()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_run_on_a_locked_folder_stops_on_every_rank(assets, tmp_path):
    """Only the main process takes the lock; the other rank stops with its message instead of waiting forever."""
    out = tmp_path / "run"
    holder = _hold_lock_in_another_process(out)
    try:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONPATH": ROOT}
        command = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "cgns.pretraining",
                   "--config", assets["config"], "--output_dir", str(out), *SHORT, "--max_steps", "1"]
        result = subprocess.run(command, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count(f"is in use by another run: process {holder.pid}") >= 2, output[-4000:]
    assert "(from the main process)" in output
    assert sorted(os.listdir(out)) == [LOCK_FILE]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_resume_falls_back_past_a_damaged_checkpoint(assets, tmp_path):
    """The main process verifies and tells the other rank which checkpoint to load."""
    out = tmp_path / "run"
    run_main(assets, out, *SHORT, "--max_steps", "2", "--save_steps", "1")
    _truncate(str(out / "checkpoints" / "step_2" / "model.safetensors"))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": ROOT}
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "cgns.pretraining",
               "--config", assets["config"], "--output_dir", str(out), *SHORT, "--max_steps", "2",
               "--resume_from_checkpoint", "latest"]
    result = subprocess.run(command, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "skipping" in result.stderr and "model.safetensors" in result.stderr
    assert sorted(os.listdir(out / "checkpoints")) == ["step_1", "step_2", "step_2.corrupt"]
    assert load_file(str(out / "final" / "model.safetensors"))
    assert not (out / LOCK_FILE).exists()
