"""Resume at epoch and stage boundaries, with the text-feature cache, and after a stop signal (issue 26).

End-to-end runs use the tiny setup of test_pretrain.py (1-layer BERT of width 32, resnet18 at 64 px, 16 pairs,
batch 4: 4 optimiser steps per epoch); each compares every tensor of the final model (parameters, the k-means
buffers, the logit scale) with an uninterrupted run, bit for bit. ``--logit_scale_max 10.0001`` puts the cap
just above the initial logit scale (ln 10), so the clamp after each step is live in these runs.
"""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cgns.pretraining import preemption
from cgns.pretraining.checkpointing import list_checkpoints, read_trainer_state
from cgns.pretraining.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_FILE, StopRequest, TrainingPreempted
from modeling_cgns import CGNSModel
from modeling_cgns.text_cache import FrozenTextFeatureCache
from test_pretrain import (ROOT, _free_port, assets, fresh_accelerate_state, model_tensors,  # noqa: F401
                           read_jsonl, run_main)

NO_EVAL = ("--do_eval", "false", "--logit_scale_max", "10.0001")
STAGE1 = ("--stage2_epochs", "0", *NO_EVAL)


def checkpoint_steps(output_dir):
    return [step for step, _ in list_checkpoints(str(output_dir))]


def assert_same_model(expected_run, resumed_run):
    expected, resumed = model_tensors(expected_run["final_dir"]), model_tensors(resumed_run["final_dir"])
    assert set(expected) == set(resumed)
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ after resume: {different[:5]}"
    assert float(resumed["logit_scale"]) <= math.log(10.0001)       # the clamp held in both runs
    return resumed


def train_losses(output_dir):
    records = read_jsonl(os.path.join(output_dir, "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


# --------------------------------------------------------------------------------------------------
# epoch and stage boundaries
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_from_a_stage_end_checkpoint_is_exact(assets, tmp_path):
    """A checkpoint at the last step of stage 1 (= the end of epoch 0) resumes into stage 2 exactly.

    Before: ``NoSentencesError: none of the first 0 train batches holds a sentence`` (the check judged the empty
    rest of the epoch)."""
    straight = run_main(assets, tmp_path / "straight", *NO_EVAL, "--max_steps", "5")
    out = tmp_path / "cut"
    first = run_main(assets, out, *NO_EVAL, "--max_steps", "4")
    state = read_trainer_state(first["last_checkpoint"])
    # --max_steps on an epoch's last step completes that epoch (counted, validated when on): the checkpoint is
    # the boundary itself, stage 1 done and epoch 1 not begun
    assert (state["stage"], state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 0, 4)
    assert state["sentence_check_seen"] == state["sentence_check_found"] == 1     # passed at the first batch

    resumed = run_main(assets, out, *NO_EVAL, "--max_steps", "5", "--resume_from_checkpoint", "latest")
    assert (resumed["global_step"], resumed["stage"], resumed["epoch"]) == (5, 2, 1)
    tensors = assert_same_model(straight, resumed)
    assert bool(tensors["clustering.initialized"]) and int(tensors["clustering.num_updates"]) == 5
    assert train_losses(out) == pytest.approx(train_losses(tmp_path / "straight"), rel=1e-6, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True])
def test_resume_from_epoch_and_stage_end_checkpoints_is_exact_with_validation(assets, tmp_path, cache):
    """Two stage-1 epochs and one stage-2 epoch with validation: cut at the end of epoch 0 (inside stage 1),
    at the end of stage 1 (step 8) and in stage 2, with the text tower frozen and cached or not."""
    extra = ("--stage1_epochs", "2", "--logit_scale_max", "10.0001")
    if cache:
        extra += ("--freeze_text_layers", "-1", "--cache_text_features", "true")
    straight = run_main(assets, tmp_path / "straight", *extra)
    out = tmp_path / "cut"
    for max_steps, expected in ((4, (1, 1, 0)), (8, (1, 2, 0)), (10, (2, 2, 2))):
        summary = run_main(assets, out, *extra, "--max_steps", str(max_steps),
                           *(("--resume_from_checkpoint", "latest") if max_steps > 4 else ()))
        state = read_trainer_state(summary["last_checkpoint"])
        assert (state["stage"], state["epoch"], state["step_in_epoch"]) == expected
    resumed = run_main(assets, out, *extra, "--resume_from_checkpoint", "latest")
    assert resumed["global_step"] == straight["global_step"] == 12
    assert_same_model(straight, resumed)
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["stage"] for r in records if r["split"] == "eval"] == [1, 1, 2]


