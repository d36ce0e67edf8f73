"""Build small DICOM files with pydicom for the tests."""
import numpy as np


def write(path, stored, photometric="MONOCHROME2", window=None, rescale=None, deflated=False, ids=None):
    """stored: (H, W) uint8 or uint16 stored values; window (centre, width); rescale (slope, intercept);
    deflated: the whole data set zlib-compressed (Deflated Explicit VR Little Endian);
    ids: {DICOM keyword: value}, such as PatientID."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage,
                             generate_uid)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
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
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    for keyword, value in (ids or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def variants(pixels, folder):
    """The same 8-bit grayscale pixels as DICOM files of every kind the tests cover."""
    p8 = pixels.astype(np.uint8)
    p16 = pixels.astype(np.uint16)
    return {
        "mono2_8bit": write(folder / "mono2_8bit.dcm", p8, window=(128, 256)),
        "mono1_8bit": write(folder / "mono1_8bit.dcm", 255 - p8, "MONOCHROME1", window=(128, 256)),
        "mono2_16bit": write(folder / "mono2_16bit.dcm", p16 * 257, window=(32768, 65536)),
        "mono1_16bit": write(folder / "mono1_16bit.dcm", (255 - p16) * 257, "MONOCHROME1",
                             window=(32768, 65536)),
        "rescaled_16bit": write(folder / "rescaled_16bit.dcm", p16 * 4 + 100, window=(128, 256),
                                rescale=(0.25, -25)),
    }
