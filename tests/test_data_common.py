"""data_scripts.builder: the input-keyed Arrow cache, ``force_prepare``, listed-path containment and
the text-decoding fallback shared by every builder (issue 13)."""
import json
import os

import pytest

from data_scripts import covidx
from data_scripts.builder import (
    REASON_ABSOLUTE_PATH,
    REASON_OUTSIDE_DATA_DIR,
    decode_text,
    input_fingerprint,
    resolve_listed_path,
)
from test_data_covidx import _png, make_covidx

CACHED = "using the cached preparation"


def _manifest(cache):
    with open(os.path.join(cache, "covidx", "classification", "manifest.json")) as f:
        return json.load(f)


def _ids(ds):
    return {i for s in ds for i in ds[s]["image_id"]}


def test_cache_follows_repaired_and_added_images(tmp_path, capsys):
    root, cache = str(tmp_path / "COVIDx"), str(tmp_path / "cache")
    make_covidx(root)
    first = covidx.load(root, cache_dir=cache, verbose=False)
    first_fingerprint = _manifest(cache).get("inputs_fingerprint")
    assert "train/missing.png" not in _ids(first) and "train/garbage.png" not in _ids(first)
    # the user adds the missing image and repairs the unreadable one: same options, new inputs
    _png(os.path.join(root, "train", "missing.png"), value=3)
    _png(os.path.join(root, "train", "garbage.png"), value=4)
    repaired = covidx.load(root, cache_dir=cache, verbose=False)
    assert {"train/missing.png", "train/garbage.png"} <= _ids(repaired)
    m = _manifest(cache)
    assert "unreadable image" not in m["skipped_counts"]
    assert m["skipped"]["missing image file"] == ["test/gone.png"]
    assert first_fingerprint and m["inputs_fingerprint"] not in (None, first_fingerprint)
    assert CACHED not in capsys.readouterr().out
    again = covidx.load(root, cache_dir=cache, verbose=False)  # nothing changed: reused, and said so
    assert CACHED in capsys.readouterr().out and _ids(again) == _ids(repaired)


def test_force_prepare_rebuilds_and_cli_flag(tmp_path, capsys):
    root, cache = str(tmp_path / "COVIDx"), str(tmp_path / "cache")
    make_covidx(root)
    covidx.load(root, cache_dir=cache, verbose=False)
    capsys.readouterr()
    covidx.load(root, cache_dir=cache, force_prepare=True)
    out = capsys.readouterr().out
    assert CACHED not in out and "covidx/classification:" in out  # prepared again: summary printed
    assert covidx.main(["--data_dir", root, "--output_dir", cache]) == 0
    assert CACHED in capsys.readouterr().out
    assert covidx.main(["--data_dir", root, "--output_dir", cache, "--force_prepare"]) == 0
    assert CACHED not in capsys.readouterr().out


def test_cache_inside_data_folder_is_not_an_input(tmp_path, capsys):
    root = str(tmp_path / "COVIDx")
    make_covidx(root)
    cache = os.path.join(root, "prepared")
    covidx.load(root, cache_dir=cache, verbose=False)
    covidx.load(root, cache_dir=cache, verbose=False)
    assert CACHED in capsys.readouterr().out


def test_unknown_option_is_an_error(tmp_path):
    root = str(tmp_path / "COVIDx")
    make_covidx(root)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['val_fraktion'\].*val_fraction"):
        covidx.load(root, cache_dir=str(tmp_path / "c"), val_fraktion=0.3)


def test_input_fingerprint_names_sizes_mtimes(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("x")
    (d / "sub" / "b.png").write_bytes(b"12")
    fp = input_fingerprint([str(d)])
    assert fp == input_fingerprint([str(d)])
    (d / "sub" / "b.png").read_bytes()  # reading changes nothing
    assert input_fingerprint([str(d)]) == fp
    st = os.stat(d / "a.txt")
    os.utime(d / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fp_mtime = input_fingerprint([str(d)])
    (d / "sub" / "b.png").write_bytes(b"123")
    fp_size = input_fingerprint([str(d)])
    (d / "sub" / "b.png").rename(d / "sub" / "c.png")
    fp_name = input_fingerprint([str(d)])
    assert len({fp, fp_mtime, fp_size, fp_name}) == 4
    (d / "cache").mkdir()
    (d / "cache" / "x.arrow").write_bytes(b"0" * 10)
    assert input_fingerprint([str(d)], exclude=[str(d / "cache")]) == fp_name


def test_resolve_listed_path(tmp_path):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "train" / "a.png").write_bytes(b"x")
    r = str(root)

    def resolve(entry, *bases):
        return resolve_listed_path(r, entry, [os.path.join(b, entry) for b in bases])

    assert resolve("a.png", str(root / "train")) == (str(root / "train" / "a.png"), None)
    assert resolve("b.png", r, str(root / "train")) == (str(root / "b.png"), None)  # none exists: first
    assert resolve("../train/a.png", str(root / "train")) == (str(root / "train" / "a.png"), None)
    assert resolve("../../elsewhere/scan.png", str(root / "train")) == (None, REASON_OUTSIDE_DATA_DIR)
    assert resolve("../data2/x.png", r) == (None, REASON_OUTSIDE_DATA_DIR)  # a sibling sharing the prefix
    for entry in ("/etc/passwd", "~/scan.png", "C:\\scans\\a.png", "\\\\server\\share\\a.png"):
        assert resolve(entry, r) == (None, REASON_ABSOLUTE_PATH), entry


def test_decode_text_fallbacks():
    assert decode_text("Café".encode("utf-8")) == ("Café", None)
    assert decode_text(b"\xef\xbb\xbfok") == ("ok", None)  # UTF-8 BOM dropped
    assert decode_text("Café – ok".encode("cp1252")) == ("Café – ok", "cp1252")
    assert decode_text(b"caf\xe9 \x81") == ("café \x81", "latin-1")  # 0x81 is undefined in cp1252


__all__ = []
