"""Everything about a run's output folder and its checkpoints, in one place.

* output-dir policy: :func:`prepare_output_dir` decides, before anything is written, whether this run
  starts fresh or resumes, and refuses (or with ``--overwrite_output_dir`` deletes) what would mix runs;
* resume checks: the arguments a checkpoint was trained with (:func:`stored_args`) against this run's;
* save / list / resolve / load: :func:`save_checkpoint` (``accelerator.save_state`` written atomically,
  rotated), :func:`list_checkpoints`, :func:`resolve_checkpoint` (``latest`` or a folder),
  :func:`load_checkpoint` and :func:`resume` (state, progress counters, another process count).
"""
import json
import os
import re
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from .arguments import PretrainingConfig
from .optimization import stage_schedule
from .state import PretrainingRun

logger = get_logger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
METRICS_FILE = "metrics.jsonl"
LOSS_CURVES_FILE = "loss_curves.png"


# Arguments a resume may change: they decide what is logged, saved or evaluated (and where), or how fast the
# data loads, but not the optimisation. Every other field is baked into the checkpoint (optimiser, schedule,
# data order, model shapes) or would change the run's trajectory, so a change is refused.
RESUME_SAFE_FIELDS = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "logging_steps", "save_steps",
    "save_total_limit", "report_to", "do_eval", "per_device_eval_batch_size", "max_steps",
    "dataloader_num_workers", "cache_dir", "data_dir", "gradient_checkpointing", "channels_last", "deterministic",
    "nonfinite_grad", "sentence_check_batches", "log_level", "sentence_meanings"})
# what a run writes into output_dir; --overwrite_output_dir deletes these before a fresh start
RUN_OUTPUTS = (CHECKPOINTS_DIRNAME, "final", "tensorboard", METRICS_FILE, LOSS_CURVES_FILE)


def stored_args(checkpoint_dir: str) -> Tuple[Optional[Dict[str, Any]], str]:
    """(the arguments a checkpoint was trained with, where they were read); ``(None, "")`` if unknown.

    Newer checkpoints carry them in ``trainer_state.json``; older ones have the run's ``args.json`` two
    folders up (``output_dir/checkpoints/step_N``)."""
    state = read_trainer_state(checkpoint_dir)
    if "args" in state:
        return state["args"], os.path.join(checkpoint_dir, "trainer_state.json")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir))), "args.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f), path
    return None, ""


