"""MS-CXR phrase grounding (Boecking et al., ECCV 2022) on MIMIC-CXR-JPG images -> the ``grounding`` task.

Reads the files as PhysioNet publishes them (docs/data_contract.md, docs/evaluation.md):

* ``<data_dir>/MS_CXR_Local_Alignment_v1.1.0.csv`` (MS-CXR 1.1.0) or ``MS_CXR_Local_Alignment_v1.0.0.csv``
  (MS-CXR 0.1): one row per box, columns ``dicom_id, category_name, label_text, path, x, y, w, h,
  image_width, image_height`` and, in 1.1.0 only, ``split`` (``train`` / ``val`` / ``test``). ``x, y`` is
  the top-left corner, ``w, h`` the extent, all in pixels of the original image of ``image_width x
  image_height``; ``label_text`` is the phrase, ``category_name`` its finding (8 findings);
* the MIMIC-CXR-JPG 2.0.0 tree (option ``mimic_cxr_dir``): ``mimic-cxr-2.0.0-metadata.csv(.gz)`` gives each
  ``dicom_id`` its subject and study, and the image is ``files/p<xx>/p<subject>/s<study>/<dicom_id>.jpg``.
  Rows are joined to it by ``dicom_id`` (the ``path`` column is not read: no path from a list file is ever
  opened).

One dataset row per phrase (``dicom_id`` + ``label_text``): ``sentences`` = [the phrase], ``sentence_boxes`` =
[its boxes], ``sentence_findings`` = [its category]; boxes are normalised ``[x_min, y_min, x_max, y_max]``
by the CSV's image size, so storing the image smaller never moves them, and the grounding task maps them
through the processor's resize / pad / crop onto the model's grid (``downstream.grounding.box_to_crop``).
Each phrase is its own row so that it is encoded alone, as in the published zero-shot evaluation. By default
every phrase is in the split ``test`` (the published numbers use all of MS-CXR); ``official_split=True`` keeps
the 1.1.0 ``split`` column instead (``val`` -> ``validation``).

Bad input is counted in ``manifest.json``, one entry per CSV row (first failing check wins):
``malformed box`` (a coordinate or the image size missing or not a finite number, ``w``/``h`` or the image
size not positive), ``box outside image``, ``empty phrase``, ``unknown dicom_id`` (not in the MIMIC-CXR-JPG
metadata), ``duplicate box`` (a row repeating an earlier one), ``unknown split value`` (``official_split``
only), ``image size disagrees with the CSV`` (the JPEG's aspect ratio differs from ``image_width /
image_height`` by more than 1 %, so the boxes would not land on it), ``missing image file`` /
``unreadable image`` / ``truncated image``. Repairs: ``box clipped to the image``. Accounting:
``inputs["csv rows"]`` = the boxes in the dataset + the skipped rows.
"""
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import datasets

from .builder import (
    STORED_IMAGE_FORMATS,
    CGNSBuilder,
    CliFlag,
    DatasetFormatError,
    Manifest,
    TaskSpec,
    encode_image_file,
    prepare_and_load,
    read_csv_table,
    run_cli,
    validate_image_files,
)
from .mimic_cxr import METADATA_FILE, _digits, _find_table, _image_relpath, _read_csv

NAME = "ms_cxr"
FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Lung Opacity", "Pleural Effusion",
            "Pneumonia", "Pneumothorax")
TASKS = {"grounding": TaskSpec("grounding", FINDINGS, "cnr")}
#: The local-alignment CSV of each published version, newest first.
CSV_FILES = {"1.1.0": "MS_CXR_Local_Alignment_v1.1.0.csv", "1.0.0": "MS_CXR_Local_Alignment_v1.0.0.csv"}
REQUIRED_COLUMNS = ("dicom_id", "category_name", "label_text", "x", "y", "w", "h", "image_width", "image_height")
SPLIT_MAP = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
ASPECT_TOLERANCE = 0.01

