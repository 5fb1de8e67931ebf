"""RSNA Pneumonia builder on a miniature copy of the published layout (stage 2)."""
import json
import os

import numpy as np
import pytest

from data_scripts import DatasetFormatError
from data_scripts import rsna
from fixtures import write_dicom

W, H = 64, 48  # most images: 64 columns x 48 rows (non-square, so width/height mix-ups show)
HEADER = "patientId,x,y,width,height,Target"


def _negatives(ids):
    return [f"{p},,,,,0" for p in ids]


ROWS = [HEADER,
        "p01,8,12,16,24,1",                       # [0.125, 0.25, 0.375, 0.75]
        "p02,0,0,32,24,1", "p02,32,24,32,24,1",   # two boxes: two quarters
        "p03,48,36,32,24,1",                      # partly outside: clipped to [.75, .75, 1, 1]
        "p04,100,10,10,10,1",                     # only box outside: label stays 1, no detection row
        "p05,4,4,0,8,1", "p05,4,4,8,8,1",         # non-positive width: that box skipped
        "p06,,,,,1",                              # Target 1 without a box -> patient skipped
        "p07,8,8,8,8,0",                          # Target 0 with a box -> patient skipped
        "p08,abc,1,2,3,1", "p08,16,16,16,8,1",    # malformed row skipped, patient kept
        "p09,,,,,0", "p09,,,,,0",                 # duplicate identical row
        "p10,,,,,0",                              # no DICOM
        "p11,,,,,0",                              # truncated DICOM
        "p12,8,8,8,8,1",                          # 32x32 MONOCHROME1 16-bit: [.25, .25, .5, .5]
        ] + _negatives(f"p{i:02d}" for i in range(13, 25))


@pytest.fixture(scope="module")
def rsna_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    img = root / "stage_2_train_images"
    img.mkdir()
    (root / "stage_2_train_labels.csv").write_text("\n".join(ROWS) + "\n")
    rng = np.random.default_rng(0)
    for i in range(1, 25):
        pid = f"p{i:02d}"
        if pid == "p10":
            continue
        if pid == "p12":
            px = np.round(np.linspace(0, 65535, 32 * 32)).astype(np.uint16).reshape(32, 32)
            write_dicom(img / f"{pid}.dcm", px, "MONOCHROME1", 16)
        elif i % 2:
            write_dicom(img / f"{pid}.dcm", rng.integers(0, 256, (H, W), dtype=np.uint8), "MONOCHROME2", 8)
        else:
            write_dicom(img / f"{pid}.dcm", rng.integers(0, 4096, (H, W)).astype(np.uint16), "MONOCHROME1", 12)
    data = (img / "p11.dcm").read_bytes()
    (img / "p11.dcm").write_bytes(data[:-2000])
    return str(root)


USABLE = 21  # 24 patients - p06, p07 (mismatch) - p10 (no DICOM); p11 is dropped while generating


def _ids(dd):
    return {s: list(dd[s]["image_id"]) for s in dd}


def _manifest(cache, task):
    with open(os.path.join(cache, "rsna", task, "manifest.json")) as f:
        return json.load(f)


def test_split_sizes_on_full_dataset():
    assert rsna.classification_split_sizes(26684) == (18678, 4003, 4003)
    assert rsna.detection_split_sizes(26684) == (16010, 5337, 5337)
    assert rsna.detection_holdout(26684) == 10674
    assert rsna.classification_split_sizes(USABLE) == (14, 4, 3)
    assert rsna.detection_split_sizes(USABLE) == (12, 5, 4)  # ceil(21 * 10674 / 26684) = 9


def test_split_matches_sklearn_train_test_split():
    sk = pytest.importorskip("sklearn.model_selection")
    ids = [f"id{i:03d}" for i in range(137)]
    tr, held = sk.train_test_split(ids, test_size=0.3, random_state=0)
    te, va = sk.train_test_split(held, test_size=0.5, random_state=0)
    assert rsna.split_patients(ids, "classification") == {"train": tr, "validation": va, "test": te}
    tr, held = sk.train_test_split(ids, test_size=rsna.detection_holdout(137), random_state=0)
    te, va = sk.train_test_split(held, test_size=0.5, random_state=0)
    assert rsna.split_patients(ids, "detection") == {"train": tr, "validation": va, "test": te}


