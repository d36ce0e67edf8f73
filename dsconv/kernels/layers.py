"""The public one-layer kernels: one layer on a batch, parallel over its outermost independent axis.

Promises: stem, depthwise, pointwise (+ bias + ReLU6), global_avg_pool,
dense and softmax on NHWC float32 arrays, each checking its arguments and
allocating its output (ValueError on a wrong shape or dtype), then calling
a compiled body with explicit loops: Numba parallel loops (OpenMP) over
batch x output rows for the convolutions. MobileNet's layer-by-layer path
(forward.py's fused pass computes the same bits).

    stem, depthwise, pointwise, global_avg_pool, dense, softmax   the public kernels
    _stem, _depthwise, _pointwise, _global_avg_pool, _dense, _softmax   their compiled bodies
"""
import numba
import numpy as np
from numba import njit, prange

from .config import JIT, NR, POINTWISE_ROWS, STEM_BAND
from .conv import _call_depthwise_row, _call_stem_rows, pack_depthwise, same_padding
from .fused import _pool_flat
from .product import gemm, pack


# ---------------------------------------------------------------------------
# The public kernels: check, allocate, call


def stem(x, k, b, stride=2):
    """3x3 convolution, 3 -> C channels, SAME padding, + bias + ReLU6.

    x (N, H, W, 3), k (3, 3, 3, C), b (C,) -> (N, ceil(H/s), ceil(W/s), C)
    """
    x, k, b = _check(x, "x", 4), _check(k, "kernel", 4), _check(b, "bias", 1)
    if k.shape[:3] != (3, 3, x.shape[3]) or b.shape != (k.shape[3],):
        raise ValueError(f"stem: kernel {k.shape} / bias {b.shape} do not fit input {x.shape}")
    n, h, w, _ = x.shape
    y = np.empty((n, -(-h // stride), -(-w // stride), k.shape[3]), np.float32)
    _stem(x, pack(k.reshape(-1, k.shape[3])), b, y, stride)
    return y


def depthwise(x, k, b, stride):
    """Depthwise 3x3 convolution, SAME padding, + bias + ReLU6.

    x (N, H, W, C), k (3, 3, C), b (C,) -> (N, ceil(H/s), ceil(W/s), C)
    """
    x, k, b = _check(x, "x", 4), _check(k, "kernel", 3), _check(b, "bias", 1)
    if k.shape != (3, 3, x.shape[3]) or b.shape != (x.shape[3],):
        raise ValueError(f"depthwise: kernel {k.shape} / bias {b.shape} do not fit input {x.shape}")
    n, h, w, c = x.shape
    ho, top = same_padding(h, stride)
    wo, left = same_padding(w, stride)
    y = np.empty((n, ho, wo, c), np.float32)
    _depthwise(x, pack_depthwise(k), b, y, stride, (top, left))
    return y


def pointwise(x, w, b):
    """1x1 convolution as a matrix product, + bias + ReLU6.

    x (N, H, W, Cin), w (Cin, Cout), b (Cout,) -> (N, H, W, Cout)
    """
    x, w, b = _check(x, "x", 4), _check(w, "kernel", 2), _check(b, "bias", 1)
    if w.shape[0] != x.shape[3] or b.shape != (w.shape[1],):
        raise ValueError(f"pointwise: kernel {w.shape} / bias {b.shape} do not fit input {x.shape}")
    x2 = x.reshape(-1, x.shape[3])
    y = np.empty((x2.shape[0], w.shape[1]), np.float32)
    _pointwise(x2, pack(w), b, y, numba.get_num_threads())
    return y.reshape(x.shape[:3] + (w.shape[1],))


def global_avg_pool(x):
    """Mean over height and width: x (N, H, W, C) -> (N, C)."""
    x = _check(x, "x", 4)
    y = np.empty((x.shape[0], x.shape[3]), np.float32)
    _global_avg_pool(x, y, np.empty(y.shape))
    return y


def dense(x, w, b):
    """Fully connected layer with bias: x (N, K), w (K, M), b (M,) float32 or float64 -> (N, M) float64.

    Summed in float64 (the head is 0.2% of the work, and float32 sums of
    1024 terms drift from Keras' logits by more than 1e-4), every output in
    the order of k: a row's result does not depend on the rows beside it
    (a BLAS product of one row and of many round differently), so an image
    gets the same bits alone, in a batch, on the page or from the cache.
    """
    x, w, b = (np.ascontiguousarray(a) for a in (x, w, b))
    if any(a.dtype not in (np.float32, np.float64) for a in (x, w, b)) or (x.ndim, w.ndim, b.ndim) != (2, 2, 1):
        raise ValueError(f"dense: expected float arrays (N, K), (K, M), (M,), got {x.shape} {x.dtype}, "
                         f"{w.shape} {w.dtype}, {b.shape} {b.dtype}")
    if w.shape[0] != x.shape[1] or b.shape != (w.shape[1],):
        raise ValueError(f"dense: kernel {w.shape} / bias {b.shape} do not fit input {x.shape}")
    y = np.empty((x.shape[0], w.shape[1]), np.float64)
    _dense(x, w, b, y)
    return y


def softmax(z):
    """Numerically stable softmax over the last axis: z (N, K) float32 or float64 -> (N, K) of its dtype."""
    z = np.ascontiguousarray(z)
    if z.dtype not in (np.float32, np.float64) or z.ndim != 2:
        raise ValueError(f"logits: expected a 2-d float32 or float64 array, got {z.ndim}-d {z.dtype}")
    p = np.empty_like(z)
    _softmax(z, p)
    return p


# ---------------------------------------------------------------------------
# Their compiled bodies


def _check(x, name, ndim):
    if x.dtype != np.float32 or x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d float32 array, got {x.ndim}-d {x.dtype}")
    return np.ascontiguousarray(x)


@njit(parallel=True, **JIT)
def _stem(x, k, b, y, stride):
    # x (N, H, W, Cin), k packed (9 Cin, C), y (N, Ho, Wo, C): parallel over bands of STEM_BAND output rows
    n_img, h, w, cin = x.shape
    _, ho, wo, c = y.shape
    bands = -(-ho // STEM_BAND)
    for t in prange(n_img * bands):
        n, r0 = t // bands, t % bands * STEM_BAND
        tile = np.empty(STEM_BAND * wo * (9 * cin + c), np.float32)  # patches and their outputs
        _call_stem_rows(x[n].ravel(), h, w, k, b, stride, y[n].ravel(), r0, min(ho, r0 + STEM_BAND), tile)


@njit(parallel=True, **JIT)
def _depthwise(x, k, b, y, stride, pad):
    # x (N, H, W, C), y (N, Ho, Wo, C): parallel over the N * Ho output rows
    n_img, h, w, _ = x.shape
    _, ho, wo, _ = y.shape
    for t in prange(n_img * ho):
        n, oy = t // ho, t % ho
        _call_depthwise_row(x[n].ravel(), h, w, k, b, oy, stride, pad[0], pad[1], y[n, oy].ravel(), wo)


@njit(parallel=True, **JIT)
def _pointwise(x, w, b, y, threads):
    # x (M, Cin), w packed (Cin, Cout), y (M, Cout): parallel over tiles of
    # POINTWISE_ROWS rows, each split into ranges of output panels when there
    # are fewer tiles than twice the threads (a 7x7 or 14x14 image)
    m, cin = x.shape
    cout, panels = b.shape[0], w.shape[0]
    tiles = -(-m // POINTWISE_ROWS)
    groups = min(panels, max(1, -(-2 * threads // tiles)))
    xf, yf = x.ravel(), y.ravel()
    for t in prange(tiles * groups):
        i, j = t // groups, t % groups
        r0, r1 = i * POINTWISE_ROWS, min(m, (i + 1) * POINTWISE_ROWS)
        gemm(xf[r0 * cin:], r1 - r0, w, b, yf[r0 * cout:], NR * (panels * j // groups),
             min(cout, NR * (panels * (j + 1) // groups)))


@njit(parallel=True, **JIT)
def _global_avg_pool(x, y, sums):
    # x (N, H, W, C), y (N, C): the fused pass's pooling, image by image, summing in sums (N, C) float64
    n_img, h, w, c = x.shape
    for n in prange(n_img):
        _pool_flat(x[n].ravel(), h * w, y[n], sums[n])


@njit(**JIT)
def _dense(x, w, b, y):
    # y (N, M) = x (N, K) @ w (K, M) + b in float64, each sum in the order of k
    for n in range(x.shape[0]):
        acc = y[n]
        acc[:] = 0.0
        for k in range(x.shape[1]):
            v = np.float64(x[n, k])
            for m in range(w.shape[1]):
                acc[m] += v * w[k, m]
        for m in range(w.shape[1]):
            acc[m] += b[m]


@njit(**JIT)
def _softmax(z, p):
    # z (N, K) logits, p (N, K), float32 or float64
    for n in range(z.shape[0]):
        m = z[n].max()
        s = 0.0
        for j in range(z.shape[1]):
            p[n, j] = np.exp(z[n, j] - m)
            s += p[n, j]
        p[n, :] /= s
