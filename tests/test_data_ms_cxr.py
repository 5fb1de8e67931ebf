"""data_scripts.ms_cxr on a miniature of MS-CXR 1.0.0 / 1.1.0 joined to a miniature MIMIC-CXR-JPG tree, generated
here (tiny JPEGs): every CSV row is accounted for, with every fault kind."""
import csv
import os

import pytest
from PIL import Image

from data_scripts import DatasetFormatError, load_cgns_dataset
from data_scripts.builder import manifest_dir, read_manifest
from data_scripts.ms_cxr import CSV_FILES

# dicom_id -> (subject_id, study_id, stored JPEG size or None for no file / "garbage")
IMAGES = {
    "d1": ("10000001", "50000001", (40, 50)),
    "d2": ("10000002", "50000002", (40, 50)),
    "d3": ("10000003", "50000003", (40, 50)),
    "dmissing": ("10000004", "50000004", None),
    "daspect": ("10000005", "50000005", (50, 50)),
    "dgarbage": ("10000006", "50000006", "garbage"),
}
W, H = "400", "500"          # the CSV's original size: the stored JPEGs are 10x smaller, same aspect
PNEUMONIA = "patchy opacity in the right lower lobe"
EFFUSION = "small left pleural effusion"
HEART = "the heart is enlarged"
PNEUMOTHORAX = "small right apical pneumothorax"
OPACITY = "opacity at the left apex"
FINDING_OF = {PNEUMONIA: "Pneumonia", EFFUSION: "Pleural Effusion", HEART: "Cardiomegaly", PNEUMOTHORAX: "Pneumothorax"}
# (dicom_id, category, phrase, x, y, w, h, width, height, split)
CLEAN_ROWS = [
    ("d1", "Pneumonia", PNEUMONIA, "100", "200", "80", "120", W, H, "train"),
    ("d1", "Pneumonia", PNEUMONIA, "250", "220", "60", "90", W, H, "train"),
    ("d1", "Pleural Effusion", EFFUSION, "220", "380", "150", "100", W, H, "train"),
    ("d2", "Cardiomegaly", HEART, "120", "200", "180", "150", W, H, "val"),
    ("d3", "Pneumothorax", PNEUMOTHORAX, "40", "30", "90", "80", W, H, "test"),
]
FAULT_ROWS = [
    ("d1", "Pneumonia", PNEUMONIA, "abc", "200", "80", "120", W, H, "train"),          # malformed box
    ("d2", "Cardiomegaly", HEART, "120", "200", "0", "150", W, H, "val"),               # malformed box (w = 0)
    ("d2", "Edema", "mild edema", "500", "600", "10", "10", W, H, "val"),               # box outside image
    ("d2", "Edema", "   ", "120", "200", "10", "10", W, H, "val"),                      # empty phrase
    ("dunknown", "Edema", "mild edema", "120", "200", "10", "10", W, H, "val"),         # unknown dicom_id
    ("d2", "Cardiomegaly", HEART, "120", "200", "180", "150", W, H, "val"),             # duplicate box
    ("dmissing", "Edema", "mild edema", "120", "200", "10", "10", W, H, "test"),        # missing image file
    ("daspect", "Edema", "mild edema", "120", "200", "10", "10", W, H, "test"),         # aspect disagrees
    ("dgarbage", "Edema", "mild edema", "120", "200", "10", "10", W, H, "test"),        # unreadable image
    ("d3", "Lung Opacity", OPACITY, "-40", "30", "90", "80", W, H, "holdout"),          # clipped; unknown split
]
COLUMNS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height"]


