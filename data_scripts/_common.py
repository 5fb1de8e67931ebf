"""Shared pieces of the dataset builders: task specs, bad-input accounting, deterministic sampling.

See docs/data_contract.md for the contract every builder follows.
"""
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

PROBLEM_TYPES = (
    "multi_label_classification",
    "single_label_classification",
    "detection",
    "segmentation",
    "pretraining",
)


class DatasetFormatError(ValueError):
    """The folder is not the named dataset, or nothing usable remains after validation."""


@dataclass(frozen=True)
class TaskSpec:
    """What a (dataset, task) pair provides: problem type, label names and the protocol metric."""

    problem_type: str
    label_names: Sequence[str] = ()
    metric: Optional[str] = None

    def __post_init__(self):
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class Manifest:
    """Counts and lists every item a builder skipped or repaired, by reason.

    Nothing is dropped silently: the manifest is written beside the prepared data and printed.
    """

    dataset: str
    task: str
    skipped: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    repaired: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    rows: Dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, item: str) -> None:
        self.skipped[reason].append(str(item))

    def repair(self, reason: str, item: str) -> None:
        self.repaired[reason].append(str(item))

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "task": self.task,
            "rows": dict(self.rows),
            "skipped_counts": {k: len(v) for k, v in sorted(self.skipped.items())},
            "repaired_counts": {k: len(v) for k, v in sorted(self.repaired.items())},
            "skipped": {k: sorted(v) for k, v in sorted(self.skipped.items())},
            "repaired": {k: sorted(v) for k, v in sorted(self.repaired.items())},
        }

    def write(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "manifest.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)
        return path

    def summary(self) -> str:
        lines = [f"{self.dataset}/{self.task}: " + ", ".join(f"{k}={v}" for k, v in self.rows.items())]
        if self.skipped:
            lines.append(f"  skipped {self.num_skipped} item(s):")
            lines += [f"    {k}: {len(v)}" for k, v in sorted(self.skipped.items())]
        if self.repaired:
            lines.append("  repaired:")
            lines += [f"    {k}: {len(v)}" for k, v in sorted(self.repaired.items())]
        return "\n".join(lines)


def check_data_pct(data_pct: float) -> float:
    data_pct = float(data_pct)
    if not (0.0 < data_pct <= 1.0):
        raise ValueError(f"data_pct must be in (0, 1], got {data_pct}")
    return data_pct


def subsample_indices(n: int, data_pct: float, seed: int) -> np.ndarray:
    """Deterministic subsample of ``range(n)``: ``max(1, round(data_pct * n))`` sorted indices.

    Uses numpy's PCG64 generator, whose stream is fixed across platforms and versions, so the
    same (n, data_pct, seed) selects the same rows on every machine.
    """
    data_pct = check_data_pct(data_pct)
    if data_pct >= 1.0 or n == 0:
        return np.arange(n)
    k = max(1, int(round(data_pct * n)))
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    return np.sort(perm[:k])


def subsample_train(dataset_dict, data_pct: float, seed: int):
    """Apply ``subsample_indices`` to the ``train`` split of a DatasetDict only."""
    data_pct = check_data_pct(data_pct)
    if data_pct >= 1.0 or "train" not in dataset_dict:
        return dataset_dict
    train = dataset_dict["train"]
    dataset_dict["train"] = train.select(subsample_indices(len(train), data_pct, seed).tolist())
    return dataset_dict


def label_balance(values) -> Dict[str, int]:
    return dict(Counter(values))



# ---------------------------------------------------------------------------------------------
# Helpers for the image builders (rsna, siim, object_cxr): PNG storage, sklearn-compatible
# splits, prepare-then-load with the manifest copied to <cache_dir>/<name>/<task>/manifest.json.
# ---------------------------------------------------------------------------------------------


def resize_longest(image, max_size: Optional[int], resample=None):
    """Downsize a PIL image so its longest side is at most ``max_size`` (aspect kept; never upsizes).

    ``max_size`` None or <= 0 keeps the image as it is. ``resample`` defaults to bilinear
    (antialiased when shrinking); use ``PIL.Image.NEAREST`` for label masks.
    """
    from PIL import Image

    if not max_size or max_size <= 0 or max(image.size) <= max_size:
        return image
    w, h = image.size
    scale = max_size / max(w, h)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return image.resize(size, Image.BILINEAR if resample is None else resample)


def encode_png(image, max_size: Optional[int] = None, resample=None) -> bytes:
    """PNG bytes of a PIL image or uint8 array, optionally downsized with ``resize_longest``."""
    import io

    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = resize_longest(image, max_size, resample)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sklearn_test_count(n: int, test_size) -> int:
    """Number of held-out items ``sklearn.model_selection.train_test_split`` takes for ``test_size``.

    A float is a fraction (``ceil(test_size * n)``, the same float arithmetic as sklearn), an int
    an absolute count.
    """
    if isinstance(test_size, (float, np.floating)):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"fractional test_size must be in (0, 1), got {test_size}")
        return int(np.ceil(float(test_size) * n))
    if not 0 <= int(test_size) <= n:
        raise ValueError(f"test_size {test_size} out of range for {n} items")
    return int(test_size)


