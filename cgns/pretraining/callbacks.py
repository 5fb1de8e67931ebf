"""Training-loop machinery for ``train_pretrain.py``: run state, the two-stage optimisation, atomic
resumable checkpoints and the callbacks (cluster reassignment, stage switch, checkpoint, logging).

Kept out of ``modeling_cgns/`` on purpose: the library knows nothing about Accelerate, file layouts
or training schedules (ARCHITECTURE.md section 1).

Callback protocol: every callback may implement ``on_train_begin(run)``, ``on_epoch_begin(run)``,
``on_step_end(run, micro_batches)`` (after each optimiser step; ``micro_batches`` holds the detached
sentence features of every micro-batch that went into it), ``on_epoch_end(run)``,
``on_evaluate(run, metrics)``, ``on_save(run, checkpoint_dir)``, ``on_train_end(run)`` (normal end only)
and ``close(run)`` (always, also after an error). Callbacks
run on every process, in list order, because some of them use collectives (cluster update, loss
averaging) that every rank must enter; only the main process writes files or prints.
"""
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from accelerate.logging import get_logger

logger = get_logger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")


# --------------------------------------------------------------------------------------------------
# run state
# --------------------------------------------------------------------------------------------------

class TrainingProgress:
    """Where training stands. Saved as ``trainer_state.json`` inside every checkpoint (beside the
    model, optimiser, scheduler and RNG states of ``accelerator.save_state``) and read back on resume.

    ``stage`` is the stage whose optimiser is live (and saved); ``epoch`` counts epochs over both
    stages; ``step_in_epoch`` counts the micro-batches of ``epoch`` already consumed (what
    ``skip_first_batches`` skips on resume); ``global_step`` counts optimiser steps;
    ``skipped_steps`` counts the steps whose optimiser update was skipped for a non-finite gradient.
    """

    def __init__(self):
        self.stage = 1
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.skipped_steps = 0

    def state_dict(self) -> Dict[str, int]:
        return {"stage": self.stage, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.stage = int(state["stage"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))     # absent in older checkpoints

    def __repr__(self) -> str:
        return f"TrainingProgress({self.state_dict()})"


@dataclass
class PretrainingRun:
    """Everything the loop and the callbacks share for one run."""

    args: Any                                  # train_pretrain.PretrainingConfig (model, data, training)
    accelerator: Any
    model: torch.nn.Module                     # prepared (possibly DDP-wrapped)
    processor: Any
    train_dataloader: Any
    eval_dataloader: Any
    train_sampler: Any                         # the per-epoch seeded sampler behind train_dataloader
    output_dir: str
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    optimizer: Any = None
    scheduler: Any = None
    should_stop: bool = False
    step_logs: Dict[str, float] = field(default_factory=dict)   # extra per-step metrics from callbacks
    last_checkpoint: Optional[str] = None
    # (step, path) of the checkpoints of this run's own history in output_dir, oldest first: rotation
    # deletes only these, never a checkpoint some other run left there
    checkpoint_history: List[Tuple[int, str]] = field(default_factory=list)
    last_train_logs: Dict[str, float] = field(default_factory=dict)
    last_eval_metrics: Dict[str, float] = field(default_factory=dict)
    text_cache: Any = None                     # modeling_cgns.text_cache.FrozenTextFeatureCache when enabled

    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def training_args(self):
        return self.args.training

    @property
    def total_epochs(self) -> int:
        return self.training_args.stage1_epochs + self.training_args.stage2_epochs

    @property
    def updates_per_epoch(self) -> int:
        # accelerate syncs at the end of the dataloader, so a partial accumulation window still steps
        return math.ceil(len(self.train_dataloader) / self.training_args.gradient_accumulation_steps)

    @property
    def total_updates(self) -> int:
        total = self.total_epochs * self.updates_per_epoch
        max_steps = self.training_args.max_steps
        return min(total, max_steps) if max_steps > 0 else total

    @property
    def global_batch_size(self) -> int:
        t = self.training_args
        return t.per_device_train_batch_size * t.gradient_accumulation_steps * self.accelerator.num_processes


def fire(callbacks: Sequence["Callback"], event: str, run: PretrainingRun, **kwargs) -> None:
    for callback in callbacks:
        getattr(callback, event)(run, **kwargs)


# --------------------------------------------------------------------------------------------------
# two-stage optimisation (ALGORITHM.md C)
# --------------------------------------------------------------------------------------------------

def stage_of_epoch(epoch: int, stage1_epochs: int) -> int:
    """Stage 1 (no reconstruction) for epochs 0 .. stage1_epochs - 1, stage 2 (CM-MIR) afterwards."""
    return 1 if epoch < stage1_epochs else 2


def stage_parameters(model: torch.nn.Module, stage: int) -> List[torch.nn.Parameter]:
    """Trainable parameters of a stage: stage 1 leaves out the CM-MIR decoder and the image mask token
    (they get no gradient in stage 1, and Adam's weight decay must not shrink them); stage 2 trains all."""
    excluded = set()
    if stage == 1 and getattr(model, "decoder", None) is not None:
        excluded = {id(p) for p in model.decoder.parameters()} | {id(model.image_mask_token)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in excluded]


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, start_factor: float) -> float:
    """LR multiplier of pl_bolts' LinearWarmupCosineAnnealingLR stepped per iteration (C): linear from
    ``start_factor`` to 1 over ``warmup_steps``, then cosine from 1 to 0 at ``total_steps``."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """LR lambda as a callable object rather than a closure, so LambdaLR's state_dict saves and restores
    its three numbers with the checkpoint."""

    def __init__(self, warmup_steps: int, total_steps: int, start_factor: float):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.start_factor = start_factor

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps, self.start_factor)


def build_stage_optimization(model: torch.nn.Module, stage: int, training_args, updates_per_epoch: int
                             ) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Fresh Adam (not AdamW, C) over the stage's parameters + its own warm-up/cosine schedule."""
    t = training_args
    optimizer = torch.optim.Adam(stage_parameters(model, stage), lr=t.learning_rate,
                                 weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, stage_schedule(t, stage, updates_per_epoch))
    return optimizer, scheduler


