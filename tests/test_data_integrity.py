"""Input and cache integrity shared by the builders (data_scripts.builder, data_scripts.dicom):
cross-split duplicates by file content, prepared caches verified on reuse, preparations that lost
(nearly) everything refused and never cached, and the DICOM decoder message."""
import os
import re
import shutil
import struct

import numpy as np
import pydicom
import pytest
from PIL import Image

from data_scripts import DatasetFormatError, covidx, rsna, synthetic_cxr
from data_scripts.builder import (CACHE_DIGEST_FILE, REASON_CROSS_SPLIT_CONTENT, Manifest,
                                  drop_cross_split_content_duplicates, manifest_dir, read_manifest)
from data_scripts.dicom import DicomReadError, read_dicom
from fixtures import write_dicom
from test_data_covidx import make_covidx


def _png(path, value, size=(20, 24)):
    Image.new("L", size, value).save(path)
    return str(path)


# ------------------------------------------------------------------------------------------------
# Cross-split duplicates by content
# ------------------------------------------------------------------------------------------------

def test_content_duplicates_kept_in_the_scored_split_only(tmp_path):
    a = _png(tmp_path / "a.png", 10)
    os.link(a, tmp_path / "a_link.png")                               # hard link: another name, same inode
    shutil.copyfile(a, tmp_path / "a_copy.png")                       # byte copy
    b = _png(tmp_path / "b.png", 20)                                  # same size, other bytes
    shutil.copyfile(b, tmp_path / "b_again.png")                      # a duplicate inside one split is kept
    c = _png(tmp_path / "c.png", 30)
    assert os.path.getsize(a) == os.path.getsize(b)

    def rec(name):
        return {"image_id": name, "image_path": str(tmp_path / name)}

    splits = {"train": [rec("a_link.png"), rec("b.png"), rec("b_again.png"), rec("c.png")],
              "validation": [rec("a_copy.png")],
              "test": [rec("a.png"), {"image_id": "no_file"}]}
    manifest = Manifest("x", "y")
    out = drop_cross_split_content_duplicates(splits, manifest, lambda r: r.get("image_path"), lambda r: r["image_id"])
    assert {s: [r["image_id"] for r in v] for s, v in out.items()} == {
        "train": ["b.png", "b_again.png", "c.png"], "validation": [], "test": ["a.png", "no_file"]}
    assert sorted(manifest.skipped[REASON_CROSS_SPLIT_CONTENT]) == [
        "a_copy.png (validation) = a.png (test)", "a_link.png (train) = a.png (test)"]
    # without test, validation keeps the image and train loses it
    manifest = Manifest("x", "y")
    out = drop_cross_split_content_duplicates({"train": splits["train"], "validation": splits["validation"]},
                                              manifest, lambda r: r["image_path"], lambda r: r["image_id"])
    assert [r["image_id"] for r in out["validation"]] == ["a_copy.png"]
    assert manifest.skipped[REASON_CROSS_SPLIT_CONTENT] == ["a_link.png (train) = a_copy.png (validation)"]


def test_hard_linked_and_copied_test_image_in_train_counted_once(tmp_path):
    """COVIDx: two train-list names that are the test images t1 (hard link) and t2 (byte copy); the
    name and link checks cannot see them, the content check keeps them in test only."""
    root = tmp_path / "covidx"
    make_covidx(str(root))
    os.link(root / "test" / "t1.png", root / "train" / "linked.png")
    shutil.copyfile(root / "test" / "t2.png", root / "train" / "copied.png")
    with open(root / "train_COVIDx9A.txt", "a") as f:
        f.write("PAT950 linked.png normal sirm\nPAT951 copied.png pneumonia sirm\n")
    cache = str(tmp_path / "cache")
    ds = covidx.load(str(root), cache_dir=cache, verbose=False)
    ids = [i for s in ds for i in ds[s]["image_id"]]
    assert len(ds["train"]) + len(ds["validation"]) == 24 and len(ds["test"]) == 5
    assert not {"train/linked.png", "train/copied.png"} & set(ids)
    manifest = read_manifest(manifest_dir(cache, "covidx", "classification"))
    assert manifest["skipped_counts"][REASON_CROSS_SPLIT_CONTENT] == 2
    # "<id> (<split>) = <kept id> (test)"; the split is train or validation (patients are held out at random)
    entries = sorted(re.sub(r" \((train|validation)\) = ", " = ", e)
                     for e in manifest["skipped"][REASON_CROSS_SPLIT_CONTENT])
    assert entries == ["train/copied.png = test/t2.png (test)", "train/linked.png = test/t1.png (test)"]