R_MALFORMED_BOX = "malformed box"
R_BOX_OUTSIDE = "box outside image"
R_EMPTY_PHRASE = "empty phrase"
R_UNKNOWN_DICOM = "unknown dicom_id"
R_DUPLICATE_BOX = "duplicate box"
R_UNKNOWN_SPLIT = "unknown split value"
R_SIZE_MISMATCH = "image size disagrees with the CSV"
R_CLIPPED = "box clipped to the image"


def _number(text: str) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def normalized_box(x: float, y: float, w: float, h: float, width: float, height: float
                   ) -> Tuple[Optional[List[float]], Optional[str], bool]:
    """An MS-CXR box (top-left ``x, y``, extent ``w, h``, pixels of a ``width x height`` image) ->
    ``([x_min, y_min, x_max, y_max] in [0, 1], None, clipped)`` or ``(None, skip reason, False)``."""
    if w <= 0 or h <= 0 or width <= 0 or height <= 0:
        return None, R_MALFORMED_BOX, False
    raw = [x / width, y / height, (x + w) / width, (y + h) / height]
    box = [min(max(v, 0.0), 1.0) for v in raw]
    if box[2] <= box[0] or box[3] <= box[1]:
        return None, R_BOX_OUTSIDE, False
    return box, None, box != raw


def find_csv(data_dir: str, version: Optional[str] = None) -> Tuple[str, str]:
    """``(path, version)`` of the local-alignment CSV in ``data_dir`` (the newest when ``version`` is None)."""
    if version is not None and version not in CSV_FILES:
        raise ValueError(f"version must be one of {list(CSV_FILES)}, got {version!r}")
    for name in ([version] if version else list(CSV_FILES)):
        path = os.path.join(data_dir, CSV_FILES[name])
        if os.path.isfile(path):
            return path, name
    wanted = CSV_FILES[version] if version else " or ".join(CSV_FILES.values())
    raise DatasetFormatError(f"{data_dir} is not MS-CXR: expected {wanted}, found {sorted(os.listdir(data_dir))[:20]}")


def read_metadata(mimic_cxr_dir: Optional[str]) -> Tuple[str, Dict[str, Tuple[str, str]]]:
    """``(folder, {dicom_id: (subject_id, study_id)})`` from the MIMIC-CXR-JPG metadata table."""
    if not mimic_cxr_dir:
        raise DatasetFormatError("ms_cxr needs the MIMIC-CXR-JPG folder: pass mimic_cxr_dir=... (the folder with "
                                 f"files/ and {METADATA_FILE})")
    folder = os.path.abspath(os.path.expanduser(str(mimic_cxr_dir)))
    table = _find_table(folder, METADATA_FILE) if os.path.isdir(folder) else None
    if table is None:
        raise DatasetFormatError(f"mimic_cxr_dir {folder!r} is not MIMIC-CXR-JPG 2.0.0: no {METADATA_FILE}(.gz)")
    ids = {}
    for row in _read_csv(table, ("dicom_id", "subject_id", "study_id"), "metadata"):
        subject, study = _digits(row["subject_id"], "p"), _digits(row["study_id"], "s")
        if row["dicom_id"] and subject is not None and study is not None:
            ids[row["dicom_id"]] = (subject, study)
    return folder, ids


def _aspect_matches(path: str, width: float, height: float) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        actual_w, actual_h = im.size
    return abs((actual_w / actual_h) / (width / height) - 1.0) <= ASPECT_TOLERANCE


