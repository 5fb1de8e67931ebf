"""RSNA Pneumonia Detection (stage 2 train, DICOM): classification, detection and segmentation.

Published layout (docs/data_contract.md)::

    <data_dir>/stage_2_train_labels.csv     patientId,x,y,width,height,Target (one row per box;
                                            a negative patient has one row, empty box, Target 0)
    <data_dir>/stage_2_train_images/<patientId>.dcm

Tasks (docs/data_contract.md):

* ``classification`` -- one row per patient, ``labels = [Target]`` (float32, length 1). Split 70/15/15
  exactly like the reference (sklearn ``train_test_split(test_size=0.3, random_state=0)`` on the
  patients sorted by id, then 50/50 of the held-out part, whose *held* half is validation):
  26,684 patients give 18,678 / 4,003 / 4,003 (``classification_split_sizes``).
* ``detection`` -- every patient, negatives included (empty box list). Split as E.2: 10,674 of
  26,684 held out, then 50/50 -> 16,010 / 5,337 / 5,337; for other patient counts the held-out
  count scales proportionally, ``ceil(n * 10674 / 26684)`` (``detection_split_sizes``). Boxes are
  ``[x_min, y_min, x_max, y_max]`` normalised by the DICOM's real width/height, clipped to [0, 1].
* ``segmentation`` -- the detection split; the mask is the union of the filled boxes (0/255, mode L)
  at the stored image size.

``split_seed`` (default 0, the reference ``random_state``) fixes the split; ``load(seed=...)`` only
drives ``data_pct`` subsampling of train. Images are stored as 8-bit PNG (``data_scripts.dicom``),
downsized to ``max_size`` (default 1024, aspect kept); boxes are normalised so resizing never
changes them.

Bad input is counted in ``manifest.json`` (never dropped silently):

* skipped rows: ``duplicate_row`` (identical to an earlier row; the patient is kept),
  ``missing_patient_id``, ``bad_target`` (Target not 0/1), ``malformed_box`` (box fields partly
  empty or not finite numbers);
* skipped patients: ``target_box_mismatch`` (a Target 1 row without a box or a Target 0 row with
  one -- the ground truth is ambiguous, so the patient is left out of every task),
  ``missing_image`` (no DICOM; checked before splitting), ``unreadable_dicom`` (found while
  generating; the patient drops out of its split);
* skipped patients (detection/segmentation): ``positive_without_usable_box`` (Target 1, but every box
  lies outside the image or has non-positive size: kept, it would be a positive stored as a
  negative; classification keeps the patient, its label is sound);
* skipped patients: ``absolute path in list file`` / ``path outside the data folder`` (a patientId that
  is a path; DICOMs are only opened by name from the folder listing, so nothing outside is read);
* skipped boxes (detection/segmentation): ``box_nonpositive_size``, ``box_outside_image``;
* repaired boxes: ``box_clipped`` (partly outside the image, clipped to it).

Accounting: ``inputs["rows"]`` = row-level skips + the rows of ``inputs["patients"]`` patients, and
``inputs["patients"]`` = patients in the splits + patient-level skips.
"""
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import datasets
import numpy as np

from .builder import (
    CGNSBuilder,
    MAX_SIZE_FLAG,
    CliFlag,
    DatasetFormatError,
    Manifest,
    TaskSpec,
    png_image,
    prepare_and_load,
    read_csv_table,
    resize_longest,
    resolve_listed_path,
    run_cli,
    sklearn_holdout_split,
    sklearn_test_count,
)
from .dicom import SCALINGS, DicomReadError, read_dicom

NAME = "rsna"
LABELS_CSV = "stage_2_train_labels.csv"
IMAGES_DIR = "stage_2_train_images"
COLUMNS = ("patientId", "x", "y", "width", "height", "Target")

TASKS = {
    "classification": TaskSpec("multi_label_classification", ("Pneumonia",), "auroc"),
    "detection": TaskSpec("detection", ("Pneumonia",), "map"),
    "segmentation": TaskSpec("segmentation", ("Pneumonia",), "dice"),
}

# Reference sizes (docs/method.md E.1 / E.2) on the full 26,684 stage-2 patients.
FULL_PATIENTS = 26684
DETECTION_HOLDOUT = 10674  # = 2 * 5337
CLASSIFICATION_HOLDOUT_FRACTION = 0.3  # test_fac 0.15 * 2


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------
def _three_way(ids: List[str], holdout, seed: int) -> Dict[str, List[str]]:
    """Reference two-step split: (train, held) = split(ids); (test, validation) = split(held, 0.5)."""
    train, held = sklearn_holdout_split(ids, holdout, seed)
    test, validation = sklearn_holdout_split(held, 0.5, seed)
    return {"train": train, "validation": validation, "test": test}


