"""CheXpert v1.0 -> five-task multi-label classification (docs/method.md E.1).

Reads the published layout (docs/data_contract.md): ``train.csv`` and ``valid.csv`` with ``Path``,
``Frontal/Lateral`` and the observation columns; ``Path`` starts with the dataset folder's name
(``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``) and is resolved relative to
the folder that contains the dataset folder or, failing that, to the dataset folder itself.
``data_dir`` may be the dataset folder or the folder holding it.

Protocol:

* tasks, in order: Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion;
* blank (not mentioned) -> 0; uncertain (-1) per task by ``uncertainty_policy``, default U-Ones for
  Atelectasis, Edema, Pleural Effusion and U-Zeros for Cardiomegaly, Consolidation;
* frontal images only;
* the CheXpert 5x200 set (up to ``holdout_per_task`` = 200 frontal images per competition task
  that are positive for exactly that task and negative for the four others, sampled with
  ``split_seed``) is removed from the official train list;
* a validation split of ``val_size`` images (default ``min(5000, 10 %)``) is taken from the rest
  by whole patients, so no patient is in both train and validation; membership is decided on
  patient ids / paths, never on positional labels (fixes G.2 item 21);
* test = the official ``valid.csv`` (frontal), complete; an image listed in both ``train.csv`` and
  ``valid.csv`` (same file, links resolved) is removed from train (``cross-split duplicate (kept in
  test)``).

A ``Path`` that is absolute or leads out of ``data_dir`` (``../../elsewhere/scan.png``) is never
opened: ``absolute path in list file`` / ``path outside the data folder``. Accounting:
``inputs["train.csv rows"]`` = train + validation rows + the skips of train rows, and
``inputs["valid.csv rows"]`` = test rows + the skips of valid rows (``docs/data_contract.md``).

Task ``5x200`` returns only that hold-out, as a ``test`` split (labels: one positive task per image),
for zero-shot evaluation (``cgns evaluate --task zero_shot``).
"""
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import datasets
import numpy as np
import pandas as pd

from .builder import (
    CGNSBuilder,
    DatasetFormatError,
    Manifest,
    TaskSpec,
    drop_cross_split_duplicates,
    grouped_holdout,
    keep_valid_images,
    prepare_and_load,
    read_csv_table,
    resolve_listed_path,
    run_cli,
    validate_image_files,
)

NAME = "chexpert"
COMPETITION_TASKS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
TASKS = {"classification": TaskSpec("multi_label_classification", COMPETITION_TASKS, "auroc"),
         # the held-out 5x200 set itself, as a test split only (zero-shot classification)
         "5x200": TaskSpec("multi_label_classification", COMPETITION_TASKS, "auroc")}
OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
REQUIRED_COLUMNS = ("Path", "Frontal/Lateral") + COMPETITION_TASKS
DEFAULT_UNCERTAINTY_POLICY = {
    "Atelectasis": "ones", "Cardiomegaly": "zeros", "Consolidation": "zeros", "Edema": "ones",
    "Pleural Effusion": "ones",
}
DEFAULT_VAL_SIZE = 5000
DEFAULT_HOLDOUT_PER_TASK = 200

R_NON_FRONTAL = "non-frontal view"
R_DUPLICATE = "duplicate Path"
R_BAD_LABEL = "invalid label value"
R_EMPTY_PATH = "empty Path"
R_HOLDOUT = "held out: CheXpert 5x200"

_POLICY_VALUES = {"ones": 1.0, "u-ones": 1.0, "u_ones": 1.0, "uones": 1.0, "1": 1.0, "1.0": 1.0,
                  "positive": 1.0, "zeros": 0.0, "u-zeros": 0.0, "u_zeros": 0.0, "uzeros": 0.0, "0": 0.0,
                  "0.0": 0.0,
                  "negative": 0.0}
_PATIENT = re.compile(r"(patient\d+)")


