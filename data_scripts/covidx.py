"""COVIDx (three-class versions) -> normal / pneumonia / COVID-19 classification (docs/method.md E.1).

Reads the published layout (docs/data_contract.md): a train list and a test list (``train.txt`` /
``test.txt``, or versioned names such as ``train_COVIDx9A.txt``; pass ``train_list`` / ``test_list``
to name them), one image per line, space separated ``<patient id> <filename> <class> <data source>``
(the oldest versions have no data-source column; both layouts are detected line by line). Images
are in ``train/`` and ``test/``.

The later binary versions (``positive`` / ``negative``) are a different task: they raise
``DatasetFormatError`` instead of being guessed into three classes. The official train list is
split 80/20 into train/validation by whole patients (seeded with ``split_seed``, deterministic);
test is the official test list, complete. A file listed in both lists (same file name, or the same
file) is removed from train (``cross-split duplicate (kept in test)``); a listed file name that is
absolute or leads out of ``data_dir`` is never opened (``absolute path in list file`` / ``path outside
the data folder``). Accounting: ``inputs["train list lines"]`` = train + validation rows + the skips
of train lines; ``inputs["test list lines"]`` = test rows + the skips of test lines.
"""
import glob
import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import datasets

from .builder import (
    CGNSBuilder,
    DatasetFormatError,
    Manifest,
    TaskSpec,
    drop_cross_split_duplicates,
    grouped_holdout,
    keep_valid_images,
    prepare_and_load,
    resolve_listed_path,
    run_cli,
    validate_image_files,
)

NAME = "covidx"
CLASS_NAMES = ("normal", "pneumonia", "COVID-19")
TASKS = {"classification": TaskSpec("single_label_classification", CLASS_NAMES, "accuracy")}
DEFAULT_VAL_FRACTION = 0.2

_CLASS_ALIASES = {"normal": "normal", "pneumonia": "pneumonia", "covid-19": "COVID-19", "covid19": "COVID-19",
                  "covid": "COVID-19"}
_BINARY = {"positive", "negative"}

R_MALFORMED = "malformed line"
R_DUPLICATE = "duplicate filename"


def parse_line(line: str) -> Optional[Tuple[str, str, str]]:
    """``(patient id, filename, class name)`` from one list line, or ``None`` when it has no class.

    The class is the second-to-last token (four-column layout with a data-source column) or the
    last token (three-column layout); the filename is everything between the patient id and it.
    """
    tokens = line.split()
    if len(tokens) >= 4 and tokens[-2].lower() in _CLASS_ALIASES:
        return tokens[0], " ".join(tokens[1:-2]), _CLASS_ALIASES[tokens[-2].lower()]
    if len(tokens) >= 3 and tokens[-1].lower() in _CLASS_ALIASES:
        return tokens[0], " ".join(tokens[1:-1]), _CLASS_ALIASES[tokens[-1].lower()]
    return None


def _is_binary(line: str) -> bool:
    tokens = line.lower().split()
    return (len(tokens) >= 4 and tokens[-2] in _BINARY) or (len(tokens) >= 3 and tokens[-1] in _BINARY)


def read_list(path: str, manifest: Manifest, split: Optional[str] = None) -> List[Tuple[str, str, str]]:
    """Parse one COVIDx list; raise ``DatasetFormatError`` for a binary or unknown layout.

    ``manifest.inputs["<split> list lines"]`` counts the non-empty lines read."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError as exc:
        raise DatasetFormatError(f"cannot read COVIDx list {path}: {exc}") from exc
    name = os.path.basename(path)
    manifest.inputs[f"{split or name} list lines"] = len(lines)
    if not lines:
        raise DatasetFormatError(f"COVIDx list {name} is empty")
    parsed = [parse_line(ln) for ln in lines]
    n_ok = sum(p is not None for p in parsed)
    n_binary = sum(_is_binary(ln) for ln in lines)
    if n_binary > n_ok:
        raise DatasetFormatError(
            f"{name} is a binary COVIDx list (classes 'positive'/'negative', COVIDx CXR-3 or later): "
            f"that is a different task from the three-class normal/pneumonia/COVID-19 classification "
            f"this builder provides"
        )
    if n_ok == 0:
        seen = Counter(tok for ln in lines[:200] for tok in ln.split()[2:3])
        raise DatasetFormatError(
            f"{name} is not a three-class COVIDx list: expected lines '<patient id> <filename> <class> "
            f"[<data source>]' with class in {list(CLASS_NAMES)}; first line {lines[0]!r}, third-column "
            f"values {dict(seen.most_common(5))}"
        )
    out, seen_files = [], set()
    for ln, p in zip(lines, parsed):
        if p is None:
            manifest.skip(R_MALFORMED, f"{name}: {ln[:120]}")
            continue
        if p[1] in seen_files:
            manifest.skip(R_DUPLICATE, f"{name}: {p[1]}")
            continue
        seen_files.add(p[1])
        out.append(p)
    return out


def find_list(data_dir: str, split: str, explicit: Optional[str]) -> str:
    """``train``/``test`` list path: the named file, ``<split>.txt``, or the single ``<split>_*.txt``."""
    if explicit:
        path = explicit if os.path.isabs(explicit) else os.path.join(data_dir, explicit)
        if not os.path.isfile(path):
            raise DatasetFormatError(f"COVIDx {split} list {path!r} does not exist")
        return path
    plain = os.path.join(data_dir, f"{split}.txt")
    if os.path.isfile(plain):
        return plain
    versioned = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.txt")) +
                       glob.glob(os.path.join(data_dir, f"{split}*.txt")))
    versioned = sorted(set(versioned))
    if len(versioned) == 1:
        return versioned[0]
    if len(versioned) > 1:
        raise DatasetFormatError(
            f"several COVIDx {split} lists in {data_dir}: {[os.path.basename(v) for v in versioned]}; "
            f"name one with {split}_list=..."
        )
    raise DatasetFormatError(
        f"{data_dir} is not COVIDx: expected {split}.txt or {split}_<version>.txt, "
        f"found {sorted(os.listdir(data_dir))[:20]}"
    )


def _image_path(data_dir: str, split: str, filename: str) -> Tuple[Optional[str], Optional[str]]:
    """``(path, None)``: ``<split>/<filename>`` or ``<filename>`` in data_dir; ``(None, reason)``
    when the listed name leads out of data_dir (``resolve_listed_path``)."""
    return resolve_listed_path(data_dir, filename, [os.path.join(data_dir, split, filename),
                                                    os.path.join(data_dir, filename)])


def _identity(record: dict) -> Tuple[str, str]:
    """A record's listed file name and its file (links resolved): either shared means the same image."""
    return ("name:" + record["filename"], "file:" + os.path.normcase(os.path.realpath(record["image_path"])))