def detection_holdout(n: int) -> int:
    """Held-out (validation + test) count for detection: 10,674 of 26,684, scaled to ``n``."""
    return -(-n * DETECTION_HOLDOUT // FULL_PATIENTS)  # exact integer ceil


def classification_split_sizes(n: int) -> Tuple[int, int, int]:
    """(train, validation, test) sizes of the classification split for ``n`` patients."""
    held = sklearn_test_count(n, CLASSIFICATION_HOLDOUT_FRACTION)
    val = sklearn_test_count(held, 0.5)
    return n - held, val, held - val


def detection_split_sizes(n: int) -> Tuple[int, int, int]:
    """(train, validation, test) sizes of the detection/segmentation split for ``n`` patients."""
    held = detection_holdout(n)
    val = sklearn_test_count(held, 0.5)
    return n - held, val, held - val


def split_patients(ids, task: str, seed: int = 0) -> Dict[str, List[str]]:
    """Split patient ids (sorted first, like the reference's groupby) for ``task``."""
    ids = sorted(ids)
    if len(ids) < 3:
        raise DatasetFormatError(f"RSNA: need at least 3 usable patients to split, found {len(ids)}")
    holdout = CLASSIFICATION_HOLDOUT_FRACTION if task == "classification" else detection_holdout(len(ids))
    return _three_way(ids, holdout, seed)


# ------------------------------------------------------------------------------------------------
# Label file
# ------------------------------------------------------------------------------------------------
@dataclass
class Patient:
    """One patient: binary Target and its boxes in pixels ``(x, y, width, height)``."""

    patient_id: str
    target: int
    boxes: List[Tuple[float, float, float, float]] = field(default_factory=list)


def _parse_number(text: str) -> Optional[float]:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def read_labels(data_dir: str, manifest: Manifest) -> "OrderedDict[str, Patient]":
    """Parse ``stage_2_train_labels.csv`` into patients; bad rows/patients go to ``manifest``."""
    path = os.path.join(data_dir, LABELS_CSV)
    if not os.path.isfile(path):
        found = sorted(os.listdir(data_dir))[:20] if os.path.isdir(data_dir) else "no such folder"
        raise DatasetFormatError(f"RSNA: expected {LABELS_CSV} in {data_dir!r}; found: {found}")
    df = read_csv_table(path, COLUMNS, "RSNA")
    manifest.inputs["rows"] = len(df)
    rows: Dict[str, Dict] = OrderedDict()
    seen = set()
    for i, rec in enumerate(df[list(COLUMNS)].itertuples(index=False, name=None)):
        pid, x, y, w, h, target = (str(v).strip() for v in rec)
        item = f"row {i + 2}: {pid or '<empty>'}"  # +2: header line and 1-based numbering
        if not pid:
            manifest.skip("missing_patient_id", item)
            continue
        if (pid, x, y, w, h, target) in seen:
            manifest.skip("duplicate_row", item)
            continue
        seen.add((pid, x, y, w, h, target))
        t = _parse_number(target)
        if t not in (0.0, 1.0):
            manifest.skip("bad_target", f"{item} (Target={target!r})")
            continue
        fields = (x, y, w, h)
        if all(f == "" for f in fields):
            box = None
        else:
            nums = [_parse_number(f) for f in fields]
            if any(v is None for v in nums):
                manifest.skip("malformed_box", f"{item} (x,y,width,height={fields})")
                continue
            box = tuple(nums)
        p = rows.setdefault(pid, {"targets": [], "boxes": [], "mismatch": False})
        p["targets"].append(int(t))
        if box is not None:
            p["boxes"].append(box)
        if (t == 1.0) != (box is not None):
            p["mismatch"] = True

    manifest.inputs["patients"] = len(rows)
    patients: "OrderedDict[str, Patient]" = OrderedDict()
    for pid, p in rows.items():
        if p["mismatch"]:
            manifest.skip("target_box_mismatch", pid)
            continue
        patients[pid] = Patient(pid, int(max(p["targets"])), list(p["boxes"]))
    return patients


def normalise_box(box, width: int, height: int) -> Tuple[Optional[List[float]], Optional[str]]:
    """Pixel ``(x, y, w, h)`` -> normalised clipped ``[x0, y0, x1, y1]`` and a status.

    Status is ``None`` (inside), ``"box_clipped"`` (partly outside, clipped),
    ``"box_nonpositive_size"`` or ``"box_outside_image"`` (the box is then ``None``).
    """
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return None, "box_nonpositive_size"
    x0, y0, x1, y1 = x, y, x + w, y + h
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return None, "box_outside_image"
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    status = "box_clipped" if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1) else None
    return [cx0 / width, cy0 / height, cx1 / width, cy1 / height], status


