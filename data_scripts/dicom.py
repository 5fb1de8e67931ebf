"""Shared DICOM reader for the RSNA and SIIM builders: a DICOM file -> an 8-bit grayscale image.

Steps (``read_dicom``):

1. ``pydicom.dcmread`` (no ``force``: a file without the DICOM preamble is rejected) and decode the
   pixel data (uncompressed, RLE, and JPEG baseline through Pillow -- the RSNA and SIIM files
   are JPEG baseline);
2. the modality LUT: ``RescaleSlope`` / ``RescaleIntercept`` when present;
3. scaling to 8 bits, whatever ``BitsStored`` is (8, 12, 16, signed or not):

   * ``"minmax"`` (default): ``(x - min) / (max - min) * 255`` over the image's own pixel range;
   * ``"max"``: ``x / max * 255`` (the MGCA/CGNS reference ``cv2.convertScaleAbs(x, 255 / x.max())``,
     which assumes non-negative pixels);

   a constant image becomes all zeros;
4. ``MONOCHROME1`` (white = low values) is inverted, ``255 - x``, so every output has the
   ``MONOCHROME2`` convention (air dark, bone bright).

Every failure (not a DICOM, truncated file, missing or undecodable pixel data, colour or
multi-frame data) raises ``DicomReadError`` with the reason, so builders can count it and go on.
"""
from dataclasses import dataclass

import numpy as np

SCALINGS = ("minmax", "max")


class DicomReadError(ValueError):
    """A DICOM file could not be turned into an 8-bit grayscale image; ``str(e)`` says why."""


@dataclass
class DicomImage:
    """A decoded DICOM: 8-bit pixels (rows x columns) plus the header facts the builders need."""

    pixels: np.ndarray  # uint8, shape (height, width), MONOCHROME2 convention
    width: int  # Columns
    height: int  # Rows
    photometric: str  # PhotometricInterpretation as stored in the file
    bits_stored: int

    def to_pil(self):
        from PIL import Image

        return Image.fromarray(self.pixels, mode="L")


def to_uint8(values: np.ndarray, scaling: str = "minmax") -> np.ndarray:
    """Scale an array of any numeric dtype to uint8 by its pixel range (see the module doc)."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x.astype(np.uint8)
    hi = float(x.max())
    lo = float(x.min()) if scaling == "minmax" else 0.0
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    out = (x - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def read_dicom(path, scaling: str = "minmax") -> DicomImage:
    """Read ``path`` into a ``DicomImage`` (8-bit, MONOCHROME1 inverted); raises ``DicomReadError``."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as e:  # InvalidDicomError, EOFError, OSError, struct errors on truncation...
        raise DicomReadError(f"not a readable DICOM file: {type(e).__name__}: {e}") from None
    if "PixelData" not in ds:
        raise DicomReadError("the DICOM file has no PixelData")
    try:
        arr = ds.pixel_array
    except Exception as e:  # truncated pixel data, missing decoder, inconsistent header
        raise DicomReadError(f"pixel data cannot be decoded: {type(e).__name__}: {e}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomReadError(f"not a grayscale image (PhotometricInterpretation {photometric!r}, "
                             f"SamplesPerPixel {ds.get('SamplesPerPixel', 1)})")
    if arr.ndim != 2:
        raise DicomReadError(f"expected one 2-D frame, got pixel array of shape {arr.shape}")
    try:
        values = apply_modality_lut(arr, ds)
    except Exception as e:
        raise DicomReadError(f"modality LUT / rescale failed: {type(e).__name__}: {e}") from None
    pixels = to_uint8(values, scaling)
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
    height, width = pixels.shape
    return DicomImage(pixels=pixels, width=int(width), height=int(height), photometric=photometric,
                      bits_stored=int(ds.get("BitsStored", arr.dtype.itemsize * 8)))


__all__ = ["DicomImage", "DicomReadError", "SCALINGS", "read_dicom", "to_uint8"]
