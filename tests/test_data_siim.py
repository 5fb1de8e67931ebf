"""SIIM-ACR Pneumothorax builder: relative column-major RLE, image-level split, train balancing."""
import json
import os

import numpy as np
import pytest

from data_scripts import DatasetFormatError
from data_scripts import siim
from fixtures import write_dicom

S = 32  # images are S x S


def oracle_encode(mask):
    """Independent RLE encoder (the published mask2rle logic): column-major, relative offsets."""
    flat = (mask.T.flatten() > 0)
    out, last_end, i, n = [], 0, 0, flat.size
    while i < n:
        if flat[i]:
            j = i
            while j < n and flat[j]:
                j += 1
            out += [i - last_end, j - i]
            last_end, i = j, j
        else:
            i += 1
    return " ".join(map(str, out)) if out else "-1"


def test_rle_known_answer_4x4():
    # column-major pixels 1, 2 (column 0, rows 1-2) then offset 3 from pixel 3 -> pixel 6 (row 2, col 1)
    expected = np.array([[0, 0, 0, 0], [255, 0, 0, 0], [255, 255, 0, 0], [0, 0, 0, 0]], np.uint8)
    np.testing.assert_array_equal(siim.rle_decode("1 2 3 1", 4, 4), expected)
    assert oracle_encode(expected) == "1 2 3 1" == siim.rle_encode(expected)
    # non-square: width 3, height 2; column-major order is (r0,c0),(r1,c0),(r0,c1),...
    np.testing.assert_array_equal(siim.rle_decode("1 2", 3, 2), [[0, 255, 0], [255, 0, 0]])


def test_rle_roundtrip_against_oracle():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(3, 20, 2)
        mask = (rng.random((h, w)) < 0.3).astype(np.uint8) * 255
        rle = oracle_encode(mask)
        if rle != "-1":
            np.testing.assert_array_equal(siim.rle_decode(rle, w, h), mask)
        assert siim.rle_encode(mask) == rle


@pytest.mark.parametrize("rle,msg", [("1 2 3", "odd"), ("1 x", "non-integer"), ("1.5 2", "non-integer"),
                                     ("10 7", "past the image end"), ("", "empty"), ("-2 3", "negative")])
def test_malformed_rle_raises(rle, msg):
    with pytest.raises(siim.RLEError, match=msg):
        siim.rle_decode(rle, 4, 4)


def _rect(r0, r1, c0, c1):
    m = np.zeros((S, S), np.uint8)
    m[r0:r1, c0:c1] = 255
    return m


POS = {f"pos{i:02d}": _rect(i, i + 5, 2 * i, 2 * i + 3) for i in range(10)}
TWO_REGION = ("pos_two", _rect(0, 4, 0, 4), _rect(20, 30, 10, 12))  # two RLE rows -> union
NEG = [f"neg{i:02d}" for i in range(14)]


@pytest.fixture(scope="module")
def siim_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("siim")
    rng = np.random.default_rng(1)
    lines = ["ImageId, EncodedPixels"]
    ids = list(POS) + [TWO_REGION[0]] + NEG + ["bad_odd", "bad_int", "bad_end", "no_dicom", "truncated"]
    for n, image_id in enumerate(ids):
        d = root / "dicom-images-train" / f"1.2.{n}" / f"1.3.{n}"  # nested study/series folders
        d.mkdir(parents=True)
        if image_id != "no_dicom":
            px = rng.integers(0, 4096, (S, S)).astype(np.uint16)
            write_dicom(d / f"{image_id}.dcm", px, "MONOCHROME1" if n % 2 else "MONOCHROME2", 12)
    for image_id, m in POS.items():
        lines.append(f"{image_id}, {oracle_encode(m)}")
    lines += [f"{TWO_REGION[0]}, {oracle_encode(TWO_REGION[1])}", f"{TWO_REGION[0]}, {oracle_encode(TWO_REGION[2])}"]
    lines += [f"{i}, -1" if k % 2 else f"{i},-1" for k, i in enumerate(NEG)]  # with and without the space
    lines += ["neg00, -1"]  # duplicate row
    lines += ["bad_odd, 1 2 3", "bad_int, 4 x", f"bad_end, {S * S - 2} 5", "no_dicom, -1", "truncated, 3 4"]
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    f = next((root / "dicom-images-train").rglob("truncated.dcm"))
    f.write_bytes(f.read_bytes()[:-500])
    return str(root)


