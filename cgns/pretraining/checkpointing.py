"""Everything about a run's output folder and its checkpoints, in one place.

* output-dir policy: :func:`prepare_output_dir` decides, before anything is written, whether this run
  starts fresh or resumes, and refuses (or with ``--overwrite_output_dir`` deletes) what would mix runs;
* resume checks: the arguments a checkpoint was trained with (:func:`stored_args`) against this run's;
* one writer per output folder: :func:`lock_output_dir` (the run lock of :mod:`~cgns.pretraining.lock`);
* save / list / resolve / load: :func:`save_checkpoint` (``accelerator.save_state`` written atomically,
  sealed with a manifest, rotated), :func:`list_checkpoints`, :func:`resolve_checkpoint` (``latest``: the
  newest intact checkpoint, or a folder, verified by :func:`verify_checkpoint`), :func:`load_checkpoint` and
  :func:`restore` (state, progress counters, another process count).
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import time
import zipfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from .arguments import PretrainingConfig
from .lock import OutputDirLock, OutputDirLockedError
from .optimization import stage_schedule
from .state import PretrainingRun

logger = get_logger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
_PARTIAL_RE = re.compile(r"^step_\d+\.tmp$")
MANIFEST_NAME = "manifest.json"
# A resume without its process's RNG file only warns (load_checkpoint), so a manifest lets these be absent;
# present, they must match like every other file.
_OPTIONAL_FILE_RE = re.compile(r"^random_states_\d+\.pkl$")
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
    beside it (their future would mix with this run's), a resume from a damaged checkpoint named explicitly
    (:func:`verify_checkpoint`), and a resume whose arguments differ from the checkpoint's in a field that
    breaks exact resume. ``--overwrite_output_dir`` deletes the earlier run's outputs (fresh start) or the
    newer checkpoints (resume) instead of refusing. ``latest`` takes the newest intact checkpoint; damaged
    newer ones are renamed ``step_N.corrupt`` (kept for inspection, never resumed or rotated). Partial
    ``step_N.tmp`` folders of interrupted saves are deleted: the caller holds the run lock
    (:func:`lock_output_dir`), so no other run is writing them.

    The main process decides (it reads the checksums, renames and deletes); the others get its answer, or
    its error.
    """
    resume_dir = _on_main_process(accelerator, lambda: _decide_output_dir(config))
    accelerator.wait_for_everyone()
    return resume_dir


def _decide_output_dir(config: PretrainingConfig) -> Optional[str]:
    t = config.training
    damaged: List[str] = []
    if t.resume_from_checkpoint == "latest":
        resume_dir, skipped = find_intact_checkpoint(t.output_dir)
        damaged = [path for path, _ in skipped]
        if resume_dir is None and skipped:
            reasons = "; ".join(f"{os.path.basename(path)}: {error.file} {error.reason}" for path, error in skipped)
            raise CheckpointIntegrityError(
                f"--resume_from_checkpoint latest: no intact checkpoint in {checkpoints_root(t.output_dir)} "
                f"({reasons}). Start over with --overwrite_output_dir true (deletes them) or in another "
                f"--output_dir", skipped[0][0], skipped[0][1].file, skipped[0][1].reason)
    else:
        resume_dir = resolve_checkpoint(t.resume_from_checkpoint, t.output_dir)
    existing = [(step, path) for step, path in list_checkpoints(t.output_dir) if path not in damaged]
    remove: List[str] = []
    how = ("pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir true to delete it and "
           "start over, or choose another --output_dir")
    if resume_dir is None:
        if existing and not t.overwrite_output_dir:
            raise FileExistsError(f"{t.output_dir} holds checkpoints of an earlier run (newest: "
                                  f"{existing[-1][1]}); a fresh run there would mix with it: {how}")
        if t.overwrite_output_dir:
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
    for path in remove:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if remove:
        logger.warning(f"--overwrite_output_dir: deleted {', '.join(remove)}")
    for path in damaged:
        aside = _set_aside(path)
        logger.warning(f"renamed the damaged checkpoint {path} to {os.path.basename(aside)}: it is never resumed "
                       f"or rotated; inspect it or delete it")
    for path in partial_checkpoints(t.output_dir):
        size = _folder_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        logger.warning(f"deleted {path} ({size / 2 ** 20:.1f} MiB), the partial checkpoint of an interrupted save")
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


