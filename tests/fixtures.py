"""Builders of test inputs shared by several test files (not part of the installed packages)."""
import numpy as np


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored=None,
                rescale=None, jpeg_baseline: bool = False, patient_id: str = "anon") -> str:
    """Write a minimal single-frame grayscale DICOM (the miniature RSNA / SIIM layouts of the tests).

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


__all__ = ["write_dicom"]
