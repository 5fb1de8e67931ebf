"""MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR reports -> image-report pairs for pretraining (docs/method.md D).

Reads the published layout as it is (docs/data_contract.md):

* images ``files/p<xx>/p<subject_id>/s<study_id>/<dicom_id>.jpg``;
* ``mimic-cxr-2.0.0-metadata.csv`` (or ``.csv.gz``): ``dicom_id, subject_id, study_id, ViewPosition, ...``;
* ``mimic-cxr-2.0.0-split.csv`` (or ``.csv.gz``): ``dicom_id, study_id, subject_id, split``;
* reports ``files/p<xx>/p<subject_id>/s<study_id>.txt``, either inside the official
  ``mimic-cxr-reports.zip`` (possibly under a top folder) or extracted into a folder.

Each report is cut into sections (D.1, ``extract_sections``); the text used is
``impression + " " + findings`` (``modeling_cgns.sentences.report_text``), or the report's last
paragraph when it has neither section. Only frontal images (PA/AP) are kept.

Tasks:

* ``pretraining``: ``train`` (official train) and ``validation`` (the official ``validate`` and ``test``
  splits merged: pretraining only reports losses on it);
* ``retrieval``: the official ``test`` split alone, as a ``test`` split of image-report pairs (``cgns evaluate
  --task retrieval --dataset mimic_cxr``);
* ``classification``: the same test rows with the five CheXpert competition labels of their study from
  ``mimic-cxr-2.0.0-chexpert.csv(.gz)`` (1.0 = positive; 0.0, -1.0 (uncertain) and blank = negative), for
  ``cgns evaluate --task zero_shot --dataset mimic_cxr``;
* ``5x200``: up to ``holdout_per_task`` (200) of those test images per competition task that are positive
  for exactly that task and negative or blank for the four others, drawn with ``split_seed`` (the rule of
  the CheXpert 5x200 set, ``data_scripts.chexpert.select_5x200``), as a ``test`` split.

The evaluation tasks keep the rows the pretraining task would keep (frontal, a usable report, a readable
image); the rows of other official splits are counted in ``inputs["rows outside the official test split"]``,
not listed. Unlike the reference, nothing
depends on absolute paths (G.2 item 29): images are stored as bytes and the ids are kept as strings.
Image paths are built from the digit-checked ids, never read from a file, so none can leave the
data folder.

Report bytes that are not UTF-8 are decoded as Windows-1252, else Latin-1 (``decode_text``; never
a replacement character) and counted as repaired (``report not UTF-8 (decoded with fallback)``). An
archive member that cannot be read (bad CRC, corrupt data) skips its study's images with
``unreadable report (bad archive member)`` and the member's name and error. Accounting:
``inputs["metadata rows"]`` = train + validation rows + skips.

Stored size (docs/data_contract.md): the ~2,500 x 3,000 px JPEGs are resized once, while preparing,
to a longest side of ``max_size`` (default 256, the 224 px protocol's resize size, stored as lossless
uncompressed BMP, which decodes fastest: the processor's resize is then the identity, so training sees
what resizing the original gives, within 8-bit rounding) instead of in every epoch; ``max_size=0``
keeps the original JPEG bytes. The
resizing runs in ``num_workers`` threads in resumable shards (``iter_encoded_images``).
"""
import csv
import gzip
import os
import re
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import datasets

from modeling_cgns.sentences import is_usable_report, report_text, split_sentences

from .builder import (
    STORED_IMAGE_FORMATS,
    CGNSBuilder,
    CliFlag,
    DatasetFormatError,
    Manifest,
    TaskSpec,
    decode_text,
    iter_encoded_images,
    keep_valid_images,
    prepare_and_load,
    run_cli,
    validate_image_files,
)
from .chexpert import COMPETITION_TASKS, DEFAULT_HOLDOUT_PER_TASK, select_5x200

NAME = "mimic_cxr"
TASKS = {"pretraining": TaskSpec("pretraining", (), None),
         # the official test split alone (encoder-only evaluation: docs/evaluation.md)
         "retrieval": TaskSpec("pretraining", (), None),
         "classification": TaskSpec("multi_label_classification", COMPETITION_TASKS, "auroc"),
         "5x200": TaskSpec("multi_label_classification", COMPETITION_TASKS, "auroc")}