def scan(data_dir: str, mimic_cxr_dir: Optional[str], version: Optional[str] = None, official_split: bool = False,
         num_workers: Optional[int] = None) -> Tuple[Dict[str, List[dict]], Manifest, str]:
    """Read and check everything; ``({split: [phrase record, ...]}, manifest, version read)``.

    A phrase record holds ``image_path`` (absolute, only used while writing), ``image_id``
    (``<dicom_id>/<k>``, k counting the image's phrases in CSV order), ``dicom_id``, ``subject_id``,
    ``study_id``, ``sentences``, ``sentence_boxes``, ``sentence_findings``.
    """
    manifest = Manifest(NAME, "grounding")
    if not os.path.isdir(data_dir):
        raise DatasetFormatError(f"MS-CXR data_dir {data_dir!r} is not a folder")
    csv_path, version = find_csv(data_dir, version)
    table = read_csv_table(csv_path, REQUIRED_COLUMNS + (("split",) if official_split else ()), "MS-CXR",
                           hint=" (official_split needs MS-CXR 1.1.0's split column)" if official_split else "")
    mimic_dir, ids = read_metadata(mimic_cxr_dir)
    manifest.inputs["csv rows"] = len(table)
    phrases: Dict[Tuple[str, str], dict] = {}
    row_ids: Dict[Tuple[str, str], List[str]] = {}
    seen = set()
    for index, row in enumerate(table.to_dict("records")):
        dicom = row["dicom_id"]
        item = f"row {index + 2} ({dicom or 'no dicom_id'})"          # line number in the file, header = 1
        values = [_number(row[c]) for c in ("x", "y", "w", "h", "image_width", "image_height")]
        if any(v is None for v in values):
            manifest.skip(R_MALFORMED_BOX, item)
            continue
        box, reason, clipped = normalized_box(*values)
        if reason is not None:
            manifest.skip(reason, item)
            continue
        phrase = " ".join(row["label_text"].split())
        if not phrase:
            manifest.skip(R_EMPTY_PHRASE, item)
            continue
        if dicom not in ids:
            manifest.skip(R_UNKNOWN_DICOM, item)
            continue
        split = "test"
        if official_split:
            split = SPLIT_MAP.get(row["split"].lower())
            if split is None:
                manifest.skip(R_UNKNOWN_SPLIT, f"{item}: {row['split']!r}")
                continue
        key = (dicom, phrase, row["category_name"], tuple(values))
        if key in seen:
            manifest.skip(R_DUPLICATE_BOX, item)
            continue
        seen.add(key)
        if clipped:
            manifest.repair(R_CLIPPED, item)
        subject, study = ids[dicom]
        record = phrases.setdefault((dicom, phrase), {
            "split": split, "dicom_id": dicom, "subject_id": subject, "study_id": study,
            "image_path": os.path.join(mimic_dir, *_image_relpath(subject, study, dicom).split("/")),
            "sentences": [phrase], "sentence_boxes": [[]], "sentence_findings": [row["category_name"]],
            "declared_size": values[4:]})
        record["sentence_boxes"][0].append(box)
        row_ids.setdefault((dicom, phrase), []).append(item)

    checked = validate_image_files([r["image_path"] for r in phrases.values()], num_workers)
    splits: Dict[str, List[dict]] = {}
    per_image: Dict[str, int] = {}
    for key, record in phrases.items():
        reason = checked[record["image_path"]]
        if reason is None and not _aspect_matches(record["image_path"], *record["declared_size"]):
            reason = R_SIZE_MISMATCH
        if reason is not None:
            for item in row_ids[key]:
                manifest.skip(reason, item)
            continue
        del record["declared_size"]
        k = per_image.get(record["dicom_id"], 0)
        per_image[record["dicom_id"]] = k + 1
        record["image_id"] = f"{record['dicom_id']}/{k}"
        splits.setdefault(record.pop("split"), []).append(record)
    for records in splits.values():
        records.sort(key=lambda r: (r["subject_id"], r["study_id"], r["image_id"]))
    manifest.rows = {k: len(v) for k, v in splits.items()}
    if not splits:
        raise DatasetFormatError(f"nothing usable remains in {csv_path}: {len(table)} rows, skipped "
                                 f"{ {k: len(v) for k, v in manifest.skipped.items()} }")
    return splits, manifest, version


# ------------------------------------------------------------------------------------------------
# Builder, load(), CLI
# ------------------------------------------------------------------------------------------------

#: The 224 px protocol resizes the longest side to 256: storing exactly that makes its resize the identity.
DEFAULT_MAX_SIZE = 256