def stage_schedule(training_args, stage: int, updates_per_epoch: int) -> WarmupCosine:
    """The stage's warm-up + cosine LR multiplier, in optimiser steps of ``updates_per_epoch`` per epoch."""
    t = training_args
    stage_epochs = t.stage1_epochs if stage == 1 else t.stage2_epochs
    total_steps = max(1, stage_epochs * updates_per_epoch)
    warmup_steps = min(total_steps, max(0, round(t.warmup_epochs * updates_per_epoch)))
    return WarmupCosine(warmup_steps, total_steps, t.warmup_start_factor)


def _unregister(registry: list, obj) -> None:
    # Accelerate has no public call to drop one prepared optimizer/scheduler (free_memory drops the
    # model and dataloaders too). Without this, save_state would also save the previous stage's
    # optimiser, and a resumed run (which only builds the current one) could not load the checkpoint.
    for i, item in enumerate(registry):
        if item is obj:
            del registry[i]
            return


def prepare_stage(run: PretrainingRun, stage: int) -> None:
    """Build and ``accelerator.prepare`` the optimiser and scheduler of ``stage``, replacing the old ones."""
    accelerator = run.accelerator
    if run.optimizer is not None:
        _unregister(accelerator._optimizers, run.optimizer)
        _unregister(accelerator._schedulers, run.scheduler)
        run.model.zero_grad(set_to_none=True)
    optimizer, scheduler = build_stage_optimization(run.unwrapped_model, stage, run.training_args,
                                                    run.updates_per_epoch)
    run.optimizer, run.scheduler = accelerator.prepare(optimizer, scheduler)
    run.progress.stage = stage
    num_params = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    logger.info(f"stage {stage}: fresh Adam over {num_params:,} parameters, "
                f"{'with' if stage == 2 and run.unwrapped_model.decoder is not None else 'without'} CM-MIR "
                f"reconstruction, "
                f"warm-up {run.training_args.warmup_epochs:g} epoch(s) then cosine to 0")


