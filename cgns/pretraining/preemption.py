"""Graceful preemption (docs/pretraining.md, "Preemption and requeueing").

SIGTERM (how SLURM and Kubernetes preempt), SIGINT (Ctrl-C) and SIGUSR1 (what ``sbatch --signal`` can send
ahead of the time limit) do not kill a pretraining run: :class:`StopRequest` records the signal, the loop
finishes the optimiser step in progress, every process agrees at that step boundary (one all-reduce of the
flag per step, so a signal that reached only some processes stops them all at the same step), a checkpoint
is written there, and the command exits with :data:`PREEMPTED_EXIT_CODE` after writing
``output_dir/preempted.json``. A second signal (one arriving more than :data:`REPEAT_WINDOW_S` after the
first: launchers forward a signal their children also got from the terminal or the scheduler) exits at
once, without a checkpoint, as the signal's default action would.

:func:`exit_with_parent` makes a process started by a launcher (``torchrun``, ``accelerate launch``) receive
SIGTERM when the launcher dies (Linux ``PR_SET_PDEATHSIG``), so no worker trains on after its launcher is
gone; :func:`ignore_stop_signals` keeps DataLoader worker processes alive until the main process, which
owns the checkpoint, has finished.
"""
import ctypes
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Optional

#: exit status of a run stopped by a signal after writing its checkpoint: EX_TEMPFAIL of sysexits.h
#: ("temporary failure, the user is invited to retry"); a requeue script resumes it with
#: ``--resume_from_checkpoint latest``
PREEMPTED_EXIT_CODE = 75
#: the signals that ask for a checkpoint and a clean exit
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
#: a repeat of the signal within this many seconds counts as the same request
REPEAT_WINDOW_S = 2.0
#: written into output_dir by a preempted run, removed when a run starts there
PREEMPTED_FILE = "preempted.json"
# environment variables that only a launcher sets for the process it starts (torchrun and accelerate's
# multi-process launch: TORCHELASTIC_RUN_ID; accelerate's single-process launch: ACCELERATE_USE_CPU)
_LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU")
_PR_SET_PDEATHSIG = 1


def _signals():
    return [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]


def _say(message: str) -> None:
    """Write one line to stderr from a signal handler (no logging: its locks are not re-entrant)."""
    try:
        os.write(2, (message + "\n").encode())
    except OSError:
        pass


class TrainingPreempted(SystemExit):
    """Raised by ``cli.main`` after a signal stopped training and its checkpoint was written; uncaught, the
    process exits with :data:`PREEMPTED_EXIT_CODE`."""

    def __init__(self, message: str, checkpoint: Optional[str], signal_name: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message
        self.checkpoint = checkpoint
        self.signal_name = signal_name

    def __str__(self) -> str:
        return self.message


class StopRequest:
    """Signal handlers for :data:`STOP_SIGNALS` while installed (main thread only): the first signal is
    recorded in :attr:`signal_name`; see the module docstring for the rest."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        self.received_at: Optional[float] = None
        self._previous: Dict[int, Any] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self                  # signal handlers can only be set there (e.g. a run inside a thread)
        for sig in _signals():
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name, self.received_at = name, time.monotonic()
            _say(f"cgns pretrain (process {os.getpid()}): {name} received: finishing the current optimiser step, "
                 f"then writing a checkpoint and exiting with status {PREEMPTED_EXIT_CODE}; a second signal "
                 f"exits at once without one")
            return
        if time.monotonic() - self.received_at < REPEAT_WINDOW_S:
            return                       # the same request, delivered twice
        _say(f"cgns pretrain (process {os.getpid()}): second signal ({name}): exiting at once, no checkpoint")
        self._exit_now(signum)

    @staticmethod
    def _exit_now(signum: int) -> None:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def escalate(self) -> None:
        """From now on the next signal ends the process at once, even inside a blocking call (a
        collective, a file write): the stop signals go back to their default action. Called by a process
        that received a signal once training has stopped and its checkpoint is about to be written; waits
        out the rest of :data:`REPEAT_WINDOW_S` first so that a duplicate of the first signal is not taken
        for a second one."""
        if not self._previous or self.received_at is None:
            return
        remaining = REPEAT_WINDOW_S - (time.monotonic() - self.received_at)
        if remaining > 0:
            time.sleep(remaining)
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)


def stop_agreed(run) -> bool:
    """Whether any process received a stop signal; every process calls this at the same step boundary and
    gets the same answer (a sum over processes, gloo and NCCL alike). Sets ``run.preempted`` and, on a
    process that got the signal itself, lets the next one end it at once (:meth:`StopRequest.escalate`)."""
    import torch

    request = run.stop_request
    if request is None:
        return False
    accelerator = run.accelerator
    flag = float(request.requested)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(torch.tensor([flag], device=accelerator.device), reduction="sum").item()
    if flag > 0:
        run.preempted = request.signal_name or "a signal on another process"
        request.escalate()
        return True
    return False


def write_preempted_file(output_dir: str, run, checkpoint: Optional[str]) -> str:
    """``output_dir/preempted.json``: why and where the run stopped, for requeue scripts behind a launcher
    that reports every failed worker as status 1 (torchrun, accelerate launch)."""
    path = os.path.join(output_dir, PREEMPTED_FILE)
    record = {"signal": run.preempted, "global_step": run.progress.global_step, "checkpoint": checkpoint,
              "exit_code": PREEMPTED_EXIT_CODE, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "resume": "--resume_from_checkpoint latest"}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path


def launched_by_launcher(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return any(name in environ for name in _LAUNCHER_VARIABLES)


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only); returns whether it
    was set. SIGTERM, so the run still stops at a step boundary with a checkpoint."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def ignore_stop_signals(worker_id: Optional[int] = None) -> None:
    """``worker_init_fn`` of the DataLoaders: a worker process ignores the stop signals that a terminal or a
    scheduler sends to the whole process group, and ends with the main process as usual."""
    for sig in _signals():
        signal.signal(sig, signal.SIG_IGN)


__all__ = [
    "PREEMPTED_EXIT_CODE",
    "STOP_SIGNALS",
    "REPEAT_WINDOW_S",
    "PREEMPTED_FILE",
    "TrainingPreempted",
    "StopRequest",
    "stop_agreed",
    "write_preempted_file",
    "launched_by_launcher",
    "exit_with_parent",
    "ignore_stop_signals",
]
