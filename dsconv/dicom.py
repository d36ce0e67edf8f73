"""DICOM X-rays as 8-bit images, with pydicom (optional extra `dicom`).

The steps a viewer takes: stored values -> modality rescale (slope,
intercept) -> VOI LUT or window (centre, width) when the file has one, else
the image's own range -> 8 bits -> MONOCHROME1 inverted (there, bright means
low values). The result is a Pillow image, so the usual preprocessing follows.
"""
import zlib

import numpy as np
from PIL import Image

INSTALL = 'pip install "dsconv[dicom]"'
DEFLATED = b"1.2.840.10008.1.2.1.99"  # the transfer syntax UID of deflated DICOM


def available():
    """Whether pydicom (the optional extra) is installed."""
    import importlib.util
    return importlib.util.find_spec("pydicom") is not None


def read(path):
    """A DICOM file as a Pillow image, mode L (grayscale) or RGB."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ImportError(f"reading DICOM needs pydicom; {INSTALL}") from None
    _check_deflated(path)
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("the DICOM file has no pixel data")
    _check_size(ds)
    pixels = ds.pixel_array
    if pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # a multi-frame file: its first frame
    photometric = ds.get("PhotometricInterpretation", "MONOCHROME2")
    if ds.get("SamplesPerPixel", 1) == 3:
        if pixels.dtype != np.uint8:
            pixels = _to_8bit(pixels.astype(np.float64), pixels.min(), pixels.max())
        return Image.fromarray(pixels, "RGB")
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, prefer_lut=True)
        lo, hi = 0, 2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        values, lo, hi = _window(values, ds), 0.0, 1.0
    else:
        lo, hi = values.min(), values.max()
    gray = _to_8bit(values, lo, hi)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray, "L")


def _check_size(ds):
    """Refuse, from the header and before decoding, more pixels than Pillow accepts of any other format.

    Pillow refuses images over twice Image.MAX_IMAGE_PIXELS (a decompression
    bomb: 381 KB of deflated DICOM can hold 14000 x 14000 pixels, 7 GB once
    decoded); every frame is decoded, so frames count.
    """
    if Image.MAX_IMAGE_PIXELS is None:
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    n = int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * frames * int(ds.get("SamplesPerPixel", 1))
    if n > 2 * Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(
            f"{ds.get('Rows')} x {ds.get('Columns')} pixels x {frames} frame(s) is over the limit of "
            f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels; raise it with --max-pixels if the file is genuine")


def _check_deflated(source):
    """Refuse a deflated DICOM file that inflates beyond what the pixel limit allows.

    pydicom inflates such a file whole before any header can be read; inflated
    here first, in a bounded amount, the bomb costs that bound at most.
    """
    if Image.MAX_IMAGE_PIXELS is None:
        return
    if hasattr(source, "read"):
        data = source.getvalue()
    else:
        with open(source, "rb") as f:
            data = f.read()
    meta_end = 144 + int.from_bytes(data[140:144], "little")  # (0002,0000) group length, explicit VR
    if data[128:136] != b"DICM\x02\x00\x00\x00" or DEFLATED not in data[132:meta_end]:
        return
    limit = 2 * Image.MAX_IMAGE_PIXELS * 2 + (1 << 20)  # 16-bit pixels and a header
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflater.decompress(data[meta_end:], limit)
    if inflater.unconsumed_tail:
        raise Image.DecompressionBombError(f"the deflated DICOM data inflates to more than {limit:,} bytes, over the "
                                           "pixel limit; raise it with --max-pixels if the file is genuine")
IDENTIFIERS = {"patient_id": "PatientID", "study_date": "StudyDate", "accession_number": "AccessionNumber"}


def identifiers(source):
    """{patient_id, study_date, accession_number} of a DICOM file (path or file object); "" where absent.

    Only the header is read. Anything that is not a readable DICOM file (or
    no pydicom) gives empty strings: the identifiers help tell patients
    apart, they never stop a diagnosis.
    """
    try:
        import pydicom
        ds = pydicom.dcmread(source, stop_before_pixels=True)
    except Exception:  # not DICOM, damaged, or pydicom missing: no identifiers
        return dict.fromkeys(IDENTIFIERS, "")
    return {key: str(ds.get(tag, "") or "") for key, tag in IDENTIFIERS.items()}


def _first(value):
    try:
        return float(value[0])  # several windows: the first
    except TypeError:
        return float(value)


def _window(x, ds):
    """The window of DICOM PS3.3 C.11.2.1.2, mapped onto [0, 1]."""
    c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if function == "SIGMOID":
        return 1 / (1 + np.exp(-4 * (x - c) / w))
    if function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0, 1)
    return np.clip((x - (c - 0.5)) / max(w - 1, 1) + 0.5, 0, 1)


def _to_8bit(values, lo, hi):
    scaled = (values - lo) * (255.0 / max(float(hi) - float(lo), 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def write_bytes(stored, photometric="MONOCHROME2", window="full", rescale=None, deflated=False, tags=None):
    """A DICOM file's bytes holding grey stored values (H, W) uint8 or uint16.

    ``window``: (centre, width), "full" for the stored values' whole range, or
    None for none; ``rescale``: (slope, intercept); ``deflated``: the data set
    zlib-compressed (Deflated Explicit VR Little Endian); ``tags``: {DICOM
    keyword: value}, such as PatientID. The instance's UID comes from the
    pixels: the same image gives the same file (and so hits the bottleneck
    cache).
    """
    import hashlib
    import io

    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage,
                             generate_uid)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[hashlib.sha256(stored.tobytes()).hexdigest()])
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = FileDataset("image.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = stored.dtype.itemsize * 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter, ds.WindowWidth = (2 ** (bits - 1), 2 ** bits) if window == "full" else window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