def partial_checkpoints(output_dir: str) -> List[str]:
    """The ``step_N.tmp`` folders of saves that did not finish."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, name) for name in os.listdir(root)
                  if _PARTIAL_RE.match(name) and os.path.isdir(os.path.join(root, name)))


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


def _set_aside(checkpoint_dir: str) -> str:
    """Rename a damaged ``step_N`` to ``step_N.corrupt`` (``step_N.corrupt2``, ... if taken)."""
    target, n = checkpoint_dir + ".corrupt", 1
    while os.path.exists(target):
        n += 1
        target = f"{checkpoint_dir}.corrupt{n}"
    os.rename(checkpoint_dir, target)
    return target


def find_intact_checkpoint(output_dir: str) -> Tuple[Optional[str], List[Tuple[str, "CheckpointIntegrityError"]]]:
    """The newest checkpoint of ``output_dir`` that passes :func:`verify_checkpoint` (``None`` if none does),
    and the newer ones that failed, newest first; each skipped one gets a warning naming the file and why."""
    skipped: List[Tuple[str, CheckpointIntegrityError]] = []
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            _verify_and_warn(path)
        except CheckpointIntegrityError as error:
            logger.warning(f"--resume_from_checkpoint latest: skipping {path}: {error.file} {error.reason}")
            skipped.append((path, error))
            continue
        if skipped:
            logger.warning(f"--resume_from_checkpoint latest: resuming from {path}, the newest intact checkpoint")
        return path, skipped
    return None, skipped


def resolve_checkpoint(value: Optional[str], output_dir: str) -> Optional[str]:
    """``None`` -> no resume; ``"latest"`` -> the newest intact checkpoint in ``output_dir``
    (:func:`find_intact_checkpoint`; ``None`` if there is none yet); otherwise a checkpoint folder, which must be
    complete and intact (:class:`CheckpointIntegrityError` names the damaged file and what is wrong with it)."""
    if not value:
        return None
    if value == "latest":
        return find_intact_checkpoint(output_dir)[0]
    if not os.path.isfile(os.path.join(value, TRAINER_STATE_NAME)):
        raise ValueError(f"--resume_from_checkpoint {value!r} is not a complete checkpoint folder "
                         f"(no {TRAINER_STATE_NAME}); pass 'latest' or a folder like "
                         f"{os.path.join(checkpoints_root(output_dir), 'step_100')}")
    try:
        _verify_and_warn(value)
    except CheckpointIntegrityError as error:
        raise CheckpointIntegrityError(
            f"cannot resume from {value}: {error.file} {error.reason}. Resume from another checkpoint "
            f"(--resume_from_checkpoint latest takes the newest intact one)", value, error.file, error.reason
        ) from None
    return value


def read_trainer_state(checkpoint_dir: str) -> Dict[str, Any]:
    with open(os.path.join(checkpoint_dir, TRAINER_STATE_NAME)) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------
# integrity: a manifest of sizes and checksums, written last, verified before a resume
# --------------------------------------------------------------------------------------------------

class CheckpointIntegrityError(ValueError):
    """A checkpoint's file is missing, truncated, changed since it was written, or unparsable.
    ``checkpoint_dir``, ``file`` and ``reason`` say which and why."""

    def __init__(self, message: str, checkpoint_dir: str = "", file: str = "", reason: str = ""):
        super().__init__(message)
        self.checkpoint_dir, self.file, self.reason = checkpoint_dir, file, reason


def _damaged(checkpoint_dir: str, file: str, reason: str) -> CheckpointIntegrityError:
    return CheckpointIntegrityError(f"{checkpoint_dir} is damaged: {file} {reason}", checkpoint_dir, file, reason)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass                     # some filesystems do not fsync directories; the files themselves are synced
    finally:
        os.close(fd)


def _checkpoint_files(checkpoint_dir: str) -> List[str]:
    """Every file of a checkpoint folder except the manifest, as sorted paths relative to it."""
    found = []
    for folder, _, names in os.walk(checkpoint_dir):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), checkpoint_dir)
            if not relative.startswith(MANIFEST_NAME):
                found.append(relative)
    return sorted(found)


def write_manifest(checkpoint_dir: str) -> Dict[str, Any]:
    """Flush every file of a checkpoint folder to disk, then record each one's size and SHA-256 in
    ``manifest.json`` (flushed too). Written last, it vouches for everything written before it."""
    files = {}
    for name in _checkpoint_files(checkpoint_dir):
        with open(os.path.join(checkpoint_dir, name), "rb") as f:
            os.fsync(f.fileno())
            files[name] = {"size": os.fstat(f.fileno()).st_size,
                           "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    manifest = {"format": 1, "files": files}
    path = os.path.join(checkpoint_dir, MANIFEST_NAME)
    with open(path + ".partial", "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".partial", path)
    for folder, _, _ in os.walk(checkpoint_dir):
        _fsync_dir(folder)
    return manifest


def _read_manifest(checkpoint_dir: str) -> Optional[Dict[str, Tuple[int, str]]]:
    """file -> (size, sha256) from ``manifest.json``; ``None`` when the folder has none."""
    path = os.path.join(checkpoint_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        entries = {str(name): (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise _damaged(checkpoint_dir, MANIFEST_NAME, f"is unparsable ({type(error).__name__}: {error})") from None
    for name in entries:
        if os.path.isabs(name) or ".." in name.split(os.sep):
            raise _damaged(checkpoint_dir, MANIFEST_NAME, f"is unparsable (it lists {name!r}, outside the folder)")
    return entries


def verify_checkpoint(checkpoint_dir: str) -> bool:
    """Check a checkpoint folder before it is resumed; raise :class:`CheckpointIntegrityError` naming the first
    bad file and what is wrong (missing, size, checksum, unparsable).

    ``True``: every file its manifest lists has the recorded size and SHA-256 (a missing
    ``random_states_<rank>.pkl`` is left to :func:`load_checkpoint`'s warning). ``False``: a checkpoint of an
    earlier version, without a manifest, whose structure was checked instead (:func:`check_structure`)."""
    entries = _read_manifest(checkpoint_dir)
    if entries is None:
        state = _parse_trainer_state(checkpoint_dir)
        if state.get("manifest") == MANIFEST_NAME:
            raise _damaged(checkpoint_dir, MANIFEST_NAME, f"is missing (its {TRAINER_STATE_NAME} records one)")
        check_structure(checkpoint_dir)
        return False
    present = {}
    for name, (size, _) in sorted(entries.items()):          # sizes first: cheap, and most damage is truncation
        path = os.path.join(checkpoint_dir, name)
        if not os.path.isfile(path):
            if _OPTIONAL_FILE_RE.match(os.path.basename(name)):
                continue
            raise _damaged(checkpoint_dir, name, "is missing")
        actual = os.path.getsize(path)
        if actual != size:
            raise _damaged(checkpoint_dir, name, f"has {actual} bytes, the manifest records {size} (truncated or "
                                                 f"overwritten)")
        present[name] = path
    for name, path in present.items():
        found, recorded = file_sha256(path), entries[name][1]
        if found != recorded:
            raise _damaged(checkpoint_dir, name, f"fails its checksum (sha256 {found[:16]}..., the manifest "
                                                 f"records {recorded[:16]}...): its content changed after it "
                                                 f"was written")
    return True


def _parse_trainer_state(checkpoint_dir: str) -> Dict[str, Any]:
    try:
        state = read_trainer_state(checkpoint_dir)
    except FileNotFoundError:
        raise _damaged(checkpoint_dir, TRAINER_STATE_NAME, "is missing") from None
    except ValueError as error:
        raise _damaged(checkpoint_dir, TRAINER_STATE_NAME, f"is unparsable ({error})") from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise _damaged(checkpoint_dir, TRAINER_STATE_NAME, "is unparsable (no global_step)")
    return state


def _check_safetensors(checkpoint_dir: str, name: str) -> None:
    path = os.path.join(checkpoint_dir, name)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(checkpoint_dir, name, f"is truncated ({size} bytes, shorter than a safetensors header)")
        header_size = struct.unpack("<Q", head)[0]
        if 8 + header_size > size:
            raise _damaged(checkpoint_dir, name, f"is truncated ({size} bytes, its header alone needs "
                                                 f"{8 + header_size})")
        try:
            header = json.loads(f.read(header_size))
            end = max([int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"],
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            raise _damaged(checkpoint_dir, name, f"is unparsable (safetensors header: {error})") from None
    if 8 + header_size + end != size:
        raise _damaged(checkpoint_dir, name, f"has {size} bytes, its header describes {8 + header_size + end} "
                                             f"(truncated)")


def _check_archive(checkpoint_dir: str, name: str) -> None:
    """A ``torch.save`` file is a zip archive with a CRC-32 per member: truncation or a changed byte shows."""
    try:
        with zipfile.ZipFile(os.path.join(checkpoint_dir, name)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise _damaged(checkpoint_dir, name, f"is unparsable (not a readable torch archive: {error})") from None
    if bad is not None:
        raise _damaged(checkpoint_dir, name, f"fails the CRC check of its member {bad}")


def check_structure(checkpoint_dir: str) -> None:
    """The checks a checkpoint without manifest (written by an earlier version) gets: ``trainer_state.json``
    parses, ``model.safetensors`` exists and every ``.safetensors`` file is as long as its header says, and every
    ``.bin`` / ``.pkl`` (``torch.save`` archives) passes its CRC check. A changed byte inside a safetensors
    tensor goes unnoticed: only a manifest catches that."""
    _parse_trainer_state(checkpoint_dir)
    files = _checkpoint_files(checkpoint_dir)
    if "model.safetensors" not in files:
        raise _damaged(checkpoint_dir, "model.safetensors", "is missing")
    for name in files:
        if name.endswith(".safetensors"):
            _check_safetensors(checkpoint_dir, name)
        elif name.endswith((".bin", ".pkl")):
            _check_archive(checkpoint_dir, name)


def _verify_and_warn(checkpoint_dir: str) -> None:
    if not verify_checkpoint(checkpoint_dir):
        logger.warning(f"{checkpoint_dir} has no {MANIFEST_NAME} (written before checkpoints carried one): only "
                       f"its structure was checked (no file missing or truncated, the torch archives' CRCs); a "
                       f"changed byte in the model weights would go unnoticed")


# --------------------------------------------------------------------------------------------------
# one decision for every process, and the run lock
# --------------------------------------------------------------------------------------------------

# errors the main process's decision may raise, re-raised with the same class on the other processes
_SHARED_ERRORS = {cls.__name__: cls for cls in (ValueError, FileExistsError, FileNotFoundError, OSError,
                                                 RuntimeError, CheckpointIntegrityError, OutputDirLockedError)}


def _broadcast_json(accelerator: Accelerator, value: Any) -> Any:
    """The main process's JSON-able ``value`` on every process (as bytes in a tensor: nothing is unpickled)."""
    from accelerate.utils import broadcast

    device = accelerator.device
    payload = json.dumps(value).encode() if accelerator.is_main_process else b""
    length = broadcast(torch.tensor([len(payload)], dtype=torch.long, device=device))
    data = torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    if accelerator.is_main_process:
        data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    data = broadcast(data)
    return json.loads(bytes(data.cpu().tolist()).decode())


def _on_main_process(accelerator: Accelerator, decide: Callable[[], Any]) -> Any:
    """``decide()`` on the main process only; every process returns its (JSON-able) result, or raises its
    error (same class and message), so no process goes on alone into a collective the others never reach."""
    if accelerator.num_processes == 1:
        return decide()
    outcome, error = None, None
    if accelerator.is_main_process:
        try:
            outcome = {"value": decide()}
        except Exception as raised:      # every error, or the other processes would wait in the broadcast
            outcome, error = {"error": type(raised).__name__, "message": str(raised)}, raised
    outcome = _broadcast_json(accelerator, outcome)
    if "error" not in outcome:
        return outcome["value"]
    if error is not None:
        raise error
    raise _SHARED_ERRORS.get(outcome["error"], RuntimeError)(f"(from the main process) {outcome['message']}")


@contextlib.contextmanager
def lock_output_dir(output_dir: str, accelerator: Accelerator) -> Iterator[None]:
    """Hold ``output_dir``'s run lock (:class:`~cgns.pretraining.lock.OutputDirLock`, taken by the main process)
    for the body: a second run on the folder is refused with :class:`OutputDirLockedError` naming the process
    that holds it, on every process; a stale lock (its run is gone) is taken over with a warning."""
    lock = OutputDirLock(output_dir, logger)

    def take() -> None:
        lock.acquire()

    _on_main_process(accelerator, take)
    try:
        yield
    finally:
        lock.release()            # a no-op where not held


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
    """``accelerator.save_state`` into ``step_N.tmp``, sealed with ``manifest.json`` (every file's size and
    SHA-256, written last, after the files are flushed to disk), then renamed to ``step_N``.

    The rename is atomic, so a crash while saving leaves the previous checkpoints untouched and the
    half-written folder is never picked by ``latest``; damage after the save is caught on resume by the
    manifest (:func:`verify_checkpoint`). A save that fails with an exception (a full
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
        state["manifest"] = MANIFEST_NAME             # so a lost manifest is noticed, not taken for an old checkpoint
        with open(os.path.join(tmp, TRAINER_STATE_NAME), "w") as f:
            json.dump(state, f, indent=2)
        write_manifest(tmp)              # last, after every file is on disk
        if os.path.exists(final):        # only when a run re-saves a step it already saved
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
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
    "partial_checkpoints",
    "find_intact_checkpoint",
    "resolve_checkpoint",
    "read_trainer_state",
    "MANIFEST_NAME",
    "CheckpointIntegrityError",
    "file_sha256",
    "write_manifest",
    "verify_checkpoint",
    "check_structure",
    "lock_output_dir",
    "OutputDirLockedError",
    "NonFiniteStateError",
    "CheckpointWriteError",
    "nonfinite_tensors",
    "free_space",
    "save_checkpoint",
    "load_checkpoint",
    "adapt_to_process_count",
    "restore",
]