def test_classification(rsna_dir, tmp_path):
    cache = str(tmp_path / "cache")
    dd = rsna.load(rsna_dir, "classification", cache_dir=cache)
    ids = _ids(dd)
    assert set(dd) == {"train", "validation", "test"}
    all_ids = sum(ids.values(), [])
    assert len(all_ids) == len(set(all_ids)) == USABLE - 1
    assert {"p06", "p07", "p10", "p11"}.isdisjoint(all_ids)
    sizes = {s: len(v) + ("p11" in rsna.split_patients(
        [p for p in (f"p{i:02d}" for i in range(1, 25)) if p not in ("p06", "p07", "p10")],
        "classification")[s]) for s, v in ids.items()}
    assert (sizes["train"], sizes["validation"], sizes["test"]) == (14, 4, 3)
    labels = {r["image_id"]: r["labels"] for s in dd for r in dd[s].select_columns(["image_id", "labels"])}
    assert labels["p01"] == [1.0] and labels["p04"] == [1.0] and labels["p13"] == [0.0]
    assert sum(v[0] for v in labels.values()) == 7  # p01 p02 p03 p04 p05 p08 p12
    assert dd["train"].features["labels"].length == 1
    m = _manifest(cache, "classification")
    assert m["skipped_counts"] == {"duplicate_row": 1, "malformed_box": 1, "missing_image": 1,
                                   "target_box_mismatch": 2, "unreadable_dicom": 1}
    assert m["rows"] == {s: len(v) for s, v in ids.items()}
    assert sum(b.get("positive", 0) for b in m["label_balance"].values()) == 7