# --------------------------------------------------------------------------------------------------
# checkpoints: accelerate save_state, written atomically
# --------------------------------------------------------------------------------------------------

def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS_DIRNAME)


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints as (global step, path), oldest first. A ``step_N.tmp`` folder (a save that
    did not finish) never counts, nor does a folder without its trainer state."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(value: Optional[str], output_dir: str) -> Optional[str]:
    """``None`` -> no resume; ``"latest"`` -> newest complete checkpoint in ``output_dir`` (or ``None``
    if there is none yet); otherwise a checkpoint folder, which must be complete."""
    if not value:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    if not os.path.isfile(os.path.join(value, TRAINER_STATE_NAME)):
        raise ValueError(f"--resume_from_checkpoint {value!r} is not a complete checkpoint folder "
                         f"(no {TRAINER_STATE_NAME}); pass 'latest' or a folder like "
                         f"{os.path.join(checkpoints_root(output_dir), 'step_100')}")
    return value


def read_trainer_state(checkpoint_dir: str) -> Dict[str, Any]:
    with open(os.path.join(checkpoint_dir, TRAINER_STATE_NAME)) as f:
        return json.load(f)


class NonFiniteStateError(RuntimeError):
    """A parameter or buffer (k-means state included) is NaN or infinite: no checkpoint is written."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (typically a full disk); the partial checkpoint has been removed."""


def nonfinite_tensors(model: torch.nn.Module) -> List[str]:
    """Names of the floating-point parameters and buffers that hold a NaN or an infinity."""
    return [name for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def free_space(path: str) -> str:
    """Free space on the disk holding ``path``, for error messages ("1.2 GiB")."""
    try:
        free = float(shutil.disk_usage(path).free)
    except OSError:
        return "an unknown amount of space"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.1f} {unit}"
        free /= 1024