# --------------------------------------------------------------------------------------------------
# the text-feature cache
# --------------------------------------------------------------------------------------------------

def test_cached_row_does_not_depend_on_the_padding_of_its_first_batch():
    """The root of the inexact cached resume: a report first seen in a batch padded to 20 tokens and one first
    seen padded to 60 must get the same cached features, bit for bit (before: ~1e-7 apart, so a resumed run,
    which first sees some reports in other batches than the uninterrupted run, drifted: 118-120 tensors)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tower = BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=128, max_position_embeddings=128)).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in (10, 17, 31, 32, 45, 59):
        ids = torch.randint(1000, 30000, (n,), generator=generator)
        features = []
        for width in (n + 1, 60, 100):
            cache = FrozenTextFeatureCache(tower).attach()
            padded = torch.zeros(2, width, dtype=torch.long)
            padded[0, :n] = ids
            padded[1, :5] = ids[:5]
            mask = (padded != 0).long()
            with torch.no_grad():
                out = tower(input_ids=padded, attention_mask=mask).last_hidden_state
            features.append(out[0, :n])
            assert torch.all(out[0, n:] == 0)
            cache.detach()
        rows.append(all(torch.equal(features[0], other) for other in features[1:]))
    assert all(rows), rows
    cache = FrozenTextFeatureCache(tower)
    assert [cache.canonical_width(n) for n in (1, 31, 32, 100, 127, 128)] == [32, 32, 64, 128, 128, 128]


@pytest.mark.slow
def test_text_cache_resume_is_exact(assets, tmp_path):
    """Frozen, cached text tower: 2 steps, resume to 6 (into the second epoch, where the cache serves rows
    the resumed run computed in other batches than the uninterrupted one) == 6 steps straight. (This tiny
    setup happens to be exact before the fix too; the padding test above is the one that catches the cause.)"""
    cached = ("--stage1_epochs", "2", *STAGE1, "--freeze_text_layers", "-1", "--cache_text_features", "true",
              "--dataset", _long_reports(assets, tmp_path))
    straight = run_main(assets, tmp_path / "straight", *cached, "--max_steps", "6")
    out = tmp_path / "cut"
    run_main(assets, out, *cached, "--max_steps", "2")
    resumed = run_main(assets, out, *cached, "--max_steps", "6", "--resume_from_checkpoint", "latest")
    assert resumed["global_step"] == 6
    assert_same_model(straight, resumed)


def _long_reports(assets, tmp_path) -> str:
    """The test pairs with 1-9 sentences per report, so that batches are padded to very different widths."""
    import datasets
    import numpy as np

    from test_pretrain import PHRASES

    splits = datasets.load_from_disk(assets["pairs"])
    rng = np.random.default_rng(1)

    def longer(example):
        return {"sentences": list(rng.choice(PHRASES, size=int(rng.integers(1, 10)), replace=False))}

    path = str(tmp_path / "long_reports")
    datasets.DatasetDict({name: split.map(longer, load_from_cache_file=False, keep_in_memory=True)
                          for name, split in splits.items()}).save_to_disk(path)
    return path


# --------------------------------------------------------------------------------------------------
# stop signals
# --------------------------------------------------------------------------------------------------

def _signal_during_forward(monkeypatch, call: int, sig=signal.SIGTERM):
    """Send ``sig`` to this process in the middle of the ``call``-th training forward pass."""
    original_forward = CGNSModel.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        if self.training:
            calls["n"] += 1
            if calls["n"] == call:
                os.kill(os.getpid(), sig)
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(CGNSModel, "forward", forward)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=lambda sig: signal.Signals(sig).name)
def test_stop_signal_checkpoints_at_the_step_boundary_and_resume_is_exact(assets, tmp_path, monkeypatch, sig):
    """A signal during step 4, the last of stage 1 (and of epoch 0), lets the step finish, writes step_4, exits
    with status 75 and a preempted.json; the resume from that stage-end checkpoint switches to stage 2 and equals
    an uninterrupted run (before: SIGTERM killed the run, and a stage-end checkpoint could not be resumed:
    ``NoSentencesError: none of the first 0 train batches holds a sentence``)."""
    straight = run_main(assets, tmp_path / "straight", *NO_EVAL, "--max_steps", "5")
    out = tmp_path / "cut"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    _signal_during_forward(monkeypatch, call=4, sig=sig)
    with pytest.raises(SystemExit) as stopped:
        run_main(assets, out, *NO_EVAL, "--max_steps", "5")
    monkeypatch.undo()
    assert isinstance(stopped.value, TrainingPreempted) and stopped.value.code == PREEMPTED_EXIT_CODE == 75
    assert stopped.value.signal_name == signal.Signals(sig).name
    assert "--resume_from_checkpoint latest" in str(stopped.value)
    assert checkpoint_steps(out) == [4] and not (out / "final").exists()
    state = read_trainer_state(str(out / "checkpoints" / "step_4"))
    # the step was the epoch's last: the epoch is completed (counted, validated when on) before the stop, so the
    # checkpoint is the boundary itself: stage 1 done, epoch 1 not begun (the resume switches to stage 2)
    assert (state["stage"], state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 0, 4)
    record = json.loads((out / PREEMPTED_FILE).read_text())
    assert (record["signal"], record["global_step"], record["exit_code"]) == (signal.Signals(sig).name, 4, 75)
    assert {s: signal.getsignal(s) for s in handlers} == handlers          # the handlers are gone again

    resumed = run_main(assets, out, *NO_EVAL, "--resume_from_checkpoint", "latest", "--max_steps", "5")
    assert (resumed["global_step"], resumed["stage"], resumed["epoch"]) == (5, 2, 1)
    assert not (out / PREEMPTED_FILE).exists()
    tensors = assert_same_model(straight, resumed)
    assert bool(tensors["clustering.initialized"]) and int(tensors["clustering.num_updates"]) == 5
    assert train_losses(out) == pytest.approx(train_losses(tmp_path / "straight"), rel=1e-6, abs=1e-7)


_HANDLER_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from cgns.pretraining import preemption
    preemption.REPEAT_WINDOW_S = float(sys.argv[1])
    request = preemption.StopRequest().install()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)          # a duplicate (a launcher forwarding the same request)
    print("first", request.signal_name, flush=True)
    time.sleep(float(sys.argv[1]) + 0.2)
    os.kill(os.getpid(), signal.SIGINT)            # a second request: exits at once
    time.sleep(5)
    print("survived", flush=True)
""")