def _manifest(cache):
    with open(os.path.join(cache, "siim", "segmentation", "manifest.json")) as f:
        return json.load(f)


def _expected_mask(image_id):
    if image_id in POS:
        return POS[image_id]
    if image_id == TWO_REGION[0]:
        return TWO_REGION[1] | TWO_REGION[2]
    return np.zeros((S, S), np.uint8)


def test_segmentation_split_masks_balance(siim_dir, tmp_path):
    cache = str(tmp_path / "cache")
    dd = siim.load(siim_dir, cache_dir=cache)
    rows = {s: {r["image_id"]: r for r in dd[s]} for s in dd}
    ids = {s: set(v) for s, v in rows.items()}
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    for s in rows:
        for image_id, r in rows[s].items():
            assert r["mask"].mode == "L" and r["mask"].size == r["image"].size == (S, S)
            np.testing.assert_array_equal(np.asarray(r["mask"]), _expected_mask(image_id))
    # balanced train: every positive plus as many negatives ("truncated", an RLE-positive whose
    # header reads fine, is balanced for and then fails while decoding its pixels)
    items = siim.collect_items(siim_dir, siim.Manifest("siim", "x"))
    planned = siim.split_items(items)
    pos_train = [i for i in planned["train"] if i.positive]
    assert 0 < len(pos_train) == len(planned["train"]) - len(pos_train)
    assert ids["train"] == {i.image_id for i in planned["train"]} - {"truncated"}
    assert ids["validation"] == {i.image_id for i in planned["validation"]} - {"truncated"}
    m = _manifest(cache)
    assert m["skipped_counts"]["malformed_rle"] == 3
    assert m["skipped_counts"]["missing_image"] == 1
    assert m["skipped_counts"]["unreadable_dicom"] == 1
    assert m["skipped_counts"]["duplicate_row"] == 1
    # every usable image is either in a split or counted as a balanced-out negative
    usable = len(POS) + 1 + len(NEG) + 1  # + "truncated": its header is fine, it fails while decoding
    dropped = m["skipped_counts"].get("train_negative_not_sampled", 0)
    assert sum(len(v) for v in ids.values()) + dropped + 1 == usable
    # 70/15/15 of the usable images by ImageId (sklearn sizing): 26 -> 18 / 4 / 4 before balancing
    split = siim.split_items(siim.collect_items(siim_dir, siim.Manifest("siim", "x")), balance_train=False)
    assert [len(split[s]) for s in ("train", "validation", "test")] == [18, 4, 4]
    assert ids["validation"] | ids["test"] <= {i.image_id for s in ("validation", "test") for i in split[s]}


def test_unbalanced_option_keeps_all_negatives(siim_dir, tmp_path):
    dd = siim.load(siim_dir, cache_dir=str(tmp_path / "c"), balance_train=False)
    balanced = siim.load(siim_dir, cache_dir=str(tmp_path / "c"))
    assert len(dd["train"]) >= len(balanced["train"])
    assert list(dd["validation"]["image_id"]) == list(balanced["validation"]["image_id"])
    assert set(balanced["train"]["image_id"]) <= set(dd["train"]["image_id"])


def test_downsized_masks_follow_image(siim_dir, tmp_path):
    dd = siim.load(siim_dir, cache_dir=str(tmp_path / "c"), max_size=16)
    r = next(r for s in dd for r in dd[s] if r["image_id"] == "pos05")
    assert r["image"].size == r["mask"].size == (16, 16)
    assert set(np.unique(np.asarray(r["mask"]))) <= {0, 255} and np.asarray(r["mask"]).max() == 255


