"""Tests of data_scripts/synthetic_cxr.py: determinism, label / report / mask consistency, builder.

Small sizes throughout (64-96 px, <= 200 studies) so the file runs in well under a minute.
"""
import hashlib
import json
import os
import re

import numpy as np
import pytest

from data_scripts import load_cgns_dataset
from data_scripts import synthetic_cxr as sc
from modeling_cgns.sentences import report_text, split_sentences

_NEG = re.compile(r"^(no|there is no|there are no)\b")
_LUNG_FINDINGS = set(sc.FINDING_NAMES) - {"cardiomegaly"}


@pytest.fixture(scope="module")
def studies():
    """40 studies at 96 px (shared by the consistency tests)."""
    return list(sc.generate(40, seed=3, image_size=96))


def _digest(items):
    h = hashlib.sha256()
    for st in items:
        h.update(st["image"].tobytes())
        h.update(st["report"].encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- determinism
def test_determinism_across_generations_and_order():
    a = _digest(sc.generate(8, seed=0, image_size=64))
    b = _digest(sc.generate(8, seed=0, image_size=64))
    assert a == b
    batch = list(sc.generate(8, seed=0, image_size=64))
    alone = sc.generate_study(5, seed=0, image_size=64)
    assert sc.study_digest(alone) == sc.study_digest(batch[5])
    late = next(sc.generate(1, seed=0, image_size=64, start=5))
    assert sc.study_digest(late) == sc.study_digest(batch[5])
    # the seed matters
    assert _digest(sc.generate(8, seed=1, image_size=64)) != a


def test_image_format_any_size():
    for size in (50, 64, 97):
        st = sc.generate_study(2, seed=0, image_size=size)
        assert st["image"].shape == (size, size) and st["image"].dtype == np.uint8
        assert st["pneumothorax_mask"].shape == (size, size) and st["opacity_mask"].shape == (size, size)
        assert set(np.unique(st["opacity_mask"])) <= {0, 255}
        assert st["image"].std() > 10  # not a blank image
    with pytest.raises(ValueError):
        sc.generate_study(0, seed=0, image_size=16)


# ---------------------------------------------------------------------------------------------- labels
def test_labels_consistent_with_findings(studies):
    for st in studies:
        names = {f["name"] for f in st["findings"]}
        expect = [float(n in names) for n in ("atelectasis", "cardiomegaly", "consolidation", "edema",
                                              "pleural_effusion")]
        assert st["chexpert"].tolist() == expect, st["study_id"]
        has_opacity = bool(names & {"consolidation", "multifocal_opacity"})
        assert st["opacity"].tolist() == [float(has_opacity)]
        expect_cls = 2 if "multifocal_opacity" in names else 1 if "consolidation" in names else 0
        assert st["multiclass"] == expect_cls
        assert not ({"consolidation", "multifocal_opacity"} <= names)
        for f in st["findings"]:
            if f["name"] == "multifocal_opacity":
                assert (f["side"], f["zone"]) == ("bilateral", "lower")
            if f["name"] == "consolidation":
                assert f["side"] in ("left", "right")


def test_masks_match_labels(studies):
    for st in studies:
        names = {f["name"] for f in st["findings"]}
        assert bool(st["pneumothorax_mask"].any()) == ("pneumothorax" in names), st["study_id"]
        assert bool(st["opacity_mask"].any()) == bool(st["opacity"][0]), st["study_id"]


def test_boxes_from_drawn_masks(studies):
    n_checked = 0
    for st in studies:
        boxes, labels = st["boxes"], st["box_labels"]
        assert boxes.shape == (len(labels), 4) and boxes.dtype == np.float32
        if len(boxes):
            assert (boxes >= 0).all() and (boxes <= 1).all()
            assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
        names = [f["name"] for f in st["findings"]]
        assert labels.count("nodule") == names.count("nodule")
        assert ("opacity" in labels) == bool(st["opacity"][0])
        mask = st["opacity_mask"] > 0
        s = mask.shape[0]
        covered = np.zeros_like(mask)
        for box, lab in zip(boxes, labels):
            if lab != "opacity":
                continue
            x0, y0, x1, y1 = (int(round(float(t) * s)) for t in box)
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            covered |= inside
            # tight: the mask inside the box touches all four box edges
            ys, xs = np.nonzero(mask & inside)
            assert len(ys) and (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            n_checked += 1
        assert not (mask & ~covered).any(), "opacity pixels outside every opacity box"
    assert n_checked > 0


def test_masks_are_exactly_the_drawn_regions(monkeypatch):
    """Switching the opacity / pneumothorax contrast off changes pixels only inside their masks."""
    ids = {"opacity": None, "pneumothorax": None}
    for st in sc.generate(60, seed=0, image_size=96):
        if ids["opacity"] is None and st["opacity"][0]:
            ids["opacity"] = st["index"]
        if ids["pneumothorax"] is None and st["pneumothorax_mask"].any():
            ids["pneumothorax"] = st["index"]
    assert None not in ids.values()
    cases = (("opacity", ("consolidation_contrast", "multifocal_contrast"), "opacity_mask"),
             ("pneumothorax", ("pneumothorax_lucency",), "pneumothorax_mask"))
    for kind, keys, mask_key in cases:
        ref = sc.generate_study(ids[kind], seed=0, image_size=96)
        for k in keys:
            monkeypatch.setitem(sc.DIFFICULTY, k, (0.0, 0.0))
        off = sc.generate_study(ids[kind], seed=0, image_size=96)
        monkeypatch.undo()
        diff = ref["image"] != off["image"]
        assert diff.any(), kind
        assert not (diff & (ref[mask_key] == 0)).any(), f"{kind}: pixels changed outside the mask"
        assert ref["report"] == off["report"]  # calibration changes pixels, not the report


# ---------------------------------------------------------------------------------------------- reports
def _mentions(sentence, name):
    return any(k in sentence for k in sc.KEYWORDS[name])


def test_report_describes_exactly_the_findings(studies):
    for st in studies:
        assert st["report"].startswith("FINDINGS: ") and "\n\nIMPRESSION: " in st["report"]
        assert st["text"] == report_text(st["impression_text"], st["findings_text"])
        assert st["sentences"] == split_sentences(st["text"]) and len(st["sentences"]) >= 2
        sents = st["sentences"]
        present = {f["name"] for f in st["findings"]}
        positive = [s for s in sents if not _NEG.match(s)]
        negative = [s for s in sents if _NEG.match(s)]
        for name in sc.FINDING_NAMES:
            said = any(_mentions(s, name) for s in positive)
            assert said == (name in present), (st["study_id"], name, sents)
            if name in present:
                assert not any(_mentions(s, name) for s in negative), (st["study_id"], name)
        for f in st["findings"]:
            about = [s for s in positive if _mentions(s, f["name"])]
            size_word = sc.SIZE_WORDS[f["name"]][f["size"]]
            assert any(size_word in s for s in about), (st["study_id"], f, about)
            if f["side"] in ("left", "right"):
                side_ok = any(f["side"] in s or (f["side"] == "left" and "lingula" in s) for s in about)
                assert side_ok, (st["study_id"], f, about)
            if f["name"] == "pleural_effusion" and f["side"] == "bilateral":
                assert any("bilateral" in s for s in about)
        clear = any("lungs are" in s and "clear" in s for s in sents)
        if clear:
            assert not (present & _LUNG_FINDINGS), st["study_id"]
        if not present:
            assert any("no acute" in s for s in sents)


def test_prevalence_and_cooccurrence():
    sts = [sc.generate_study(i, seed=0, image_size=64) for i in range(200)]
    normal = np.mean([not st["findings"] for st in sts])
    assert 0.25 <= normal <= 0.45
    chex = np.stack([st["chexpert"] for st in sts])
    assert (chex.sum(0) > 0).all()
    assert set(st["multiclass"] for st in sts) == {0, 1, 2}
    cardio, edema, effusion = chex[:, 1] > 0, chex[:, 3] > 0, chex[:, 4] > 0
    assert edema[cardio].mean() > edema[~cardio].mean() + 0.2
    assert effusion[cardio].mean() > effusion[~cardio].mean() + 0.2
    assert any(st["pneumothorax_mask"].any() for st in sts)


def test_split_sizes():
    assert sc.split_sizes(2000) == {"train": 1600, "validation": 200, "test": 200}
    assert sc.split_sizes(25) == {"train": 21, "validation": 2, "test": 2}
    assert [sc.split_of(i, 20) for i in (0, 15, 16, 17, 18, 19)] == \
        ["train", "train", "validation", "validation", "test", "test"]


def test_difficulty_is_a_calibration_dict():
    for key in ("lesion_contrast_scale", "consolidation_contrast", "grain_sigma", "anatomy_noise"):
        assert key in sc.DIFFICULTY


def test_lesion_contrast_scale_brightens_only_the_lesions(tmp_path):
    # find a study with a boxed lesion and a normal one (no finding at all)
    lesion = next(i for i in range(60) if len(sc.generate_study(i, 0, 64)["boxes"]))
    normal = next(i for i in range(60) if not sc.generate_study(i, 0, 64)["findings"])
    base_dict = dict(sc.DIFFICULTY)
    plain, easy = sc.generate_study(lesion, 0, 64), sc.generate_study(lesion, 0, 64, lesion_contrast_scale=3.0)
    assert sc.DIFFICULTY == base_dict  # the override is undone
    assert plain["report"] == easy["report"] and plain["findings"] == easy["findings"]
    assert np.array_equal(plain["boxes"], easy["boxes"])
    assert np.array_equal(plain["opacity_mask"], easy["opacity_mask"])
    box = np.round(np.asarray(plain["boxes"][0]) * 64).astype(int)
    region = (slice(box[1], box[3]), slice(box[0], box[2]))
    diff = easy["image"].astype(float) - plain["image"].astype(float)
    assert diff[region].mean() > 2.0  # the lesion is denser, so brighter on the film
    outside = np.ones((64, 64), bool)
    for b in np.round(np.asarray(easy["boxes"]) * 64).astype(int).tolist() + box[None].tolist():
        outside[max(b[1] - 3, 0):b[3] + 3, max(b[0] - 3, 0):b[2] + 3] = False
    assert np.abs(diff[outside]).mean() < 0.25 * diff[region].mean()
    assert np.array_equal(sc.generate_study(normal, 0, 64)["image"],
                          sc.generate_study(normal, 0, 64, lesion_contrast_scale=3.0)["image"])
    with pytest.raises(ValueError, match="lesion_contrast_scale"):
        sc.generate_study(lesion, 0, 64, lesion_contrast_scale=0.0)
    # a load option with its own cache entry; the default keeps the old config id
    kw = dict(task="detection", cache_dir=str(tmp_path), num_images=20, image_size=64)
    a = load_cgns_dataset("synthetic_cxr", **kw)
    b = load_cgns_dataset("synthetic_cxr", lesion_contrast_scale=3.0, **kw)
    assert a["train"]["image_id"] == b["train"]["image_id"]
    assert any(np.asarray(x).tobytes() != np.asarray(y).tobytes()
               for x, y in zip(a["train"]["image"], b["train"]["image"]))
    assert sc._config_id("detection", 20, 64, 0) == "detection-n20-s64-seed0"
    assert sc._config_id("detection", 20, 64, 0, 3.0) == "detection-n20-s64-seed0-c3"


# ---------------------------------------------------------------------------------------------- builder
def _expected_features(task):
    from datasets import ClassLabel, Features, Image, List, Value

    cols = {
        "pretraining": {"image": Image(), "report": Value("string"), "sentences": List(Value("string")),
                        "study_id": Value("string")},
        "classification": {"image": Image(), "labels": List(Value("float32"), length=5),
                           "image_id": Value("string")},
        "classification_binary": {"image": Image(), "labels": List(Value("float32"), length=1),
                                  "image_id": Value("string")},
        "classification_multiclass": {"image": Image(),
                                      "labels": ClassLabel(names=["normal", "pneumonia", "COVID-19"]),
                                      "image_id": Value("string")},
        "detection": {"image": Image(), "boxes": List(List(Value("float32"), length=4)),
                      "image_id": Value("string")},
        "segmentation": {"image": Image(), "mask": Image(), "image_id": Value("string")},
        "segmentation_opacity": {"image": Image(), "mask": Image(), "image_id": Value("string")},
        "grounding": {"image": Image(), "sentences": List(Value("string")),
                      "sentence_boxes": List(List(List(Value("float32"), length=4))), "image_id": Value("string")},
    }
    meanings = {"sentence_meanings": List(Value("string")), "sentence_meanings_fine": List(Value("string"))}
    if task in ("pretraining", "grounding"):      # the clustering's ground truth (docs/clustering.md)
        cols[task].update(meanings)
    return Features(cols[task])


@pytest.mark.parametrize("task", list(sc.TASKS))
def test_builder_every_task(task, tmp_path):
    dd = load_cgns_dataset("synthetic_cxr", task=task, cache_dir=str(tmp_path), num_images=20, image_size=64)
    expect_splits = ["train", "validation"] if task == "pretraining" else ["train", "validation", "test"]
    assert sorted(dd) == sorted(expect_splits)
    assert {k: len(v) for k, v in dd.items()} == {k: sc.split_sizes(20)[k] for k in expect_splits}
    for split in expect_splits:
        assert dd[split].features == _expected_features(task)
    spec = sc.TASKS[task]
    assert spec.metric == {"pretraining": None, "classification": "auroc", "classification_binary": "auroc",
                           "classification_multiclass": "accuracy", "detection": "map",
                           "segmentation": "dice", "segmentation_opacity": "dice",
                           "grounding": "pointing_game"}[task]
    # rows equal the pure-Python generator (validation row 0 is study 16)
    row = dd["validation"][0]
    st = sc.generate_study(16, seed=0, image_size=64)
    img = row["image"]
    assert img.mode == "L" and img.size == (64, 64)
    assert np.array_equal(np.asarray(img), st["image"])
    if task == "pretraining":
        assert row["report"] == st["text"] and row["sentences"] == st["sentences"]
        assert row["study_id"] == st["study_id"]
    if task in ("pretraining", "grounding"):
        assert row["sentence_meanings"] == st["sentence_meanings"]
        assert row["sentence_meanings_fine"] == st["sentence_meanings_fine"]
    else:
        assert row["image_id"] == st["study_id"]
    if task == "classification":
        assert row["labels"] == st["chexpert"].tolist()
    if task == "classification_binary":
        assert row["labels"] == st["opacity"].tolist()
    if task == "classification_multiclass":
        assert row["labels"] == st["multiclass"]
    if task == "detection":
        assert np.allclose(np.array(row["boxes"], dtype=np.float32).reshape(-1, 4), st["boxes"])
    if task == "grounding":
        assert row["sentences"] == st["sentences"]
        assert [np.array(b, dtype=np.float32).reshape(-1, 4).tolist() for b in row["sentence_boxes"]] == \
            [np.array(b, dtype=np.float32).reshape(-1, 4).tolist() for b in st["sentence_boxes"]]
    if task.startswith("segmentation"):
        key = "pneumothorax_mask" if task == "segmentation" else "opacity_mask"
        assert row["mask"].mode == "L" and np.array_equal(np.asarray(row["mask"]), st[key])
    manifest = json.loads((tmp_path / "synthetic_cxr" / task / "manifest.json").read_text())
    assert manifest["rows"] == {k: len(v) for k, v in dd.items()} and manifest["skipped_counts"] == {}


def test_builder_data_pct_and_sizes(tmp_path):
    kw = dict(task="classification", cache_dir=str(tmp_path), num_images=20, image_size=64)
    full = load_cgns_dataset("synthetic_cxr", **kw)
    a = load_cgns_dataset("synthetic_cxr", data_pct=0.5, seed=7, **kw)
    b = load_cgns_dataset("synthetic_cxr", data_pct=0.5, seed=7, **kw)
    c = load_cgns_dataset("synthetic_cxr", data_pct=0.5, seed=8, **kw)
    assert len(a["train"]) == 8
    assert a["train"]["image_id"] == b["train"]["image_id"]
    assert a["train"]["image_id"] != c["train"]["image_id"]
    assert set(a["train"]["image_id"]) <= set(full["train"]["image_id"])
    for split in ("validation", "test"):
        assert a[split]["image_id"] == full[split]["image_id"]
    # a different size or generator seed gets its own cache entry
    big = load_cgns_dataset("synthetic_cxr", task="classification", cache_dir=str(tmp_path), num_images=20,
                            image_size=72)
    assert big["train"][0]["image"].size == (72, 72)
    other = load_cgns_dataset("synthetic_cxr", generator_seed=1, **kw)
    assert other["train"][0]["image_id"] != full["train"][0]["image_id"]


def test_cli(tmp_path, capsys):
    out = tmp_path / "out"
    assert sc.main(["--output_dir", str(out), "--num_images", "20", "--image_size", "64",
                    "--task", "classification_multiclass", "--num_samples", "3"]) == 0
    text = capsys.readouterr().out
    assert "train=16" in text and "label balance" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == {"train": 16, "validation": 2, "test": 2}
    pngs = [p for p in os.listdir(out / "samples") if p.endswith(".png") and "_" not in p.split("-")[-1]]
    assert len(pngs) == 3


def test_mistyped_option_is_rejected(tmp_path, capsys):
    # like the real builders: a typo must not silently give the default 2000 studies
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_image'\].*num_images"):
        load_cgns_dataset("synthetic_cxr", task="classification", cache_dir=str(tmp_path), num_image=20)
    assert not os.path.exists(tmp_path / "synthetic_cxr")  # nothing was generated
    rc = sc.main(["--output_dir", str(tmp_path / "out"), "--num_images", "20", "--option", "imagesize=64"])
    assert rc == 2 and "unknown option(s) ['imagesize']" in capsys.readouterr().err


__all__ = []


def test_sentence_findings_name_the_drawn_finding_and_carry_its_boxes():
    boxed = 0
    for i in range(60):
        st = sc.generate_study(i, seed=0, image_size=64)
        assert len(st["sentence_findings"]) == len(st["sentences"]) == len(st["sentence_boxes"])
        assert len(st["box_findings"]) == len(st["boxes"])
        for sentence, tag, boxes in zip(st["sentences"], st["sentence_findings"], st["sentence_boxes"]):
            if tag < 0:
                assert boxes == []
                continue
            finding = st["findings"][tag]
            assert any(k in sentence for k in sc.KEYWORDS[finding["name"]]), (sentence, finding)
            own = st["boxes"][[k for k, f in enumerate(st["box_findings"]) if f == tag]]
            assert np.allclose(np.array(boxes, dtype=np.float32).reshape(-1, 4), own)
            if finding["name"] in ("consolidation", "nodule", "multifocal_opacity"):
                assert len(boxes) >= 1
                boxed += 1
        # every box belongs to a finding that some sentence names (impression and findings section)
        for tag in st["box_findings"]:
            assert st["sentence_findings"].count(tag) == 2
    assert boxed > 10


def test_preparing_several_tasks_renders_each_study_once(tmp_path, monkeypatch):
    calls = []
    real = sc.generate_study

    def counting(index, *args, **kwargs):
        calls.append(index)
        return real(index, *args, **kwargs)

    monkeypatch.setattr(sc, "generate_study", counting)
    monkeypatch.setattr(sc, "_STUDY_CACHE", type(sc._STUDY_CACHE)())
    monkeypatch.setattr(sc, "_STUDY_CACHE_BYTES", [0])
    options = dict(num_images=20, image_size=48, cache_dir=str(tmp_path))
    grounding = load_cgns_dataset("synthetic_cxr", task="grounding", **options)
    classification = load_cgns_dataset("synthetic_cxr", task="classification", **options)
    assert sorted(calls) == list(range(20))  # the second task rendered nothing again
    # and its rows are what a fresh rendering gives
    for split in ("train", "test"):
        for row in classification[split].select(range(2)):
            index = int(row["image_id"].split("-")[-1])
            fresh = real(index, 0, 48)
            assert row["labels"] == fresh["chexpert"].tolist()
    assert len(grounding["test"]) == len(classification["test"]) == 2


def test_study_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(sc, "_STUDY_CACHE", type(sc._STUDY_CACHE)())
    monkeypatch.setattr(sc, "_STUDY_CACHE_BYTES", [0])
    one = sc._study_bytes(sc.generate_study(0, 0, 64))
    monkeypatch.setattr(sc, "STUDY_CACHE_LIMIT_BYTES", int(one * 2.5))
    for i in range(5):
        sc._cached_study(i, 0, 64, 1.0)
    assert len(sc._STUDY_CACHE) == 2 and sc._STUDY_CACHE_BYTES[0] <= sc.STUDY_CACHE_LIMIT_BYTES
    assert list(sc._STUDY_CACHE) == [(3, 0, 64, 1.0), (4, 0, 64, 1.0)]
