"""Wrap a model-ready image as a DICOM Secondary Capture instance, and unwrap it again.

This is how the study "acquires" test images: each becomes an 8-bit MONOCHROME2 or RGB
instance with deterministic UIDs (derived from a seed and the pixel content), ready to sign.
"""

from __future__ import annotations

import datetime as dt
import hashlib

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from medsec.errors import MedsecError

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_FIXED_TIME = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def _to_uint8(image: np.ndarray) -> tuple[np.ndarray, str]:
    """(H,W) or (C,H,W) floats in [0,1] -> uint8 (H,W) or (H,W,3) and the photometric name."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] == 3:
        arr = np.moveaxis(arr, 0, -1)
        photometric = "RGB"
    elif arr.ndim == 2:
        photometric = "MONOCHROME2"
    else:
        raise MedsecError(f"image must be (H,W), (1,H,W) or (3,H,W); got shape {arr.shape}")
    if arr.size == 0:
        raise MedsecError("image is empty")
    if not np.issubdtype(arr.dtype, np.floating):
        raise MedsecError(f"image must be floating point in [0,1]; got {arr.dtype}")
    if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
        raise MedsecError("image values must be finite and within [0,1]")
    return np.ascontiguousarray(np.rint(arr * 255.0).astype(np.uint8)), photometric


def image_to_dicom(
    image: np.ndarray,
    seed: int = 0,
    modality: str = "OT",
    uid_prefix: str | None = None,
    when: dt.datetime = _FIXED_TIME,
    patient_id: str = "MEDSEC-ANON",
) -> Dataset:
    """An 8-bit Secondary Capture dataset (with file meta) holding ``image``.

    Study and series UIDs depend on ``seed`` only; the instance UID also on the pixel bytes,
    so the same image and seed always give the same instance. ``uid_prefix`` defaults to
    pydicom's prefix. Quantisation to 8 bits is the caller's concern: a model should consume
    :func:`dicom_to_image` of the signed instance, not the float original.
    """
    pixels, photometric = _to_uint8(image)
    content = hashlib.sha256(pixels.tobytes()).hexdigest()
    prefix = uid_prefix or "1.2.826.0.1.3680043.8.498."

    def uid(*parts: str) -> str:
        return generate_uid(prefix=prefix, entropy_srcs=[str(seed), *parts])

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = uid("instance", content)
    ds.InstanceCreationDate = ds.StudyDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.StudyTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.Modality = modality
    ds.ConversionType = "WSD"
    ds.Manufacturer = "medsec"
    ds.PatientName = "Anonymous"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.set_original_encoding(False, True)
    return ds


def dicom_to_image(ds: Dataset) -> np.ndarray:
    """Float32 image in [0,1]: (H,W) for MONOCHROME2, (3,H,W) for RGB; inverse of the above."""
    if int(ds.get("BitsAllocated", 0)) != 8 or int(ds.get("PixelRepresentation", 1)) != 0:
        raise MedsecError("only unsigned 8-bit instances are supported here")
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1))
    data = np.frombuffer(ds.PixelData, dtype=np.uint8)
    if data.size < rows * cols * samples:
        raise MedsecError("pixel data shorter than Rows x Columns x Samples")
    data = data[: rows * cols * samples]
    photometric = str(ds.PhotometricInterpretation)
    if samples == 1 and photometric == "MONOCHROME2":
        return data.reshape(rows, cols).astype(np.float32) / 255.0
    if samples == 3 and photometric == "RGB":
        if int(ds.get("PlanarConfiguration", 0)) == 0:
            arr = data.reshape(rows, cols, 3).transpose(2, 0, 1)
        else:
            arr = data.reshape(3, rows, cols)
        return np.ascontiguousarray(arr).astype(np.float32) / 255.0
    raise MedsecError(f"unsupported photometric interpretation {photometric!r}/{samples}")