EVALUATION_TASKS = ("retrieval", "classification", "5x200")
LABELLED_TASKS = ("classification", "5x200")

METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
CHEXPERT_FILE = "mimic-cxr-2.0.0-chexpert.csv"
REPORTS_ZIP = "mimic-cxr-reports.zip"
FRONTAL_VIEWS = ("PA", "AP")
SPLIT_MAP = {"train": "train", "validate": "validation", "test": "validation"}

# Manifest reasons (one per skipped image row, first failing check wins).
R_DUPLICATE = "duplicate dicom_id"
R_MALFORMED = "malformed metadata row"
R_NON_FRONTAL = "non-frontal view"
R_NO_SPLIT = "dicom without split row"
R_CONFLICTING_SPLIT = "conflicting split rows"
R_UNKNOWN_SPLIT = "unknown split value"
R_MISSING_REPORT = "missing report"
R_EMPTY_REPORT = "empty report"
R_SECTIONLESS = "section-less report"
R_NO_SENTENCES = "no usable sentences"
R_UNREADABLE_REPORT = "unreadable report (bad archive member)"
R_NO_LABELS = "study without CheXpert labels"
R_BAD_LABEL = "invalid CheXpert label value"
R_NOT_5X200 = "not positive for exactly one competition task (5x200)"
# A repair, once per report file: not UTF-8, decoded with the cp1252 / latin-1 fallback (decode_text).
R_DECODED_REPORT = "report not UTF-8 (decoded with fallback)"

# ------------------------------------------------------------------------------------------------
# Report sectioning (D.1)
# ------------------------------------------------------------------------------------------------

# An upper-case header at the start of a line: "FINDINGS:", " IMPRESSION: ...", "PA AND LATERAL:".
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]*[A-Z)])[ \t]*:", re.MULTILINE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")

# Common spellings -> canonical section name (lower-case keys). Anything not listed falls through to
# the containment rules in ``normalize_section_name``.
SECTION_ALIASES = {
    "comparisons": "comparison", "comparision": "comparison", "comparsion": "comparison",
    "comparrison": "comparison", "comparisions": "comparison", "reference exam": "comparison",
    "prior": "comparison", "priors": "comparison",
    "conclusion": "impression", "conclusions": "impression", "impresson": "impression",
    "imprression": "impression", "imoression": "impression", "impressoin": "impression",
    "imprssion": "impression", "impresion": "impression", "imperssion": "impression",
    "mpression": "impression", "impession": "impression", "summary": "impression",
    "finding": "findings", "findins": "findings", "findindgs": "findings", "findgings": "findings",
    "findngs": "findings", "findnings": "findings", "finidngs": "findings", "fidings": "findings",
    "clinical information": "history", "pfi": "history", "hx": "history",
    "indication": "indication", "indications": "indication", "idication": "indication",
    "clinical indication": "indication", "reason for exam": "indication",
    "reason for examination": "indication", "reason for study": "indication",
    "exam": "examination", "examination": "examination", "type of examination": "examination",
    "technique": "technique", "notification": "notification", "wet read": "wet read",
    "wetread": "wet read", "recommendation": "recommendations", "recommendation(s)": "recommendations",
    "recommendations": "recommendations",
}
# Containment rules, checked in this order ("findings and impression" -> impression).
MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")
# A header naming the view or exam describes the whole study: its text is findings.
_VIEW_PHRASE = re.compile(
    r"chest|portable|pa and lat|lateral and pa|ap and lat|lateral and ap|frontal and|two views|"
    r"frontal view|pa view|ap view|one view|single view|lateral view|bone window|frontal upright|"
    r"frontal semi-upright|upright|supine|semi-erect|ribs"
)


