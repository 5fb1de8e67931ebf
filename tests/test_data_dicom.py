"""data_scripts.dicom: 8-bit conversion of DICOMs (bit depths, rescale, MONOCHROME1, bad files)."""
import numpy as np
import pytest

from data_scripts.dicom import DicomReadError, read_dicom, to_uint8
from fixtures import write_dicom


def _ramp(h, w, hi, dtype):
    """Row-major ramp from 0 to ``hi`` (inclusive) over an h x w image."""
    return np.round(np.linspace(0, hi, h * w)).astype(dtype).reshape(h, w)


def test_8bit_monochrome2_ramp_is_unchanged_and_size_is_real(tmp_path):
    px = _ramp(48, 64, 255, np.uint8)  # rows 48, columns 64
    d = read_dicom(write_dicom(tmp_path / "a.dcm", px, "MONOCHROME2", 8))
    assert (d.width, d.height) == (64, 48)
    assert d.pixels.dtype == np.uint8 and d.pixels.shape == (48, 64)
    np.testing.assert_array_equal(d.pixels, px)
    assert d.photometric == "MONOCHROME2" and d.bits_stored == 8


def test_monochrome1_ramp_comes_out_inverted(tmp_path):
    px = _ramp(32, 32, 255, np.uint8)
    d = read_dicom(write_dicom(tmp_path / "m1.dcm", px, "MONOCHROME1", 8))
    np.testing.assert_array_equal(d.pixels, 255 - px)
    assert d.pixels[0, 0] == 255 and d.pixels[-1, -1] == 0


@pytest.mark.parametrize("bits,hi", [(12, 4095), (16, 65535)])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_12_and_16_bit_scaled_by_pixel_range(tmp_path, bits, hi, photometric):
    px = _ramp(24, 40, hi, np.uint16)
    d = read_dicom(write_dicom(tmp_path / "x.dcm", px, photometric, bits))
    expected = np.rint(px.astype(np.float64) * 255.0 / hi).astype(np.uint8)
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    np.testing.assert_array_equal(d.pixels, expected)
    assert d.bits_stored == bits


def test_partial_range_uses_min_and_max(tmp_path):
    px = np.array([[1000, 1500], [2000, 3000]], dtype=np.uint16)
    d = read_dicom(write_dicom(tmp_path / "r.dcm", px, "MONOCHROME2", 12))
    np.testing.assert_array_equal(d.pixels, [[0, 64], [128, 255]])  # (x-1000)/2000*255, rounded
    d = read_dicom(tmp_path / "r.dcm", scaling="max")
    np.testing.assert_array_equal(d.pixels, np.rint(px / 3000.0 * 255).astype(np.uint8))


def test_rescale_slope_intercept_signed(tmp_path):
    px = np.array([[-8, 0], [4, 8]], dtype=np.int16)
    # slope -1 reverses the order: modality values 8, 0, -4, -8
    d = read_dicom(write_dicom(tmp_path / "s.dcm", px, "MONOCHROME2", 16, rescale=(-1, 0)))
    np.testing.assert_array_equal(d.pixels, [[255, 128], [64, 0]])


def test_constant_image_is_zero(tmp_path):
    d = read_dicom(write_dicom(tmp_path / "c.dcm", np.full((8, 8), 77, np.uint8)))
    assert d.pixels.max() == 0


def test_jpeg_baseline_like_rsna_and_siim(tmp_path):
    px = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    d = read_dicom(write_dicom(tmp_path / "j.dcm", px, jpeg_baseline=True))
    assert d.pixels.shape == (32, 32)
    assert np.abs(d.pixels.astype(int) - px.astype(int)).max() <= 8


def test_bad_files_raise_dicom_read_error(tmp_path):
    good = write_dicom(tmp_path / "g.dcm", _ramp(32, 32, 4095, np.uint16), bits_stored=12)
    data = open(good, "rb").read()
    (tmp_path / "trunc.dcm").write_bytes(data[:-700])
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom at all" * 10)
    (tmp_path / "head.dcm").write_bytes(data[:200])
    for name in ("trunc.dcm", "junk.dcm", "head.dcm", "missing.dcm"):
        with pytest.raises(DicomReadError):
            read_dicom(tmp_path / name)


def test_to_uint8_rejects_unknown_scaling():
    with pytest.raises(ValueError):
        to_uint8(np.zeros(3), "gamma")
