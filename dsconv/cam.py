"""Class activation maps (Zhou et al. 2016): where the network looked.

The classifier is affine in the global average of the last feature maps A
(h x w x F): logit_k = mean_ij(A_ij) . W_k + b_k. So the map
M_k = A . W_k has mean(M_k) + b_k = logit_k exactly, and every pixel's share
of the decision can be read off it. For a softmax only differences between
logits matter, so the map drawn is the contrast of class k against the mean
of all classes, W_k - mean_j W_j: red where the X-ray pushes towards class k,
blue where it pushes away.
"""
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit, prange
from PIL import Image, ImageDraw, ImageFont

RED = (230, 30, 30)
BLUE = (30, 90, 230)
OPACITY = 0.6


def class_map(feature_maps, weights):
    """feature_maps (h, w, F), weights (F,) -> (h, w): the map whose mean is the logit less its bias."""
    return np.tensordot(feature_maps.astype(np.float64), np.asarray(weights, np.float64), axes=1)


def contrast(W, b, k):
    """(weights (F,), bias) of class k's logit minus the mean logit; W (F, K), b (K,)."""
    W, b = np.asarray(W, np.float64), np.asarray(b, np.float64)
    return W[:, k] - W.mean(axis=1), b[k] - b.mean()


def overlay(image, cam, caption):
    """The map upsampled onto the X-ray at its own size, with a caption; an RGB image.

    image: a Pillow image; cam (h, w): positive red, negative blue, opacity
    OPACITY x |cam| / max |cam| (the largest of the map's cells), the map
    upsampled bilinearly as Pillow resizes (pixel centres aligned, edges
    held). One compiled pass over the X-ray's pixels (_blend): an original
    has millions of them, and Pillow's float resize and composites took
    145 ms of a 2572 x 2476 X-ray, float arrays half a second.
    """
    grey = np.asarray(image.convert("L"))
    cam = np.ascontiguousarray(cam, np.float64)
    out = np.empty(grey.shape + (3,), np.uint8)
    rows, cols = _taps(cam.shape[0], grey.shape[0]), _taps(cam.shape[1], grey.shape[1])
    _blend(grey, cam, *rows, *cols, OPACITY / max(float(np.abs(cam).max()), 1e-12),
           np.array(RED, np.float64), np.array(BLUE, np.float64), out)
    out = Image.fromarray(out, "RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(12, grey.shape[0] // 24))
    box = draw.textbbox((0, 0), caption, font=font)
    pad = font.size // 3
    draw.rectangle((0, 0, box[2] + 2 * pad, box[3] + 2 * pad), fill=(0, 0, 0))
    draw.text((pad, pad), caption, fill=(255, 255, 255), font=font)
    return out


def png(image):
    """An L or RGB Pillow image as PNG bytes: every row filtered "Up" (less the row above, mod 256), zlib level 1.

    What predict --heatmap writes. Pillow's PNG at level 1 tries its five
    filters on every row: a 2572 x 2476 heatmap took 0.61 s, and 0.33 s so
    (6.7 MB against 6.9), 0.21 s with the rows deflated on both cores
    (_deflate).
    """
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"png: expected an L or RGB image, got {image.mode}")
    a = np.asarray(image)
    rows = a.reshape(a.shape[0], -1)
    data = np.empty((rows.shape[0], 1 + rows.shape[1]), np.uint8)
    data[:, 0] = 2  # the filter type of each row: Up
    data[0, 1:] = rows[0]  # the row above the first is zeros
    np.subtract(rows[1:], rows[:-1], out=data[1:, 1:])  # uint8: wraps mod 256, as the filter does
    header = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 8, 2 if image.mode == "RGB" else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        for kind, body in ((b"IHDR", header), (b"IDAT", _deflate(data.tobytes())), (b"IEND", b"")))


def _deflate(data, level=1, part=1 << 20):
    """zlib.compress(data, level) as pigz makes it: parts of at least `part` bytes deflated on threads (zlib lets
    go of the GIL), each primed with the 32 KB before it and ending on a byte boundary, in one stream."""
    parts = max(1, min(os.cpu_count() or 1, len(data) // part))
    cuts = [len(data) * i // parts for i in range(parts + 1)]
    view = memoryview(data)

    def deflate(i):
        start, stop = cuts[i], cuts[i + 1]
        d = zlib.compressobj(level, zlib.DEFLATED, -15, zdict=view[max(0, start - 32768):start]) if i else \
            zlib.compressobj(level, zlib.DEFLATED, -15)
        return d.compress(view[start:stop]) + d.flush(zlib.Z_FINISH if i == parts - 1 else zlib.Z_SYNC_FLUSH)

    with ThreadPoolExecutor(parts) as pool:
        body = b"".join(pool.map(deflate, range(parts)))
    return b"\x78\x01" + body + struct.pack(">I", zlib.adler32(data))  # a zlib header, then the checksum


def _taps(n, size):
    """Bilinear upsampling of n cells to size pixels: (first cell, weight of the next) per pixel, edges held."""
    at = np.clip((np.arange(size) + 0.5) * (n / size) - 0.5, 0, n - 1)
    first = np.minimum(at.astype(np.int64), max(n - 2, 0))
    return first, at - first


@njit(parallel=True, cache=True, nogil=True)
def _blend(grey, cam, r0, ry, c0, cx, scale, red, blue, out):
    # out (H, W, 3) = grey (H, W) blended with red where the upsampled map is >= 0, blue where < 0, opacity
    # |map| x scale; the map at pixel (i, j) from cells r0[i], r0[i] + 1 (weights 1 - ry[i], ry[i]) and
    # likewise c0[j], cx[j]
    h, w = cam.shape
    for i in prange(grey.shape[0]):
        a, b, t = r0[i], min(r0[i] + 1, h - 1), ry[i]
        for j in range(grey.shape[1]):
            c, d, u = c0[j], min(c0[j] + 1, w - 1), cx[j]
            v = (cam[a, c] * (1 - u) + cam[a, d] * u) * (1 - t) + (cam[b, c] * (1 - u) + cam[b, d] * u) * t
            alpha = min(abs(v) * scale, 1.0)
            colour = red if v >= 0 else blue
            g = grey[i, j] * (1 - alpha)
            for k in range(3):
                out[i, j, k] = np.uint8(g + colour[k] * alpha + 0.5)
