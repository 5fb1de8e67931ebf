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



def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored=None,
                rescale=None, jpeg_baseline: bool = False, patient_id: str = "anon") -> str:
    """Write a minimal single-frame grayscale DICOM (for synthetic data and tests).

    ``pixels``: 2-D uint8/uint16/int16 array. ``bits_stored`` defaults to the dtype's width.
    ``rescale``: optional ``(RescaleSlope, RescaleIntercept)``. ``jpeg_baseline=True`` stores uint8
    pixels JPEG-compressed (transfer syntax 1.2.840.10008.1.2.4.50), as RSNA and SIIM ship them.
    """
    import io

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16, np.int16):
        raise ValueError(f"pixels must be a 2-D uint8/uint16/int16 array, got {pixels.dtype} {pixels.shape}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg_baseline else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.Modality = "CR"
    ds.Rows, ds.Columns = (int(v) for v in pixels.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = int(bits_stored or bits)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = (str(v) for v in rescale)
    if jpeg_baseline:
        from PIL import Image

        if pixels.dtype != np.uint8:
            raise ValueError("JPEG baseline needs uint8 pixels")
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


__all__ = ["DicomImage", "DicomReadError", "SCALINGS", "read_dicom", "to_uint8", "write_dicom"]