def _python(script, *args, **kwargs):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_a_duplicate_signal_is_ignored_and_a_second_one_exits_at_once():
    result = _python(_HANDLER_SCRIPT, 0.3)
    assert "first SIGTERM" in result.stdout and "survived" not in result.stdout
    assert result.returncode == -signal.SIGINT, (result.returncode, result.stderr[-2000:])
    assert "second signal (SIGINT): exiting at once" in result.stderr


def test_escalate_makes_the_next_signal_end_the_process():
    request = StopRequest()
    assert not request.requested
    request.escalate()                     # nothing installed, nothing received: a no-op
    result = _python(textwrap.dedent("""
        import os, signal, time
        from cgns.pretraining import preemption
        preemption.REPEAT_WINDOW_S = 0.1
        request = preemption.StopRequest().install()
        os.kill(os.getpid(), signal.SIGUSR1)
        request.escalate()                 # what a process does once its checkpoint is being written
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("survived", flush=True)
    """))
    assert result.returncode == -signal.SIGTERM and "survived" not in result.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_launched_process_gets_sigterm_when_its_launcher_dies(tmp_path):
    """The worker of a launcher that is killed (SIGKILL: it cannot forward anything) receives SIGTERM and so
    stops at a step boundary with a checkpoint (before: it trained on, orphaned)."""
    marker = tmp_path / "worker_got"
    worker = textwrap.dedent(f"""
        import os, signal, sys, time
        from cgns.pretraining.preemption import exit_with_parent, launched_by_launcher
        assert launched_by_launcher()
        def note(signum, frame):
            open({str(marker)!r}, "w").write(signal.Signals(signum).name)
            sys.exit(0)
        signal.signal(signal.SIGTERM, note)
        assert exit_with_parent()
        print("ready", flush=True)
        time.sleep(60)
    """)
    launcher = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {worker!r}], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "TORCHELASTIC_RUN_ID": "test"}
    parent = subprocess.Popen([sys.executable, "-c", launcher], env=env, stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists() and marker.read_text() == "SIGTERM"
    finally:
        parent.kill()
    deadline = time.monotonic() + 30
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child_pid)
    assert not preemption.launched_by_launcher({"PATH": "/bin"})


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except OSError:
        return False