def test_data_pct_train_only_deterministic(siim_dir, tmp_path):
    cache = str(tmp_path / "c")
    full = siim.load(siim_dir, cache_dir=cache)
    a = siim.load(siim_dir, cache_dir=cache, data_pct=0.5, seed=7)
    b = siim.load(siim_dir, cache_dir=cache, data_pct=0.5, seed=7)
    assert list(a["train"]["image_id"]) == list(b["train"]["image_id"])
    assert len(a["train"]) == round(len(full["train"]) / 2)
    assert len(a["test"]) == len(full["test"]) and len(a["validation"]) == len(full["validation"])


def test_wrong_folder_errors(tmp_path, siim_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(DatasetFormatError, match="train-rle.csv"):
        siim.load(str(bad), cache_dir=str(tmp_path / "c"))
    (bad / "train-rle.csv").write_text("image,rle\na,-1\n")
    with pytest.raises(DatasetFormatError, match="EncodedPixels"):
        siim.load(str(bad), cache_dir=str(tmp_path / "c"))
    (bad / "train-rle.csv").write_text("ImageId, EncodedPixels\na, -1\n")
    with pytest.raises(DatasetFormatError, match="DICOM"):
        siim.load(str(bad), cache_dir=str(tmp_path / "c"))


def test_cli(siim_dir, tmp_path, capsys):
    assert siim.main(["--data_dir", siim_dir, "--output_dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "siim/segmentation" in out and "malformed_rle: 3" in out and "positive=" in out



# ------------------------------------------------------------------------------------------------
# Faults of issue 13: ImageIds that are paths, every row and image accounted
# ------------------------------------------------------------------------------------------------

ROW_REASONS = {"duplicate_row", "missing_image_id"}
IMAGE_REASONS = {"missing_image", "unreadable_dicom", "malformed_rle", "train_negative_not_sampled",
                 "absolute path in list file", "path outside the data folder"}


@pytest.fixture(scope="module")
def faulty_dir(tmp_path_factory, siim_dir):
    import shutil

    base = tmp_path_factory.mktemp("siim_faults")
    root = base / "data"
    shutil.copytree(siim_dir, root)
    (base / "elsewhere").mkdir()
    write_dicom(base / "elsewhere" / "scan.dcm", np.zeros((S, S), np.uint16), "MONOCHROME2", 12)
    extra = ["../../elsewhere/scan, -1", f"{base / 'elsewhere' / 'scan'}, 1 2", ", -1"]
    with open(root / "train-rle.csv", "a") as f:
        f.write("\n".join(extra) + "\n")
    n_rows = len((root / "train-rle.csv").read_text().strip().splitlines()) - 1
    return str(root), n_rows


def test_image_ids_that_leave_the_folder_are_refused(faulty_dir, tmp_path):
    root, _ = faulty_dir
    cache = str(tmp_path / "c")
    dd = siim.load(root, cache_dir=cache, verbose=False)
    assert not any("elsewhere" in i for s in dd for i in dd[s]["image_id"])
    m = _manifest(cache)
    assert m["skipped"]["path outside the data folder"] == ["../../elsewhere/scan"]
    assert len(m["skipped"]["absolute path in list file"]) == 1


def test_every_row_and_image_accounted(faulty_dir, tmp_path):
    root, n_rows = faulty_dir
    cache = str(tmp_path / "c")
    dd = siim.load(root, cache_dir=cache, verbose=False)
    m = _manifest(cache)
    assert set(m["skipped_counts"]) <= ROW_REASONS | IMAGE_REASONS
    row_skips = sum(v for k, v in m["skipped_counts"].items() if k in ROW_REASONS)
    # pos_two has two RLE rows: rows = row skips + images + 1
    assert m["inputs"]["rows"] == n_rows == row_skips + m["inputs"]["images"] + 1
    image_skips = sum(v for k, v in m["skipped_counts"].items() if k in IMAGE_REASONS)
    assert m["inputs"]["images"] == sum(len(dd[s]) for s in dd) + image_skips


__all__ = []