@dataclass
class MsCxrConfig(datasets.BuilderConfig):
    """Options: ``mimic_cxr_dir`` (the MIMIC-CXR-JPG 2.0.0 folder; required), ``ms_cxr_version`` (``"1.1.0"`` or
    ``"1.0.0"``; default: the newest CSV in data_dir), ``official_split`` (keep 1.1.0's split column instead
    of one ``test`` split), ``max_size`` (longest stored side, 256; 0 keeps the JPEGs), ``image_format``
    (``"png"``, ``"bmp"`` or ``"jpeg"`` for resized images), ``num_workers`` (image validation threads)."""

    mimic_cxr_dir: Optional[str] = None
    ms_cxr_version: Optional[str] = None
    official_split: bool = False
    max_size: int = DEFAULT_MAX_SIZE
    image_format: str = "png"
    num_workers: Optional[int] = None


class MsCxr(CGNSBuilder):
    """MS-CXR phrases with their boxes on MIMIC-CXR-JPG images; one config, ``grounding``."""

    NAME, TASKS = NAME, TASKS
    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIG_CLASS = MsCxrConfig
    BUILDER_CONFIGS = [MsCxrConfig(name="grounding", version=VERSION, description="phrase + boxes per row")]
    DEFAULT_CONFIG_NAME = "grounding"
    PATH_OPTIONS = ("mimic_cxr_dir",)
    EXTRA_FEATURES = {"sentence_findings": datasets.List(datasets.Value("string")),
                      "dicom_id": datasets.Value("string"), "subject_id": datasets.Value("string"),
                      "study_id": datasets.Value("string")}

    def _split_generators(self, dl_manager):
        if self.config.image_format not in STORED_IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {STORED_IMAGE_FORMATS}, got {self.config.image_format!r}")
        splits, self.manifest, version = scan(self._data_dir(), self.config.mimic_cxr_dir, self.config.ms_cxr_version,
                                              self.config.official_split, self.config.num_workers)
        self.manifest.inputs["ms_cxr version"] = version
        return self.split_generators(splits)

    def _examples(self, records, **extra):
        columns = [c for c in self.info.features if c != "image"]
        stored: Dict[str, dict] = {}
        for rec in records:              # sorted by image: the phrases of one image are consecutive
            if rec["image_path"] not in stored:
                stored = {rec["image_path"]: encode_image_file(rec["image_path"], self.config.max_size,
                                                               self.config.image_format)}
            yield rec["image_id"], {"image": stored[rec["image_path"]], **{c: rec[c] for c in columns}}


def load(data_dir=None, task: str = "grounding", data_pct: float = 1.0, seed: int = 0, cache_dir=None,
         **options) -> datasets.DatasetDict:
    """``DatasetDict`` with ``test`` (every phrase; or train / validation / test with ``official_split``).

    ``options``: ``mimic_cxr_dir`` (required), ``ms_cxr_version``, ``official_split``, ``max_size``, ``image_format``,
    ``num_workers`` (``MsCxrConfig``), ``download_mode``, ``verbose``.
    """
    return prepare_and_load(MsCxr, task, data_dir, data_pct, seed, cache_dir, **options)


def main(argv=None) -> int:
    return run_cli(NAME, load, TASKS, argv, description=__doc__.splitlines()[0],
                   flags=[CliFlag.for_option("mimic_cxr_dir", help="the MIMIC-CXR-JPG 2.0.0 folder (files/ + "
                                                                   "metadata CSV)"),
                          CliFlag.for_option("ms_cxr_version", choices=list(CSV_FILES), help="MS-CXR CSV version"),
                          CliFlag.for_option("max_size", type=int,
                                             help=f"longest stored side ({DEFAULT_MAX_SIZE}; 0: original JPEGs)")])


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = [
    "TASKS", "FINDINGS", "CSV_FILES", "REQUIRED_COLUMNS", "DEFAULT_MAX_SIZE", "MsCxr", "MsCxrConfig",
    "normalized_box", "find_csv", "read_metadata", "scan", "load", "main",
]