def sklearn_holdout_split(items: Sequence, test_size, seed: int):
    """``train_test_split(items, test_size=..., random_state=seed)`` without sklearn.

    Identical membership and order to sklearn's (``ShuffleSplit``: a legacy ``RandomState(seed)``
    permutation, the first ``n_test`` items held out), so published splits that were made with
    ``random_state=0`` on the same item order are reproduced exactly. Returns (train, held_out).
    """
    items = list(items)
    n_test = sklearn_test_count(len(items), test_size)
    perm = np.random.RandomState(seed).permutation(len(items))
    return [items[i] for i in perm[n_test:]], [items[i] for i in perm[:n_test]]


def prepare_builder_and_load(builder, name: str, task: str, data_pct: float = 1.0, seed: int = 0,
                             **prepare_kwargs):
    """``download_and_prepare`` + ``as_dataset`` + train-only ``data_pct`` for an already built builder.

    For builders that write ``manifest.json`` into their own Arrow cache folder at the end of
    generation (so it also lists what was found while writing): the manifest is copied to
    ``<cache_root>/<name>/<task>/manifest.json`` (the contract's location), also on a cache hit.
    """
    import shutil

    data_pct = check_data_pct(data_pct)
    builder.download_and_prepare(**prepare_kwargs)
    src = os.path.join(builder.cache_dir, "manifest.json")
    if os.path.exists(src):
        dst_dir = os.path.join(builder._cache_dir_root, name, task)
        os.makedirs(dst_dir, exist_ok=True)
        shutil.copyfile(src, os.path.join(dst_dir, "manifest.json"))
    return subsample_train(builder.as_dataset(), data_pct, seed)