def save_checkpoint(run: PretrainingRun) -> str:
    """``accelerator.save_state`` into ``step_N.tmp``, then rename to ``step_N``.

    The rename is atomic, so a crash while saving leaves the previous checkpoints untouched and the
    half-written folder is never picked by ``latest``. A save that fails with an exception (a full
    disk) removes its partial folder and raises :class:`CheckpointWriteError`; a model holding a
    non-finite parameter or k-means buffer is never saved (:class:`NonFiniteStateError`). Keeps the
    newest ``save_total_limit`` checkpoints of this run's own history.
    """
    accelerator = run.accelerator
    root = checkpoints_root(run.output_dir)
    final = os.path.join(root, f"step_{run.progress.global_step}")
    tmp = final + ".tmp"
    # Every rank holds the same parameters and centroids, so every rank raises here together.
    bad = nonfinite_tensors(run.unwrapped_model)
    if bad:
        raise NonFiniteStateError(
            f"not writing {final}: {len(bad)} tensor(s) are NaN or infinite ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); the last good checkpoint is {run.last_checkpoint or 'none'}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):          # left behind by an interrupted save
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
    except Exception as error:           # torch reports a full disk as RuntimeError, safetensors as OSError
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointWriteError(
            f"could not write checkpoint {final} ({reason}); {free_space(root)} free on the disk of {root}. "
            f"The partial checkpoint was removed; the last complete one is {run.last_checkpoint or 'none'}. "
            f"Free disk space (or lower --save_total_limit), then resume with --resume_from_checkpoint latest"
        ) from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        t = run.training_args
        state = {**run.progress.state_dict(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "num_processes": accelerator.num_processes,
                 # progress in samples, so a resume on another number of processes starts at the right one
                 "samples_in_epoch": run.progress.step_in_epoch * t.per_device_train_batch_size
                 * accelerator.num_processes,
                 "train_logs": run.last_train_logs, "eval_metrics": run.last_eval_metrics}
        if hasattr(run.args, "to_dict"):
            state["args"] = run.args.to_dict()      # what a resume compares its own arguments with
        with open(os.path.join(tmp, TRAINER_STATE_NAME), "w") as f:
            json.dump(state, f, indent=2)
        if os.path.exists(final):        # only when a run re-saves a step it already saved
            shutil.rmtree(final)
        os.replace(tmp, final)
    history = sorted([(step, path) for step, path in run.checkpoint_history if path != final]
                     + [(run.progress.global_step, final)])
    keep = run.training_args.save_total_limit
    if keep > 0:
        if accelerator.is_main_process:
            for _, path in history[:-keep]:
                shutil.rmtree(path, ignore_errors=True)
        history = history[-keep:]
    run.checkpoint_history = history
    accelerator.wait_for_everyone()
    run.last_checkpoint = final
    return final


# --------------------------------------------------------------------------------------------------
# callbacks
# --------------------------------------------------------------------------------------------------

class Callback:
    """No-op base: override the events you need."""

    def on_train_begin(self, run: PretrainingRun) -> None:
        pass

    def on_epoch_begin(self, run: PretrainingRun) -> None:
        pass

    def on_step_end(self, run: PretrainingRun, micro_batches: List[Dict[str, torch.Tensor]]) -> None:
        pass

    def on_epoch_end(self, run: PretrainingRun) -> None:
        pass

    def on_evaluate(self, run: PretrainingRun, metrics: Dict[str, float]) -> None:
        pass

    def on_save(self, run: PretrainingRun, checkpoint_dir: str) -> None:
        pass

    def on_train_end(self, run: PretrainingRun) -> None:
        pass

    def close(self, run: PretrainingRun) -> None:
        """Release resources (progress bars, files); runs after training even when it failed."""


class StageSwitchCallback(Callback):
    """At the start of epoch ``stage1_epochs`` build stage 2's fresh optimiser and schedule (C).

    Acting at epoch *begin* (not at the end of the last stage-1 epoch) makes a resume from the
    stage-1 end-of-epoch checkpoint switch exactly like an uninterrupted run.
    """

    def on_epoch_begin(self, run: PretrainingRun) -> None:
        stage = stage_of_epoch(run.progress.epoch, run.training_args.stage1_epochs)
        if stage != run.progress.stage:
            logger.info(f"epoch {run.progress.epoch}: switching from stage {run.progress.stage} "
                        f"to stage {stage}")
            prepare_stage(run, stage)


class ClusterReassignmentCallback(Callback):
    """After each optimiser step: ``model.after_optimizer_step`` (B.3, ARCHITECTURE 4).

    That clamps the logit scale in place, applies the k-means updates of the step's micro-batches when
    ``cluster_update_timing="after_step"`` (with the default "before_loss" the forward already did them,
    one per micro-batch) and, every ``reassign_every`` steps, re-seeds dead centroids. Every rank runs
    it (the updates all-reduce, so all ranks hold the same centroids). Publishes the clustering
    diagnostics to ``run.step_logs``.
    """

    def __init__(self, reassign_every: int):
        self.reassign_every = reassign_every
        self.reassigned_total = 0

    def on_step_end(self, run: PretrainingRun, micro_batches: List[Dict[str, torch.Tensor]]) -> None:
        model = run.unwrapped_model
        reassign = self.reassign_every > 0 and run.progress.global_step % self.reassign_every == 0
        stats = model.after_optimizer_step(reassign_dead=reassign)
        if not model.config.use_clustering:
            return
        reassigned = int(stats.pop("reassigned", 0))
        self.reassigned_total += reassigned
        if reassigned:
            logger.info(f"step {run.progress.global_step}: re-seeded {reassigned} dead cluster(s)")
        stats["reassigned_total"] = float(self.reassigned_total)
        run.step_logs.update({f"cluster/{name}": float(value) for name, value in stats.items()})


class CheckpointCallback(Callback):
    """Saves every ``save_steps`` optimiser steps, at every epoch end and when training stops early."""

    def __init__(self, save_steps: int, callbacks: Sequence[Callback] = ()):
        self.save_steps = save_steps
        self.callbacks = callbacks        # told via on_save
        self.saved_step = -1

    def _save(self, run: PretrainingRun) -> None:
        if self.saved_step == run.progress.global_step:
            return
        path = save_checkpoint(run)
        self.saved_step = run.progress.global_step
        logger.info(f"saved checkpoint {path}")
        fire(self.callbacks, "on_save", run, checkpoint_dir=path)

    def on_train_begin(self, run: PretrainingRun) -> None:
        # a resumed run must not re-save the step it was loaded from
        self.saved_step = run.progress.global_step

    def on_step_end(self, run: PretrainingRun, micro_batches) -> None:
        if self.save_steps > 0 and run.progress.global_step % self.save_steps == 0:
            self._save(run)

    def on_epoch_end(self, run: PretrainingRun) -> None:
        self._save(run)

    def on_train_end(self, run: PretrainingRun) -> None:
        self._save(run)


class LoggingCallback(Callback):
    """What a person watches: a tqdm bar (main process), ``metrics.jsonl``, Accelerate trackers
    (TensorBoard) and, at the end, ``loss_curves.png``.

    Train losses are averaged over the ``logging_steps`` window and over processes.
    """

    def __init__(self, logging_steps: int):
        self.logging_steps = max(1, logging_steps)
        self.window: Dict[str, torch.Tensor] = {}
        self.window_counts: Dict[str, int] = {}       # steps that had the term (CM-MIR starts mid-window)
        self.window_steps = 0
        self.window_start = time.perf_counter()
        self.bar = None

    # ---------------------------------------------------------------- helpers
    def _metrics_path(self, run: PretrainingRun) -> str:
        return os.path.join(run.output_dir, "metrics.jsonl")

    def _write(self, run: PretrainingRun, record: Dict[str, Any]) -> None:
        if run.accelerator.is_main_process:
            with open(self._metrics_path(run), "a") as f:
                f.write(json.dumps(record) + "\n")

    def _add_step(self, micro_batches: List[Dict[str, Any]]) -> None:
        """Adds one optimiser step's loss terms (mean over its micro-batches) to the logging window."""
        for record in micro_batches:
            for name, value in record["losses"].items():
                self.window[name] = self.window.get(name, 0.0) + value / len(micro_batches)
        for name in micro_batches[0]["losses"]:
            self.window_counts[name] = self.window_counts.get(name, 0) + 1
        self.window_steps += 1

    # ---------------------------------------------------------------- events
    def on_train_begin(self, run: PretrainingRun) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=run.total_updates, initial=min(run.progress.global_step, run.total_updates),
                        desc=f"stage {run.progress.stage}", unit="step", dynamic_ncols=True,
                        disable=not run.accelerator.is_local_main_process)
        self.window_start = time.perf_counter()

    def on_epoch_begin(self, run: PretrainingRun) -> None:
        if self.bar is not None:
            self.bar.set_description(
                f"stage {run.progress.stage} epoch {run.progress.epoch + 1}/{run.total_epochs}")

    def on_step_end(self, run: PretrainingRun, micro_batches) -> None:
        self._add_step(micro_batches)
        if self.bar is not None:
            self.bar.update(1)
        step = run.progress.global_step
        if step % self.logging_steps and not run.should_stop:
            return
        names = sorted(self.window)
        means = torch.stack([torch.as_tensor(self.window[n], dtype=torch.float32).to(run.accelerator.device)
                             for n in names])
        means = means / torch.tensor([self.window_counts[n] for n in names], dtype=torch.float32,
                                     device=means.device)
        means = run.accelerator.reduce(means, reduction="mean")
        elapsed = time.perf_counter() - self.window_start
        logs = {n: float(v) for n, v in zip(names, means.tolist())}
        logs["lr"] = float(run.scheduler.get_last_lr()[0])
        logs["samples_per_second"] = self.window_steps * run.global_batch_size / max(elapsed, 1e-9)
        logs.update(run.step_logs)
        self.window, self.window_counts, self.window_steps = {}, {}, 0
        self.window_start = time.perf_counter()
        run.last_train_logs = logs
        epoch = run.progress.epoch + run.progress.step_in_epoch / max(1, len(run.train_dataloader))
        self._write(run, {"split": "train", "step": step, "epoch": round(epoch, 4),
                          "stage": run.progress.stage, **logs})
        run.accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
        if self.bar is not None:
            short = {k.replace("_loss", ""): f"{v:.3g}" for k, v in logs.items() if k.endswith("loss")}
            short.update(lr=f"{logs['lr']:.2e}", sps=f"{logs['samples_per_second']:.1f}")
            self.bar.set_postfix(short, refresh=False)

    def on_evaluate(self, run: PretrainingRun, metrics: Dict[str, float]) -> None:
        step = run.progress.global_step
        self._write(run, {"split": "eval", "step": step, "epoch": run.progress.epoch,
                          "stage": run.progress.stage, **metrics})
        run.accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        terms = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("loss"))
        retrieval = " ".join(f"{k} {metrics[k]:.3f}" for k in ("i2t_acc1", "i2t_acc5", "t2i_acc1", "t2i_acc5")
                             if k in metrics)
        message = (f"eval after epoch {run.progress.epoch}/{run.total_epochs} (stage {run.progress.stage}, "
                   f"step {step}): {terms} | {retrieval}")
        if self.bar is not None and not self.bar.disable:
            self.bar.write(message)
        logger.info(message)

    def close(self, run: PretrainingRun) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, run: PretrainingRun) -> None:
        self.close(run)
        if run.accelerator.is_main_process and os.path.isfile(self._metrics_path(run)):
            plot_loss_curves(self._metrics_path(run), os.path.join(run.output_dir, "loss_curves.png"))