def resolve_uncertainty_policy(policy: Union[None, str, float, Dict[str, object]]) -> Dict[str, float]:
    """Turn the ``uncertainty_policy`` option into ``{task: value for -1}``.

    ``None`` -> the default (U-Ones / U-Zeros as in the CheXpert paper); one string ("ones"/"zeros")
    -> the same rule for all five tasks; a dict overrides the default for the tasks it names.
    """
    def value(task, v):
        key = str(v).strip().lower()
        if key not in _POLICY_VALUES:
            raise ValueError(f"uncertainty policy for {task!r} must be 'ones' or 'zeros', got {v!r}")
        return _POLICY_VALUES[key]

    resolved = {t: value(t, p) for t, p in DEFAULT_UNCERTAINTY_POLICY.items()}
    if policy is None:
        return resolved
    if isinstance(policy, dict):
        unknown = [t for t in policy if t not in COMPETITION_TASKS]
        if unknown:
            raise ValueError(f"uncertainty_policy names unknown task(s) {unknown}; "
                             f"tasks: {list(COMPETITION_TASKS)}")
        resolved.update({t: value(t, p) for t, p in policy.items()})
        return resolved
    return {t: value(t, policy) for t in COMPETITION_TASKS}


def _parse_raw(value: str) -> Optional[float]:
    """Raw CSV cell -> 1.0 / 0.0 / -1.0 (blank -> 0.0); ``None`` for anything else."""
    value = value.strip()
    if value == "" or value.lower() == "nan":
        return 0.0
    try:
        v = float(value)
    except ValueError:
        return None
    return v if v in (1.0, 0.0, -1.0) else None