def changed_arguments(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(field, old, new) for every field outside :data:`RESUME_SAFE_FIELDS` whose value changed."""
    new = json.loads(json.dumps(new))          # tuples -> lists, as they were stored
    return [(name, old[name], new[name]) for name in sorted(new)
            if name in old and name not in RESUME_SAFE_FIELDS and old[name] != new[name]]


def checkpoint_step(checkpoint_dir: str) -> int:
    """The step of a checkpoint folder: N of ``step_N``, else its recorded global step."""
    name = os.path.basename(os.path.normpath(checkpoint_dir))
    if re.fullmatch(r"step_\d+", name):
        return int(name[len("step_"):])
    return int(read_trainer_state(checkpoint_dir)["global_step"])


def prepare_output_dir(config: PretrainingConfig, accelerator: Accelerator) -> Optional[str]:
    """Decide, before anything is written, which checkpoint to resume from (``None``: a fresh start).

    Refuses a fresh start over an earlier run's checkpoints, a resume from a checkpoint with newer ones
    beside it (their future would mix with this run's), and a resume whose arguments differ from the
    checkpoint's in a field that breaks exact resume. ``--overwrite_output_dir`` deletes the earlier
    run's outputs (fresh start) or the newer checkpoints (resume) instead of refusing.
    """
    t = config.training
    resume_dir = resolve_checkpoint(t.resume_from_checkpoint, t.output_dir)
    existing = list_checkpoints(t.output_dir)
    remove: List[str] = []
    how = ("pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir true to delete it and "
           "start over, or choose another --output_dir")
    if resume_dir is None:
        if existing:
            if not t.overwrite_output_dir:
                raise FileExistsError(f"{t.output_dir} holds checkpoints of an earlier run (newest: "
                                      f"{existing[-1][1]}); a fresh run there would mix with it: {how}")
            remove = [os.path.join(t.output_dir, name) for name in RUN_OUTPUTS]
    else:
        old, source = stored_args(resume_dir)
        if old is None:
            logger.warning(f"{resume_dir} records no training arguments: cannot check that this resume uses "
                           f"the same ones")
        else:
            changed = changed_arguments(old, config.to_dict())
            if changed:
                listing = "; ".join(f"{name}: {before!r} -> {after!r}" for name, before, after in changed)
                raise ValueError(
                    f"cannot resume {resume_dir} with changed arguments ({listing}): the checkpoint's model, "
                    f"optimiser, schedule and data position follow the old values (in {source}). Resume with "
                    f"the old values, or start a fresh run in another --output_dir. Only "
                    f"{', '.join(sorted(RESUME_SAFE_FIELDS - {'output_dir', 'resume_from_checkpoint'}))} "
                    f"may change on resume")
        resume_step = checkpoint_step(resume_dir)
        newer = [path for step, path in existing if step > resume_step]
        if newer:
            if not t.overwrite_output_dir:
                raise FileExistsError(
                    f"resuming from {resume_dir}, but {t.output_dir} holds newer checkpoints "
                    f"({', '.join(os.path.basename(p) for p in newer)}) that this run would mix with: pass "
                    f"--overwrite_output_dir true to delete them, or resume from the newest")
            remove = newer
    remove = [path for path in remove if os.path.exists(path)]
    if remove and accelerator.is_main_process:
        for path in remove:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        logger.warning(f"--overwrite_output_dir: deleted {', '.join(remove)}")
    accelerator.wait_for_everyone()
    return resume_dir


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
        if hasattr(run.config, "to_dict"):
            state["args"] = run.config.to_dict()      # what a resume compares its own arguments with
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


# a mismatched checkpoint tensor -> the arguments that set its shape
_SHAPE_FIELDS = (("clustering.", "num_clusters / cluster_queue_size / projection_dim"),
                 ("decoder.", "decoder_channels / decoder_layers / decoder_ffn_dim / projection_dim"),
                 ("attention_pool.", "image_size / attention_pool_heads / vision_model"),
                 ("vision_model.", "vision_model"), ("text_model.", "text_model"),
                 ("predictor.", "projection_dim"), ("", "projection_dim"))


def load_checkpoint(run: PretrainingRun, checkpoint_dir: str) -> None:
    """``accelerator.load_state`` with readable errors: a checkpoint of another model shape names the
    argument that differs, and a missing RNG state (exact resume lost) is a warning."""
    accelerator = run.accelerator
    try:
        accelerator.load_state(checkpoint_dir)
    except RuntimeError as error:
        if "size mismatch" not in str(error):
            raise
        shape = r"torch\.Size\((\[[^\]]*\])\)"
        mismatched = re.findall(rf"size mismatch for ([\w.]+): copying a param with shape {shape} from "
                                rf"checkpoint, the shape in current model is {shape}", str(error))
        hints: List[str] = []
        for name, _, _ in mismatched:
            hint = next(hint for prefix, hint in _SHAPE_FIELDS if name.startswith(prefix))
            if hint not in hints:
                hints.append(hint)
        details = "; ".join(f"{name} {old} in the checkpoint, {new} here" for name, old, new in mismatched[:4])
        raise ValueError(f"{checkpoint_dir} holds a model of another shape ({details or 'size mismatch'}): the "
                         f"model arguments differ from the checkpoint's, check {', '.join(hints) or 'them'}; "
                         f"resume with the arguments it was trained with") from None
    rng_file = os.path.join(checkpoint_dir, f"random_states_{accelerator.process_index}.pkl")
    if not os.path.isfile(rng_file):
        logger.warning(f"{rng_file} is missing: process {accelerator.process_index} continues with a fresh RNG "
                       f"state, so dropout and the CM-MIR masks differ from an uninterrupted run",
                       main_process_only=False)


def adapt_to_process_count(run: PretrainingRun, state: Dict[str, Any]) -> None:
    """Re-express a checkpoint written by another number of processes for this one.

    Progress within the epoch is kept in samples: the epoch order is the same on any number of processes
    and global micro-batch k covers its samples [k * B * W, (k + 1) * B * W), so this run skips
    ``samples / (B * W)`` batches per process (rounded down to a whole accumulation window; the rest are
    seen again). The stage's schedule is rebuilt for this run's optimiser steps per epoch and set to the
    same point of the stage.
    """
    accelerator, progress, t = run.accelerator, run.progress, run.training_args
    world, old_world = accelerator.num_processes, int(state.get("num_processes", accelerator.num_processes))
    if world == old_world:
        return
    samples = int(state.get("samples_in_epoch", progress.step_in_epoch * t.per_device_train_batch_size * old_world))
    window = t.per_device_train_batch_size * world * t.gradient_accumulation_steps
    windows = samples // window
    progress.step_in_epoch = windows * t.gradient_accumulation_steps
    repeated = samples - windows * window
    stage_start = 0 if progress.stage == 1 else t.stage1_epochs
    step_in_stage = (progress.epoch - stage_start) * run.updates_per_epoch + windows
    scheduler = run.scheduler.scheduler
    schedule = stage_schedule(t, progress.stage, run.updates_per_epoch)
    scheduler.lr_lambdas = [schedule for _ in scheduler.lr_lambdas]
    scheduler.last_epoch = step_in_stage
    scheduler._last_lr = [base * schedule(step_in_stage) for base in scheduler.base_lrs]
    for group, lr in zip(run.optimizer.param_groups, scheduler._last_lr):
        group["lr"] = lr
    logger.warning(f"the checkpoint was written by {old_world} process(es), this run has {world}: epoch "
                   f"{progress.epoch} continues at sample {samples - repeated} of {samples} consumed"
                   + (f" ({repeated} are seen again: the global batch of {window} does not divide {samples})"
                      if repeated else "")
                   + f"; the schedule continues at step {step_in_stage} of the stage in this run's steps")



def restore(run: PretrainingRun, resume_dir: Optional[str]) -> None:
    """Load ``resume_dir`` into a prepared run whose optimiser is already that checkpoint's stage's; with
    ``None`` (a fresh start) delete an earlier ``metrics.jsonl`` instead, so the log starts afresh."""
    if resume_dir:
        load_checkpoint(run, resume_dir)
        # The progress counters travel as JSON beside the accelerate state, not as a registered custom
        # object: accelerate loads those with weights_only=False (a pickle), which this project never does.
        state = read_trainer_state(resume_dir)
        run.progress.load_state_dict(state)
        adapt_to_process_count(run, state)
        run.last_checkpoint = resume_dir
        if os.path.abspath(os.path.dirname(resume_dir)) == os.path.abspath(checkpoints_root(run.output_dir)):
            run.checkpoint_history = [(step, path) for step, path in list_checkpoints(run.output_dir)
                                      if step <= checkpoint_step(resume_dir)]
        logger.info(f"resumed from {resume_dir}: {run.progress}")
    elif run.accelerator.is_main_process:
        metrics = os.path.join(run.output_dir, METRICS_FILE)
        if os.path.exists(metrics):           # a fresh run starts a fresh log; a resumed one appends
            os.remove(metrics)

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "TRAINER_STATE_NAME",
    "METRICS_FILE",
    "LOSS_CURVES_FILE",
    "RESUME_SAFE_FIELDS",
    "RUN_OUTPUTS",
    "stored_args",
    "changed_arguments",
    "checkpoint_step",
    "prepare_output_dir",
    "checkpoints_root",
    "list_checkpoints",
    "resolve_checkpoint",
    "read_trainer_state",
    "NonFiniteStateError",
    "CheckpointWriteError",
    "nonfinite_tensors",
    "free_space",
    "save_checkpoint",
    "load_checkpoint",
    "adapt_to_process_count",
    "restore",
]