def scan(data_dir: str, train_list: Optional[str] = None, test_list: Optional[str] = None,
         val_fraction: float = DEFAULT_VAL_FRACTION, split_seed: int = 0, num_workers: Optional[int] = None,
         task: str = "classification") -> Tuple[Dict[str, List[dict]], Manifest]:
    """Read, validate and split; return ``({split: [record, ...]}, manifest)``."""
    manifest = Manifest(NAME, task)
    if not os.path.isdir(data_dir):
        raise DatasetFormatError(f"COVIDx data_dir {data_dir!r} is not a folder")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    lists = {"train": find_list(data_dir, "train", train_list),
             "test": find_list(data_dir, "test", test_list)}
    rows: Dict[str, List[dict]] = {}
    for split, path in lists.items():
        rows[split] = []
        for pid, fn, cls in read_list(path, manifest, split):
            image_path, refused = _image_path(data_dir, split, fn)
            if refused:
                manifest.skip(refused, f"{os.path.basename(path)}: {fn}")
                continue
            rows[split].append({"patient": pid, "image_id": f"{split}/{fn}", "filename": fn,
                                "image_path": image_path, "labels": CLASS_NAMES.index(cls)})
    if not any(os.path.isdir(os.path.join(data_dir, s)) for s in ("train", "test")):
        raise DatasetFormatError(
            f"{data_dir} has no train/ or test/ image folder (COVIDx keeps images there)")

    checked = validate_image_files([r["image_path"] for rs in rows.values() for r in rs], num_workers)
    for split in rows:
        rows[split] = keep_valid_images(rows[split], checked, manifest)
    # a file name in both lists is one image, which test would score after training on it
    rows["train"] = drop_cross_split_duplicates(rows["train"], rows["test"], manifest, _identity)
    if len(rows["train"]) < 2 or not rows["test"]:
        raise DatasetFormatError(
            f"nothing usable remains in {data_dir}: {len(rows['train'])} train / "
            f"{len(rows['test'])} test images "
            f"(skipped: { {k: len(v) for k, v in manifest.skipped.items()} })"
        )
    target = max(1, int(round(float(val_fraction) * len(rows["train"]))))
    val_patients = grouped_holdout([r["patient"] for r in rows["train"]], target, split_seed)
    splits = {
        "train": [r for r in rows["train"] if r["patient"] not in val_patients],
        "validation": [r for r in rows["train"] if r["patient"] in val_patients],
        "test": rows["test"],
    }
    if not splits["train"]:
        raise DatasetFormatError(
            "the validation hold-out took every training patient; add data or lower val_fraction")
    for records in splits.values():
        records.sort(key=lambda r: r["image_id"])
    manifest.rows = {k: len(v) for k, v in splits.items()}
    return splits, manifest


@dataclass
class CovidxConfig(datasets.BuilderConfig):
    """Options: ``train_list`` / ``test_list`` (file names in data_dir), ``val_fraction`` (0.2),
    ``split_seed`` (0), ``num_workers`` (image-validation threads)."""

    train_list: Optional[str] = None
    test_list: Optional[str] = None
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = 0
    num_workers: Optional[int] = None


class Covidx(CGNSBuilder):
    """COVIDx three-class classification; one config, ``classification``."""

    NAME, TASKS = NAME, TASKS
    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIG_CLASS = CovidxConfig
    PATH_OPTIONS = ("train_list", "test_list")
    BUILDER_CONFIGS = [CovidxConfig(name="classification", version=VERSION,
                                    description="normal / pneumonia / COVID-19")]
    DEFAULT_CONFIG_NAME = "classification"

    def _split_generators(self, dl_manager):
        c = self.config
        splits, self.manifest = scan(self._data_dir(), c.train_list, c.test_list, c.val_fraction,
                                     c.split_seed, c.num_workers, c.name)
        return self.split_generators(splits)


def load(data_dir=None, task: str = "classification", data_pct: float = 1.0, seed: int = 0, cache_dir=None,
         **options) -> datasets.DatasetDict:
    """``DatasetDict`` with ``train``, ``validation`` (20 % of official train, by patient) and ``test``.

    ``options``: the ``CovidxConfig`` fields, ``download_mode``, ``verbose``.
    """
    return prepare_and_load(Covidx, task, data_dir, data_pct, seed, cache_dir, **options)


def main(argv=None) -> int:
    return run_cli(NAME, load, TASKS, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = [
    "TASKS",
    "CLASS_NAMES",
    "Covidx",
    "CovidxConfig",
    "parse_line",
    "read_list",
    "find_list",
    "scan",
    "load",
    "main",
]