def write_manifest(manifest: "Manifest", directory: str, **extra) -> str:
    """``Manifest.write`` plus extra top-level keys (e.g. ``label_balance``) in the same JSON file."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "manifest.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**manifest.to_dict(), **extra}, f, indent=2, default=str)
    os.replace(tmp, path)
    return path


def manifest_summary(d: dict) -> str:
    """Human-readable summary of a manifest dict (rows, label balance, skipped/repaired counts)."""
    lines = [f"{d.get('dataset')}/{d.get('task')}: rows " + ", ".join(f"{k}={v}" for k, v in d.get("rows", {}).items())]
    for split, bal in d.get("label_balance", {}).items():
        lines.append(f"  {split} label balance: " + ", ".join(f"{k}={v}" for k, v in bal.items()))
    for key, title in (("skipped_counts", "skipped"), ("repaired_counts", "repaired")):
        counts = d.get(key, {})
        if counts:
            lines.append(f"  {title} {sum(counts.values())} item(s):")
            lines += [f"    {k}: {v}" for k, v in counts.items()]
    if not d.get("skipped_counts"):
        lines.append("  skipped: none")
    return "\n".join(lines)


def read_builder_manifest(builder) -> dict:
    """The manifest dict a builder wrote beside its prepared data ({} if none)."""
    path = os.path.join(builder.cache_dir, "manifest.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------
# Generic helpers for builders: image validation, grouped hold-outs, manifest placement, the
# prepare-then-load sequence and the CLI. All optional; builders may use any subset.
# ------------------------------------------------------------------------------------------------

REASON_MISSING_IMAGE = "missing image file"
REASON_UNREADABLE_IMAGE = "unreadable image"
REASON_TRUNCATED_IMAGE = "truncated image"


def check_image_file(path: str) -> Optional[str]:
    """Return ``None`` when ``path`` decodes completely with PIL, else the skip reason.

    Reasons: ``REASON_MISSING_IMAGE`` (no such file), ``REASON_TRUNCATED_IMAGE`` (PIL reports a
    truncated file), ``REASON_UNREADABLE_IMAGE`` (anything else PIL cannot decode). The full pixel
    data is loaded, so truncation is caught (unless ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` was
    switched on globally by someone else).
    """
    from PIL import Image as PILImage

    if not os.path.isfile(path):
        return REASON_MISSING_IMAGE
    try:
        with PILImage.open(path) as im:
            im.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unusable image"
        return REASON_TRUNCATED_IMAGE if "truncated" in str(exc).lower() else REASON_UNREADABLE_IMAGE
    return None


def validate_image_files(paths, num_workers: Optional[int] = None) -> Dict[str, Optional[str]]:
    """``check_image_file`` for many paths (threaded; PIL decoders release the GIL).

    Returns ``{path: None or reason}`` for every distinct path.
    """
    from concurrent.futures import ThreadPoolExecutor

    unique = sorted(set(paths))
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    if workers <= 1 or len(unique) < 32:
        return {p: check_image_file(p) for p in unique}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(unique, pool.map(check_image_file, unique, chunksize=16)))


def read_image_bytes(path: str) -> dict:
    """The value to store in an ``Image()`` column: the file's bytes, no path.

    The path is left out on purpose: ``Image.encode_example`` drops the bytes when the path exists
    relative to the current directory, and an absolute path would make the cache machine-specific.
    Keep the relative path in an id column instead.
    """
    with open(path, "rb") as f:
        return {"bytes": f.read(), "path": None}


def grouped_holdout(groups: Sequence[str], target: int, seed: int) -> set:
    """Choose whole groups (e.g. patients) whose items add up to about ``target``, deterministically.

    ``groups`` holds one group id per item. Groups are visited in a seeded PCG64 permutation of
    their sorted ids; a group is taken when it still fits under ``target`` (so the total never
    exceeds ``target`` unless the first visited group alone does, and at least one group is taken
    when ``target > 0``). A group is therefore never split between the hold-out and the rest.
    """
    counts = Counter(str(g) for g in groups)
    names = sorted(counts)
    if target <= 0 or not names:
        return set()
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(names))
    chosen, total = set(), 0
    for i in order:
        if total >= target:
            break
        name = names[i]
        if total + counts[name] <= target:
            chosen.add(name)
            total += counts[name]
    if not chosen:
        chosen.add(names[order[0]])
    return chosen


def manifest_dir(cache_root: str, name: str, task: str) -> str:
    """Where the contract puts the manifest: ``<cache_dir>/<name>/<task>/``."""
    return os.path.join(cache_root, name, task)


def write_builder_manifest(builder, manifest: Manifest, verbose: bool = True) -> None:
    """Write ``manifest`` inside the builder's (incomplete) output dir and at the contract path.

    Call it from ``_split_generators`` once the scan is done: the copy in the output dir then
    travels with the prepared Arrow files, the one under ``<cache_dir>/<name>/<task>/`` is the
    latest build of that task. Prints the summary unless ``verbose`` is false.
    """
    output_dir = getattr(builder, "_output_dir", None)
    if output_dir and "://" not in str(output_dir):
        manifest.write(output_dir)
    cache_root = getattr(builder, "_cache_dir_root", None)
    if cache_root and "://" not in str(cache_root):
        manifest.write(manifest_dir(cache_root, manifest.dataset, manifest.task))
    if verbose:
        print(manifest.summary(), flush=True)


def read_manifest(cache_root: str, name: str, task: str) -> Optional[dict]:
    path = os.path.join(manifest_dir(cache_root, name, task), "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def prepare_and_load(builder_cls, task: str, data_dir, data_pct: float = 1.0, seed: int = 0,
                     cache_dir=None, download_mode=None, **options):
    """Instantiate ``builder_cls`` for ``task``, prepare it once (cached), and return a DatasetDict.

    ``options`` become attributes of the task's BuilderConfig (an unknown option is an error);
    ``data_pct`` subsamples the train split only (``subsample_train``).
    """
    check_data_pct(data_pct)
    if data_dir is None:
        raise DatasetFormatError(f"{builder_cls.__module__}: data_dir is required")
    data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
    if not os.path.isdir(data_dir):
        raise DatasetFormatError(f"data_dir {data_dir!r} is not a folder")
    options = {k: v for k, v in options.items() if v is not None}
    builder = builder_cls(config_name=task, data_dir=data_dir, cache_dir=cache_dir, **options)
    builder.download_and_prepare(download_mode=download_mode)
    return subsample_train(builder.as_dataset(), data_pct, seed)


def describe_dataset(dataset_dict, spec: Optional[TaskSpec] = None) -> str:
    """Rows per split and label balance (positives per label, counts per class, or sentences)."""
    lines = []
    for split, ds in dataset_dict.items():
        line = f"  {split}: {len(ds)} rows"
        feats = ds.features
        if "labels" in feats and len(ds):
            feat = feats["labels"]
            labels = ds["labels"]
            if hasattr(feat, "names") and hasattr(feat, "int2str"):
                counts = Counter(feat.int2str(int(v)) for v in labels)
                line += "; " + ", ".join(f"{n}={counts.get(n, 0)}" for n in feat.names)
            else:
                arr = np.asarray(list(labels), dtype=np.float64).reshape(len(ds), -1)
                names = list(spec.label_names) if spec and len(spec.label_names) == arr.shape[1] \
                    else [str(i) for i in range(arr.shape[1])]
                line += "; positives: " + ", ".join(f"{n}={int(c)}" for n, c in zip(names, arr.sum(0)))
        elif "sentences" in feats and len(ds):
            n_sent = [len(s) for s in ds["sentences"]]
            line += f"; sentences per report: mean {np.mean(n_sent):.2f}, max {max(n_sent)}"
        lines.append(line)
    return "\n".join(lines)


def _parse_option(text: str):
    if "=" not in text:
        raise ValueError(f"--option expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except ValueError:
        pass
    return key.strip(), value


def run_cli(name: str, load_fn, tasks: Dict[str, TaskSpec], argv=None, description: str = "") -> int:
    """Shared CLI: ``--data_dir D --output_dir O [--task T] [--data_pct P] [--seed S] [--option K=V]``.

    Prepares the data into ``O`` (used as the cache dir), copies the manifest to ``O/manifest.json``
    and prints rows per split, label balance and skipped items per reason. Returns an exit code
    (2 when the folder is not the named dataset).
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=f"python -m data_scripts.{name}", description=description)
    parser.add_argument("--data_dir", required=True, help="folder holding the published files")
    parser.add_argument("--output_dir", required=True, help="where the prepared Arrow data and manifest go")
    parser.add_argument("--task", default=next(iter(tasks)), choices=list(tasks))
    parser.add_argument("--data_pct", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="builder option (value parsed as JSON when possible); repeatable")
    args = parser.parse_args(argv)
    options = dict(_parse_option(o) for o in args.option)
    try:
        ds = load_fn(data_dir=args.data_dir, task=args.task, data_pct=args.data_pct, seed=args.seed,
                     cache_dir=args.output_dir, **options)
    except DatasetFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = read_manifest(args.output_dir, name, args.task)
    print(f"{name}/{args.task}")
    print(describe_dataset(ds, tasks[args.task]))
    if manifest is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        skipped = manifest.get("skipped_counts", {})
        print(f"  skipped {sum(skipped.values())} item(s)" + (":" if skipped else ""))
        for reason, count in skipped.items():
            print(f"    {reason}: {count}")
        for reason, count in manifest.get("repaired_counts", {}).items():
            print(f"  repaired {reason}: {count}")
        print(f"  manifest: {os.path.join(args.output_dir, 'manifest.json')}")
    return 0


__all__ = [
    "DatasetFormatError",
    "REASON_MISSING_IMAGE",
    "REASON_UNREADABLE_IMAGE",
    "REASON_TRUNCATED_IMAGE",
    "check_image_file",
    "validate_image_files",
    "read_image_bytes",
    "grouped_holdout",
    "manifest_dir",
    "write_builder_manifest",
    "read_manifest",
    "prepare_and_load",
    "describe_dataset",
    "run_cli",
    "TaskSpec",
    "Manifest",
    "check_data_pct",
    "subsample_indices",
    "subsample_train",
    "label_balance",
    "PROBLEM_TYPES",
    "resize_longest",
    "encode_png",
    "sklearn_test_count",
    "sklearn_holdout_split",
    "prepare_builder_and_load",
    "read_builder_manifest",
    "write_manifest",
    "manifest_summary",
]
