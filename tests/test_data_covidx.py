"""data_scripts.covidx on a miniature COVIDx 9A layout generated in tmp_path."""
import io
import json
import os

import datasets
import pytest
from PIL import Image

from data_scripts import DatasetFormatError, covidx
from data_scripts.builder import grouped_holdout, validate_image_files

CLASSES = ["normal", "pneumonia", "COVID-19"]


def _png(path, value=0, size=(20, 24)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("L", size, value).save(path)


def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.effect_noise((32, 32), 40).convert("L").save(buf, format="JPEG")
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def make_covidx(root, binary=False, three_columns=False):
    """Train list: 12 patients (1-3 images each) + broken items; test list: 5 images + 1 missing."""
    os.makedirs(root, exist_ok=True)
    train_lines, test_lines, truth = [], [], {}
    k = 0
    for p in range(12):
        for j in range(1 + p % 3):
            fn = f"p{p}_img{j}.png"
            cls = CLASSES[(p + j) % 3]
            _png(os.path.join(root, "train", fn), value=10 * k % 255)
            train_lines.append((f"PAT{p:03d}", fn, cls))
            truth[f"train/{fn}"] = (f"PAT{p:03d}", cls)
            k += 1
    # Broken items of every kind.
    train_lines.append(("PAT900", "missing.png", "normal"))                    # listed, no file
    with open(os.path.join(root, "train", "garbage.png"), "wb") as f:
        f.write(b"this is not an image")
    train_lines.append(("PAT901", "garbage.png", "pneumonia"))                 # unreadable
    _truncated_jpeg(os.path.join(root, "train", "cut.jpg"))
    train_lines.append(("PAT902", "cut.jpg", "COVID-19"))                       # truncated
    train_lines.append(("PAT000", "p0_img0.png", "normal"))                     # duplicate filename
    for t in range(5):
        fn = f"t{t}.png"
        _png(os.path.join(root, "test", fn), value=40 * t + 5)  # bytes unlike any train image
        test_lines.append((f"TP{t}", fn, CLASSES[t % 3]))
        truth[f"test/{fn}"] = (f"TP{t}", CLASSES[t % 3])
    test_lines.append(("TP9", "gone.png", "normal"))

    def fmt(line):
        pid, fn, cls = line
        if binary:
            cls = "positive" if cls == "COVID-19" else "negative"
        return f"{pid} {fn} {cls}" if three_columns else f"{pid} {fn} {cls} sirm"

    with open(os.path.join(root, "train_COVIDx9A.txt"), "w") as f:
        f.write("\n".join(fmt(x) for x in train_lines) + "\nthis line is garbage\n")
    with open(os.path.join(root, "test_COVIDx9A.txt"), "w") as f:
        f.write("\n".join(fmt(x) for x in test_lines) + "\n")
    return truth


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("covidx") / "COVIDx")
    truth = make_covidx(root)
    cache = str(tmp_path_factory.mktemp("cache"))
    ds = covidx.load(root, cache_dir=cache)
    return root, cache, truth, ds


def test_rows_labels_and_features(built):
    root, cache, truth, ds = built
    assert set(ds) == {"train", "validation", "test"}
    assert ds["train"].features["labels"].names == CLASSES
    usable_train = [k for k in truth if k.startswith("train/")]
    assert len(ds["train"]) + len(ds["validation"]) == len(usable_train) == 24
    assert len(ds["test"]) == 5
    for split in ds:
        for row in ds[split]:
            assert truth[row["image_id"]][1] == CLASSES[row["labels"]]
            assert row["image"].size == (20, 24)


def test_split_by_patient_and_size(built):
    _, _, truth, ds = built
    pats = {s: {truth[i][0] for i in ds[s]["image_id"]} for s in ds}
    assert not pats["train"] & pats["validation"]
    assert not set(ds["train"]["image_id"]) & set(ds["validation"]["image_id"])
    # 20 % of 24 usable train images = 5 (whole patients, never more than the target).
    assert 1 <= len(ds["validation"]) <= 5
    assert set(ds["test"]["image_id"]) == {k for k in truth if k.startswith("test/")}


