"""The matrix product relu6(a @ w + b): the pointwise layers, and the stem as patches x kernel.

Promises: pack(w), the weights in panels of NR columns; gemm, columns
[n0, n1) of a product, callable from any compiled function; _product, the
C function behind it (compiled once, called by name as _call_product);
and the tiles the product is cut into, with PLAN, the cut of a product's
last rows.

    pack                              w (K, N) -> panels (panels, K, NR)
    _tile_mr, _tile_short, _tile_half   the micro-kernel's tiles of MR, MR_SHORT, MR_HALF rows x NV vectors
    _tile_tall_vector, _tile_tall_half_vector   2 MR rows x one vector, x half a vector
    MR_SHORT, MR_HALF, tile_plan, PLAN   the last rows' tiles: fewest rows computed, then fewest tiles
    _block                            rows x one panel, tile by tile
    _product, _call_product           the product, a C function called by name
    gemm                              the product as the other kernels call it
"""
import numpy as np
from numba import carray, cfunc, njit
from numba.extending import intrinsic

from .config import JIT, LANES, MR, NR, NV, SMALL_B
from .entry import C_FLAGS, FLAT, INT, PACKED, _by_name, _call_entry, c_signature
from .vector import gemm_block


# ---------------------------------------------------------------------------
# Packed weights


def pack(w):
    """w (K, N) -> (panels, K, NR) float32: columns [p NR, (p + 1) NR) of w in panel p, zero-padded.

    The layout the matrix products take their weights in (see gemm): one
    contiguous row of a panel per step of K.
    """
    k, n = w.shape
    panels = -(-n // NR)
    padded = np.zeros((k, panels * NR), np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, NR).transpose(1, 0, 2))


# ---------------------------------------------------------------------------
# The tiles, and the cut of the last rows


