"""DICOM decoding: modality rescale, window, MONOCHROME1, 8 and 16 bits."""
import sys

import numpy as np
import pytest
from PIL import Image

from dsconv import dicom, images
from tests import dicomfiles
from tests.conftest import CHEST


@pytest.fixture(scope="module")
def xray():
    path = sorted((CHEST / "PNEUMONIA").glob("*.jpeg"))[0]
    return np.asarray(Image.open(path).convert("L"))

@pytest.mark.shared
def test_every_kind_gives_the_same_pixels(xray, tmp_path):
    for name, path in dicomfiles.variants(xray, tmp_path).items():
        got = np.asarray(dicom.read(path))
        assert got.shape == xray.shape, name
        assert np.array_equal(got, xray), f"{name}: {np.abs(got.astype(int) - xray).max()} grey levels off"

def test_without_window_uses_the_image_range(tmp_path):
    stored = np.array([[1000, 2000], [3000, 4000]], np.uint16)
    got = np.asarray(dicom.read(dicomfiles.write(tmp_path / "a.dcm", stored)))
    assert got.tolist() == [[0, 85], [170, 255]]

def test_window_clips(tmp_path):
    stored = np.array([[0, 100, 200, 255]], np.uint8)
    got = np.asarray(dicom.read(dicomfiles.write(tmp_path / "w.dcm", stored, window=(150.5, 101))))
    # values at or below c - 0.5 - (w-1)/2 = 100 are black, above c - 0.5 + (w-1)/2 = 200 white
    assert got.tolist() == [[0, 0, 255, 255]]

@pytest.mark.shared
def test_dicom_without_its_suffix_is_recognised(xray, tmp_path):
    path = dicomfiles.write(tmp_path / "IM0001", xray, window=(128, 256))
    assert np.array_equal(images.decode(path, 64), images.decode(dicomfiles.write(tmp_path / "a.dcm", xray,
                                                                                   window=(128, 256)), 64))


def test_missing_pydicom_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r'pip install "dsconv\[dicom\]"'):
        dicom.read(tmp_path / "x.dcm")
