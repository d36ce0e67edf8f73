"""Build small DICOM files with pydicom for the tests."""
import numpy as np


def write(path, stored, photometric="MONOCHROME2", window=None, rescale=None, deflated=False, ids=None):
    """stored: (H, W) uint8 or uint16 stored values; window (centre, width); rescale (slope, intercept);
    deflated: the whole data set zlib-compressed (Deflated Explicit VR Little Endian);
    ids: {DICOM keyword: value}, such as PatientID."""
    from dsconv import dicom
    path.write_bytes(dicom.write_bytes(stored, photometric, window, rescale, deflated, ids))
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