def normalize_section_name(name: str) -> str:
    """Map a raw header ("IMPRESSON", "PA AND LATERAL VIEWS OF THE CHEST") to a canonical name."""
    key = " ".join(name.lower().split())
    if key in SECTION_ALIASES:
        return SECTION_ALIASES[key]
    for main in MAIN_SECTIONS:
        if main in key:
            return main
    if "indication" in key or key.startswith("reason for"):
        return "indication"
    if _VIEW_PHRASE.search(key):
        return "findings"
    return key


def section_report(text: str) -> List[Tuple[str, str]]:
    """Cut a report into ``[(canonical name, section text), ...]`` in reading order.

    The text before the first header is ``"preamble"``; a report without any header is one
    ``"full report"`` section. Empty impression/findings sections are dropped.
    """
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    matches = list(_HEADER.finditer(text))
    if not matches:
        return [("full report", text)]
    sections = [("preamble", text[: matches[0].start()])]
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        sections.append((normalize_section_name(m.group(1)), text[m.end():end]))
    return [(n, s) for n, s in sections if not (n in ("impression", "findings") and not s.strip())]


def last_paragraph(section_text: str) -> Optional[str]:
    """The tail after the last blank line of ``section_text`` (``None`` without a blank line)."""
    parts = _BLANK_LINE.split(section_text.strip())
    if len(parts) < 2 or not parts[-1].strip():
        return None
    return parts[-1].strip()


def extract_sections(text: str) -> Dict[str, Optional[str]]:
    """D.1 on one report: ``{"impression", "findings", "last_paragraph", "comparison"}``.

    Each value is the stripped text of the *last* section of that name, or ``None``. When the
    report has neither impression nor findings, ``last_paragraph`` is the tail after the last
    blank line of its last section (else it stays ``None``).
    """
    sections = section_report(text)
    out: Dict[str, Optional[str]] = {"impression": None, "findings": None, "last_paragraph": None,
                                     "comparison": None}
    for name, body in sections:  # later occurrences overwrite earlier ones
        if name in out and body.strip():
            out[name] = body.strip()
    if out["impression"] is None and out["findings"] is None and sections:
        out["last_paragraph"] = last_paragraph(sections[-1][1])
    return out


def report_to_text(text: str) -> Tuple[Optional[str], Optional[str]]:
    """``(text used for training, None)`` or ``(None, skip reason)`` for one raw report."""
    if text is None:
        return None, R_MISSING_REPORT
    if not text.strip():
        return None, R_EMPTY_REPORT
    sec = extract_sections(text)
    if sec["impression"] is None and sec["findings"] is None:
        if sec["last_paragraph"] is None:
            return None, R_SECTIONLESS
        used = report_text(sec["last_paragraph"], None)
    else:
        used = report_text(sec["impression"], sec["findings"])
    if not used.strip():
        return None, R_SECTIONLESS
    return used, None


# ------------------------------------------------------------------------------------------------
# Reading the published files
# ------------------------------------------------------------------------------------------------

_REPORT_NAME = re.compile(r"(?:^|/)p(\d+)/s(\d+)\.txt$")