def test_manifest_counts(built):
    _, cache, _, ds = built
    with open(os.path.join(cache, "covidx", "classification", "manifest.json")) as f:
        m = json.load(f)
    assert m["skipped_counts"] == {"duplicate filename": 1, "malformed line": 1, "missing image file": 2,
                                   "truncated image": 1, "unreadable image": 1}
    assert m["rows"] == {s: len(ds[s]) for s in ds}
    assert "train/missing.png" in m["skipped"]["missing image file"]


def test_no_absolute_paths(built):
    root, _, _, ds = built
    raw = ds["train"].cast_column("image", datasets.Image(decode=False))
    for row in raw:
        assert row["image"]["path"] is None and row["image"]["bytes"]
        assert not os.path.isabs(row["image_id"]) and root not in row["image_id"]


def test_deterministic_split_and_data_pct(built, tmp_path):
    root, cache, _, ds = built
    again = covidx.load(root, cache_dir=str(tmp_path / "other"))
    assert again["validation"]["image_id"] == ds["validation"]["image_id"]
    a = covidx.load(root, cache_dir=cache, data_pct=0.5, seed=3)
    b = covidx.load(root, cache_dir=cache, data_pct=0.5, seed=3)
    assert len(a["train"]) == round(0.5 * len(ds["train"]))
    assert a["train"]["image_id"] == b["train"]["image_id"]
    assert set(a["train"]["image_id"]) <= set(ds["train"]["image_id"])
    assert a["validation"]["image_id"] == ds["validation"]["image_id"]
    assert a["test"]["image_id"] == ds["test"]["image_id"]
    with pytest.raises(ValueError):
        covidx.load(root, cache_dir=cache, data_pct=0.0)


def test_three_column_layout(tmp_path):
    root = str(tmp_path / "old")
    make_covidx(root, three_columns=True)
    ds = covidx.load(root, cache_dir=str(tmp_path / "c"), train_list="train_COVIDx9A.txt",
                     test_list="test_COVIDx9A.txt")
    assert len(ds["train"]) + len(ds["validation"]) == 24 and len(ds["test"]) == 5


def test_binary_version_is_a_different_task(tmp_path):
    root = str(tmp_path / "cxr4")
    make_covidx(root, binary=True)
    with pytest.raises(DatasetFormatError, match="binary"):
        covidx.load(root, cache_dir=str(tmp_path / "c"))


