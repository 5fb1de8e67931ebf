"""data_scripts.mimic_cxr: report sectioning (synthetic and real IU-Xray reports) and the builder on a
miniature MIMIC-CXR-JPG 2.0.0 layout generated in tmp_path."""
import csv
import gzip
import importlib.util
import io
import json
import os
import tarfile
import textwrap
import xml.etree.ElementTree as ET
import zipfile

import datasets
import pytest
from PIL import Image

from data_scripts import DatasetFormatError, mimic_cxr
from data_scripts.mimic_cxr import extract_sections, normalize_section_name, report_to_text
from modeling_cgns.sentences import split_sentences

# ------------------------------------------------------------------------------------------------
# Miniature reports (MIMIC style: leading space on every line, " \n" blank lines)
# ------------------------------------------------------------------------------------------------

R_NORMAL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with cough
 
 COMPARISON:  None.
 
 FINDINGS: 
 
 The lungs are clear. The cardiomediastinal silhouette is normal.
 No pleural effusion or pneumothorax.
 
 IMPRESSION: 
 
 No acute cardiopulmonary process.
"""
R_HEADERLESS = """                                 FINAL REPORT
 PORTABLE CHEST RADIOGRAPH
 
 Heart size is normal. Lungs are clear.
"""
R_NO_MAIN_SECTIONS = """ EXAMINATION:  CHEST
 
 INDICATION:  fever
 
 Mild cardiomegaly. Small left effusion.
"""
R_REPEAT = """ PA AND LATERAL VIEWS OF THE CHEST:
 Low lung volumes. Bibasilar atelectasis.
 
 IMPRESSION: Preliminary read.
 
 IMPRESSON:
 Bibasilar atelectasis without pneumonia.
