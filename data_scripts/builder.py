"""Shared pieces of the dataset builders (docs/data_contract.md).

One way to do each thing, used by every dataset module:

* ``CGNSBuilder``: base class of the builders. It keeps the ``Manifest`` (skipped / repaired items
  by reason), counts rows and label balance per split while examples are generated, and writes
  ``manifest.json`` beside the prepared Arrow files;
* ``prepare_and_load``: what every module's ``load()`` calls: instantiate, prepare once (cached),
  copy the manifest to ``<cache_dir>/<name>/<task>/manifest.json``, subsample train for ``data_pct``;
* ``write_manifest`` / ``read_manifest``: the manifest file (``manifest_dir`` is the contract path);
* ``format_summary``: the one on-screen summary (rows per split, label balance, skipped / repaired);
* ``run_cli``: the one CLI (``--data_dir --output_dir --task --data_pct --seed --option KEY=VALUE``
  plus dataset flags that map to load options);
* input integrity, shared by every builder: ``input_fingerprint`` (what the Arrow cache is keyed
  on), ``resolve_listed_path`` (paths read from list files never leave the data folder),
  ``drop_cross_split_duplicates`` (an image in train and test stays in test only) and
  ``decode_text`` (UTF-8, then the documented fallbacks, counted as repairs);
* helpers: deterministic sampling, image validation and storage, CSV tables, sklearn-compatible and
  grouped hold-outs.
"""
import hashlib
import io
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import datasets
import numpy as np

PROBLEM_TYPES = (
    "multi_label_classification",
    "single_label_classification",
    "detection",
    "segmentation",
    "pretraining",
    "grounding",
)
MANIFEST_FILE = "manifest.json"


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


# ------------------------------------------------------------------------------------------------
# Manifest: bad-input accounting, its file and its on-screen summary
# ------------------------------------------------------------------------------------------------

@dataclass
class Manifest:
    """Counts and lists every item a builder skipped or repaired, by reason, plus rows and label
    balance per split.

    Nothing is dropped silently: the manifest is written beside the prepared data and printed.
    """

    dataset: str
    task: str
    skipped: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    repaired: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    rows: Dict[str, int] = field(default_factory=dict)
    label_balance: Dict[str, Dict[str, float]] = field(default_factory=dict)
    # input units read (e.g. {"train.csv rows": 8000}): with ``rows`` and ``skipped`` every input is
    # accounted for (docs/data_contract.md gives the identity per dataset)
    inputs: Dict[str, int] = field(default_factory=dict)
    fingerprint: Optional[str] = None

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
            "label_balance": {k: dict(v) for k, v in self.label_balance.items()},
            "inputs": dict(self.inputs),
            "inputs_fingerprint": self.fingerprint,
        }


def manifest_dir(cache_root: str, name: str, task: str) -> str:
    """Where the contract puts a task's manifest: ``<cache_dir>/<name>/<task>/``."""
    return os.path.join(cache_root, name, task)


def write_manifest(manifest, directory: str) -> str:
    """Write a ``Manifest`` (or a manifest dict) to ``<directory>/manifest.json`` atomically."""
    data = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MANIFEST_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)
    return path