_RANK_SIGNAL_WRAPPER = '''
import os, signal, sys
sys.path.insert(0, os.environ["PYTHONPATH"])
from modeling_cgns import CGNSModel
from cgns.pretraining import cli

original_forward = CGNSModel.forward
calls = {"n": 0}

def forward(self, *args, **kwargs):
    if self.training and os.environ.get("SIGNAL_RANK") == os.environ["RANK"]:
        calls["n"] += 1
        if calls["n"] == int(os.environ["SIGNAL_CALL"]):
            os.kill(os.getpid(), signal.SIGTERM)
    return original_forward(self, *args, **kwargs)

CGNSModel.forward = forward
cli.main(sys.argv[1:])
'''


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_on_one_of_two_gloo_processes_stops_both_at_a_checkpoint(assets, tmp_path):
    """torchrun x 2 (2 steps per epoch), SIGTERM to rank 1 only, during step 2: both ranks agree at the step
    boundary, write step_2 (with both RNG states) and exit 75; torchrun reports the failure. Resumed with
    torchrun to step 4, the model equals an uninterrupted 2-process run."""
    wrapper = tmp_path / "signal_wrapper.py"
    wrapper.write_text(_RANK_SIGNAL_WRAPPER)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = ("--stage1_epochs", "2", *STAGE1, "--max_steps", "4")

    def launch(out, *extra, signal_rank=None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONPATH": ROOT, "SIGNAL_CALL": "2", "SIGNAL_RANK": "" if signal_rank is None else str(signal_rank)}
        command = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(wrapper),
                   "--config", assets["config"], "--output_dir", str(out), *args, *extra]
        return subprocess.run(command, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900)

    straight = launch(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-4000:]
    out = tmp_path / "cut"
    stopped = launch(out, signal_rank=1)
    assert stopped.returncode != 0
    assert "exitcode  : 75" in stopped.stderr, stopped.stderr[-4000:]
    assert checkpoint_steps(out) == [2]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(out / "checkpoints" / "step_2"))
    assert json.loads((out / PREEMPTED_FILE).read_text())["global_step"] == 2
    resumed = launch(out, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_model({"final_dir": str(tmp_path / "straight" / "final")}, {"final_dir": str(out / "final")})