def find_dataset_dir(data_dir: str) -> str:
    """The folder holding ``train.csv`` and ``valid.csv``: ``data_dir`` itself or one child."""
    if not os.path.isdir(data_dir):
        raise DatasetFormatError(f"CheXpert data_dir {data_dir!r} is not a folder")

    def has_csvs(d):
        return os.path.isfile(os.path.join(d, "train.csv")) and os.path.isfile(os.path.join(d, "valid.csv"))

    if has_csvs(data_dir):
        return data_dir
    children = sorted(os.path.join(data_dir, c) for c in os.listdir(data_dir))
    found = [c for c in children if os.path.isdir(c) and has_csvs(c)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DatasetFormatError(f"several CheXpert folders in {data_dir}: {found}; pass one as data_dir")
    raise DatasetFormatError(
        f"{data_dir} is not CheXpert v1.0: expected train.csv and valid.csv (in it or in one sub-folder), "
        f"found {sorted(os.listdir(data_dir))[:20]}"
    )


def _read_list(path: str) -> pd.DataFrame:
    return read_csv_table(path, REQUIRED_COLUMNS, "CheXpert list", hint=" (+ other observations)")


def _candidates(dataset_dir: str, rel: str) -> List[str]:
    """Where a listed ``Path`` may be: beside the dataset folder (the published form, Path starting
    with the folder's name), inside it, and inside it without the leading folder name."""
    parts = [p for p in rel.replace("\\", "/").split("/") if p]
    candidates = [os.path.join(os.path.dirname(dataset_dir), *parts), os.path.join(dataset_dir, *parts)]
    if len(parts) > 1 and parts[0] not in (".", ".."):  # only a folder name may be dropped
        candidates.append(os.path.join(dataset_dir, *parts[1:]))
    return candidates


def patient_id(path: str) -> str:
    """``patientNNNNN`` from a CheXpert Path (fallback: the folder above the study folder)."""
    m = _PATIENT.search(path)
    if m:
        return m.group(1)
    parts = path.replace("\\", "/").split("/")
    return parts[-3] if len(parts) >= 3 else path


def _rows(df: pd.DataFrame, dataset_dir: str, policy: Dict[str, float], manifest: Manifest,
          split: str, data_dir: Optional[str] = None) -> List[dict]:
    """Frontal rows with parsed labels; bad rows (and Paths leading out of ``data_dir``) go to the
    manifest."""
    data_dir = data_dir or dataset_dir
    out, seen = [], set()
    cols = list(df.columns)
    idx = {c: cols.index(c) for c in REQUIRED_COLUMNS}
    for values in df.itertuples(index=False, name=None):
        rel = str(values[idx["Path"]]).strip()
        if not rel:
            manifest.skip(R_EMPTY_PATH, f"{split} row")
            continue
        if rel in seen:
            manifest.skip(R_DUPLICATE, rel)
            continue
        seen.add(rel)
        if str(values[idx["Frontal/Lateral"]]).strip().lower() != "frontal":
            manifest.skip(R_NON_FRONTAL, rel)
            continue
        raw = [_parse_raw(str(values[idx[t]])) for t in COMPETITION_TASKS]
        if any(v is None for v in raw):
            manifest.skip(R_BAD_LABEL, rel)
            continue
        path, refused = resolve_listed_path(data_dir, rel, _candidates(dataset_dir, rel))
        if refused:
            manifest.skip(refused, rel)
            continue
        labels = [policy[t] if v == -1.0 else v for t, v in zip(COMPETITION_TASKS, raw)]
        out.append({"image_id": rel, "image_path": path, "raw": raw,
                    "labels": labels, "patient": patient_id(rel)})
    return out


def _identity(record: dict) -> Tuple[str]:
    """The file a record reads, links resolved (the same image under two listed Paths matches)."""
    return (os.path.normcase(os.path.realpath(record["image_path"])),)


def select_5x200(rows: List[dict], per_task: int, seed: int) -> set:
    """Paths of the CheXpert 5x200 hold-out: per task, ``per_task`` frontal rows positive for exactly
    that competition task (raw 1.0) and negative (0.0 or blank) for the other four."""
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = set()
    for i in range(len(COMPETITION_TASKS)):
        target = [1.0 if j == i else 0.0 for j in range(len(COMPETITION_TASKS))]
        pool = sorted(r["image_id"] for r in rows if r["raw"] == target)
        k = min(per_task, len(pool))
        if k:
            chosen.update(pool[j] for j in np.sort(rng.permutation(len(pool))[:k]))
    return chosen


def _val_target(val_size: Union[None, int, float], n: int) -> int:
    if val_size is None:
        return min(DEFAULT_VAL_SIZE, max(1, int(round(0.1 * n))))
    if isinstance(val_size, float) and 0.0 < val_size < 1.0:
        return max(1, int(round(val_size * n)))
    val_size = int(val_size)
    if val_size < 1:
        raise ValueError(f"val_size must be >= 1 (or a fraction in (0, 1)), got {val_size}")
    return val_size


def scan(data_dir: str, uncertainty_policy=None, val_size=None,
         holdout_per_task: int = DEFAULT_HOLDOUT_PER_TASK, split_seed: int = 0,
         num_workers: Optional[int] = None,
         task: str = "classification") -> Tuple[Dict[str, List[dict]], Manifest]:
    """Read, validate and split; return ``({split: [record, ...]}, manifest)``."""
    manifest = Manifest(NAME, task)
    policy = resolve_uncertainty_policy(uncertainty_policy)
    dataset_dir = find_dataset_dir(data_dir)
    train_df = _read_list(os.path.join(dataset_dir, "train.csv"))
    test_df = _read_list(os.path.join(dataset_dir, "valid.csv"))
    manifest.inputs.update({"train.csv rows": len(train_df), "valid.csv rows": len(test_df)})
    data_dir = os.path.abspath(data_dir)
    train_rows = _rows(train_df, dataset_dir, policy, manifest, "train", data_dir)
    test_rows = _rows(test_df, dataset_dir, policy, manifest, "valid", data_dir)

    checked = validate_image_files([r["image_path"] for r in train_rows + test_rows], num_workers)
    train_rows = keep_valid_images(train_rows, checked, manifest)
    test_rows = keep_valid_images(test_rows, checked, manifest)
    # an image listed in both lists would be scored on data it was trained on: test keeps it
    train_rows = drop_cross_split_duplicates(train_rows, test_rows, manifest, _identity)
    if not train_rows or not test_rows:
        raise DatasetFormatError(
            f"nothing usable remains in {dataset_dir}: {len(train_rows)} train / {len(test_rows)} valid rows "
            f"with readable frontal images (skipped: { {k: len(v) for k, v in manifest.skipped.items()} })"
        )

    held_out = select_5x200(train_rows, int(holdout_per_task), split_seed)
    if task == "5x200":
        splits = {"test": sorted((r for r in train_rows if r["image_id"] in held_out), key=lambda r: r["image_id"])}
        if not splits["test"]:
            raise DatasetFormatError(f"no frontal train image in {dataset_dir} is positive for exactly one "
                                     f"competition task: the 5x200 set is empty")
        manifest.rows = {"test": len(splits["test"])}
        return splits, manifest
    for path in sorted(held_out):
        manifest.skip(R_HOLDOUT, path)
    train_rows = [r for r in train_rows if r["image_id"] not in held_out]

    target = _val_target(val_size, len(train_rows))
    if target >= len(train_rows):
        raise DatasetFormatError(
            f"val_size {target} leaves no training rows ({len(train_rows)} usable train images after "
            f"the 5x200 hold-out)"
        )
    val_patients = grouped_holdout([r["patient"] for r in train_rows], target, split_seed)
    splits = {
        "train": [r for r in train_rows if r["patient"] not in val_patients],
        "validation": [r for r in train_rows if r["patient"] in val_patients],
        "test": test_rows,
    }
    for records in splits.values():
        records.sort(key=lambda r: r["image_id"])
    manifest.rows = {k: len(v) for k, v in splits.items()}
    return splits, manifest


@dataclass
class ChexpertConfig(datasets.BuilderConfig):
    """Options: ``uncertainty_policy`` (str or {task: "ones"/"zeros"}), ``val_size`` (int count or
    fraction; default min(5000, 10 %)), ``holdout_per_task`` (5x200 size per task), ``split_seed``,
    ``num_workers`` (image-validation threads)."""

    uncertainty_policy: Optional[object] = None
    val_size: Optional[Union[int, float]] = None
    holdout_per_task: int = DEFAULT_HOLDOUT_PER_TASK
    split_seed: int = 0
    num_workers: Optional[int] = None


class Chexpert(CGNSBuilder):
    """CheXpert five competition tasks; configs ``classification`` and ``5x200``."""

    NAME, TASKS = NAME, TASKS
    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIG_CLASS = ChexpertConfig
    BUILDER_CONFIGS = [ChexpertConfig(name="classification", version=VERSION,
                                      description="5 competition tasks, frontal, multi-label"),
                       ChexpertConfig(name="5x200", version=VERSION,
                                      description="the CheXpert 5x200 hold-out as a test split")]
    DEFAULT_CONFIG_NAME = "classification"

    def _split_generators(self, dl_manager):
        c = self.config
        splits, self.manifest = scan(self._data_dir(), c.uncertainty_policy, c.val_size, c.holdout_per_task,
                                     c.split_seed, c.num_workers, c.name)
        return self.split_generators(splits)


def load(data_dir=None, task: str = "classification", data_pct: float = 1.0, seed: int = 0, cache_dir=None,
         **options) -> datasets.DatasetDict:
    """``DatasetDict`` with ``train``, ``validation`` and ``test`` (official valid.csv); see module doc.

    ``options``: the ``ChexpertConfig`` fields, ``download_mode``, ``verbose``.
    """
    return prepare_and_load(Chexpert, task, data_dir, data_pct, seed, cache_dir, **options)


def main(argv=None) -> int:
    return run_cli(NAME, load, TASKS, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = [
    "TASKS",
    "COMPETITION_TASKS",
    "DEFAULT_UNCERTAINTY_POLICY",
    "Chexpert",
    "ChexpertConfig",
    "resolve_uncertainty_policy",
    "find_dataset_dir",
    "patient_id",
    "select_5x200",
    "scan",
    "load",
    "main",
]