# ------------------------------------------------------------------------------------------------
# Prepared caches verified on reuse
# ------------------------------------------------------------------------------------------------

SYNTH = dict(task="pretraining", num_images=10, image_size=32, verbose=False)


def _rows(dd):
    # plain lists: datasets' columns are lazy views of the memory-mapped file the tests then damage
    return {s: (list(dd[s]["study_id"]), list(dd[s]["report"]), [np.asarray(im).tobytes() for im in dd[s]["image"]])
            for s in dd}


def _train_arrow(cache):
    found = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs if f.endswith("-train.arrow")]
    assert len(found) == 1
    return found[0]


def _flip_one_byte(path, keep_mtime=False):
    st = os.stat(path)
    data = bytearray(open(path, "rb").read())
    i = data.find(b"Technique") if b"Technique" in data else len(data) // 2
    data[i] ^= 0x01
    with open(path, "r+b") as f:
        f.write(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete", "flip"])
def test_damaged_prepared_cache_is_named_and_rebuilt(tmp_path, capsys, damage):
    cache = str(tmp_path / "cache")
    good = _rows(synthetic_cxr.load(cache_dir=cache, **SYNTH))
    arrow = _train_arrow(cache)
    assert os.path.isfile(os.path.join(os.path.dirname(arrow), CACHE_DIGEST_FILE))
    if damage == "truncate":
        os.truncate(arrow, os.path.getsize(arrow) // 2)
    elif damage == "empty":
        open(arrow, "w").close()
    elif damage == "delete":
        os.remove(arrow)
    else:
        _flip_one_byte(arrow)
    capsys.readouterr()
    again = _rows(synthetic_cxr.load(cache_dir=cache, **SYNTH))
    out = capsys.readouterr().out
    assert f"the cached preparation in {os.path.dirname(arrow)} is damaged (synthetic_cxr-train.arrow" in out
    assert "preparing it again" in out and "--force_prepare" in out
    assert again == good                                   # rebuilt identically, not loaded damaged
    synthetic_cxr.load(cache_dir=cache, **SYNTH)           # and the rebuilt cache is trusted again
    assert "using the cached preparation" in capsys.readouterr().out


def test_flip_that_kept_the_file_time_is_found_by_the_full_check(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    good = _rows(synthetic_cxr.load(cache_dir=cache, **SYNTH))
    _flip_one_byte(_train_arrow(cache), keep_mtime=True)
    capsys.readouterr()
    again = _rows(synthetic_cxr.load(cache_dir=cache, verify="full", **SYNTH))
    assert "content changed since it was prepared" in capsys.readouterr().out
    assert again == good


def test_touched_cache_is_reread_once_and_kept(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    synthetic_cxr.load(cache_dir=cache, **SYNTH)
    arrow = _train_arrow(cache)
    os.utime(arrow, ns=(1, 1))                             # e.g. copied without its times: same bytes
    capsys.readouterr()
    synthetic_cxr.load(cache_dir=cache, **SYNTH)
    out = capsys.readouterr().out
    assert "damaged" not in out and "using the cached preparation" in out


# ------------------------------------------------------------------------------------------------
# DICOM: a missing decoder is named; a preparation that lost everything is refused, not cached
# ------------------------------------------------------------------------------------------------

JPEG_EXTENDED_12BIT = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "JPGExtended.dcm")


@pytest.fixture
def without_pylibjpeg(monkeypatch):
    """pydicom's decoders as on an install without the [dicom] extra (a no-op where it is missing)."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import JPEGExtended12Bit, JPEGLosslessSV1

    for uid in (JPEGExtended12Bit, JPEGLosslessSV1):
        decoder = get_decoder(uid)
        available = {k: v for k, v in decoder._available.items() if k != "pylibjpeg"}
        monkeypatch.setattr(decoder, "_available", available)
        monkeypatch.setitem(decoder._unavailable, "pylibjpeg", ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1"))


def _jpeg_extended_copy(path, patient_id):
    """pydicom's 12-bit JPEG Extended test file (a real compressed MR slice) under another patient id,
    so every copy has its own bytes."""
    ds = pydicom.dcmread(JPEG_EXTENDED_12BIT)
    ds.PatientID = patient_id
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def lossless_jpeg(pixels: np.ndarray, precision: int) -> bytes:
    """A lossless JPEG (ITU T.81 Annex H, Process 14) of one grayscale component: first-order prediction
    (selection value 1), no point transform, one Huffman table of 5-bit codes for the 17 difference
    categories. Written here because no installed package encodes this syntax."""
    x = pixels.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:], pred[1:, 0], pred[1:, 1:] = x[0, :-1], x[:-1, 0], x[1:, :-1]
    out, acc, n = bytearray(), 0, 0

    def put(value, length):
        nonlocal acc, n
        for i in range(length - 1, -1, -1):
            acc, n = (acc << 1) | ((value >> i) & 1), n + 1
            if n == 8:
                out.extend((acc, 0) if acc == 0xFF else (acc,))  # 0xFF is stuffed with 0x00
                acc, n = 0, 0

    for d in (x - pred).ravel().tolist():
        category = abs(d).bit_length()
        put(category, 5)
        if category:
            put(d if d > 0 else d + (1 << category) - 1, category)
    if n:
        put((1 << (8 - n)) - 1, 8 - n)                          # pad with 1-bits

    def segment(marker, body):
        return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body

    sof = struct.pack(">BHHB", precision, *pixels.shape, 1) + bytes([1, 0x11, 0])
    dht = bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])                           # Ss = predictor 1, Se = 0, Ah/Al = 0
    return b"\xff\xd8" + segment(0xC3, sof) + segment(0xC4, dht) + segment(0xDA, sos) + bytes(out) + b"\xff\xd9"


def _jpeg_lossless_dicom(path, pixels, bits_stored=12):
    """A MONOCHROME2 DICOM with JPEG Lossless, Non-Hierarchical, First-Order Prediction (1.2.840.10008.1.2.4.70)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    write_dicom(path, pixels, "MONOCHROME2", bits_stored)
    ds = pydicom.dcmread(str(path))
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([lossless_jpeg(pixels, bits_stored)])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def _ramp12(h=37, w=53):
    return (np.arange(h * w, dtype=np.int64).reshape(h, w) * 37 % 4096).astype(np.uint16)


@pytest.mark.parametrize("syntax", ["jpeg_extended_12bit", "jpeg_lossless_sv1"])
def test_missing_decoder_is_named_with_the_extra(tmp_path, without_pylibjpeg, syntax):
    if syntax == "jpeg_extended_12bit":
        path, name, uid = _jpeg_extended_copy(tmp_path / "x.dcm", "p1"), "JPEG Extended", "1.2.840.10008.1.2.4.51"
    else:
        path, name, uid = _jpeg_lossless_dicom(tmp_path / "x.dcm", _ramp12()), "JPEG Lossless", "1.2.840.10008.1.2.4.70"
    with pytest.raises(DicomReadError) as err:
        read_dicom(path)
    message = str(err.value)
    assert name in message and uid in message
    assert 'pip install "cm-cgns[dicom]"' in message and "pylibjpeg-libjpeg" in message


def test_jpeg_lossless_process_14_decodes_exactly_with_the_dicom_extra(tmp_path):
    """The usual lossless syntax of hospital archives: 12 bits back bit for bit (then the 8-bit scaling)."""
    px = _ramp12()
    d = read_dicom(_jpeg_lossless_dicom(tmp_path / "ll.dcm", px))
    assert d.bits_stored == 12 and d.pixels.shape == px.shape
    lo, hi = float(px.min()), float(px.max())
    np.testing.assert_array_equal(d.pixels, np.rint((px - lo) * (255.0 / (hi - lo))).astype(np.uint8))
    np.testing.assert_array_equal(pydicom.dcmread(tmp_path / "ll.dcm").pixel_array, px)


def test_12_bit_jpeg_extended_decodes_with_the_dicom_extra(tmp_path):
    d = read_dicom(_jpeg_extended_copy(tmp_path / "x.dcm", "p1"))
    raw = pydicom.dcmread(JPEG_EXTENDED_12BIT).pixel_array
    assert d.bits_stored == 12 and d.pixels.shape == raw.shape
    lo, hi = float(raw.min()), float(raw.max())
    np.testing.assert_array_equal(d.pixels, np.rint((raw - lo) * (255.0 / (hi - lo))).astype(np.uint8))


def _rsna_of_compressed_dicoms(root, n=12):
    img = root / "stage_2_train_images"
    img.mkdir(parents=True)
    (root / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\n" + "".join(f"p{i:02d},,,,,0\n" for i in range(n)))
    for i in range(n):
        _jpeg_extended_copy(img / f"p{i:02d}.dcm", f"p{i:02d}")
    return str(root)


def test_split_whose_dicoms_all_fail_names_the_decoder_and_is_not_cached(tmp_path, without_pylibjpeg):
    data_dir = _rsna_of_compressed_dicoms(tmp_path / "rsna")
    cache = str(tmp_path / "cache")
    with pytest.raises(DatasetFormatError) as err:
        rsna.load(data_dir, task="classification", cache_dir=cache, verbose=False)
    message = str(err.value)
    assert "rsna/classification: split 'train' has none of its" in message
    assert 'pip install "cm-cgns[dicom]"' in message and "Nothing was cached" in message
    assert "corresponds to no data" not in message
    assert not [f for _, _, fs in os.walk(cache) for f in fs if f in ("dataset_info.json", CACHE_DIGEST_FILE)]


def test_preparation_losing_a_large_share_is_refused(tmp_path, without_pylibjpeg):
    """Three train patients need the missing decoder, the others are uncompressed: more than 20 % of
    train lost is refused; accepted, with the three counted, when the limit is raised to 100 %."""
    data_dir = _rsna_of_compressed_dicoms(tmp_path / "rsna")
    ids = [f"p{i:02d}" for i in range(12)]
    train = rsna.split_patients(ids, "classification")["train"]
    rng = np.random.default_rng(0)
    for pid in ids:
        if pid not in train[:3]:
            write_dicom(os.path.join(data_dir, "stage_2_train_images", f"{pid}.dcm"),
                        rng.integers(0, 256, (16, 16), dtype=np.uint8), patient_id=pid)
    cache = str(tmp_path / "cache")
    share = round(100 * 3 / len(train))
    with pytest.raises(DatasetFormatError, match=rf"3 of the {len(train)} images of split 'train' could not be "
                                                 rf"decoded \({share} %, more than the 20 %"):
        rsna.load(data_dir, task="classification", cache_dir=cache, verbose=False)
    ds = rsna.load(data_dir, task="classification", cache_dir=cache, verbose=False, max_failed_share=1.0)
    assert sum(len(ds[s]) for s in ds) == 9
    manifest = read_manifest(manifest_dir(cache, "rsna", "classification"))
    assert manifest["skipped_counts"]["unreadable_dicom"] == 3