def read_manifest(directory: str) -> Optional[dict]:
    """The manifest dict in ``<directory>/manifest.json``, or ``None`` when there is none."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def merge_manifests(name: str, manifests: Dict[str, dict], task: str = "all") -> dict:
    """One manifest dict for several tasks: every per-split / per-reason key becomes ``task/key``."""
    out = {"dataset": name, "task": task}
    for key in ("rows", "skipped_counts", "repaired_counts", "skipped", "repaired", "label_balance",
                "inputs"):
        out[key] = {f"{t}/{k}": v for t, m in manifests.items() for k, v in m.get(key, {}).items()}
    return out


def _format_balance(balance: Dict[str, float], rows: int, problem_type: Optional[str]) -> str:
    if problem_type == "pretraining" or "max_sentences" in balance:
        mean = balance.get("sentences", 0) / rows if rows else 0.0
        return f"sentences per report: mean {mean:.2f}, max {balance.get('max_sentences', 0)}"
    text = ", ".join(f"{k}={v}" for k, v in balance.items())
    if problem_type == "segmentation" and rows:
        return f"label balance: {text} (positive share {100.0 * balance.get('positive', 0) / rows:.1f}%)"
    if problem_type == "multi_label_classification" and "positive" not in balance:
        return f"label balance (positives per label): {text}"
    return f"label balance: {text}"


def format_summary(manifest: dict, spec: Optional[TaskSpec] = None, dataset_dict=None) -> str:
    """The on-screen summary of a manifest dict: rows and label balance per split, skipped and
    repaired items per reason. With ``dataset_dict`` (what ``load`` returned), a train split that
    ``data_pct`` subsampled is reported too."""
    rows = manifest.get("rows", {})
    balance = manifest.get("label_balance", {})
    problem_type = spec.problem_type if spec is not None else None
    lines = [f"{manifest.get('dataset')}/{manifest.get('task')}: "
             + ", ".join(f"{k}={v}" for k, v in rows.items())]
    for split, n in rows.items():
        line = f"  {split}: {n} rows"
        if balance.get(split):
            line += "; " + _format_balance(balance[split], n, problem_type)
        lines.append(line)
    if dataset_dict is not None and "train" in dataset_dict and "train" in rows \
            and len(dataset_dict["train"]) != rows["train"]:
        lines.append(f"  train used: {len(dataset_dict['train'])} of {rows['train']} rows (data_pct)")
    for key, title in (("skipped_counts", "skipped"), ("repaired_counts", "repaired")):
        counts = manifest.get(key, {})
        if counts:
            lines.append(f"  {title} {sum(counts.values())} item(s):")
            lines += [f"    {k}: {v}" for k, v in counts.items()]
        elif key == "skipped_counts":
            lines.append("  skipped: none")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Label balance, counted while examples are generated
# ------------------------------------------------------------------------------------------------

def _mask_positive(value) -> bool:
    """Whether an ``Image()`` mask value (PIL image, array, or ``{"bytes": ...}``) has foreground."""
    from PIL import Image as PILImage

    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
        value = PILImage.open(io.BytesIO(value) if isinstance(value, bytes) else value)
    if isinstance(value, PILImage.Image):
        return value.getbbox() is not None
    return bool(np.asarray(value).any())


class LabelBalance:
    """Label balance of one split, by task family (the columns of ``features``):

    * ``sentences``: total sentences and the longest report (``sentences``, ``max_sentences``);
    * ``labels`` ClassLabel: count per class name;
    * ``labels`` list of one float: ``positive`` / ``negative``; of C floats: positives per label;
    * ``boxes``: images ``with_objects`` / ``without_objects`` and the number of ``boxes``;
    * ``mask``: ``positive`` (any foreground) / ``negative`` masks.
    """

    def __init__(self, features: datasets.Features, label_names: Sequence[str] = ()):
        self.kind, self.names = None, []
        labels = features.get("labels")
        if "sentences" in features:
            self.kind, self.counts = "sentences", {"sentences": 0, "max_sentences": 0}
        elif isinstance(labels, datasets.ClassLabel):
            self.kind, self.names = "classes", list(labels.names)
        elif labels is not None:
            width = getattr(labels, "length", -1)
            if width == 1:
                self.kind, self.names = "binary", ["positive", "negative"]
            else:
                self.kind = "multi_label"
                self.names = list(label_names) if len(label_names) == width \
                    else [str(i) for i in range(width)]
        elif "boxes" in features:
            self.kind, self.names = "boxes", ["with_objects", "without_objects", "boxes"]
        elif "mask" in features:
            self.kind, self.names = "mask", ["positive", "negative"]
        if self.kind != "sentences":
            self.counts = {n: 0 for n in self.names}

    def add(self, example: dict) -> None:
        c = self.counts
        if self.kind == "sentences":
            n = len(example["sentences"])
            c["sentences"] += n
            c["max_sentences"] = max(c["max_sentences"], n)
        elif self.kind == "classes":
            v = example["labels"]
            c[self.names[v] if isinstance(v, (int, np.integer)) else str(v)] += 1
        elif self.kind == "binary":
            c["positive" if float(example["labels"][0]) >= 0.5 else "negative"] += 1
        elif self.kind == "multi_label":
            for name, v in zip(self.names, example["labels"]):
                c[name] += int(float(v) >= 0.5)
        elif self.kind == "boxes":
            n = len(example["boxes"])
            c["with_objects" if n else "without_objects"] += 1
            c["boxes"] += n
        elif self.kind == "mask":
            c["positive" if _mask_positive(example["mask"]) else "negative"] += 1


# ------------------------------------------------------------------------------------------------
# Builder base class, prepare-and-load and the CLI
# ------------------------------------------------------------------------------------------------

def contract_features(spec: TaskSpec, **extra) -> datasets.Features:
    """The typed columns of a task family (docs/data_contract.md), then ``extra`` columns.

    ``image`` first, then ``report``/``sentences``/``study_id`` (pretraining) or the label column
    (``labels`` as C floats or a ClassLabel, ``boxes``, ``mask``) and ``image_id``.
    """
    cols = {"image": datasets.Image()}
    if spec.problem_type == "pretraining":
        cols.update(report=datasets.Value("string"), sentences=datasets.List(datasets.Value("string")),
                    study_id=datasets.Value("string"))
    elif spec.problem_type == "grounding":
        box = datasets.List(datasets.Value("float32"), length=4)
        cols.update(sentences=datasets.List(datasets.Value("string")),
                    sentence_boxes=datasets.List(datasets.List(box)), image_id=datasets.Value("string"))
    else:
        if spec.problem_type == "multi_label_classification":
            cols["labels"] = datasets.List(datasets.Value("float32"), length=spec.num_labels)
        elif spec.problem_type == "single_label_classification":
            cols["labels"] = datasets.ClassLabel(names=list(spec.label_names))
        elif spec.problem_type == "detection":
            cols["boxes"] = datasets.List(datasets.List(datasets.Value("float32"), length=4))
        else:
            cols["mask"] = datasets.Image()
        cols["image_id"] = datasets.Value("string")
    cols.update(extra)
    return datasets.Features(cols)


class CGNSBuilder(datasets.GeneratorBasedBuilder):
    """Base of every dataset builder in data_scripts.

    Subclasses set ``NAME`` (dataset name, also the manifest's folder) and ``TASKS``; the columns
    are ``contract_features`` of the task plus ``EXTRA_FEATURES``. Their ``_split_generators``
    returns ``self.split_generators({split: items}, **extra)`` and ``_examples(items, **extra)``
    yields ``(key, example)`` (the default one reads records holding ``image_path`` and a value per
    column, keyed by ``EXAMPLE_KEY``). Skips and repairs go to
    ``self.manifest`` (created fresh for every preparation; a builder may replace it with the one
    its scan returned). Rows and label balance per split are counted here while generating, and
    ``manifest.json`` is written beside the Arrow files once everything is written; its summary is
    printed unless ``verbose`` is false. Nothing happens on a cache hit.
    """

    NAME: str = ""
    TASKS: Dict[str, TaskSpec] = {}
    NEEDS_DATA_DIR = True
    EXTRA_FEATURES: Dict[str, object] = {}
    EXAMPLE_KEY = "image_id"
    # options naming a file or folder that may lie outside data_dir: part of the input fingerprint
    PATH_OPTIONS: Tuple[str, ...] = ()
    # DICOM builders: the installed decoders (``dicom.decoder_versions``) are part of the cache key
    READS_DICOM = False
    # options that change how fast the data is prepared, never what is prepared: not part of the cache key
    RUNTIME_OPTIONS: Tuple[str, ...] = ("num_workers",)
    DEFAULT_WRITER_BATCH_SIZE = 64
    verbose = True

    def _info(self):
        import sys

        doc = sys.modules[type(self).__module__].__doc__ or ""
        return datasets.DatasetInfo(description=doc.strip().split("\n")[0],
                                    features=contract_features(self.task_spec, **self.EXTRA_FEATURES))

    @property
    def task_spec(self) -> Optional[TaskSpec]:
        return self.TASKS.get(self.config.name)

    def _data_dir(self) -> str:
        """The config's data_dir as an absolute path; ``DatasetFormatError`` when it is missing."""
        if not self.config.data_dir:
            raise DatasetFormatError(f"{self.NAME}: data_dir is required")
        return os.path.abspath(os.path.expanduser(str(self.config.data_dir)))

    def split_generators(self, splits: Dict[str, list], **extra) -> List[datasets.SplitGenerator]:
        """One ``SplitGenerator`` per split, after ``drop_cross_split_content_duplicates``: an image
        file whose bytes are in another split too (a hard link, a copy under another name) is kept
        in one split only and counted in the manifest."""
        splits = drop_cross_split_content_duplicates(
            splits, self.manifest, lambda item: self._item_file(item, **extra), self._item_id)
        self._split_sizes = {s: len(items) for s, items in splits.items()}
        return [datasets.SplitGenerator(name=s, gen_kwargs={"split": s, "items": items, **extra})
                for s, items in splits.items()]

    def _item_file(self, item, **extra) -> Optional[str]:
        """The image file an item of ``split_generators`` reads (``None``: nothing read from a file).

        Records holding ``image_path`` and items with a ``path`` attribute are understood here;
        builders with other items override it."""
        if isinstance(item, dict):
            return item.get("image_path")
        return getattr(item, "path", None)

    def _item_id(self, item) -> str:
        """How an item is named in the manifest."""
        if isinstance(item, dict):
            return str(item.get(self.EXAMPLE_KEY, item.get("image_path")))
        for name in ("image_id", "image_name", "patient_id", "path"):
            if getattr(item, name, None) is not None:
                return str(getattr(item, name))
        return str(item)

    def _download_and_prepare(self, dl_manager, verification_mode, **kwargs):
        self.manifest = Manifest(self.NAME, self.config.name)
        self._split_sizes, self._split_failures = {}, {}
        super()._download_and_prepare(dl_manager, verification_mode, **kwargs)
        # raised here, the preparation folder is deleted: a failed preparation is never cached
        check_failures(self.manifest, self._split_sizes, self._split_failures,
                       getattr(self, "max_failed_share", MAX_FAILED_SHARE))
        self.manifest.fingerprint = self.hash
        if "://" not in str(self._output_dir):
            write_manifest(self.manifest, self._output_dir)
        if self.verbose:
            print(format_summary(self.manifest.to_dict(), self.task_spec), flush=True)

    def _generate_examples(self, split, items, **extra):
        spec = self.task_spec
        balance = LabelBalance(self.info.features, spec.label_names if spec else ())
        n, failed_before = 0, len(_decode_failures(self.manifest))
        for key, example in self._examples(items, **extra):
            balance.add(example)
            n += 1
            yield key, example
        self.manifest.rows[split] = n
        self._split_failures[split] = len(_decode_failures(self.manifest)) - failed_before
        self.manifest.label_balance[split] = balance.counts

    def _examples(self, records, **extra):
        columns = [c for c in self.info.features if c != "image"]
        for rec in records:
            yield rec[self.EXAMPLE_KEY], {"image": read_image_bytes(rec["image_path"]),
                                          **{c: rec[c] for c in columns}}


# An image that cannot be decoded is skipped and counted; when more than this share of a
# preparation's images fail, the cause is systemic (a missing DICOM decoder, an incomplete download)
# and the preparation is refused rather than cached with what little remained.
MAX_FAILED_SHARE = 0.2
DECODE_FAILURE_REASONS = frozenset({"unreadable_dicom", "unreadable_image", "unreadable image",
                                    "truncated image"})


def _decode_failures(manifest: Manifest) -> List[Tuple[str, str]]:
    return [(reason, item) for reason in sorted(DECODE_FAILURE_REASONS) for item in manifest.skipped.get(reason, ())]


def check_failures(manifest: Manifest, split_sizes: Dict[str, int], split_failures: Dict[str, int],
                   max_failed_share: float = MAX_FAILED_SHARE) -> None:
    """``DatasetFormatError`` when a split that was handed items wrote no row, or when more than
    ``max_failed_share`` of a split's items failed to decode while it was written
    (``split_failures``: skips with a ``DECODE_FAILURE_REASONS`` reason). The message names the split,
    the counts and the most common failure with one example (for DICOMs, the decoder to install)."""
    bad = None
    for split, size in split_sizes.items():
        failed = split_failures.get(split, 0)
        if size and not manifest.rows.get(split):
            bad = f"split {split!r} has none of its {size} items left"
        elif size and failed / size > max_failed_share:
            bad = (f"{failed} of the {size} images of split {split!r} could not be decoded "
                   f"({100 * failed / size:.0f} %, more than the {100 * max_failed_share:.0f} % a preparation "
                   f"may lose; max_failed_share raises the limit)")
        if bad:
            break
    if bad is None:
        return
    head = f"{manifest.dataset}/{manifest.task}: {bad}"
    failures = _decode_failures(manifest)
    if failures:
        common = Counter(r for r, _ in failures).most_common(1)[0][0]
        example = next(item for r, item in failures if r == common)
        head += f"; {len(failures)} image(s) failed, most often {common}, e.g. {example}"
    else:
        head += f"; skipped: { {k: len(v) for k, v in manifest.skipped.items()} }"
    raise DatasetFormatError(head + ". Nothing was cached.")


# BuilderConfig fields that are not user options (set by prepare_and_load itself)
_RESERVED_CONFIG_FIELDS = ("name", "version", "data_dir", "data_files", "description")


def config_options(builder_cls) -> List[str]:
    """The option names a builder's config accepts (its dataclass fields and ``__init__`` keywords)."""
    import dataclasses
    import inspect

    cfg = builder_cls.BUILDER_CONFIG_CLASS
    names = {f.name for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else set()
    names |= {p for p in inspect.signature(cfg.__init__).parameters if p not in ("self", "kwargs")}
    return sorted(names - set(_RESERVED_CONFIG_FIELDS))


def check_options(name: str, builder_cls, options: dict) -> None:
    """``ValueError`` naming every unknown option and the known ones (a mistyped option is never ignored)."""
    known = config_options(builder_cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; this dataset takes {known} "
                         f"(and force_prepare, download_mode, verbose, verify, max_failed_share)")


def prepare_and_load(builder_cls, task: str, data_dir=None, data_pct: float = 1.0, seed: int = 0,
                     cache_dir=None, download_mode=None, verbose: bool = True, force_prepare: bool = False,
                     config_id: Optional[str] = None, verify: str = "quick",
                     max_failed_share: float = None, **options):
    """Instantiate ``builder_cls`` for ``task``, prepare it once (Arrow-cached), return a DatasetDict.

    ``options`` become attributes of the task's BuilderConfig (``None`` means "the default" and is
    dropped; an unknown option is a ``ValueError``). The cache is keyed on the options *and* on
    ``input_fingerprint`` of ``data_dir`` (plus any folder or file a path option such as
    ``reports_path`` names outside it): after files are repaired, added or removed the data is
    prepared again. A reused preparation is announced on screen; ``force_prepare=True`` rebuilds
    it regardless. The manifest the builder wrote beside its Arrow files is copied to
    ``<cache_dir>/<name>/<task>/manifest.json`` on every call, cache hits included. ``data_pct``
    subsamples the train split only (``subsample_train``); ``verbose`` prints the summary when the
    data is actually prepared.

    A cache is verified before it is reused (``verify_cache``; ``verify="full"`` re-reads every byte,
    ``"off"`` skips the check): a truncated, emptied, deleted or altered Arrow file is announced with
    the cache folder and the preparation is done again, as ``force_prepare`` would. A preparation in
    which an item's image could not be decoded for more than ``max_failed_share`` of a split's items
    (default ``MAX_FAILED_SHARE``), or a split that ends up empty, raises ``DatasetFormatError``
    and is not cached.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if max_failed_share is None:
        max_failed_share = MAX_FAILED_SHARE
    if not 0.0 <= float(max_failed_share) <= 1.0:
        raise ValueError(f"max_failed_share must be in [0, 1], got {max_failed_share}")
    name = builder_cls.NAME
    if task not in builder_cls.TASKS:
        raise ValueError(f"{name} has no task {task!r}; it provides: {', '.join(builder_cls.TASKS)}")
    check_data_pct(data_pct)
    options = {k: v for k, v in options.items() if v is not None}
    check_options(name, builder_cls, options)
    fingerprint = None
    if builder_cls.NEEDS_DATA_DIR:
        if data_dir is None:
            raise DatasetFormatError(f"{name}: data_dir is required (the folder with the published files)")
        data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
        if not os.path.isdir(data_dir):
            raise DatasetFormatError(f"{name}: data_dir {data_dir!r} is not a folder")
        inputs = [data_dir] + [_option_path(data_dir, options[k]) for k in builder_cls.PATH_OPTIONS
                               if isinstance(options.get(k), str)]
        exclude = [cache_dir or datasets.config.HF_DATASETS_CACHE]
        fingerprint = input_fingerprint(inputs, exclude=exclude)
        if builder_cls.READS_DICOM:  # installing a decoder changes which files decode: prepare again
            from .dicom import decoder_versions

            blob = json.dumps([fingerprint, decoder_versions()], sort_keys=True)
            fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
    if config_id is None:
        config_id = content_config_id(builder_cls, task, options)
    # dataset_name: datasets would otherwise name the cache folder after the builder's module, which
    # is "__main__" under ``python -m data_scripts.<name>`` (the CLI's cache would never be reused);
    # hash: datasets puts it in the cache path, so changed inputs get a fresh preparation
    builder = builder_cls(config_name=task, data_dir=data_dir, cache_dir=cache_dir, dataset_name=name,
                          hash=fingerprint, config_id=config_id, **options)
    builder.verbose = verbose
    builder.max_failed_share = float(max_failed_share)
    if force_prepare:
        download_mode = datasets.DownloadMode.FORCE_REDOWNLOAD
    local = "://" not in str(builder._cache_dir_root)
    reused = os.path.isfile(os.path.join(builder.cache_dir, datasets.config.DATASET_INFO_FILENAME)) \
        and datasets.DownloadMode(download_mode or "reuse_dataset_if_exists") \
        == datasets.DownloadMode.REUSE_DATASET_IF_EXISTS
    damage = verify_cache(builder.cache_dir, full=verify == "full") if reused and local and verify != "off" \
        else None
    if damage is not None:
        print(f"{name}/{task}: the cached preparation in {builder.cache_dir} is damaged ({damage}); "
              f"preparing it again from the same inputs (what --force_prepare does)", flush=True)
        download_mode, reused = datasets.DownloadMode.FORCE_REDOWNLOAD, False
    elif reused:
        print(f"{name}/{task}: using the cached preparation in {builder.cache_dir} "
              + ("(inputs unchanged since it was prepared; " if fingerprint else "(")
              + "force_prepare=True or --force_prepare rebuilds it)", flush=True)
    elif not reused:
        others = other_preparations(builder, name, task)
        if others:
            print(f"{name}/{task}: {len(others)} preparation(s) in {os.path.dirname(others[0])} were made from "
                  f"other input files or options than these; preparing again into {builder.cache_dir}", flush=True)
    builder.download_and_prepare(download_mode=download_mode)
    if local and not reused:
        write_cache_digest(builder.cache_dir)
    manifest = read_manifest(builder.cache_dir)
    if manifest is not None and "://" not in str(builder._cache_dir_root):
        write_manifest(manifest, manifest_dir(cache_dir or builder._cache_dir_root, name, task))
    return subsample_train(builder.as_dataset(), data_pct, seed)


CACHE_DIGEST_FILE = "cache_digest.json"
VERIFY_MODES = ("quick", "full", "off")


def _cache_data_files(directory: str) -> List[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".arrow"))


def write_cache_digest(directory: str) -> str:
    """Record size, modification time and ``file_digest`` of every Arrow file of a prepared cache in
    ``<directory>/cache_digest.json`` (written atomically, after the data)."""
    files = {}
    for f in _cache_data_files(directory):
        path = os.path.join(directory, f)
        st = os.stat(path)
        files[f] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": file_digest(path)}
    path = os.path.join(directory, CACHE_DIGEST_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"version": 1, "files": files}, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def verify_cache(directory: str, full: bool = False) -> Optional[str]:
    """``None`` when the Arrow files of a prepared cache are the ones ``write_cache_digest`` recorded,
    else what is wrong (``"<file>: <reason>"``).

    Quick (default): a file that is gone, or whose size changed (truncated, emptied), is damaged
    without reading it; a file whose modification time changed (written to since) is re-read and
    damaged when its digest differs (a flipped byte), and its new time is recorded when the digest
    is the same (a copied or touched cache is checked once). ``full`` re-reads every file, which also
    finds damage that left the modification time alone (a failing disk). A cache prepared before
    digests were written gets one now: there is nothing to compare it with.
    """
    path = os.path.join(directory, CACHE_DIGEST_FILE)
    try:
        with open(path) as fh:
            recorded = json.load(fh)["files"]
    except FileNotFoundError:
        write_cache_digest(directory)
        return None
    except (ValueError, KeyError, TypeError) as exc:
        return f"{CACHE_DIGEST_FILE}: unreadable ({type(exc).__name__})"
    changed = False
    for f, rec in sorted(recorded.items()):
        p = os.path.join(directory, f)
        try:
            st = os.stat(p)
        except OSError:
            return f"{f}: missing"
        if st.st_size != rec["size"]:
            return f"{f}: {st.st_size} bytes, {rec['size']} when prepared"
        if full or st.st_mtime_ns != rec["mtime_ns"]:
            if file_digest(p) != rec["digest"]:
                return f"{f}: content changed since it was prepared"
            changed |= st.st_mtime_ns != rec["mtime_ns"]
            rec["mtime_ns"] = st.st_mtime_ns
    unexpected = sorted(set(_cache_data_files(directory)) - set(recorded))
    if unexpected:
        return f"{unexpected[0]}: not part of the preparation"
    if changed:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"version": 1, "files": recorded}, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    return None


def content_config_id(builder_cls, task: str, options: dict) -> str:
    """The name of a preparation's cache folder: the task, plus a hash of the options that change the
    prepared rows. The data folder and path options are left out (their files are fingerprinted into the
    cache path) and so are ``RUNTIME_OPTIONS`` such as ``num_workers``: a folder prepared with ``cgns
    prepare --num_workers 16`` is found again by a pretraining or evaluation run that names the same inputs.
    (datasets' own config id would spell the absolute data folder, URL-encoded, into folder and lock names.)"""
    skip = set(builder_cls.RUNTIME_OPTIONS) | set(builder_cls.PATH_OPTIONS)
    content = {k: options[k] for k in sorted(options) if k not in skip}
    # never the bare task name: datasets refuses a custom config (data_dir set) named like a packaged one
    return f"{task}-{datasets.fingerprint.Hasher.hash(content)[:16]}"


def other_preparations(builder, name: str, task: str) -> List[str]:
    """Finished preparations of ``name``/``task`` under the same cache root other than ``builder``'s (made
    from other inputs or options), so that a run which prepares again can say why."""
    import glob

    root = str(builder._cache_dir_root)
    if "://" in root:
        return []
    found = glob.glob(os.path.join(glob.escape(root), name, glob.escape(task) + "*", "*", "*",
                                   datasets.config.DATASET_INFO_FILENAME))
    mine = os.path.abspath(builder.cache_dir)
    return sorted(os.path.dirname(p) for p in found if os.path.abspath(os.path.dirname(p)) != mine)


def lock_files(folder: str) -> set:
    """Every ``*.lock`` file under ``folder`` (datasets' file locks)."""
    found = set()
    for root, _, files in os.walk(folder):
        found.update(os.path.join(root, f) for f in files if f.endswith(".lock"))
    return found


def _option_path(data_dir: str, value: str) -> str:
    return os.path.abspath(value if os.path.isabs(value) else os.path.join(data_dir, value))


def parse_option(text: str) -> Tuple[str, object]:
    """``KEY=VALUE`` -> (key, value); the value is parsed as JSON when possible."""
    if "=" not in text:
        raise ValueError(f"--option expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except ValueError:
        pass
    return key.strip(), value


@dataclass(frozen=True)
class CliFlag:
    """A dataset-specific CLI flag: ``flag`` sets load option ``option`` (``None``: CLI-only, read by
    ``run_cli``'s ``after`` hook); ``kwargs`` go to ``argparse.add_argument``."""

    flag: str
    option: Optional[str]
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def for_option(cls, option: str, **kwargs) -> "CliFlag":
        """``--<option>`` setting the load option of the same name."""
        return cls("--" + option, option, kwargs)


MAX_SIZE_FLAG = CliFlag.for_option("max_size", type=int, help="longest stored side (1024; 0: full size)")


def run_cli(name: str, load_fn: Callable, tasks: Dict[str, TaskSpec], argv=None, description: str = "",
            flags: Sequence[CliFlag] = (), needs_data_dir: bool = True,
            after: Optional[Callable] = None, default_tasks: Optional[Sequence[str]] = None) -> int:
    """The CLI of every dataset module.

    ``python -m data_scripts.<name> --data_dir D --output_dir O [--task T ...] [--data_pct P]
    [--seed S] [--force_prepare] [--verify_cache M] [--max_failed_share F] [--option KEY=VALUE ...]`` plus
    the module's ``flags``. Prepares
    each task (default: all) with ``O`` as the cache dir, prints ``format_summary`` per task and
    writes the manifest to ``O/manifest.json`` (several tasks: ``merge_manifests``); the per-task
    manifests stay at ``O/<name>/<task>/manifest.json``. ``after(args, options)`` runs last. Without
    ``--task`` the ``default_tasks`` (default: every task) are prepared. The file locks datasets leaves in
    ``O`` are removed.
    Returns an exit code (2 when the folder is not the named dataset or an option is wrong).
    """
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m data_scripts.{name}", description=description)
    parser.add_argument("--data_dir", required=needs_data_dir, default=None,
                        help="folder holding the published files"
                        + ("" if needs_data_dir else " (not needed: ignored)"))
    parser.add_argument("--output_dir", required=True, help="where the prepared Arrow data and manifests go")
    parser.add_argument("--task", action="append", choices=list(tasks),
                        help="task to prepare (repeatable); default: "
                        + (", ".join(default_tasks) if default_tasks else "every task"))
    parser.add_argument("--data_pct", type=float, default=1.0, help="fraction of train loaded (summary)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data_pct subsample")
    parser.add_argument("--force_prepare", action="store_true",
                        help="prepare again even when a cached preparation of the same inputs exists")
    parser.add_argument("--verify_cache", choices=VERIFY_MODES, default="quick",
                        help="check of a reused preparation: quick (sizes, re-read what changed), full "
                             "(re-read everything), off")
    parser.add_argument("--max_failed_share", type=float, default=None,
                        help=f"largest share of undecodable images a preparation may lose ({MAX_FAILED_SHARE})")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="builder option (value parsed as JSON when possible); repeatable")
    for f in flags:
        parser.add_argument(f.flag, **({"default": None} if f.option else {}), **f.kwargs)
    args = parser.parse_args(argv)
    options = dict(parse_option(o) for o in args.option)
    for f in flags:
        value = getattr(args, f.flag.lstrip("-").replace("-", "_"))
        if f.option and value is not None:
            options[f.option] = value
    selected = args.task or list(default_tasks or tasks)
    manifests = {}
    locks_before = lock_files(args.output_dir)
    try:
        return _prepare_tasks(name, load_fn, tasks, args, options, selected, manifests, after)
    finally:
        # datasets leaves its file locks behind, named after the cache folders; the output folder is the
        # user's, so the ones this command created go once it is done
        for path in sorted(lock_files(args.output_dir) - locks_before):
            try:
                os.remove(path)
            except OSError:
                pass


def _prepare_tasks(name, load_fn, tasks, args, options, selected, manifests, after) -> int:
    import sys

    for task in selected:
        try:
            ds = load_fn(data_dir=args.data_dir, task=task, data_pct=args.data_pct, seed=args.seed,
                         cache_dir=args.output_dir, verbose=False, force_prepare=args.force_prepare,
                         verify=args.verify_cache, max_failed_share=args.max_failed_share, **options)
        except (DatasetFormatError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        manifests[task] = read_manifest(manifest_dir(args.output_dir, name, task)) or {}
        print(format_summary(manifests[task], tasks[task], ds))
    if len(manifests) == 1:
        combined = manifests[selected[0]]
    else:
        combined = merge_manifests(name, manifests, "all" if selected == list(tasks) else ",".join(selected))
    print(f"manifest: {write_manifest(combined, args.output_dir)}")
    if after is not None:
        after(args, options)
    return 0


# ------------------------------------------------------------------------------------------------
# Deterministic sampling and splits
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Input integrity: cache fingerprint, listed paths, cross-split duplicates, text decoding
# ------------------------------------------------------------------------------------------------

def _walk_stats(top: str, exclude: set) -> Iterable[Tuple[str, int, int]]:
    """``(path, size, mtime_ns)`` of every file under ``top`` (links followed, each folder once;
    folders in ``exclude`` skipped)."""
    seen_dirs = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen_dirs:
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            # sorted: which alias of a folder reachable twice is walked must not depend on disk order
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            yield folder, -1, -1  # unreadable folder: its state is part of the key as well
            continue
        for entry in entries:
            path = entry.path
            try:
                if entry.is_dir():
                    if path not in exclude:
                        stack.append(path)
                    continue
                st = entry.stat()
                yield path, st.st_size, st.st_mtime_ns
            except OSError:  # a dangling link: counts as a listed name without content
                yield path, -1, -1


def input_fingerprint(paths: Sequence[str], exclude: Sequence[str] = ()) -> str:
    """A short hash of the names, sizes and modification times of every file under ``paths``.

    ``paths`` are files or folders (searched recursively; symbolic links are followed, so a data
    folder assembled from links is fingerprinted by what the links point to). Subtrees in
    ``exclude`` (the cache folder, when it lies inside the data folder) are left out. File
    contents are never read: the cost is one ``stat`` per file. Any repaired, added, removed or
    renamed file changes the result, which is what the Arrow cache is keyed on.
    """
    exclude = {os.path.abspath(e) for e in exclude if e}
    digest = hashlib.sha256()
    for top in paths:
        top = os.path.abspath(top)
        digest.update(f"root\0{top}\n".encode("utf-8", "surrogateescape"))
        if os.path.isfile(top):
            st = os.stat(top)
            items = [(top, st.st_size, st.st_mtime_ns)]
        else:
            items = sorted(_walk_stats(top, exclude))
        start = len(top) + 1  # paths below ``top`` are keyed relative to it
        digest.update("".join(f"{path[start:]}\0{size}\0{mtime}\n" for path, size, mtime in items)
                      .encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


REASON_ABSOLUTE_PATH = "absolute path in list file"
REASON_OUTSIDE_DATA_DIR = "path outside the data folder"
_DRIVE = re.compile(r"^[A-Za-z]:")


def is_within(folder: str, path: str) -> bool:
    """Whether ``path`` lies in ``folder`` after lexical normalisation (``..`` resolved, links not)."""
    folder = os.path.normpath(os.path.abspath(folder))
    path = os.path.normpath(os.path.abspath(path))
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def resolve_listed_path(data_dir: str, entry: str,
                        candidates: Sequence[str]) -> Tuple[Optional[str], Optional[str]]:
    """Where a path read from a CSV or list file may be opened, never outside ``data_dir``.

    ``entry`` is the text of the list file; ``candidates`` are the locations the builder would try
    for it (``entry`` joined to its possible base folders). An absolute ``entry`` (``/x``, ``~/x``,
    ``C:\\x``, ``\\\\server\\x``) is refused with ``REASON_ABSOLUTE_PATH``; candidates that leave
    ``data_dir`` (``../../elsewhere/scan.png``) are dropped, and when none is left the entry is
    refused with ``REASON_OUTSIDE_DATA_DIR``. The check is lexical on purpose: links *inside*
    the data folder are followed (a folder assembled from links is a normal setup), what a list
    file names outside it is not. Returns ``(path, None)`` -- the first remaining candidate that
    is a file, else the first remaining one -- or ``(None, reason)``.
    """
    text = entry.strip().replace("\\", "/")
    if text.startswith(("/", "~")) or _DRIVE.match(text):
        return None, REASON_ABSOLUTE_PATH
    inside = [os.path.normpath(c) for c in candidates if is_within(data_dir, c)]
    if not inside:
        return None, REASON_OUTSIDE_DATA_DIR
    return next((c for c in inside if os.path.isfile(c)), inside[0]), None


REASON_CROSS_SPLIT = "cross-split duplicate (kept in test)"


def drop_cross_split_duplicates(train: List[dict], test: List[dict], manifest: Manifest,
                                keys: Callable[[dict], Iterable[str]],
                                id_key: str = "image_id") -> List[dict]:
    """``train`` without the records that are also in ``test``; each removal is skipped by reason.

    ``keys(record)`` gives the identities of a record (e.g. its resolved real path and its listed
    file name); a train record sharing any of them with a test record is the same image, which
    would be scored on data it was trained on. Test lists are official and stay complete.
    """
    in_test = {k for r in test for k in keys(r)}
    kept = []
    for r in train:
        if any(k in in_test for k in keys(r)):
            manifest.skip(REASON_CROSS_SPLIT, r[id_key])
        else:
            kept.append(r)
    return kept


REASON_CROSS_SPLIT_CONTENT = "cross-split duplicate file content (kept in test, then validation)"
# which split keeps an image found in several: test lists are official, then validation (scores
# model selection), then train; a split with another name ranks between validation and train
_SPLIT_KEEP_ORDER = {"test": 0, "validation": 1, "train": 3}
_HASH_CHUNK = 1 << 20


def file_digest(path: str) -> str:
    """``<size>:<blake2b-128 of every byte>`` of a file (read in 1 MiB chunks)."""
    digest = hashlib.blake2b(digest_size=16)
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            digest.update(chunk)
    return f"{size}:{digest.hexdigest()}"


def _content_keys(paths: Sequence[str], split_of: Dict[str, set],
                  num_workers: Optional[int] = None) -> Dict[str, str]:
    """``{path: content key}`` for the paths whose content may also be in another split.

    Two files can only hold the same bytes when their sizes are equal, so only files whose size
    occurs in two splits are read (one ``stat`` per file otherwise). A file reached twice (hard
    link, symbolic link) is recognised by its device and inode without reading it; others are
    compared by ``file_digest`` of all their bytes: a partial hash (first / last blocks) would
    call two DICOMs with equal headers and trailers the same image.
    """
    from concurrent.futures import ThreadPoolExecutor

    stats = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue  # missing files are the validation's business
        stats[p] = (st.st_size, st.st_dev, st.st_ino)
    splits_by_size: Dict[int, set] = defaultdict(set)
    for p, (size, _, _) in stats.items():
        splits_by_size[size] |= split_of[p]
    candidates = [p for p, (size, _, _) in stats.items() if len(splits_by_size[size]) > 1]
    by_inode: Dict[Tuple[int, int], List[str]] = defaultdict(list)
    for p in candidates:
        by_inode[stats[p][1:]].append(p)
    first = [ps[0] for ps in by_inode.values()]
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    if workers > 1 and len(first) >= 32:  # hashlib releases the GIL on large buffers
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = dict(zip(first, pool.map(file_digest, first)))
    else:
        digests = {p: file_digest(p) for p in first}
    return {p: digests[ps[0]] for ps in by_inode.values() for p in ps}


def drop_cross_split_content_duplicates(splits: Dict[str, list], manifest: Manifest,
                                        file_of: Callable[[object], Optional[str]],
                                        id_of: Callable[[object], str],
                                        num_workers: Optional[int] = None) -> Dict[str, list]:
    """``splits`` where no image file's content is in two splits; each removal is a manifest skip.

    The name checks (``drop_cross_split_duplicates``) cannot see the same image reached through a
    hard link or stored as a byte-identical copy under another name; this compares contents
    (``_content_keys``). As with the name-level check, the image stays where it is scored: in
    ``test``, else ``validation``, else the other split, and leaves ``train``; the removed items
    are skipped with ``REASON_CROSS_SPLIT_CONTENT`` as ``"<id> (<split>) = <kept id> (<kept split>)"``.
    Items with no file (``file_of`` gives ``None``) and duplicates inside one split are kept.
    """
    files = {s: [file_of(item) for item in items] for s, items in splits.items()}
    split_of: Dict[str, set] = defaultdict(set)
    for s, paths in files.items():
        for p in paths:
            if p is not None:
                split_of[p].add(s)
    if len({s for ss in split_of.values() for s in ss}) < 2:
        return splits
    keys = _content_keys(list(split_of), split_of, num_workers)
    if not keys:
        return splits
    rank = {s: (_SPLIT_KEEP_ORDER.get(s, 2), i) for i, s in enumerate(splits)}
    keeper: Dict[str, Tuple[str, str]] = {}
    for s in sorted(splits, key=rank.get):
        for item, p in zip(splits[s], files[s]):
            key = keys.get(p)
            if key is not None and key not in keeper:
                keeper[key] = (s, id_of(item))
    out = {}
    for s, items in splits.items():
        out[s] = []
        for item, p in zip(items, files[s]):
            kept = keeper.get(keys.get(p)) if p is not None else None
            if kept is not None and kept[0] != s:
                manifest.skip(REASON_CROSS_SPLIT_CONTENT, f"{id_of(item)} ({s}) = {kept[1]} ({kept[0]})")
            else:
                out[s].append(item)
    return out


# Tried in order; latin-1 maps every byte, so decoding never fails and never drops a character.
TEXT_ENCODINGS = ("utf-8", "cp1252", "latin-1")


def decode_text(raw: bytes) -> Tuple[str, Optional[str]]:
    """``(text, None)`` for UTF-8 bytes (a BOM is dropped), else ``(text, encoding)`` with the first
    of ``TEXT_ENCODINGS`` that decodes them: Windows-1252, then Latin-1. The caller counts the
    second case as a repair, so a report is never silently stripped of its accented words."""
    for encoding in TEXT_ENCODINGS:
        try:
            text = raw.decode("utf-8-sig" if encoding == "utf-8" else encoding)
        except UnicodeDecodeError:
            continue
        return text, (None if encoding == "utf-8" else encoding)
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


# ------------------------------------------------------------------------------------------------
# Reading the published files: CSV tables and images
# ------------------------------------------------------------------------------------------------

def read_csv_table(path: str, required: Sequence[str], what: str, hint: str = ""):
    """A CSV as a pandas DataFrame of stripped strings (blank cells ``""``), header names stripped.

    Raises ``DatasetFormatError`` naming ``what`` when the file cannot be parsed or lacks a
    ``required`` column (``hint`` is added to that message).
    """
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any parser failure is a format problem
        raise DatasetFormatError(f"{what}: cannot read {path} as CSV: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetFormatError(f"{what}: {os.path.basename(path)} must have columns {list(required)}"
                                 f"{hint}; missing column(s) {missing}, found {list(df.columns)}")
    return df


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


def keep_valid_images(records: List[dict], checked: Dict[str, Optional[str]], manifest: Manifest,
                      path_key: str = "image_path", id_key: str = "image_id") -> List[dict]:
    """The records whose image passed ``validate_image_files``; the others are skipped by reason."""
    keep = []
    for r in records:
        reason = checked[r[path_key]]
        if reason is None:
            keep.append(r)
        else:
            manifest.skip(reason, r[id_key])
    return keep


def read_image_bytes(path: str) -> dict:
    """The value to store in an ``Image()`` column: the file's bytes, no path.

    The path is left out on purpose: ``Image.encode_example`` drops the bytes when the path exists
    relative to the current directory, and an absolute path would make the cache machine-specific.
    Keep the relative path in an id column instead.
    """
    with open(path, "rb") as f:
        return {"bytes": f.read(), "path": None}


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
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = resize_longest(image, max_size, resample)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_image(image, max_size: Optional[int] = None) -> dict:
    """The ``Image()`` column value for a PIL image stored as PNG, downsized to ``max_size``."""
    return {"bytes": encode_png(image, max_size), "path": None}



# ------------------------------------------------------------------------------------------------
# Stored size: resize once while preparing, in parallel, in resumable shards
# ------------------------------------------------------------------------------------------------

STORED_IMAGE_FORMATS = ("png", "bmp", "jpeg")
SHARD_FORMAT_VERSION = 1


def encode_image_file(path: str, max_size: Optional[int] = None, image_format: str = "png",
                      quality: int = 95) -> dict:
    """The ``Image()`` value of the image file at ``path``, stored with its longest side <= ``max_size``.

    The file's own bytes are kept when ``max_size`` is None or <= 0 (full size) or the image already
    fits; otherwise it is decoded, downsized once with ``resize_longest`` (bilinear, antialiased: the
    filter ``CGNSImageProcessor`` uses, so storing at the processor's ``resize_size`` makes its resize
    the identity) and re-encoded as ``image_format``: PNG (lossless, compressed), BMP (lossless,
    uncompressed: about twice PNG's size, decodes ~5x faster) or JPEG at ``quality``; modes other than
    L/RGB are always PNG. The output depends only on the file and the options (no timestamps).
    """
    from PIL import Image

    if image_format not in STORED_IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {STORED_IMAGE_FORMATS}, got {image_format!r}")
    if not max_size or max_size <= 0:
        return read_image_bytes(path)
    with Image.open(path) as im:
        if max(im.size) <= max_size:
            return read_image_bytes(path)
        im.load()
        if im.mode not in ("L", "RGB", "I", "I;16", "F"):
            im = im.convert("RGB" if len(im.getbands()) >= 3 else "L")
        small = resize_longest(im, max_size)
    buf = io.BytesIO()
    if image_format == "jpeg" and small.mode in ("L", "RGB"):
        small.save(buf, format="JPEG", quality=int(quality))
    elif image_format == "bmp" and small.mode in ("L", "RGB"):
        small.save(buf, format="BMP")
    else:
        small.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _shard_key(paths: Sequence[str], options: dict) -> str:
    import hashlib

    import PIL

    files = []
    for p in paths:
        st = os.stat(p)
        files.append([p, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": SHARD_FORMAT_VERSION, "pillow": PIL.__version__, "options": options,
                       "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _write_shard(path: str, values: List[bytes]) -> None:
    import pyarrow as pa

    table = pa.table({"bytes": pa.array(values, type=pa.binary())})
    tmp = f"{path}.tmp{os.getpid()}"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)         # a killed run leaves either a whole shard or none


def _read_shard(path: str) -> List[bytes]:
    import pyarrow as pa

    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all().column("bytes").to_pylist()


def _encode_paths(paths: Sequence[str], options: dict) -> List[bytes]:
    values = []
    for p in paths:
        try:
            values.append(encode_image_file(p, **options)["bytes"])
        except Exception as exc:  # noqa: BLE001 - validated earlier, so this is a changed or bad file
            raise DatasetFormatError(f"cannot store image {p}: {type(exc).__name__}: {exc}") from exc
    return values


def _encode_shard(index: int, paths: Sequence[str], shard_dir: Optional[str],
                  options: dict) -> Tuple[List[bytes], bool]:
    """(encoded bytes of ``paths``, whether a finished shard on disk was reused)."""
    if shard_dir is None:
        return _encode_paths(paths, options), False
    path = os.path.join(shard_dir, f"shard-{index:06d}-{_shard_key(paths, options)}.arrow")
    if os.path.isfile(path):
        values = _read_shard(path)
        if len(values) == len(paths):
            return values, True
    values = _encode_paths(paths, options)
    _write_shard(path, values)
    return values, False


def iter_encoded_images(paths: Sequence[str], shard_dir: Optional[str] = None, num_workers: int = 1,
                        shard_size: int = 256, stats: Optional[dict] = None, **options):
    """Yield ``encode_image_file(path, **options)`` for every path, in order.

    The work runs in ``num_workers`` threads (Pillow releases the GIL while decoding, resizing and
    encoding), one shard of ``shard_size`` consecutive paths at a time, at most ``2 * num_workers``
    shards ahead of the consumer. With ``shard_dir``, each finished shard is written there (an Arrow
    IPC file named by its position and a hash of the options, the Pillow version and every file's
    path, size and mtime) and reused on the next call: a preparation killed halfway redoes only the
    unfinished shards. The output never depends on ``num_workers``. ``stats`` (a dict) receives the
    number of shards ``encoded`` and ``reused``.
    """
    from concurrent.futures import ThreadPoolExecutor

    paths = list(paths)
    stats = {} if stats is None else stats
    stats.setdefault("encoded", 0)
    stats.setdefault("reused", 0)
    if shard_dir is not None:
        os.makedirs(shard_dir, exist_ok=True)
    size = max(1, int(shard_size))
    shards = [paths[i:i + size] for i in range(0, len(paths), size)]
    workers = max(1, int(num_workers or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending, next_shard = [], 0
        for _ in range(len(shards)):
            while next_shard < len(shards) and len(pending) < 2 * workers:
                pending.append(pool.submit(_encode_shard, next_shard, shards[next_shard], shard_dir, options))
                next_shard += 1
            values, reused = pending.pop(0).result()
            stats["reused" if reused else "encoded"] += 1
            for value in values:
                yield {"bytes": value, "path": None}


__all__ = [
    "PROBLEM_TYPES",
    "DatasetFormatError",
    "TaskSpec",
    "Manifest",
    "manifest_dir",
    "write_manifest",
    "read_manifest",
    "merge_manifests",
    "format_summary",
    "LabelBalance",
    "contract_features",
    "CGNSBuilder",
    "content_config_id",
    "other_preparations",
    "lock_files",
    "prepare_and_load",
    "MAX_FAILED_SHARE",
    "DECODE_FAILURE_REASONS",
    "check_failures",
    "CACHE_DIGEST_FILE",
    "VERIFY_MODES",
    "write_cache_digest",
    "verify_cache",
    "config_options",
    "check_options",
    "input_fingerprint",
    "REASON_ABSOLUTE_PATH",
    "REASON_OUTSIDE_DATA_DIR",
    "is_within",
    "resolve_listed_path",
    "REASON_CROSS_SPLIT",
    "drop_cross_split_duplicates",
    "REASON_CROSS_SPLIT_CONTENT",
    "file_digest",
    "drop_cross_split_content_duplicates",
    "TEXT_ENCODINGS",
    "decode_text",
    "parse_option",
    "CliFlag",
    "MAX_SIZE_FLAG",
    "run_cli",
    "check_data_pct",
    "subsample_indices",
    "subsample_train",
    "sklearn_test_count",
    "sklearn_holdout_split",
    "grouped_holdout",
    "read_csv_table",
    "REASON_MISSING_IMAGE",
    "REASON_UNREADABLE_IMAGE",
    "REASON_TRUNCATED_IMAGE",
    "check_image_file",
    "validate_image_files",
    "keep_valid_images",
    "read_image_bytes",
    "resize_longest",
    "encode_png",
    "png_image",
    "STORED_IMAGE_FORMATS",
    "encode_image_file",
    "iter_encoded_images",
]