def test_detection_boxes_and_repairs(rsna_dir, tmp_path):
    cache = str(tmp_path / "cache")
    dd = rsna.load(rsna_dir, "detection", cache_dir=cache)
    rows = {r["image_id"]: r for s in dd for r in dd[s]}
    assert len(rows) == USABLE - 2  # p11 (truncated) and p04 (a positive without a usable box)
    np.testing.assert_allclose(rows["p01"]["boxes"], [[0.125, 0.25, 0.375, 0.75]])
    np.testing.assert_allclose(sorted(rows["p02"]["boxes"]), [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    np.testing.assert_allclose(rows["p03"]["boxes"], [[0.75, 0.75, 1.0, 1.0]])
    assert "p04" not in rows
    np.testing.assert_allclose(rows["p05"]["boxes"], [[4 / 64, 4 / 48, 12 / 64, 12 / 48]])
    np.testing.assert_allclose(rows["p12"]["boxes"], [[0.25, 0.25, 0.5, 0.5]])  # its own 32x32 size
    assert rows["p13"]["boxes"] == []
    assert rows["p01"]["image"].size == (W, H) and rows["p01"]["image"].mode == "L"
    # p12 is MONOCHROME1: its ramp comes out inverted (bright first pixel)
    px = np.asarray(rows["p12"]["image"])
    assert px[0, 0] == 255 and px[-1, -1] == 0
    m = _manifest(cache, "detection")
    assert m["skipped_counts"]["box_outside_image"] == 1
    assert m["skipped_counts"]["box_nonpositive_size"] == 1
    assert m["skipped"]["positive_without_usable_box"] == ["p04"]
    assert m["repaired_counts"] == {"box_clipped": 1}
    assert [len(dd[s]) for s in ("train", "validation", "test")] == [
        n - ("p11" in ids) - ("p04" in ids) for n, ids in zip((12, 5, 4), rsna.split_patients(
            [p for p in (f"p{i:02d}" for i in range(1, 25)) if p not in ("p06", "p07", "p10")],
            "detection").values())]


def test_segmentation_masks_and_resize(rsna_dir, tmp_path):
    dd = rsna.load(rsna_dir, "segmentation", cache_dir=str(tmp_path / "c1"))
    rows = {r["image_id"]: r for s in dd for r in dd[s]}
    m = np.asarray(rows["p02"]["mask"])
    expected = np.zeros((H, W), np.uint8)
    expected[0:24, 0:32] = 255
    expected[24:48, 32:64] = 255
    np.testing.assert_array_equal(m, expected)
    assert rows["p02"]["mask"].mode == "L" and rows["p02"]["mask"].size == rows["p02"]["image"].size
    assert np.asarray(rows["p13"]["mask"]).max() == 0
    # downsized cache: image and mask both 32x24, box region scaled with them
    small = rsna.load(rsna_dir, "segmentation", cache_dir=str(tmp_path / "c2"), max_size=32)
    rows = {r["image_id"]: r for s in small for r in small[s]}
    assert rows["p01"]["image"].size == (32, 24) and rows["p01"]["mask"].size == (32, 24)
    m = np.asarray(rows["p01"]["mask"]) > 0
    assert m[6:18, 4:12].all() and m.sum() == 12 * 8
    # same split as detection
    det = rsna.load(rsna_dir, "detection", cache_dir=str(tmp_path / "c1"))
    assert _ids(det) == _ids(dd)


def test_data_pct_train_only_and_deterministic(rsna_dir, tmp_path):
    cache = str(tmp_path / "cache")
    full = rsna.load(rsna_dir, "classification", cache_dir=cache)
    a = rsna.load(rsna_dir, "classification", cache_dir=cache, data_pct=0.5, seed=3)
    b = rsna.load(rsna_dir, "classification", cache_dir=cache, data_pct=0.5, seed=3)
    assert len(a["train"]) == round(0.5 * len(full["train"]))
    assert list(a["train"]["image_id"]) == list(b["train"]["image_id"])
    assert set(a["train"]["image_id"]) <= set(full["train"]["image_id"])
    assert len(a["validation"]) == len(full["validation"]) and len(a["test"]) == len(full["test"])


def test_wrong_folders_raise_format_error(tmp_path, rsna_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(DatasetFormatError, match="stage_2_train_labels.csv"):
        rsna.load(str(bad), "classification", cache_dir=str(tmp_path / "c"))
    (bad / "stage_2_train_labels.csv").write_text("patient,label\np1,0\n")
    with pytest.raises(DatasetFormatError, match="missing"):
        rsna.load(str(bad), "classification", cache_dir=str(tmp_path / "c"))
    (bad / "stage_2_train_labels.csv").write_text("\n".join(ROWS) + "\n")
    with pytest.raises(DatasetFormatError, match="DICOM"):
        rsna.load(str(bad), "classification", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError):
        rsna.load(rsna_dir, "pretraining", cache_dir=str(tmp_path / "c"))


def test_cli_prints_summary(rsna_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert rsna.main(["--data_dir", rsna_dir, "--output_dir", str(out), "--task", "classification"]) == 0
    text = capsys.readouterr().out
    assert "rsna/classification" in text and "target_box_mismatch: 2" in text and "positive=" in text
    assert (out / "rsna" / "classification" / "manifest.json").exists()



# ------------------------------------------------------------------------------------------------
# Faults of issue 13: patient ids that are paths, every row and patient accounted
# ------------------------------------------------------------------------------------------------

ROW_REASONS = {"duplicate_row", "missing_patient_id", "bad_target", "malformed_box"}
PATIENT_REASONS = {"target_box_mismatch", "missing_image", "unreadable_dicom", "positive_without_usable_box",
                   "absolute path in list file", "path outside the data folder"}
BOX_REASONS = {"box_nonpositive_size", "box_outside_image"}


@pytest.fixture(scope="module")
def faulty_dir(tmp_path_factory, rsna_dir):
    """The miniature layout plus patient ids naming DICOMs outside the data folder."""
    import shutil

    base = tmp_path_factory.mktemp("rsna_faults")
    root = base / "data"
    shutil.copytree(rsna_dir, root)
    (base / "elsewhere").mkdir()
    pixels = np.full((H, W), 9, dtype=np.uint8)
    write_dicom(base / "elsewhere" / "scan.dcm", pixels, "MONOCHROME2", 8)
    extra = ["../../elsewhere/scan,,,,,0", f"{base / 'elsewhere' / 'scan'},8,8,8,8,1", ",,,,,0"]
    (root / "stage_2_train_labels.csv").write_text("\n".join(ROWS + extra) + "\n")
    return str(root), len(ROWS) - 1 + len(extra)


@pytest.mark.parametrize("task", ["classification", "detection"])
def test_patient_ids_that_leave_the_folder_are_refused(faulty_dir, tmp_path, task):
    root, _ = faulty_dir
    cache = str(tmp_path / "c")
    dd = rsna.load(root, task, cache_dir=cache, verbose=False)
    assert not any("elsewhere" in i for s in dd for i in dd[s]["image_id"])
    m = _manifest(cache, task)
    assert m["skipped"]["path outside the data folder"] == ["../../elsewhere/scan"]
    assert len(m["skipped"]["absolute path in list file"]) == 1


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_every_row_and_patient_accounted(faulty_dir, tmp_path, task):
    root, n_rows = faulty_dir
    cache = str(tmp_path / "c")
    dd = rsna.load(root, task, cache_dir=cache, verbose=False)
    m = _manifest(cache, task)
    assert set(m["skipped_counts"]) <= ROW_REASONS | PATIENT_REASONS | BOX_REASONS
    row_skips = sum(v for k, v in m["skipped_counts"].items() if k in ROW_REASONS)
    # two kept rows are second boxes of a patient (p02, p05): rows = row skips + patients + 2
    assert m["inputs"]["rows"] == n_rows == row_skips + m["inputs"]["patients"] + 2
    patient_skips = sum(v for k, v in m["skipped_counts"].items() if k in PATIENT_REASONS)
    assert m["inputs"]["patients"] == sum(len(dd[s]) for s in dd) + patient_skips


__all__ = []