def write_miniature(tmp_path, version: str, faults: bool = True):
    """``(ms_cxr folder, MIMIC-CXR-JPG folder, [(dicom_id, phrase) of every phrase that must be kept]``."""
    mimic = tmp_path / "mimic"
    mimic.mkdir(parents=True)
    with open(mimic / "mimic-cxr-2.0.0-metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dicom_id", "subject_id", "study_id", "ViewPosition"])
        for dicom, (subject, study, _) in IMAGES.items():
            writer.writerow([dicom, subject, study, "PA"])
    for k, (dicom, (subject, study, size)) in enumerate(IMAGES.items()):
        folder = mimic / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        if size == "garbage":
            (folder / f"{dicom}.jpg").write_bytes(b"not a jpeg")
        elif size is not None:
            Image.new("L", size, 120 + k).save(folder / f"{dicom}.jpg")  # every image's bytes differ
    ms_cxr = tmp_path / "ms_cxr"
    ms_cxr.mkdir()
    header = COLUMNS + (["split"] if version == "1.1.0" else [])
    with open(ms_cxr / CSV_FILES[version], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for dicom, category, phrase, x, y, w, h, width, height, split in CLEAN_ROWS + (FAULT_ROWS if faults else []):
            subject, study, _ = IMAGES.get(dicom, ("19999999", "59999999", None))
            path = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.dcm"
            writer.writerow([dicom, category, phrase, path, x, y, w, h, width, height]
                            + ([split] if version == "1.1.0" else []))
    expected = [("d1", PNEUMONIA), ("d1", EFFUSION), ("d2", HEART), ("d3", PNEUMOTHORAX)]
    return str(ms_cxr), str(mimic), expected


def load(tmp_path, data_dir, mimic_dir, **options):
    return load_cgns_dataset("ms_cxr", data_dir=data_dir, task="grounding", cache_dir=str(tmp_path / "cache"),
                             mimic_cxr_dir=mimic_dir, verbose=False, **options)


def accounted(dataset_dict, manifest) -> int:
    """Boxes in the dataset + skipped rows: must be every CSV row."""
    boxes = sum(len(b) for split in dataset_dict.values() for row in split["sentence_boxes"] for b in row)
    return boxes + sum(manifest["skipped_counts"].values())


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_builder_accounts_for_every_row(tmp_path, version):
    data_dir, mimic_dir, expected = write_miniature(tmp_path, version)
    ds = load(tmp_path, data_dir, mimic_dir)
    manifest = read_manifest(manifest_dir(str(tmp_path / "cache"), "ms_cxr", "grounding"))
    assert list(ds) == ["test"]                                   # every phrase, as the published numbers use
    rows = ds["test"]
    assert manifest["inputs"]["csv rows"] == len(CLEAN_ROWS) + len(FAULT_ROWS) == accounted(ds, manifest)
    assert manifest["inputs"]["ms_cxr version"] == version
    assert manifest["skipped_counts"] == {"malformed box": 2, "box outside image": 1, "empty phrase": 1,
                                          "unknown dicom_id": 1, "duplicate box": 1, "missing image file": 1,
                                          "image size disagrees with the CSV": 1, "unreadable image": 1}
    assert manifest["repaired_counts"] == {"box clipped to the image": 1}
    assert "row 8 (d2)" in manifest["skipped"]["malformed box"]              # the CSV line of the w = 0 row
    kept = {(r["dicom_id"], r["sentences"][0]) for r in rows}
    assert kept == set(expected) | {("d3", OPACITY)}                      # the clipped box's phrase stays
    by_phrase = {r["sentences"][0]: r for r in rows}
    pneumonia = by_phrase[PNEUMONIA]
    assert pneumonia["sentence_findings"] == ["Pneumonia"] and len(pneumonia["sentences"]) == 1
    assert pneumonia["sentence_boxes"] == [[pytest.approx([0.25, 0.4, 0.45, 0.64]),
                                            pytest.approx([0.625, 0.44, 0.775, 0.62])]]   # pixels / (400, 500)
    assert by_phrase[OPACITY]["sentence_boxes"] == [[pytest.approx([0.0, 0.06, 0.125, 0.22])]]
    assert pneumonia["image"].size == (40, 50) and pneumonia["subject_id"] == "10000001"
    assert sorted(r["image_id"] for r in rows if r["dicom_id"] == "d1") == ["d1/0", "d1/1"]
    assert manifest["label_balance"]["test"]["sentences"] == len(rows) == 5


def test_official_split_of_version_1_1_0(tmp_path):
    data_dir, mimic_dir, _ = write_miniature(tmp_path, "1.1.0")
    ds = load(tmp_path, data_dir, mimic_dir, official_split=True)
    manifest = read_manifest(manifest_dir(str(tmp_path / "cache"), "ms_cxr", "grounding"))
    assert {k: len(v) for k, v in ds.items()} == {"train": 2, "validation": 1, "test": 1}
    assert manifest["skipped_counts"]["unknown split value"] == 1           # the "holdout" row
    assert manifest["inputs"]["csv rows"] == accounted(ds, manifest)
    assert ds["validation"][0]["sentences"] == [HEART]


def test_builder_refuses_what_is_not_ms_cxr(tmp_path):
    data_dir, mimic_dir, _ = write_miniature(tmp_path, "1.0.0", faults=False)
    with pytest.raises(DatasetFormatError, match="mimic_cxr_dir"):
        load_cgns_dataset("ms_cxr", data_dir=data_dir, task="grounding", cache_dir=str(tmp_path / "c1"), verbose=False)
    with pytest.raises(DatasetFormatError, match="MS_CXR_Local_Alignment_v1.1.0.csv"):
        load(tmp_path, data_dir, mimic_dir, ms_cxr_version="1.1.0")
    with pytest.raises(DatasetFormatError, match="split"):                  # 1.0.0 has no split column
        load(tmp_path, data_dir, mimic_dir, official_split=True)
    with pytest.raises(DatasetFormatError, match="not MIMIC-CXR-JPG"):
        load(tmp_path, data_dir, data_dir)
    os.remove(os.path.join(data_dir, CSV_FILES["1.0.0"]))
    with pytest.raises(DatasetFormatError, match="is not MS-CXR"):
        load(tmp_path, data_dir, mimic_dir)


def test_synthetic_studies_in_the_published_layout_load_without_a_skip(tmp_path):
    """benchmarks/ms_cxr_synthetic.py (the layout behind the measured numbers in docs/evaluation.md) writes what
    the builder reads: every sentence that names a boxed finding is one phrase with that finding's boxes."""
    from benchmarks import ms_cxr_synthetic
    from data_scripts.synthetic_cxr import generate_study

    out = ms_cxr_synthetic.write_layout(str(tmp_path / "layout"), num_studies=12, start=500, image_size=64,
                                        lesion_contrast_scale=1.0)
    ds = load(tmp_path, out["ms_cxr"], out["mimic"])
    manifest = read_manifest(manifest_dir(str(tmp_path / "cache"), "ms_cxr", "grounding"))
    assert manifest["skipped_counts"] == {} and manifest["inputs"]["csv rows"] == out["rows"] == accounted(ds, manifest)
    assert len(ds["test"]) == out["phrases"] == sum(1 for i in range(500, 512)
                                                    for b in generate_study(i, 0, 64)["sentence_boxes"] if b) > 0
    row = ds["test"][0]
    study = generate_study(int(row["dicom_id"][len("synth"):]), 0, 64)
    boxes = dict(zip(study["sentences"], study["sentence_boxes"]))[row["sentences"][0]]
    assert row["sentence_boxes"][0] == [pytest.approx(b, abs=0.5 / 64) for b in boxes]   # pixel rounding only
