"""Shared DICOM reader for the RSNA and SIIM builders: a DICOM file -> an 8-bit grayscale image.

Steps (``read_dicom``):

1. ``pydicom.dcmread`` (no ``force``: a file without the DICOM preamble is rejected) and decode the
   pixel data. Uncompressed, RLE, JPEG baseline (the RSNA and SIIM files) and most JPEG 2000 decode
   with the base install (numpy and Pillow). JPEG Lossless (Process 14, the usual lossless syntax of
   hospital archives), 12-bit JPEG Extended, JPEG-LS and High-Throughput JPEG 2000 need the
   pylibjpeg decoders: ``pip install "cm-cgns[dicom]"`` (``DICOM_EXTRA``). A file whose transfer
   syntax has no decoder installed fails with a message that names the extra;
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
#: The install extra with the DICOM decoders (setup.cfg): pylibjpeg with its libjpeg and openjpeg plugins.
DICOM_EXTRA = "cm-cgns[dicom]"
DECODER_PACKAGES = ("pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg")


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


def decoder_hint(ds) -> str:
    """Why a compressed DICOM may not decode here, as a clause for an error message (``""`` when the
    installed decoders are not the problem).

    Names the transfer syntax and ``DICOM_EXTRA`` when pydicom's pylibjpeg plugin for it is
    missing (Pillow alone cannot do JPEG Lossless, 12-bit JPEG Extended or JPEG-LS), or says that
    no decoder exists for it at all.
    """
    from pydicom.pixels.decoders.base import get_decoder

    meta = getattr(ds, "file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if uid is None or not uid.is_compressed:
        return ""
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f" (no decoder exists for its transfer syntax, {uid.name}, {uid})"
    if any(m.startswith("pylibjpeg ") for m in decoder.missing_dependencies):
        return (f" ({uid.name}, {uid}: its decoder is not installed; pip install \"{DICOM_EXTRA}\" adds "
                f"{', '.join(DECODER_PACKAGES)})")
    return ""


def decoder_versions() -> dict:
    """Installed versions of pydicom and of the optional decoder packages (``None`` when absent):
    what a DICOM preparation's result depends on besides the files."""
    from importlib import metadata

    versions = {}
    for name in ("pydicom", "pillow") + DECODER_PACKAGES + ("pyjpegls", "python-gdcm"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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
        hint = decoder_hint(ds)
        detail = " ".join(str(e).split())
        raise DicomReadError(f"pixel data cannot be decoded{hint}: {type(e).__name__}: {detail}") from None
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


__all__ = ["DicomImage", "DicomReadError", "SCALINGS", "DICOM_EXTRA", "DECODER_PACKAGES", "decoder_hint",
           "decoder_versions", "read_dicom", "to_uint8"]