def _find_table(data_dir: str, filename: str) -> Optional[str]:
    for candidate in (filename, filename + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _read_csv(path: str, required: Tuple[str, ...], what: str) -> List[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            found = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in found]
            if missing:
                raise DatasetFormatError(
                    f"{what} {os.path.basename(path)} lacks column(s) {missing}; expected at least "
                    f"{list(required)}, found {found}"
                )
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetFormatError(f"cannot read {what} {path}: {exc}") from exc


class _ReportSource:
    """Report texts by study id, from the official zip or an extracted folder."""

    def __init__(self, path: str):
        self.path = path
        self._zip: Optional[zipfile.ZipFile] = None
        self.members: Dict[str, str] = {}
        self.duplicates: List[str] = []
        self.decoded: List[str] = []  # members that were not UTF-8 (decoded with a fallback)
        if os.path.isfile(path):
            try:
                self._zip = zipfile.ZipFile(path)
            except zipfile.BadZipFile as exc:
                raise DatasetFormatError(f"reports archive {path} is not a readable zip: {exc}") from exc
            names = self._zip.namelist()
        else:
            names = []
            for root, _, files in os.walk(path):
                for fn in files:
                    if fn.endswith(".txt"):
                        names.append(os.path.relpath(os.path.join(root, fn), path).replace(os.sep, "/"))
        for name in sorted(names):
            m = _REPORT_NAME.search(name)
            if m is None:
                continue
            study = m.group(2)
            if study in self.members:
                self.duplicates.append(name)
                continue
            self.members[study] = name

    def read(self, study_id: str) -> Tuple[Optional[str], Optional[str]]:
        """``(text, None)``; ``(None, None)`` when there is no report; ``(None, why)`` when its
        member or file cannot be read (bad CRC, corrupt compressed data, I/O error). Bytes that
        are not UTF-8 are decoded with ``decode_text``'s fallbacks, counted in ``self.decoded``."""
        name = self.members.get(study_id)
        if name is None:
            return None, None
        try:
            if self._zip is not None:
                raw = self._zip.read(name)
            else:
                with open(os.path.join(self.path, name), "rb") as f:
                    raw = f.read()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            return None, f"{name}: {type(exc).__name__}: {exc}"
        text, encoding = decode_text(raw)
        if encoding is not None:
            self.decoded.append(f"{name} ({encoding})")
        return text, None

    def close(self):
        if self._zip is not None:
            self._zip.close()


def _locate_reports(data_dir: str, reports_path: Optional[str]) -> str:
    if reports_path:
        path = reports_path if os.path.isabs(reports_path) else os.path.join(data_dir, reports_path)
        if not os.path.exists(path):
            raise DatasetFormatError(f"reports_path {path!r} does not exist")
        return path
    candidates = [os.path.join(data_dir, REPORTS_ZIP), os.path.join(data_dir, "reports"),
                  os.path.join(data_dir, "mimic-cxr-reports"), os.path.join(data_dir, "files")]
    for path in candidates:
        if os.path.isfile(path):
            return path
        if os.path.isdir(path) and any(f.endswith(".txt") for _, _, fs in os.walk(path) for f in fs):
            return path
    raise DatasetFormatError(
        f"no MIMIC-CXR reports in {data_dir}: expected {REPORTS_ZIP}, or a reports/ or files/ folder "
        f"holding files/p<xx>/p<subject>/s<study>.txt (or pass reports_path=...)"
    )


def read_chexpert_labels(data_dir: str) -> Dict[str, Optional[List[float]]]:
    """``{study_id: raw labels}`` of the five competition tasks from ``mimic-cxr-2.0.0-chexpert.csv(.gz)``:
    each value 1.0, 0.0 or -1.0, blank read as 0.0; ``None`` for a row with a value outside those."""
    path = _find_table(data_dir, CHEXPERT_FILE)
    if path is None:
        raise DatasetFormatError(
            f"{data_dir} has no {CHEXPERT_FILE}(.gz): the labels of the classification / 5x200 tasks come from "
            f"MIMIC-CXR-JPG's CheXpert table")
    labels: Dict[str, Optional[List[float]]] = {}
    for row in _read_csv(path, ("subject_id", "study_id") + COMPETITION_TASKS, "CheXpert labels"):
        study = _digits(row["study_id"], "s")
        if study is None:
            continue
        raw: Optional[List[float]] = []
        for name in COMPETITION_TASKS:
            value = row[name]
            try:
                number = float(value) if value else 0.0
            except ValueError:
                number = float("nan")
            if number not in (1.0, 0.0, -1.0):
                raw = None
                break
            raw.append(number)
        labels.setdefault(study, raw)
    return labels


def _image_relpath(subject_id: str, study_id: str, dicom_id: str) -> str:
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def _digits(value: str, prefix: str) -> Optional[str]:
    value = value.strip()
    if value.startswith(prefix):
        value = value[len(prefix):]
    if value.endswith(".0"):
        value = value[:-2]
    return value if value.isdigit() else None


def scan(data_dir: str, reports_path: Optional[str] = None, num_workers: Optional[int] = None,
         task: str = "pretraining", holdout_per_task: int = DEFAULT_HOLDOUT_PER_TASK,
         split_seed: int = 0) -> Tuple[Dict[str, List[dict]], Manifest]:
    """Read and validate everything; return ``({split: [record, ...]}, manifest)``.

    A record holds ``image_path`` (absolute, only used while writing), ``report``, ``sentences``,
    ``study_id``, ``subject_id``, ``dicom_id`` (and ``labels``, ``image_id`` for the labelled tasks). Raises ``DatasetFormatError`` when the folder is
    not MIMIC-CXR-JPG or nothing usable remains.
    """
    manifest = Manifest(NAME, task)
    if not os.path.isdir(data_dir):
        raise DatasetFormatError(f"MIMIC-CXR data_dir {data_dir!r} is not a folder")
    meta_path = _find_table(data_dir, METADATA_FILE)
    split_path = _find_table(data_dir, SPLIT_FILE)
    if meta_path is None or split_path is None:
        raise DatasetFormatError(
            f"{data_dir} is not MIMIC-CXR-JPG 2.0.0: expected {METADATA_FILE}(.gz) and {SPLIT_FILE}(.gz), "
            f"found {sorted(os.listdir(data_dir))[:20]}"
        )
    if not os.path.isdir(os.path.join(data_dir, "files")):
        raise DatasetFormatError(f"{data_dir} has no files/ folder with the MIMIC-CXR-JPG images")
    meta = _read_csv(meta_path, ("dicom_id", "subject_id", "study_id", "ViewPosition"), "metadata")
    split_rows = _read_csv(split_path, ("dicom_id", "study_id", "subject_id", "split"), "split table")

    # Split table: dicom_id -> split; identical duplicates are harmless, conflicting ones are not.
    split_of: Dict[str, str] = {}
    conflicting = set()
    for row in split_rows:
        d, s = row["dicom_id"], row["split"].lower()
        if d in split_of and split_of[d] != s:
            conflicting.add(d)
        elif d in split_of:
            manifest.repair("duplicate split row", d)
        split_of.setdefault(d, s)

    chexpert_labels = read_chexpert_labels(data_dir) if task in LABELLED_TASKS else {}
    reports = _ReportSource(_locate_reports(data_dir, reports_path))
    for name in reports.duplicates:
        manifest.repair("duplicate report file ignored", name)
    if not reports.members:
        raise DatasetFormatError(f"no s<study_id>.txt reports found in {reports.path}")

    manifest.inputs["metadata rows"] = len(meta)
    outside_test = 0
    seen = set()
    candidates: List[dict] = []
    report_cache: Dict[str, Tuple[Optional[str], Optional[List[str]], Optional[str], Optional[str]]] = {}
    try:
        for row in meta:
            dicom = row["dicom_id"]
            subject, study = _digits(row["subject_id"], "p"), _digits(row["study_id"], "s")
            if not dicom or subject is None or study is None:
                manifest.skip(R_MALFORMED, dicom or str(row))
                continue
            if dicom in seen:
                manifest.skip(R_DUPLICATE, dicom)
                continue
            seen.add(dicom)
            if row["ViewPosition"].upper() not in FRONTAL_VIEWS:
                manifest.skip(R_NON_FRONTAL, dicom)
                continue
            if dicom in conflicting:
                manifest.skip(R_CONFLICTING_SPLIT, dicom)
                continue
            if dicom not in split_of:
                manifest.skip(R_NO_SPLIT, dicom)
                continue
            split = SPLIT_MAP.get(split_of[dicom])
            if split is None:
                manifest.skip(R_UNKNOWN_SPLIT, f"{dicom} ({split_of[dicom]})")
                continue
            if task in EVALUATION_TASKS:
                if split_of[dicom] != "test":
                    outside_test += 1
                    continue
                split = "test"
            if study not in report_cache:
                text, unreadable = reports.read(study)
                used, reason = (None, R_UNREADABLE_REPORT) if unreadable else report_to_text(text)
                sentences = split_sentences(used) if used else []
                if used and not is_usable_report(sentences):
                    used, reason = None, R_NO_SENTENCES
                report_cache[study] = (used, sentences, reason, unreadable)
            used, sentences, reason, detail = report_cache[study]
            if reason is not None:
                manifest.skip(reason, f"{dicom} ({detail})" if detail else dicom)
                continue
            rel = _image_relpath(subject, study, dicom)
            record = {"split": split, "image_path": os.path.join(data_dir, *rel.split("/")),
                      "report": used, "sentences": sentences, "study_id": study,
                      "subject_id": subject, "dicom_id": dicom}
            if task in LABELLED_TASKS:
                if study not in chexpert_labels:
                    manifest.skip(R_NO_LABELS, f"{dicom} (study {study})")
                    continue
                if chexpert_labels[study] is None:
                    manifest.skip(R_BAD_LABEL, f"{dicom} (study {study})")
                    continue
                record.update(raw=chexpert_labels[study], image_id=dicom,
                              labels=[float(v == 1.0) for v in chexpert_labels[study]])
            candidates.append(record)
    finally:
        reports.close()
    if task in EVALUATION_TASKS:
        manifest.inputs["rows outside the official test split"] = outside_test
    for name in reports.decoded:
        manifest.repair(R_DECODED_REPORT, name)

    checked = validate_image_files([c["image_path"] for c in candidates], num_workers)
    splits: Dict[str, List[dict]] = {"test": []} if task in EVALUATION_TASKS else {"train": [], "validation": []}
    for c in keep_valid_images(candidates, checked, manifest, id_key="dicom_id"):
        splits[c.pop("split")].append(c)
    if task == "5x200":
        chosen = select_5x200(splits["test"], int(holdout_per_task), int(split_seed))
        for c in splits["test"]:
            if c["image_id"] not in chosen:
                manifest.skip(R_NOT_5X200, c["dicom_id"])
        splits["test"] = [c for c in splits["test"] if c["image_id"] in chosen]
    for records in splits.values():
        records.sort(key=lambda r: (r["subject_id"], r["study_id"], r["dicom_id"]))
    manifest.rows = {k: len(v) for k, v in splits.items()}
    if not any(splits.values()):
        raise DatasetFormatError(
            f"nothing usable remains in {data_dir}: {len(meta)} metadata rows, skipped "
            f"{ {k: len(v) for k, v in manifest.skipped.items()} }"
        )
    return splits, manifest


# ------------------------------------------------------------------------------------------------
# Builder, load(), CLI
# ------------------------------------------------------------------------------------------------

# The 224 px protocol resizes the longest side to 256: storing exactly that makes its resize the identity.
DEFAULT_MAX_SIZE = 256


@dataclass
class MimicCxrConfig(datasets.BuilderConfig):
    """Options: ``reports_path`` (zip or folder; default: found in data_dir), ``num_workers``
    (threads for image validation and resizing; default min(8, CPUs)), ``max_size`` (longest stored
    side, 256; 0 keeps the original JPEGs), ``image_format`` of resized images (``"bmp"``: lossless,
    uncompressed, fastest to decode; ``"png"``: lossless, half the disk; ``"jpeg"``), ``jpeg_quality``
    (95); ``holdout_per_task`` (200) and ``split_seed`` (0) of the ``5x200`` task."""

    reports_path: Optional[str] = None
    num_workers: Optional[int] = None
    max_size: int = DEFAULT_MAX_SIZE
    image_format: str = "bmp"
    jpeg_quality: int = 95
    holdout_per_task: int = DEFAULT_HOLDOUT_PER_TASK
    split_seed: int = 0


class MimicCxr(CGNSBuilder):
    """MIMIC-CXR-JPG image-report pairs (``pretraining``) and its official test split (``retrieval``,
    ``classification``, ``5x200``)."""

    NAME, TASKS = NAME, TASKS
    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIG_CLASS = MimicCxrConfig
    PATH_OPTIONS = ("reports_path",)
    BUILDER_CONFIGS = [
        MimicCxrConfig(name="pretraining", version=VERSION, description="frontal image + impression/findings "
                       "sentences: official train; validate + test as validation"),
        MimicCxrConfig(name="retrieval", version=VERSION, description="the official test split's image-report "
                       "pairs"),
        MimicCxrConfig(name="classification", version=VERSION, description="the official test split with the "
                       "five CheXpert competition labels"),
        MimicCxrConfig(name="5x200", version=VERSION, description="MIMIC-CXR 5x200: test images positive for "
                       "exactly one competition task")]
    DEFAULT_CONFIG_NAME = "pretraining"
    EXTRA_FEATURES = {"subject_id": datasets.Value("string"), "dicom_id": datasets.Value("string")}
    EXAMPLE_KEY = "dicom_id"

    def _split_generators(self, dl_manager):
        # options are set on the config after it is built (no __post_init__ sees them): check them here
        if self.config.image_format not in STORED_IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {STORED_IMAGE_FORMATS}, got {self.config.image_format!r}")
        if not 1 <= int(self.config.jpeg_quality) <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.config.jpeg_quality}")
        splits, self.manifest = scan(self._data_dir(), self.config.reports_path, self.config.num_workers,
                                     self.config.name, self.config.holdout_per_task, self.config.split_seed)
        return self.split_generators(splits)

    def _shard_dir(self) -> Optional[str]:
        """Where finished shards of resized images wait for a resumed preparation (beside the
        ``.incomplete`` folder, which datasets deletes when a preparation fails)."""
        return None if "://" in str(self._cache_dir) else str(self._cache_dir) + ".shards"

    def _examples(self, records, **extra):
        cfg = self.config
        columns = [c for c in self.info.features if c != "image"]
        workers = cfg.num_workers if cfg.num_workers is not None else min(8, os.cpu_count() or 1)
        images = iter_encoded_images([r["image_path"] for r in records], self._shard_dir(), workers,
                                     max_size=cfg.max_size, image_format=cfg.image_format,
                                     quality=cfg.jpeg_quality)
        for rec, image in zip(records, images):
            yield rec[self.EXAMPLE_KEY], {"image": image, **{c: rec[c] for c in columns}}

    def _download_and_prepare(self, dl_manager, verification_mode, **kwargs):
        super()._download_and_prepare(dl_manager, verification_mode, **kwargs)
        shard_dir = self._shard_dir()
        if shard_dir:       # everything is in the Arrow files now
            shutil.rmtree(shard_dir, ignore_errors=True)