# The micro-kernel's tiles, each named rows x columns:
_tile_mr = gemm_block(MR, NV)  # MR x NV vectors of LANES: most of every product
# For the last rows of a product (a tile costs its full height, whatever
# rows it has): tiles of MR_SHORT = MR - 2 rows (MR // 2 below 5) and of
# MR_HALF = MR // 2, so that as few rows as can be are computed for nothing:
# on AVX2 (6, 4 and 3) none from 3 rows up but 5; 49 rows, a 7 x 7 map, are
# 6 x 7 + 4 + 3, where 6 x 8 + a tile of 3 for the last row took 4% longer.
# (AVX-512: 14, 12, 7.)
MR_SHORT = MR - 2 if MR >= 5 else MR // 2
MR_HALF = max(1, MR // 2)
_tile_short = gemm_block(MR_SHORT, NV)
_tile_half = gemm_block(MR_HALF, NV)


def tile_plan(mr, short):
    """plan[R]: the height of the first tile for R rows, cut into tiles of mr, short and mr // 2 rows.

    The fewest rows computed (the last tile may stick out), then the fewest
    tiles; R < 4 mr (the last block of a product, see _product).
    """
    sizes = sorted({mr, short, max(1, mr // 2)}, reverse=True)
    best, plan = [(0, 0)], [0]
    for rows in range(1, 4 * mr):
        options = [((s, 1) if s >= rows else (s + best[rows - s][0], 1 + best[rows - s][1]), s) for s in sizes]
        cost, size = min(options)
        best.append(cost)
        plan.append(size)
    return np.array(plan, np.int64)


PLAN = tile_plan(MR, MR_SHORT)
# Tall tiles for few columns:
_tile_tall_vector = gemm_block(2 * MR, 1)  # 2 MR x LANES, for panels with at most LANES columns used (NV = 2)
# 2 MR x LANES / 2, for a last vector of at most LANES / 2 columns (NV = 1): the
# stem's 8 or 24 channels at alpha 0.25 or 0.75 take half the multiply-adds
# and, at exactly 8, an unmasked store (AMD's masked stores are slow).
_tile_tall_half_vector = gemm_block(2 * MR, 1, LANES // 2)


# ---------------------------------------------------------------------------
# The product


@njit(inline="always")
def _block(a, a0, lda, seg, gap, wp, b, y, y0, n, i0, i1, j0, n1):
    # rows [i0, i1) x columns [j0, j0 + NR) of y (one panel): tiles of MR rows, the last ones as PLAN cuts them
    k = wp.shape[1]
    cols = min(NR, n1 - j0)
    w0 = j0 // NR * k * NR
    r = i0
    while r < i1:
        rows = i1 - r
        ar, yr = a0 + r * lda, y0 + r * n + j0
        if NV == 2 and cols <= LANES:
            _tile_tall_vector(a, ar, lda, seg, gap, wp, w0, NR, k, y, yr, n, b, j0, min(2 * MR, rows), cols)
            r += 2 * MR
        elif NV == 1 and cols <= LANES // 2:
            _tile_tall_half_vector(a, ar, lda, seg, gap, wp, w0, NR, k, y, yr, n, b, j0, min(2 * MR, rows), cols)
            r += 2 * MR
        else:
            size = PLAN[rows]
            if size == MR:
                _tile_mr(a, ar, lda, seg, gap, wp, w0, NR, k, y, yr, n, b, j0, min(MR, rows), cols)
            elif size == MR_SHORT:
                _tile_short(a, ar, lda, seg, gap, wp, w0, NR, k, y, yr, n, b, j0, min(MR_SHORT, rows), cols)
            else:
                _tile_half(a, ar, lda, seg, gap, wp, w0, NR, k, y, yr, n, b, j0, min(size, rows), cols)
            r += size


@cfunc(c_signature(FLAT, INT, INT, INT, INT, INT, PACKED, FLAT, FLAT, INT, INT, INT), **C_FLAGS)
def _product(pa, na, a0, lda, seg, gap, m, pw, panels, k, pb, n, py, ny, y0, n0, n1):
    # Columns [n0, n1) of m rows of y (from y[y0], N apart) = relu6(a @ w + b), row i of a from a[a0 + i lda]
    # as the micro-kernel takes it (seg, gap: see gemm_block); wp (panels, K, NR), b (N,). Called as
    # _call_product(a, a0, lda, seg, gap, m, wp, b, y, y0, n0, n1).
    a, wp, b, y = carray(pa, na), carray(pw, (panels, k, NR)), carray(pb, n), carray(py, ny)
    # blocks of 2 MR rows, the last one with the rows left over (2 MR to 4 MR - 1 of them, for PLAN to cut), panels
    rows, cols = max(1, m // (2 * MR)), -(-(n1 - n0) // NR)
    by_rows = k * (n1 - n0) <= SMALL_B
    for t in range(rows * cols):  # one loop, so that the micro-kernels are compiled into it once, not twice
        r, p = (t // cols, t % cols) if by_rows else (t % rows, t // rows)
        _block(a, a0, lda, seg, gap, wp, b, y, y0, n, r * 2 * MR, m if r == rows - 1 else (r + 1) * 2 * MR,
               n0 + p * NR, n1)


_by_name("product", _product)


@intrinsic
def _call_product(typingctx, a, a0, lda, seg, gap, m, wp, b, y, y0, n0, n1):
    return _call_entry("product", (a, a0, lda, seg, gap, m, wp, b, y, y0, n0, n1))


@njit(inline="always", **JIT)
def gemm(a, m, wp, b, y, n0, n1):
    """Columns [n0, n1) of y[:m * N] = relu6(a[:m * K] @ w + b); n0 a multiple of NR.

    a flat (m, K), wp = pack(w) (panels, K, NR), b (N,), y flat (m, N).
    """
    k = wp.shape[1]
    _call_product(a, np.int64(0), k, k, np.int64(0), m, wp, b, y, np.int64(0), n0, n1)
