"""Decode, convert, resize and scale images for the network.

As TensorFlow's retrain.py: RGB, resized straight to r x r with bilinear
interpolation (no crop, aspect ratio not kept), scaled to x / 127.5 - 1.
"""
import numpy as np
from PIL import Image


class ImageError(Exception):
    """An image that cannot be decoded, naming the file."""


def load(path, size):
    """Read an image file as (size, size, 3) float32 in [-1, 1]."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot be read as an image ({e})") from None
    return scale(np.asarray(im))


def scale(pixels):
    """uint8 pixels -> float32 in [-1, 1]."""
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1)