def read_metrics(path: str) -> Tuple[Dict[int, dict], Dict[int, dict]]:
    """(train records by step, eval records by step); later lines win, so a resumed run's
    re-logged steps replace the ones logged before the interruption."""
    train, evals = {}, {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                (train if record.get("split") == "train" else evals)[record["step"]] = record
    return train, evals


def plot_loss_curves(metrics_path: str, png_path: str) -> str:
    """One panel per loss term: train (line) and validation (markers) against the optimiser step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path)
    records = list(train.values()) + list(evals.values())
    names = sorted({k for rec in records for k in rec if k.endswith("loss")}, key=lambda n: (n != "loss", n))
    if not names:
        return png_path
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for records, style, label in ((train, "-", "train"), (evals, "o--", "validation")):
            points = sorted((s, r[name]) for s, r in records.items() if name in r)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, markersize=4)
        ax.set_title(name)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


__all__ = [
    "TrainingProgress",
    "PretrainingRun",
    "fire",
    "stage_of_epoch",
    "stage_parameters",
    "warmup_cosine_factor",
    "WarmupCosine",
    "build_stage_optimization",
    "stage_schedule",
    "prepare_stage",
    "checkpoints_root",
    "list_checkpoints",
    "resolve_checkpoint",
    "read_trainer_state",
    "save_checkpoint",
    "NonFiniteStateError",
    "CheckpointWriteError",
    "nonfinite_tensors",
    "free_space",
    "Callback",
    "StageSwitchCallback",
    "ClusterReassignmentCallback",
    "CheckpointCallback",
    "LoggingCallback",
    "read_metrics",
    "plot_loss_curves",
]
