"""Decode, convert, resize and scale images for the network.

As TensorFlow's retrain.py: RGB, resized straight to r x r with bilinear
interpolation (no crop, aspect ratio not kept), scaled to x / 127.5 - 1.

Anything Pillow reads works: JPEG, PNG, grayscale (copied to the three
channels), RGBA and palette images (alpha dropped), 16-bit grayscale (mapped
to 8 bits as x / 257, so the full 16-bit range becomes 0..255). Large JPEGs
are decoded at a reduced scale first (Pillow's ``draft``: the JPEG decoder's
own 1/2, 1/4, 1/8 DCT scaling, never below r x r), which makes a 2500-pixel
X-ray about ten times cheaper and changes the resized pixels by about one
grey level (tests/test_images.py measures it). DICOM files are read with
pydicom (dsconv.dicom) and then take the same path.
"""
import io

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError

from dsconv import DsconvError

# Recorded in bottleneck caches and model files: change it when the
# preprocessing changes, so that old bottlenecks are not reused.
PREPROCESSING = "pillow-rgb, jpeg-draft>=r, bilinear-resize-r-x-r (no crop), x/127.5-1"


def preprocessing(blur=0.0):
    """PREPROCESSING, with the Gaussian blur after the resize when there is one."""
    return PREPROCESSING if not blur else PREPROCESSING.replace(", x/", f", gaussian-blur-{blur:g}px, x/")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(DsconvError):
    """An image that cannot be decoded, naming the file."""


def _dicom_name(source):
    """A path named .dcm or .dicom: read as DICOM without asking Pillow."""
    return not isinstance(source, bytes) and str(source).lower().endswith((".dcm", ".dicom"))


def read_bytes(path):
    """The bytes of an image file; ImageError naming it if it cannot be read."""
    return _read(path, path)


def _read(source, name):
    """The bytes of an image file (path or bytes)."""
    if isinstance(source, bytes):
        return source
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageError(f"{name}: cannot be read as an image ({e})") from None


def _read_dicom(source, name):
    from dsconv import dicom
    try:
        return dicom.read(io.BytesIO(source) if isinstance(source, bytes) else source)
    except ImportError as e:
        raise ImageError(f"{name}: {e}") from None
    except Exception as e:  # pydicom raises many kinds on a damaged file
        raise ImageError(f"{name}: cannot be read as DICOM ({type(e).__name__}: {e})") from None


def open_image(source, size=None, name=None):
    """An image file (path or bytes) as a Pillow image, mode L or RGB, decoded.

    With ``size``, large JPEGs are decoded at reduced scale (never below
    size x size). DICOM files (.dcm, or any file Pillow does not know that
    carries the DICOM marker) go through dsconv.dicom. A file is read whole
    first: Pillow then decodes from memory, faster than from the file.
    """
    name = name or source
    if _dicom_name(source):
        return _read_dicom(source, name)
    data = _read(source, name)
    try:
        im = Image.open(io.BytesIO(data))
        if size:
            im.draft(im.mode if im.mode in ("RGB", "L") else None, (size, size))
        if im.mode in SIXTEEN_BIT or im.mode == "F":
            scale16 = 257.0 if im.mode != "F" else 1.0
            x = np.asarray(im, np.float64) / scale16
            return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "L")
        im.load()
        return im if im.mode in ("L", "RGB") else im.convert("L" if im.mode == "1" else "RGB")
    except UnidentifiedImageError as e:
        if data[128:132] == b"DICM":  # DICOM's marker: a DICOM file whatever its name
            return _read_dicom(data, name)
        raise ImageError(f"{name}: cannot be read as an image ({e})") from None
    except (OSError, ValueError, SyntaxError, AttributeError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot be read as an image ({e})") from None


def decode(source, size, name=None, blur=0.0):
    """An image file (path or bytes) as (size, size, 3) uint8 RGB; ``blur``: see resized."""
    return resized(open_image(source, size, name), size, blur)


def resized(im, size, blur=0.0):
    """Resized, blurred, then copied to RGB: Pillow resizes each channel alike, so a grey image is resized once.

    ``blur``: the standard deviation, in pixels of the r x r image, of a
    Gaussian blur after the resize (Pillow's GaussianBlur). It smooths away
    what differs most between forms of one X-ray (JPEG blocks and ringing,
    the resampling filter) and keeps what the diagnosis rests on: opacities
    many pixels wide (dsconv.forms; docs/forms.md).
    """
    im = im if im.size == (size, size) else im.resize((size, size), Image.BILINEAR)
    im = im.filter(ImageFilter.GaussianBlur(blur)) if blur else im
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def decode_sizes(source, sizes, name=None, blur=0.0):
    """{size: decode(source, size)} for several sizes: the file read once, decoded once where that gives the same pixels.

    Pillow's JPEG draft decodes at a reduced scale only for images at least
    twice the requested size on both sides; below twice the smallest size
    (and for formats without draft) every size is resized from one decode.
    """
    sizes = sorted(set(sizes))
    name = name or source
    if not _dicom_name(source):
        source = _read(source, name)
    if _header_side(source) >= 2 * sizes[0]:
        return {r: decode(source, r, name, blur) for r in sizes}
    im = open_image(source, None, name)
    return {r: resized(im, r, blur) for r in sizes}


def _header_side(source):
    """The smaller side from the file's header; 0 where Pillow cannot tell (DICOM, damaged files)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return min(im.size) if im.format == "JPEG" else 0
    except Exception:  # decode() says what is wrong with the file
        return 0


def load(path, size):
    """Read an image file as (size, size, 3) float32 in [-1, 1]."""
    return scale(decode(path, size))


MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # Pillow's own limit, 178,956,970 pixels; --max-pixels raises it


def add_max_pixels(parser):
    """The --max-pixels option of an entry point; apply it with set_max_pixels."""
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help="refuse images of more pixels than this, before decoding (decompression bombs), "
                             "DICOM as every other format")


def set_max_pixels(n):
    """Refuse images (any format, DICOM too) of more than ``n`` pixels.

    Pillow refuses above twice its MAX_IMAGE_PIXELS; dsconv.dicom checks the same.
    """
    Image.MAX_IMAGE_PIXELS = n // 2


def scale(pixels):
    """uint8 pixels -> float32 in [-1, 1]: x / 127.5 - 1 (in place: one array, not three, to fault in)."""
    x = pixels.astype(np.float32)
    x /= np.float32(127.5)
    x -= np.float32(1)
    return x