def boxes_mask(boxes: List[List[float]], width: int, height: int) -> np.ndarray:
    """uint8 mask (height x width), 255 inside the union of normalised boxes (pixel-aligned)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        c0, r0 = int(math.floor(x0 * width + 1e-6)), int(math.floor(y0 * height + 1e-6))
        c1, r1 = int(math.ceil(x1 * width - 1e-6)), int(math.ceil(y1 * height - 1e-6))
        mask[r0:r1, c0:c1] = 255
    return mask


# ------------------------------------------------------------------------------------------------
# Builder
# ------------------------------------------------------------------------------------------------
@dataclass
class RSNAConfig(datasets.BuilderConfig):
    """Options: ``max_size`` (longest stored side; 0 keeps full size), ``split_seed``, ``scaling``."""

    max_size: int = 1024
    split_seed: int = 0
    scaling: str = "minmax"


class RSNA(CGNSBuilder):
    """RSNA Pneumonia stage-2 builder; one config per task (see the module docstring)."""

    NAME, TASKS = NAME, TASKS
    READS_DICOM = True
    BUILDER_CONFIG_CLASS = RSNAConfig
    BUILDER_CONFIGS = [RSNAConfig(name=t, version=datasets.Version("1.0.0")) for t in TASKS]
    DEFAULT_CONFIG_NAME = "classification"

    def _split_generators(self, dl_manager):
        cfg = self.config
        if cfg.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {cfg.scaling!r}")
        data_dir = self._data_dir()
        patients = read_labels(data_dir, self.manifest)
        image_dir = os.path.join(data_dir, IMAGES_DIR)
        present = {f[:-4] for f in os.listdir(image_dir) if f.endswith(".dcm")} if os.path.isdir(image_dir) else set()
        if not present:
            raise DatasetFormatError(f"RSNA: expected DICOMs at {IMAGES_DIR}/<patientId>.dcm under {data_dir!r}; "
                                     f"found none")
        usable = []
        for pid in patients:
            _, refused = resolve_listed_path(data_dir, pid, [os.path.join(image_dir, pid + ".dcm")])
            if refused:  # only names in the folder listing are ever opened; say why this one is not
                self.manifest.skip(refused, pid)
            elif pid in present:
                usable.append(pid)
            else:
                self.manifest.skip("missing_image", pid)
        if not usable:
            raise DatasetFormatError(f"RSNA: none of the {len(patients)} patients in {LABELS_CSV} has a DICOM "
                                     f"in {IMAGES_DIR}/ (found {len(present)} unrelated .dcm files)")
        splits = split_patients(usable, cfg.name, cfg.split_seed)
        return self.split_generators({s: [patients[p] for p in ids] for s, ids in splits.items()},
                                     image_dir=image_dir)

    def _item_file(self, patient, image_dir):
        return os.path.join(image_dir, patient.patient_id + ".dcm")

    def _examples(self, patients, image_dir):
        cfg, task = self.config, self.config.name
        for p in patients:
            try:
                dcm = read_dicom(os.path.join(image_dir, p.patient_id + ".dcm"), cfg.scaling)
            except DicomReadError as e:
                self.manifest.skip("unreadable_dicom", f"{p.patient_id} ({e})")
                continue
            image = dcm.to_pil()
            example = {"image": png_image(image, cfg.max_size), "image_id": p.patient_id}
            if task == "classification":
                example["labels"] = [float(p.target)]
            else:
                boxes = []
                for b in p.boxes:
                    nb, status = normalise_box(b, dcm.width, dcm.height)
                    if status == "box_clipped":
                        self.manifest.repair(status, f"{p.patient_id} {b}")
                    elif status is not None:
                        self.manifest.skip(status, f"{p.patient_id} {b}")
                    if nb is not None:
                        boxes.append(nb)
                if p.boxes and not boxes:  # a positive stored as a negative would teach background
                    self.manifest.skip("positive_without_usable_box", p.patient_id)
                    continue
                if task == "detection":
                    example["boxes"] = boxes
                else:  # a PIL image: datasets stores it as PNG
                    import PIL.Image

                    mask = PIL.Image.fromarray(boxes_mask(boxes, dcm.width, dcm.height), mode="L")
                    example["mask"] = resize_longest(mask, cfg.max_size, PIL.Image.NEAREST)
            yield p.patient_id, example


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------
def load(data_dir=None, task: str = "classification", data_pct: float = 1.0, seed: int = 0,
         cache_dir=None, **options) -> datasets.DatasetDict:
    """Prepare (once, Arrow-cached under ``cache_dir``) and load RSNA ``task`` as a DatasetDict.

    ``options``: ``max_size`` (default 1024; 0 keeps full size), ``split_seed`` (default 0),
    ``scaling`` (``"minmax"`` or ``"max"``), ``download_mode``, ``verbose``. ``data_pct``
    subsamples train only, from ``seed``.
    """
    return prepare_and_load(RSNA, task, data_dir, data_pct, seed, cache_dir, **options)


def main(argv=None) -> int:
    """CLI: ``python -m data_scripts.rsna --data_dir D --output_dir O [--task T ...] [--max_size N]``."""
    return run_cli(NAME, load, TASKS, argv, "Prepare RSNA Pneumonia (stage 2) for CGNS fine-tuning.",
                   flags=[MAX_SIZE_FLAG, CliFlag.for_option("split_seed", type=int, help="split seed (0)")])


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = [
    "NAME", "TASKS", "RSNA", "RSNAConfig", "Patient", "load", "main", "read_labels", "normalise_box",
    "boxes_mask", "split_patients", "classification_split_sizes", "detection_split_sizes", "detection_holdout",
]