"""
R_EMPTY = "   \n \n"
R_SECTIONLESS = " EXAMINATION: CHEST PA AND LAT\n INDICATION: cough\n"
R_SHORT = "                                 FINAL REPORT\n IMPRESSION: No change.\n"
R_EMPTY_SECTIONS = " FINDINGS:\n \n IMPRESSION:\n \n"

NORMAL_SENTENCES = ["no acute cardiopulmonary process", "the lungs are clear",
                    "the cardiomediastinal silhouette is normal", "no pleural effusion or pneumothorax"]


def test_section_names():
    assert normalize_section_name("IMPRESSON") == "impression"
    assert normalize_section_name("FINDINGS AND IMPRESSION") == "impression"
    assert normalize_section_name("CLINICAL HISTORY") == "history"
    assert normalize_section_name("COMPARISONS") == "comparison"
    assert normalize_section_name("PA AND LATERAL VIEWS OF THE CHEST") == "findings"
    assert normalize_section_name("PORTABLE AP") == "findings"
    assert normalize_section_name("REASON FOR EXAM") == "indication"
    assert normalize_section_name("CONCLUSION") == "impression"
    assert normalize_section_name("NOTIFICATION") == "notification"


def test_extract_sections_known_answers():
    sec = extract_sections(R_NORMAL)
    assert sec["impression"] == "No acute cardiopulmonary process."
    assert sec["findings"].split() == ("The lungs are clear. The cardiomediastinal silhouette is normal. "
                                       "No pleural effusion or pneumothorax.").split()
    assert sec["comparison"] == "None." and sec["last_paragraph"] is None
    assert split_sentences(report_to_text(R_NORMAL)[0]) == NORMAL_SENTENCES

    sec = extract_sections(R_HEADERLESS)
    assert sec["impression"] is None and sec["findings"] is None
    assert sec["last_paragraph"] == "Heart size is normal. Lungs are clear."
    assert extract_sections(R_NO_MAIN_SECTIONS)["last_paragraph"] == "Mild cardiomegaly. Small left effusion."

    sec = extract_sections(R_REPEAT)  # last occurrence wins; misspelt header and view header handled
    assert sec["impression"] == "Bibasilar atelectasis without pneumonia."
    assert sec["findings"].split() == "Low lung volumes. Bibasilar atelectasis.".split()
    assert split_sentences(report_to_text(R_REPEAT)[0]) == [
        "bibasilar atelectasis without pneumonia", "low lung volumes", "bibasilar atelectasis"]

    assert report_to_text(R_EMPTY) == (None, "empty report")
    assert report_to_text(R_SECTIONLESS) == (None, "section-less report")
    assert report_to_text(R_EMPTY_SECTIONS) == (None, "section-less report")
    assert report_to_text(None) == (None, "missing report")


# ------------------------------------------------------------------------------------------------
# Real reports: IU-Xray (NLMCXR) shipped inside the torchxrayvision wheel, read at test time only
# ------------------------------------------------------------------------------------------------

def _iu_reports(limit=400, ids=None):
    # Locate the installed package without importing it (importing pulls in torch).
    spec = importlib.util.find_spec("torchxrayvision")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = os.path.join(locations[0], "data", "NLMCXR_reports.tgz") if locations else ""
    if not os.path.isfile(path):
        pytest.skip("torchxrayvision's NLMCXR_reports.tgz is not installed")
    out = {}
    with tarfile.open(path) as tf:
        for member in tf:
            if not member.name.endswith(".xml"):
                continue
            rid = os.path.basename(member.name)[:-4]
            if ids is not None and rid not in ids:
                continue
            root = ET.parse(tf.extractfile(member)).getroot()
            out[rid] = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
            if ids is None and len(out) >= limit:
                break
    return out


def _as_mimic_report(sections):
    """Lay an IU report out the way MIMIC-CXR reports are: headers, wrapped lines, blank lines."""
    lines = ["                                 FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", " "]
    for label in ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION"):
        body = sections.get(label, "")
        if label in ("FINDINGS", "IMPRESSION"):
            lines += [f" {label}:", " "]
            wrapped = textwrap.wrap(body, 76, break_on_hyphens=False, break_long_words=False)
            lines += [" " + ln for ln in wrapped]
        else:
            lines.append(f" {label}:  {body}")
        lines.append(" ")
    return "\n".join(lines) + "\n"


def _norm(text):
    return " ".join((text or "").split())


def test_real_reports_sectioning_and_sentences():
    reports = _iu_reports(limit=400)
    assert len(reports) >= 300
    n_sentences, n_checked = [], 0
    for rid, sec in reports.items():
        if not sec.get("FINDINGS") and not sec.get("IMPRESSION"):
            continue
        n_checked += 1
        got = extract_sections(_as_mimic_report(sec))
        assert _norm(got["findings"]) == _norm(sec.get("FINDINGS")), rid
        assert _norm(got["impression"]) == _norm(sec.get("IMPRESSION")), rid
        # Headerless layout: the last paragraph is the fallback text.
        headerless = "FINAL REPORT\n \n " + sec.get("FINDINGS", "") + "\n \n " + sec.get("IMPRESSION", "")
        assert _norm(extract_sections(headerless)["last_paragraph"]) == _norm(
            sec.get("IMPRESSION") or sec.get("FINDINGS")), rid
        text, reason = report_to_text(_as_mimic_report(sec))
        assert reason is None
        sents = split_sentences(text)
        assert all(s and s == s.lower() and s.isascii() and s == s.strip() for s in sents), rid
        assert all("  " not in s and "." not in s for s in sents), rid
        n_sentences.append(len(sents))
    assert n_checked >= 300
    mean = sum(n_sentences) / len(n_sentences)
    assert 2 <= mean <= 15, mean


def test_real_reports_known_answers():
    # Expected sentences worked out by hand from each report's IMPRESSION then FINDINGS text.
    expected = {
        "1": ["normal chest x xxxx",
              "the cardiac silhouette and mediastinum size are within normal limits",
              "there is no pulmonary edema", "there is no focal consolidation",
              "there are no xxxx of a pleural effusion", "there is no evidence of pneumothorax"],
        "10": ["no acute cardiopulmonary process",
               "the cardiomediastinal silhouette is within normal limits for size and contour",
               "the lungs are normally inflated without evidence of focal airspace disease pleural effusion "
               "or pneumothorax",
               "stable calcified granuloma within the right upper lung", "no acute bone abnormality"],
        "100": ["no active disease", "both lungs are clear and expanded", "heart and mediastinum normal"],
        "1000": ["increased opacity in the right upper lobe with xxxx associated atelectasis may represent "
                 "focal consolidation or mass lesion with atelectasis",
                 "recommend chest ct for further evaluation",
                 "xxxx opacity overlying the left 5th rib may represent focal airspace disease",
                 "there is xxxx increased opacity within the right upper lobe with possible mass and "
                 "associated area of atelectasis or focal consolidation",
                 "the cardiac silhouette is within normal limits",
                 "xxxx opacity in the left midlung overlying the posterior left 5th rib may represent focal "
                 "airspace disease",
                 "no pleural effusion or pneumothorax", "no acute bone abnormality"],
        # Empty FINDINGS section: dropped, the impression alone is the text.
        "1002": ["status post left mastectomy", "heart size normal", "lungs are clear"],
    }
    reports = _iu_reports(ids=set(expected))
    assert set(reports) == set(expected)
    for rid, sentences in expected.items():
        text, reason = report_to_text(_as_mimic_report(reports[rid]))
        assert reason is None
        assert split_sentences(text) == sentences, rid
    assert extract_sections(_as_mimic_report(reports["1002"]))["findings"] is None


# ------------------------------------------------------------------------------------------------
# Miniature MIMIC-CXR-JPG tree
# ------------------------------------------------------------------------------------------------

META_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]

# (dicom, subject, study, view, split or None, image kind)
ROWS = [
    ("d01", "10000001", "50000001", "PA", "train", "ok"),
    ("d02", "10000001", "50000001", "LATERAL", "train", "ok"),
    ("d03", "10000002", "50000002", "AP", "train", "ok"),
    ("d04", "10000003", "50000003", "PA", "validate", "ok"),
    ("d05", "10000004", "50000004", "PA", "test", "ok"),
    ("d06", "10000004", "50000004", "AP", "test", "ok"),
    ("d07", "10000005", "50000005", "PA", "train", "ok"),
    ("d08", "10000006", "50000006", "PA", "train", "ok"),
    ("d09", "10000007", "50000007", "PA", "train", "ok"),
    ("d10", "10000008", "50000008", "PA", "train", "ok"),
    ("d11", "10000009", "50000009", "PA", "train", "missing"),
    ("d12", "10000009", "50000009", "PA", "train", "garbage"),
    ("d13", "10000009", "50000009", "AP", "train", "truncated"),
    ("d14", "10000009", "50000009", "PA", None, "ok"),
    ("d01", "10000009", "50000009", "PA", None, "ok"),       # duplicate dicom_id in the metadata
    ("d16", "10000009", "50000009", "PA", "train", "ok"),
    ("d17", "10000009", "50000009", "", "train", "ok"),       # no ViewPosition
    ("d18", "10000010", "50000010", "PA", "train", "ok"),
    ("d19", "11000011", "50000011", "PA", "validate", "ok"),
    ("d20", "11000011", "50000011", "PA", "test", "ok"),
]
REPORTS = {"50000001": R_NORMAL, "50000002": R_HEADERLESS, "50000003": R_NO_MAIN_SECTIONS,
           "50000004": R_REPEAT, "50000005": R_EMPTY, "50000006": R_SECTIONLESS, "50000007": R_SHORT,
           "50000009": R_NORMAL,
           "50000010": R_EMPTY_SECTIONS, "50000011": R_NORMAL}  # 50000008 has no report
EXPECTED_SKIPS = {"conflicting split rows": 0, "dicom without split row": 1, "duplicate dicom_id": 1,
                  "empty report": 1, "missing image file": 1, "missing report": 1, "no usable sentences": 1,
                  "non-frontal view": 2, "section-less report": 2, "truncated image": 1,
                  "unreadable image": 1}
EXPECTED_SKIPS = {k: v for k, v in EXPECTED_SKIPS.items() if v}


def make_mimic(root, reports="zip", gz=False):
    os.makedirs(root, exist_ok=True)
    for k, (dicom, subject, study, _, _, kind) in enumerate(ROWS):
        path = os.path.join(root, "files", f"p{subject[:2]}", f"p{subject}", f"s{study}", f"{dicom}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if kind == "ok" and not os.path.exists(path):
            Image.new("L", (28, 32), 7 * k).save(path, format="JPEG")
        elif kind == "garbage":
            with open(path, "wb") as f:
                f.write(b"\x00" * 50)
        elif kind == "truncated":
            buf = io.BytesIO()
            Image.effect_noise((32, 32), 60).convert("L").save(buf, format="JPEG")
            with open(path, "wb") as f:
                f.write(buf.getvalue()[:250])
    def opener(p):
        return gzip.open(p + ".gz", "wt", newline="") if gz else open(p, "w", newline="")
    with opener(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv")) as f:
        w = csv.writer(f)
        w.writerow(META_COLUMNS)
        for dicom, subject, study, view, _, _ in ROWS:
            w.writerow([dicom, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544, 21800506, 213014.531,
                        "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
    with opener(os.path.join(root, "mimic-cxr-2.0.0-split.csv")) as f:
        w = csv.writer(f)
        w.writerow(["dicom_id", "study_id", "subject_id", "split"])
        for dicom, subject, study, _, split, _ in ROWS:
            if split is not None and not (dicom == "d01" and subject != "10000001"):
                w.writerow([dicom, study, subject, split])
        w.writerow(["d04", "50000003", "10000003", "validate"])  # harmless repeated row
    rel = {s: f"files/p{subj[:2]}/p{subj}/s{s}.txt" for _, subj, s, _, _, _ in ROWS if s in REPORTS}
    if reports == "zip":
        with zipfile.ZipFile(os.path.join(root, "mimic-cxr-reports.zip"), "w") as z:
            for study, name in rel.items():
                z.writestr("mimic-cxr-reports/" + name, REPORTS[study])
    else:  # extracted next to the images, as when both trees are merged
        for study, name in rel.items():
            with open(os.path.join(root, *name.split("/")), "w") as f:
                f.write(REPORTS[study])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg")
    make_mimic(root)
    cache = str(tmp_path_factory.mktemp("cache"))
    ds = mimic_cxr.load(root, cache_dir=cache)
    with open(os.path.join(cache, "mimic_cxr", "pretraining", "manifest.json")) as f:
        manifest = json.load(f)
    return root, cache, ds, manifest


def test_rows_and_columns(built):
    _, _, ds, _ = built
    assert set(ds) == {"train", "validation"}
    assert sorted(ds["train"]["dicom_id"]) == ["d01", "d03", "d16"]
    assert sorted(ds["validation"]["dicom_id"]) == ["d04", "d05", "d06", "d19", "d20"]  # validate + test
    assert set(ds["train"].column_names) >= {"image", "report", "sentences", "study_id"}
    rows = {r["dicom_id"]: r for s in ds for r in ds[s]}
    assert rows["d01"]["sentences"] == NORMAL_SENTENCES and rows["d01"]["study_id"] == "50000001"
    assert rows["d01"]["report"].startswith("No acute cardiopulmonary process. The lungs are clear.")
    assert rows["d03"]["sentences"] == ["heart size is normal", "lungs are clear"]     # last paragraph
    assert rows["d04"]["sentences"] == ["mild cardiomegaly", "small left effusion"]
    assert rows["d05"]["sentences"] == ["bibasilar atelectasis without pneumonia", "low lung volumes",
                                        "bibasilar atelectasis"]
    assert rows["d01"]["image"].size == (28, 32) and rows["d01"]["subject_id"] == "10000001"


def test_manifest_counts(built):
    _, _, ds, manifest = built
    assert manifest["skipped_counts"] == EXPECTED_SKIPS
    assert manifest["rows"] == {"train": 3, "validation": 5}
    assert manifest["skipped"]["non-frontal view"] == ["d02", "d17"]
    assert manifest["repaired_counts"] == {"duplicate split row": 1}


def test_no_absolute_paths(built):
    root, _, ds, _ = built
    raw = ds["train"].cast_column("image", datasets.Image(decode=False))
    for row in raw:
        assert row["image"]["path"] is None and row["image"]["bytes"][:2] == b"\xff\xd8"
        assert not any(root in str(v) for k, v in row.items() if k != "image")


def test_extracted_reports_and_gz_tables(tmp_path):
    root = str(tmp_path / "mimic")
    make_mimic(root, reports="folder", gz=True)
    ds = mimic_cxr.load(root, cache_dir=str(tmp_path / "c"))
    assert sorted(ds["train"]["dicom_id"]) == ["d01", "d03", "d16"]
    assert len(ds["validation"]) == 5


def test_data_pct_train_only(built):
    root, cache, ds, _ = built
    a = mimic_cxr.load(root, cache_dir=cache, data_pct=0.5, seed=1)
    b = mimic_cxr.load(root, cache_dir=cache, data_pct=0.5, seed=1)
    assert len(a["train"]) == max(1, round(0.5 * 3)) and a["train"]["dicom_id"] == b["train"]["dicom_id"]
    assert a["validation"]["dicom_id"] == ds["validation"]["dicom_id"]


def test_wrong_folders(tmp_path):
    bad = tmp_path / "bad"
    (bad / "files").mkdir(parents=True)
    (bad / "mimic-cxr-2.0.0-metadata.csv").write_text("image,label\na,1\n")
    (bad / "mimic-cxr-2.0.0-split.csv").write_text("dicom_id,study_id,subject_id,split\n")
    with pytest.raises(DatasetFormatError, match="lacks column"):
        mimic_cxr.load(str(bad), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DatasetFormatError, match="expected mimic-cxr-2.0.0-metadata.csv"):
        mimic_cxr.load(str(tmp_path / "c"), cache_dir=str(tmp_path / "c2"))
    root = str(tmp_path / "noreports")
    make_mimic(root)
    os.remove(os.path.join(root, "mimic-cxr-reports.zip"))
    with pytest.raises(DatasetFormatError, match="no MIMIC-CXR reports"):
        mimic_cxr.load(root, cache_dir=str(tmp_path / "c3"))
    with pytest.raises(ValueError):
        mimic_cxr.load(root, task="classification")


def test_cli(built, tmp_path, capsys):
    root = built[0]
    out = tmp_path / "out"
    assert mimic_cxr.main(["--data_dir", root, "--output_dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train: 3 rows" in text and "validation: 5 rows" in text and "sentences per report" in text
    assert "missing report: 1" in text and "non-frontal view: 2" in text
    assert json.loads((out / "manifest.json").read_text())["skipped_counts"] == EXPECTED_SKIPS


# ------------------------------------------------------------------------------------------------
# Report bytes: non-UTF-8 text and a damaged archive member (issue 13)
# ------------------------------------------------------------------------------------------------

CP1252_REPORT = " FINDINGS: Café au lait spot over the left clavicle.\n \n IMPRESSION: No pneumothorax.\n"
CRC_TEXT = " IMPRESSION: Stable right effusion. No new consolidation.\n"
# (dicom, subject, study): d21 has a Windows-1252 report, d22 and d23 share a member with a bad CRC
EXTRA_ROWS = [("d21", "10000012", "50000012"), ("d22", "10000013", "50000013"),
              ("d23", "10000013", "50000013")]


def make_faulty_mimic(root, bad_crc=True):
    """The miniature tree plus a cp1252 report and (``bad_crc``) a stored zip member whose bytes no
    longer match its CRC."""
    make_mimic(root)
    with open(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"), "a", newline="") as f:
        for dicom, subject, study in EXTRA_ROWS:
            csv.writer(f).writerow([dicom, subject, study, "CHEST", "PA", 1, 1, 1, 1, "", "", ""])
    with open(os.path.join(root, "mimic-cxr-2.0.0-split.csv"), "a", newline="") as f:
        for dicom, subject, study in EXTRA_ROWS:
            csv.writer(f).writerow([dicom, study, subject, "train"])
    for k, (dicom, subject, study) in enumerate(EXTRA_ROWS):
        path = os.path.join(root, "files", f"p{subject[:2]}", f"p{subject}", f"s{study}", f"{dicom}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("L", (28, 32), 30 + k).save(path, format="JPEG")
    zpath = os.path.join(root, "mimic-cxr-reports.zip")
    with zipfile.ZipFile(zpath, "a", compression=zipfile.ZIP_STORED) as z:
        z.writestr("mimic-cxr-reports/files/p10/p10000012/s50000012.txt", CP1252_REPORT.encode("cp1252"))
        z.writestr("mimic-cxr-reports/files/p10/p10000013/s50000013.txt", CRC_TEXT.encode())
    data = open(zpath, "rb").read()
    assert data.count(b"Stable right") == 1
    if bad_crc:
        with open(zpath, "wb") as f:  # same length, different bytes: the stored CRC-32 no longer matches
            f.write(data.replace(b"Stable right", b"Stable_right"))


def _load_faulty(tmp_path_factory, bad_crc):
    root = str(tmp_path_factory.mktemp("mimic_faults") / "mimic-cxr-jpg")
    make_faulty_mimic(root, bad_crc)
    cache = str(tmp_path_factory.mktemp("cache_faults"))
    ds = mimic_cxr.load(root, cache_dir=cache, verbose=False)
    with open(os.path.join(cache, "mimic_cxr", "pretraining", "manifest.json")) as f:
        manifest = json.load(f)
    return root, ds, manifest


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    return _load_faulty(tmp_path_factory, bad_crc=True)


def test_non_utf8_report_decoded_with_fallback_and_counted(tmp_path_factory):
    _, ds, manifest = _load_faulty(tmp_path_factory, bad_crc=False)
    row = {r["dicom_id"]: r for r in ds["train"]}["d21"]
    assert "Café au lait spot" in row["report"] and "\ufffd" not in row["report"]
    # D.2 drops non-ASCII from the *sentences* on purpose; the stored report keeps every character
    assert row["sentences"][-1] == "caf au lait spot over the left clavicle"
    assert manifest["repaired_counts"]["report not UTF-8 (decoded with fallback)"] == 1
    assert manifest["repaired"]["report not UTF-8 (decoded with fallback)"] == [
        "mimic-cxr-reports/files/p10/p10000012/s50000012.txt (cp1252)"]


def test_bad_crc_member_is_counted_not_raised(faulty):
    _, ds, manifest = faulty
    ids = set(ds["train"]["dicom_id"]) | set(ds["validation"]["dicom_id"])
    assert {"d22", "d23"}.isdisjoint(ids) and "d21" in ids
    bad = manifest["skipped"]["unreadable report (bad archive member)"]
    assert len(bad) == 2 and all("s50000013.txt: BadZipFile" in b and "CRC" in b for b in bad)


def test_every_metadata_row_accounted(faulty):
    _, ds, manifest = faulty
    rows_in = manifest["inputs"]["metadata rows"]
    assert rows_in == len(ROWS) + len(EXTRA_ROWS)
    assert rows_in == sum(len(ds[s]) for s in ds) + sum(manifest["skipped_counts"].values())


__all__ = []


# ------------------------------------------------------------------------------------------------
# The official test split: retrieval, classification (CheXpert labels) and 5x200 tasks (issue 27)
# ------------------------------------------------------------------------------------------------

# study -> raw CheXpert labels of the five competition tasks (blank = not mentioned)
CHEXPERT_ROWS = {"50000004": ["1.0", "", "0.0", "", ""],          # d05, d06: Atelectasis only
                 "50000011": ["", "1.0", "-1.0", "", "1.0"]}      # d20: two positives + one uncertain


def write_chexpert_table(root, rows=CHEXPERT_ROWS):
    from data_scripts.chexpert import COMPETITION_TASKS

    with open(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject_id", "study_id", *COMPETITION_TASKS, "No Finding"])
        subjects = {study: subject for _, subject, study, _, _, _ in ROWS}
        for study, values in rows.items():
            w.writerow([subjects[study], study, *values, ""])


def test_official_test_split_tasks(built, tmp_path):
    root = str(tmp_path / "mimic")
    make_mimic(root)
    cache = str(tmp_path / "c")
    retrieval = mimic_cxr.load(root, task="retrieval", cache_dir=cache)
    assert set(retrieval) == {"test"}
    assert retrieval["test"]["dicom_id"] == ["d05", "d06", "d20"]      # official test, frontal, with a report
    assert retrieval["test"][2]["sentences"] == NORMAL_SENTENCES
    with open(os.path.join(cache, "mimic_cxr", "retrieval", "manifest.json")) as f:
        manifest = json.load(f)
    # 20 metadata rows = 3 rows + skips + the rows of the other official splits (counted, not listed)
    assert manifest["inputs"]["rows outside the official test split"] == 13
    assert 3 + sum(manifest["skipped_counts"].values()) + 13 == manifest["inputs"]["metadata rows"] == 20

    with pytest.raises(DatasetFormatError, match="mimic-cxr-2.0.0-chexpert.csv"):
        mimic_cxr.load(root, task="classification", cache_dir=cache)
    write_chexpert_table(root)
    labelled = mimic_cxr.load(root, task="classification", cache_dir=cache)["test"]
    assert labelled["image_id"] == ["d05", "d06", "d20"]
    assert labelled["labels"] == [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 1]]   # -1 and blank: negative
    five = mimic_cxr.load(root, task="5x200", cache_dir=cache, holdout_per_task=1)["test"]
    assert len(five) == 1 and five[0]["image_id"] in ("d05", "d06")         # d20 has two positives
    # the pretraining task is unchanged: validate + test form its validation split
    assert len(mimic_cxr.load(root, cache_dir=cache)["validation"]) == 5


def test_prepare_leaves_no_lock_files_and_names_no_path(built, tmp_path):
    root = built[0]
    out = tmp_path / "prepared"
    assert mimic_cxr.main(["--data_dir", root, "--output_dir", str(out), "--num_workers", "2"]) == 0
    names = [os.path.join(r, n) for r, dirs, files in os.walk(out) for n in files + dirs]
    assert not [n for n in names if n.endswith(".lock")]
    assert not [n for n in names if "%2F" in n or root.strip("/").replace("/", "_") in n]
    # the same inputs with another thread count find the preparation again
    ds = mimic_cxr.load(root, cache_dir=str(out), num_workers=1)
    assert len(ds["train"]) == 3
    infos = [r for r, _, files in os.walk(out) if "dataset_info.json" in files]
    assert len(infos) == 1