def test_unknown_layout_and_wrong_folders(tmp_path):
    root = tmp_path / "weird"
    (root / "train").mkdir(parents=True)
    (root / "train.txt").write_text("a,b,c\n1,2,3\n")
    (root / "test.txt").write_text("a,b,c\n")
    with pytest.raises(DatasetFormatError, match="not a three-class COVIDx list"):
        covidx.load(str(root), cache_dir=str(tmp_path / "c"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetFormatError, match="expected train.txt"):
        covidx.load(str(empty), cache_dir=str(tmp_path / "c"))
    noimg = tmp_path / "noimg"
    noimg.mkdir()
    (noimg / "train.txt").write_text("P1 a.png normal x\n")
    (noimg / "test.txt").write_text("P2 b.png normal x\n")
    with pytest.raises(DatasetFormatError, match="no train/ or test/ image folder"):
        covidx.load(str(noimg), cache_dir=str(tmp_path / "c"))


def test_parse_line():
    assert covidx.parse_line("3 a b.png COVID-19 cohen") == ("3", "a b.png", "COVID-19")
    assert covidx.parse_line("3 a.png pneumonia") == ("3", "a.png", "pneumonia")
    assert covidx.parse_line("3 a.png positive x") is None


def test_cli(built, tmp_path, capsys):
    root = built[0]
    out = tmp_path / "out"
    assert covidx.main(["--data_dir", root, "--output_dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train:" in text and "validation:" in text and "test: 5 rows" in text
    assert "missing image file: 2" in text and "COVID-19=" in text
    assert json.loads((out / "manifest.json").read_text())["dataset"] == "covidx"
    assert covidx.main(["--data_dir", str(tmp_path), "--output_dir", str(out)]) == 2


def test_validate_image_files_threaded(tmp_path):
    paths = []
    for i in range(40):
        p = str(tmp_path / f"{i}.png")
        _png(p, value=i)
        paths.append(p)
    _truncated_jpeg(str(tmp_path / "cut.jpg"))
    (tmp_path / "bad.png").write_bytes(b"nope")
    paths += [str(tmp_path / "cut.jpg"), str(tmp_path / "bad.png"), str(tmp_path / "absent.png")]
    seq = validate_image_files(paths, num_workers=1)
    par = validate_image_files(paths + paths[:3], num_workers=4)
    assert seq == par and len(par) == 43
    assert [par[p] for p in paths[-3:]] == ["truncated image", "unreadable image", "missing image file"]
    assert all(par[p] is None for p in paths[:40])


def test_grouped_holdout():
    groups = ["a"] * 3 + ["b"] * 2 + ["c"] * 4 + ["d"] + ["e"] * 2
    chosen = grouped_holdout(groups, 4, seed=0)
    assert chosen == grouped_holdout(list(reversed(groups)), 4, seed=0)   # order-independent
    assert 1 <= sum(g in chosen for g in groups) <= 4
    assert grouped_holdout(groups, 0, seed=0) == set()


# ------------------------------------------------------------------------------------------------
# Faults of issue 13: a file in both lists, names out of the data folder, every line accounted
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    base = tmp_path_factory.mktemp("covidx_faults")
    root = str(base / "COVIDx")
    make_covidx(root)
    _png(str(base / "elsewhere" / "scan.png"), value=99)                 # readable, outside the folder
    _png(os.path.join(root, "train", "t0.png"), value=0)                 # test image t0 copied into train/
    extra = ["PAT500 t0.png normal sirm", "PAT501 ../../elsewhere/scan.png normal sirm",
             f"PAT502 {base / 'elsewhere' / 'scan.png'} pneumonia sirm",
             "PAT503 ../test/t1.png pneumonia sirm"]
    with open(os.path.join(root, "train_COVIDx9A.txt"), "a") as f:
        f.write("\n".join(extra) + "\n")
    cache = str(base / "cache")
    ds = covidx.load(root, cache_dir=cache, verbose=False)
    with open(os.path.join(cache, "covidx", "classification", "manifest.json")) as f:
        manifest = json.load(f)
    return ds, manifest


def test_file_in_both_lists_stays_in_test_only(faulty):
    ds, manifest = faulty
    train_side = set(ds["train"]["image_id"]) | set(ds["validation"]["image_id"])
    assert "test/t0.png" in ds["test"]["image_id"] and "train/t0.png" not in train_side
    # by name (t0.png) and by file (../test/t1.png is test/t1.png itself)
    assert sorted(manifest["skipped"]["cross-split duplicate (kept in test)"]) == [
        "train/../test/t1.png", "train/t0.png"]


def test_listed_names_outside_data_folder_refused(faulty):
    ds, manifest = faulty
    assert not any("elsewhere" in i for s in ds for i in ds[s]["image_id"])
    assert manifest["skipped"]["path outside the data folder"] == [
        "train_COVIDx9A.txt: ../../elsewhere/scan.png"]
    assert len(manifest["skipped"]["absolute path in list file"]) == 1


def test_every_line_accounted(faulty):
    ds, manifest = faulty
    lines_in = manifest["inputs"]["train list lines"] + manifest["inputs"]["test list lines"]
    assert manifest["inputs"] == {"train list lines": 33, "test list lines": 6}
    assert lines_in == sum(len(ds[s]) for s in ds) + sum(manifest["skipped_counts"].values())


__all__ = []
