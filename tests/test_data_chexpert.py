"""data_scripts.chexpert on a miniature CheXpert-v1.0-small layout generated in tmp_path."""
import csv
import io
import json
import os
import re

import pytest
from PIL import Image

from data_scripts import DatasetFormatError, chexpert

FOLDER = "CheXpert-v1.0-small"
COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
           "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
           "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
TASKS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
# Hand-picked label patterns (raw CSV values, "" = blank) in task order At, Ca, Co, Ed, PE.
ALL_UNCERTAIN = ["-1.0"] * 5
MIXED = ["1.0", "-1.0", "", "0.0", "-1.0"]
SINGLE = [["1.0" if j == i else "" for j in range(5)] for i in range(5)]  # single-positive (5x200 pool)


def _jpg(path, value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("L", (24, 20), value).save(path, format="JPEG")


def _row(rel, labels, view="Frontal"):
    row = {c: "" for c in COLUMNS}
    row.update({"Path": rel, "Sex": "Female", "Age": "60", "Frontal/Lateral": view,
                "AP/PA": "AP" if view == "Frontal" else ""})
    row.update(dict(zip(TASKS, labels)))
    return row


def _write(path, rows, columns=COLUMNS):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def make_chexpert(parent):
    """20 train patients x 2 studies (frontal + lateral each) + broken rows; 4 valid patients."""
    ds_dir = os.path.join(parent, FOLDER)
    train, valid, info = [], [], {}
    for p in range(1, 21):
        for s in (1, 2):
            rel = f"{FOLDER}/train/patient{p:05d}/study{s}/view1_frontal.jpg"
            if p <= 10 and s == 1:
                labels = SINGLE[(p - 1) % 5]           # 2 single-positive rows per task
            elif p == 11 and s == 1:
                labels = ALL_UNCERTAIN
            elif p == 12 and s == 1:
                labels = MIXED
            else:
                labels = ["0.0", "", "1.0", "-1.0", "1.0"] if (p + s) % 2 else [""] * 5
            _jpg(os.path.join(parent, rel), value=5 * p)
            train.append(_row(rel, labels))
            info[rel] = labels
            lat = f"{FOLDER}/train/patient{p:05d}/study{s}/view2_lateral.jpg"
            _jpg(os.path.join(parent, lat))
            train.append(_row(lat, labels, view="Lateral"))
    # Broken rows.
    train.append(_row(f"{FOLDER}/train/patient00090/study1/view1_frontal.jpg", MIXED))  # missing file
    bad = f"{FOLDER}/train/patient00091/study1/view1_frontal.jpg"
    os.makedirs(os.path.dirname(os.path.join(parent, bad)))
    with open(os.path.join(parent, bad), "wb") as f:
        f.write(b"")                                                                 # unreadable (empty)
    train.append(_row(bad, MIXED))
    cut = f"{FOLDER}/train/patient00092/study1/view1_frontal.jpg"
    buf = io.BytesIO()
    Image.effect_noise((32, 32), 50).convert("L").save(buf, format="JPEG")
    os.makedirs(os.path.dirname(os.path.join(parent, cut)))
    with open(os.path.join(parent, cut), "wb") as f:
        f.write(buf.getvalue()[:300])                                                # truncated
    train.append(_row(cut, MIXED))
    odd = f"{FOLDER}/train/patient00093/study1/view1_frontal.jpg"
    _jpg(os.path.join(parent, odd))
    train.append(_row(odd, ["2.0", "", "", "", ""]))                                 # invalid label
    train.append(_row(f"{FOLDER}/train/patient00001/study1/view1_frontal.jpg", MIXED))  # duplicate Path
    for p in range(64541, 64545):
        rel = f"{FOLDER}/valid/patient{p}/study1/view1_frontal.jpg"
        labels = ["1.0", "0.0", "0.0", "1.0", "0.0"]
        _jpg(os.path.join(parent, rel))
        valid.append(_row(rel, labels))
        info[rel] = labels
        lat = f"{FOLDER}/valid/patient{p}/study1/view2_lateral.jpg"
        _jpg(os.path.join(parent, lat))
        valid.append(_row(lat, labels, view="Lateral"))
    _write(os.path.join(ds_dir, "train.csv"), train)
    _write(os.path.join(ds_dir, "valid.csv"), valid)
    return ds_dir, info


def _patient(image_id):
    return re.search(r"patient\d+", image_id).group(0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    parent = str(tmp_path_factory.mktemp("chexpert"))
    ds_dir, info = make_chexpert(parent)
    cache = str(tmp_path_factory.mktemp("cache"))
    ds = chexpert.load(ds_dir, cache_dir=cache, holdout_per_task=1, val_size=8)
    with open(os.path.join(cache, "chexpert", "classification", "manifest.json")) as f:
        manifest = json.load(f)
    return parent, ds_dir, cache, info, ds, manifest


def _labels_by_id(ds):
    return {i: lab for s in ds for i, lab in zip(ds[s]["image_id"], ds[s]["labels"])}


def test_uncertainty_policy_labels(built):
    _, _, _, _, ds, _ = built
    got = _labels_by_id(ds)
    all_u = f"{FOLDER}/train/patient00011/study1/view1_frontal.jpg"
    mixed = f"{FOLDER}/train/patient00012/study1/view1_frontal.jpg"
    # Default: U-Ones for Atelectasis, Edema, Pleural Effusion; U-Zeros for Cardiomegaly, Consolidation.
    assert got[all_u] == [1.0, 0.0, 0.0, 1.0, 1.0]
    # MIXED = 1, -1 (Cardiomegaly -> 0), blank (-> 0), 0, -1 (Pleural Effusion -> 1).
    assert got[mixed] == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert ds["train"].features["labels"].length == 5


def test_custom_uncertainty_policy(built, tmp_path):
    _, ds_dir, _, _, _, _ = built
    ds = chexpert.load(ds_dir, cache_dir=str(tmp_path), holdout_per_task=1, val_size=8,
                       uncertainty_policy={"Cardiomegaly": "ones", "Edema": "zeros"})
    got = _labels_by_id(ds)
    assert got[f"{FOLDER}/train/patient00011/study1/view1_frontal.jpg"] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert got[f"{FOLDER}/train/patient00012/study1/view1_frontal.jpg"] == [1.0, 1.0, 0.0, 0.0, 1.0]
    zeros = chexpert.resolve_uncertainty_policy("zeros")
    assert zeros == {t: 0.0 for t in TASKS}
    with pytest.raises(ValueError):
        chexpert.resolve_uncertainty_policy({"Pneumonia": "ones"})


def test_splits_no_leak_and_test_is_official_valid(built):
    _, _, _, info, ds, manifest = built
    train_ids, val_ids = set(ds["train"]["image_id"]), set(ds["validation"]["image_id"])
    assert not train_ids & val_ids                                          # G.21: no validation row in train
    assert not {_patient(i) for i in train_ids} & {_patient(i) for i in val_ids}
    assert 1 <= len(val_ids) <= 8
    held = set(manifest["skipped"]["held out: CheXpert 5x200"])
    usable_train = {k for k in info if "/train/" in k}
    # Nothing unrelated is dropped: train + validation + hold-out = every usable frontal train image.
    assert train_ids | val_ids | held == usable_train and not (train_ids | val_ids) & held
    assert set(ds["test"]["image_id"]) == {k for k in info if "/valid/" in k}
    assert all("frontal" in i for s in ds for i in ds[s]["image_id"])


def test_5x200_holdout(built):
    _, _, _, info, _, manifest = built
    held = manifest["skipped"]["held out: CheXpert 5x200"]
    assert len(held) == 5                                                    # holdout_per_task=1, 5 tasks
    tasks_hit = sorted(info[h].index("1.0") for h in held)
    assert tasks_hit == [0, 1, 2, 3, 4]
    for h in held:
        assert info[h].count("1.0") == 1 and "-1.0" not in info[h]


def test_manifest_counts(built):
    _, _, _, _, ds, manifest = built
    assert manifest["skipped_counts"] == {
        "duplicate Path": 1, "held out: CheXpert 5x200": 5, "invalid label value": 1,
        "missing image file": 1, "non-frontal view": 44, "truncated image": 1, "unreadable image": 1,
    }
    assert manifest["rows"] == {s: len(ds[s]) for s in ds}


def test_data_dir_as_parent_and_default_val_size(built, tmp_path):
    parent, _, _, _, ds, _ = built
    d = chexpert.load(parent, cache_dir=str(tmp_path), holdout_per_task=1)
    n = len(ds["train"]) + len(ds["validation"])
    assert len(d["train"]) + len(d["validation"]) == n
    assert 1 <= len(d["validation"]) <= round(0.1 * n)


def test_data_pct_train_only_and_deterministic(built):
    _, ds_dir, cache, _, ds, _ = built
    a = chexpert.load(ds_dir, cache_dir=cache, holdout_per_task=1, val_size=8, data_pct=0.25, seed=7)
    b = chexpert.load(ds_dir, cache_dir=cache, holdout_per_task=1, val_size=8, data_pct=0.25, seed=7)
    assert a["train"]["image_id"] == b["train"]["image_id"]
    assert len(a["train"]) == max(1, round(0.25 * len(ds["train"])))
    assert a["validation"]["image_id"] == ds["validation"]["image_id"]
    assert a["test"]["image_id"] == ds["test"]["image_id"]


def test_wrong_columns_and_wrong_folder(tmp_path):
    d = tmp_path / FOLDER
    d.mkdir()
    _write(str(d / "train.csv"), [{"Path": "x.jpg", "Label": "1"}], columns=["Path", "Label"])
    _write(str(d / "valid.csv"), [{"Path": "x.jpg", "Label": "1"}], columns=["Path", "Label"])
    with pytest.raises(DatasetFormatError, match="missing column"):
        chexpert.load(str(d), cache_dir=str(tmp_path / "c"))
    not_chexpert = tmp_path / "photos"
    not_chexpert.mkdir()
    (not_chexpert / "cat.jpg").write_bytes(b"x")
    with pytest.raises(DatasetFormatError, match="expected train.csv and valid.csv"):
        chexpert.load(str(not_chexpert), cache_dir=str(tmp_path / "c2"))
    # A well-formed list whose images are all absent: nothing usable remains.
    _write(str(d / "train.csv"), [_row(f"{FOLDER}/train/patient00001/study1/view1_frontal.jpg", MIXED)])
    _write(str(d / "valid.csv"), [_row(f"{FOLDER}/valid/patient00002/study1/view1_frontal.jpg", MIXED)])
    with pytest.raises(DatasetFormatError, match="nothing usable remains"):
        chexpert.load(str(d), cache_dir=str(tmp_path / "c3"))


def test_cli(built, tmp_path, capsys):
    _, ds_dir, _, _, _, _ = built
    out = tmp_path / "out"
    rc = chexpert.main(["--data_dir", ds_dir, "--output_dir", str(out), "--option", "holdout_per_task=1",
                        "--option", "val_size=8"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "test: 4 rows" in text and "Pleural Effusion=" in text and "non-frontal view: 44" in text
    assert (out / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------------
# Faults of issue 13: an image in both lists, Paths out of the data folder, every row accounted
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """The miniature layout plus train rows that list a valid.csv image (directly and through a
    link) and Paths naming a readable image outside the data folder."""
    base = tmp_path_factory.mktemp("chexpert_faults")
    parent = str(base / "data")
    ds_dir, _ = make_chexpert(parent)
    _jpg(str(base / "elsewhere" / "scan.jpg"))
    valid_image = f"{FOLDER}/valid/patient64541/study1/view1_frontal.jpg"
    link = f"{FOLDER}/train/patient00031/study1/view1_frontal.jpg"
    os.makedirs(os.path.dirname(os.path.join(parent, link)))
    os.symlink(os.path.join(parent, valid_image), os.path.join(parent, link))
    with open(os.path.join(ds_dir, "train.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    extra = [_row(valid_image, MIXED), _row(link, MIXED), _row(f"{FOLDER}/../../elsewhere/scan.jpg", MIXED),
             _row("../elsewhere/scan.jpg", MIXED), _row(str(base / "elsewhere" / "scan.jpg"), MIXED)]
    _write(os.path.join(ds_dir, "train.csv"), rows + extra)
    cache = str(base / "cache")
    ds = chexpert.load(ds_dir, cache_dir=cache, holdout_per_task=1, val_size=8, verbose=False)
    with open(os.path.join(cache, "chexpert", "classification", "manifest.json")) as f:
        manifest = json.load(f)
    return ds, manifest, valid_image, link


def test_image_in_train_and_valid_lists_stays_in_test_only(faulty):
    ds, manifest, valid_image, link = faulty
    assert valid_image in ds["test"]["image_id"]
    train_side = set(ds["train"]["image_id"]) | set(ds["validation"]["image_id"])
    assert valid_image not in train_side and link not in train_side
    assert sorted(manifest["skipped"]["cross-split duplicate (kept in test)"]) == sorted([valid_image, link])


def test_paths_outside_data_folder_refused(faulty):
    ds, manifest, _, _ = faulty
    assert not any("elsewhere" in i for s in ds for i in ds[s]["image_id"])
    assert sorted(manifest["skipped"]["path outside the data folder"]) == sorted(
        [f"{FOLDER}/../../elsewhere/scan.jpg", "../elsewhere/scan.jpg"])
    assert len(manifest["skipped"]["absolute path in list file"]) == 1


def test_every_row_accounted(faulty):
    ds, manifest, _, _ = faulty
    # every CheXpert skip is one list row (held out: 5x200 included)
    rows_in = manifest["inputs"]["train.csv rows"] + manifest["inputs"]["valid.csv rows"]
    assert manifest["inputs"]["valid.csv rows"] == 8
    assert rows_in == sum(len(ds[s]) for s in ds) + sum(manifest["skipped_counts"].values())


__all__ = []


def test_5x200_task_is_the_holdout_as_test_split(built, tmp_path):
    _, ds_dir, _, info, _, manifest = built
    ds = chexpert.load(ds_dir, task="5x200", cache_dir=str(tmp_path), holdout_per_task=1, val_size=8)
    assert list(ds) == ["test"]
    assert sorted(ds["test"]["image_id"]) == sorted(manifest["skipped"]["held out: CheXpert 5x200"])
    for image_id, labels in zip(ds["test"]["image_id"], ds["test"]["labels"]):
        assert labels == [1.0 if v == "1.0" else 0.0 for v in info[image_id]] and sum(labels) == 1.0
