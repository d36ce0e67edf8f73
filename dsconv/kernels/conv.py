"""The 3x3 convolutions' rows: the stem (as a matrix product) and the depthwise layers.

Promises: same_padding (TensorFlow's "SAME" for a 3x3 window);
pack_depthwise, the depthwise kernel in blocks of DW_LANES channels;
_stem_rows, output rows of the stem on a stack of images, and
_depthwise_row_entry, one output row of a depthwise layer: both C functions
compiled once and called by name (_call_stem_rows, _call_depthwise_row)
from the one-layer kernels and the fused pass alike.

    same_padding                          (output size, padding before) of a 3x3 window
    pack_depthwise                        k (3, 3, C) -> (blocks, 9, DW_LANES)
    _stem_rows, _call_stem_rows, stem_rows   rows of the stem
    _depthwise_row, _call_depthwise_row   one row of a depthwise layer
"""
import numpy as np
from numba import carray, cfunc, njit
from numba.extending import intrinsic

from .config import DW_LANES, JIT, NR
from .entry import C_FLAGS, FLAT, INT, PACKED, _by_name, _call_entry, c_signature
from .product import _call_product
from .vector import depthwise_row


# ---------------------------------------------------------------------------
# Padding and packing


@njit(inline="always", **JIT)
def same_padding(size, stride):
    """TensorFlow "SAME" for a 3x3 window: (output size, padding before).

    The padding after is whatever remains, so stride 2 on an even size pads
    one row at the bottom only, and stride 1 pads one on each side.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + 3 - size, 0)
    return out, total // 2


def pack_depthwise(k):
    """k (3, 3, C) -> (blocks, 9, DW_LANES) float32: block b holds the nine taps of channels b DW_LANES onwards."""
    c = k.shape[2]
    blocks = -(-c // DW_LANES)
    padded = np.zeros((9, blocks * DW_LANES), np.float32)
    padded[:, :c] = k.reshape(9, c)
    return np.ascontiguousarray(padded.reshape(9, blocks, DW_LANES).transpose(1, 0, 2))


_depthwise_s1, _depthwise_s2 = depthwise_row(1), depthwise_row(2)


# ---------------------------------------------------------------------------
# The stem's rows


@cfunc(c_signature(FLAT, INT, INT, PACKED, FLAT, INT, FLAT, INT, INT, FLAT), **C_FLAGS)
def _stem_rows(px, nx, h, w, pk, panels, taps, pb, c, stride, py, ny, t0, t1, ptile, ntile):
    # Output rows [t0, t1) of a stack of images (G * Ho rows) as a matrix
    # product with the kernel (9 Cin, C) packed in k. A pixel whose 3x3
    # window is inside the image takes its window straight from the image
    # (three runs of 3 Cin floats, a row apart); the others (the SAME
    # padding's, at the bottom and right of an even size) have their patches
    # gathered in tile, zeros for the padding, their outputs computed after
    # the patches and copied into place.
    # x flat (G, H, W, Cin), b (C,), y flat (G, Ho, Wo, C). Called as
    # _call_stem_rows(x, h, w, k, b, stride, y, t0, t1, tile) (or stem_rows).
    x, k, b = carray(px, nx), carray(pk, (panels, taps, NR)), carray(pb, c)
    y, tile = carray(py, ny), carray(ptile, ntile)
    cin = taps // 9
    ho, top = same_padding(h, stride)
    wo, left = same_padding(w, stride)
    lo = min(wo, -(-left // stride))  # output columns [lo, hi) have their window inside the image's columns
    hi = max(lo, min(wo, (w - 3 + left) // stride + 1))
    band = max(1, tile.shape[0] // (wo * (taps + c)))  # rows whose patches and outputs all fit in tile
    for r0 in range(t0, t1, band):
        r1 = min(t1, r0 + band)
        m = np.int64(0)  # patches gathered
        for t in range(r0, r1):
            img, oy = x[t // ho * h * w * cin:], t % ho
            iy = oy * stride - top
            inside = iy >= 0 and iy + 2 < h
            if inside and hi > lo:
                _call_product(x, (t // ho * h * w + iy * w + lo * stride - left) * cin, stride * cin, 3 * cin,
                              w * cin, hi - lo, k, b, y, (t * wo + lo) * c, np.int64(0), c)
            for ox in range(wo):
                if inside and ox >= lo and ox < hi:
                    continue
                for ky in range(3):
                    jy = iy + ky
                    for j in range(3 * cin):
                        jx = ox * stride - left + j // cin
                        within = jy >= 0 and jy < h and jx >= 0 and jx < w
                        tile[m * taps + ky * 3 * cin + j] = img[(jy * w + jx) * cin + j % cin] if within else np.float32(0)
                m += 1
        if m == 0:
            continue
        _call_product(tile, np.int64(0), taps, taps, np.int64(0), m, k, b, tile, m * taps, np.int64(0), c)
        out = tile[m * taps:]
        i = 0
        for t in range(r0, r1):
            iy = t % ho * stride - top
            inside = iy >= 0 and iy + 2 < h
            for ox in range(wo):
                if not (inside and ox >= lo and ox < hi):
                    for j in range(c):  # not a slice assignment: that took 3 s to compile
                        y[(t * wo + ox) * c + j] = out[i * c + j]
                    i += 1


_by_name("stem_rows", _stem_rows)


@intrinsic
def _call_stem_rows(typingctx, x, h, w, k, b, stride, y, t0, t1, tile):
    return _call_entry("stem_rows", (x, h, w, k, b, stride, y, t0, t1, tile))


@njit(**JIT)
def stem_rows(x, h, w, k, b, stride, y, t0, t1, tile):
    """Output rows [t0, t1) of the stem on a stack of images, as the fused pass makes them (_stem_rows).

    x flat (G, H, W, Cin), k = pack(kernel (9 Cin, C)), b (C,), y flat
    (G, Ho, Wo, C), tile: room for the patches of the padding's pixels.
    """
    _call_stem_rows(x, h, w, k, b, stride, y, t0, t1, tile)


# ---------------------------------------------------------------------------
# A depthwise row


@njit(inline="always", **JIT)
def _depthwise_row(x, h, w, k, b, oy, stride, top, left, y, wo):
    # Output row oy: x flat (H, W, C), k packed (3, 3, C), b (C,), y flat (Wo, C),
    # see depthwise_row. Output pixels [lo, hi) have their whole window
    # inside the image. Compiled code calls it as _call_depthwise_row: compiled
    # once, inlined into the C function _depthwise_row_entry.
    iy = oy * stride - top
    lo = min(wo, -(-left // stride))
    hi = max(lo, min(wo, (w - 3 + left) // stride + 1))
    if iy < 0 or iy + 2 >= h:
        lo = hi = wo
    if stride == 1:
        _depthwise_s1(x, h, w, b.shape[0], k, b, iy, -left, lo, hi, wo, y)
    else:
        _depthwise_s2(x, h, w, b.shape[0], k, b, iy, -left, lo, hi, wo, y)


@cfunc(c_signature(FLAT, INT, INT, PACKED, FLAT, INT, INT, INT, INT, FLAT, INT), **C_FLAGS)
def _depthwise_row_entry(x, nx, h, w, k, blocks, taps, b, c, oy, stride, top, left, y, ny, wo):
    # _depthwise_row compiled once: called as _call_depthwise_row(x, h, w, k, b, oy, stride, top, left, y, wo)
    _depthwise_row(carray(x, nx), h, w, carray(k, (blocks, taps, DW_LANES)), carray(b, c), oy, stride, top, left,
                   carray(y, ny), wo)


_by_name("depthwise_row", _depthwise_row_entry)


@intrinsic
def _call_depthwise_row(typingctx, x, h, w, k, b, oy, stride, top, left, y, wo):
    return _call_entry("depthwise_row", (x, h, w, k, b, oy, stride, top, left, y, wo))