def load(data_dir=None, task: str = "pretraining", data_pct: float = 1.0, seed: int = 0, cache_dir=None,
         **options) -> datasets.DatasetDict:
    """``DatasetDict`` of ``task``: ``pretraining`` gives ``train`` and ``validation`` (official validate + test),
    the evaluation tasks a ``test`` split (the official test split); see module doc.

    ``options``: ``reports_path``, ``num_workers``, ``max_size``, ``image_format``, ``jpeg_quality``,
    ``holdout_per_task``, ``split_seed`` (``MimicCxrConfig``), ``download_mode``, ``verbose``, ``force_prepare``.
    """
    return prepare_and_load(MimicCxr, task, data_dir, data_pct, seed, cache_dir, **options)


def main(argv=None) -> int:
    # the evaluation tasks are prepared when named (--task retrieval ...), or by the first evaluation
    return run_cli(NAME, load, TASKS, argv, description=__doc__.splitlines()[0], default_tasks=("pretraining",),
                   flags=[CliFlag.for_option("reports_path", help="mimic-cxr-reports.zip or its extracted folder "
                                             "(PhysioNet's MIMIC-CXR project; default: found in --data_dir)"),
                          CliFlag.for_option("max_size", type=int,
                                             help=f"longest stored side ({DEFAULT_MAX_SIZE}; 0: original JPEGs)"),
                          CliFlag.for_option("num_workers", type=int,
                                             help="threads validating and resizing images")])


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = [
    "TASKS",
    "EVALUATION_TASKS",
    "DEFAULT_MAX_SIZE",
    "read_chexpert_labels",
    "MimicCxr",
    "MimicCxrConfig",
    "SECTION_ALIASES",
    "normalize_section_name",
    "section_report",
    "last_paragraph",
    "extract_sections",
    "report_to_text",
    "scan",
    "load",
    "main",
]
