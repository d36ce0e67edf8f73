"""Numba kernels of the MobileNet v1 forward pass.

Every array is NHWC float32. A public function checks shapes and allocates;
a private ``@njit`` function does the work in explicit loops, parallel over
the outermost independent axis (batch x output rows) only. Batch norm is
folded into the kernels and biases at conversion time (dsconv.weights), so
each convolution is conv + bias + ReLU6.
"""
import numpy as np
from numba import njit, prange

# One place for the JIT flags. fastmath stays off: the forward pass must match
# Keras to 1e-4, and reassociated sums would trade that for little speed.
JIT = dict(cache=True, nogil=True, fastmath=False)


def same_padding(size, stride):
    """TensorFlow "SAME" for a 3x3 window: (output size, padding before).

    The padding after is whatever remains, so stride 2 on an even size pads
    one row at the bottom only, and stride 1 pads one on each side.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + 3 - size, 0)
    return out, total // 2


def _check(x, name, ndim):
    if x.dtype != np.float32 or x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d float32 array, got {x.ndim}-d {x.dtype}")
    return np.ascontiguousarray(x)


@njit(parallel=True, **JIT)
def _stem(x, k, b, y, stride, pad):
    # x (N, H, W, 3), k (3, 3, 3, C), b (C,), y (N, Ho, Wo, C)
    n_img, h, w, cin = x.shape
    _, ho, wo, c = y.shape
    for t in prange(n_img * ho):
        n, oy = t // ho, t % ho
        for ox in range(wo):
            acc = y[n, oy, ox]
            acc[:] = 0
            for ky in range(3):
                iy = oy * stride + ky - pad[0]
                if iy < 0 or iy >= h:
                    continue
                for kx in range(3):
                    ix = ox * stride + kx - pad[1]
                    if ix < 0 or ix >= w:
                        continue
                    for ci in range(cin):
                        v = x[n, iy, ix, ci]
                        for co in range(c):
                            acc[co] += v * k[ky, kx, ci, co]
            for co in range(c):
                acc[co] = min(max(acc[co] + b[co], np.float32(0)), np.float32(6))


@njit(parallel=True, **JIT)
def _depthwise(x, k, b, y, stride, pad):
    # x (N, H, W, C), k (3, 3, C), b (C,), y (N, Ho, Wo, C)
    n_img, h, w, c = x.shape
    _, ho, wo, _ = y.shape
    for t in prange(n_img * ho):
        n, oy = t // ho, t % ho
        for ox in range(wo):
            acc = y[n, oy, ox]
            acc[:] = 0
            for ky in range(3):
                iy = oy * stride + ky - pad[0]
                if iy < 0 or iy >= h:
                    continue
                for kx in range(3):
                    ix = ox * stride + kx - pad[1]
                    if ix < 0 or ix >= w:
                        continue
                    for ci in range(c):
                        acc[ci] += x[n, iy, ix, ci] * k[ky, kx, ci]
            # The bias last, as Keras adds batch norm after the convolution.
            for ci in range(c):
                acc[ci] = min(max(acc[ci] + b[ci], np.float32(0)), np.float32(6))


@njit(parallel=True, **JIT)
def _bias_relu6(y, b):
    # y (M, C) in place, b (C,)
    m, c = y.shape
    for i in prange(m):
        for j in range(c):
            y[i, j] = min(max(y[i, j] + b[j], np.float32(0)), np.float32(6))


@njit(parallel=True, **JIT)
def _global_avg_pool(x, y):
    # x (N, H, W, C), y (N, C)
    n_img, h, w, c = x.shape
    for n in prange(n_img):
        acc = np.zeros(c, np.float64)  # 49 to 196 terms: the sum is exact enough in float64 only
        for i in range(h):
            for j in range(w):
                for ci in range(c):
                    acc[ci] += x[n, i, j, ci]
        for ci in range(c):
            y[n, ci] = acc[ci] / (h * w)


@njit(parallel=True, **JIT)
def _softmax(z, p):
    # z (N, K) logits, p (N, K)
    for n in prange(z.shape[0]):
        m = z[n].max()
        s = np.float32(0)
        for j in range(z.shape[1]):
            p[n, j] = np.exp(z[n, j] - m)
            s += p[n, j]
        p[n, :] /= s


def _conv3x3(kernel, x, k, b, stride):
    n, h, w, _ = x.shape
    ho, top = same_padding(h, stride)
    wo, left = same_padding(w, stride)
    y = np.empty((n, ho, wo, k.shape[-1]), np.float32)
    kernel(x, k, b, y, stride, (top, left))
    return y


def stem(x, k, b, stride=2):
    """3x3 convolution, 3 -> C channels, SAME padding, + bias + ReLU6.

    x (N, H, W, 3), k (3, 3, 3, C), b (C,) -> (N, ceil(H/s), ceil(W/s), C)
    """
    x, k, b = _check(x, "x", 4), _check(k, "kernel", 4), _check(b, "bias", 1)
    if k.shape[:3] != (3, 3, x.shape[3]) or b.shape != (k.shape[3],):
        raise ValueError(f"stem: kernel {k.shape} / bias {b.shape} do not fit input {x.shape}")
    return _conv3x3(_stem, x, k, b, stride)


def depthwise(x, k, b, stride):
    """Depthwise 3x3 convolution, SAME padding, + bias + ReLU6.

    x (N, H, W, C), k (3, 3, C), b (C,) -> (N, ceil(H/s), ceil(W/s), C)
    """
    x, k, b = _check(x, "x", 4), _check(k, "kernel", 3), _check(b, "bias", 1)
    if k.shape != (3, 3, x.shape[3]) or b.shape != (x.shape[3],):
        raise ValueError(f"depthwise: kernel {k.shape} / bias {b.shape} do not fit input {x.shape}")
    return _conv3x3(_depthwise, x, k, b, stride)


def pointwise(x, w, b):
    """1x1 convolution as a matrix product, + bias + ReLU6.

    x (N, H, W, Cin), w (Cin, Cout), b (Cout,) -> (N, H, W, Cout)
    """
    x, w, b = _check(x, "x", 4), _check(w, "kernel", 2), _check(b, "bias", 1)
    if w.shape[0] != x.shape[3] or b.shape != (w.shape[1],):
        raise ValueError(f"pointwise: kernel {w.shape} / bias {b.shape} do not fit input {x.shape}")
    y = x.reshape(-1, x.shape[3]) @ w
    _bias_relu6(y, b)
    return y.reshape(x.shape[:3] + (w.shape[1],))


def global_avg_pool(x):
    """Mean over height and width: x (N, H, W, C) -> (N, C)."""
    x = _check(x, "x", 4)
    y = np.empty((x.shape[0], x.shape[3]), np.float32)
    _global_avg_pool(x, y)
    return y


def dense(x, w, b):
    """Fully connected layer with bias: x (N, K), w (K, M), b (M,) -> (N, M)."""
    x, w, b = _check(x, "x", 2), _check(w, "kernel", 2), _check(b, "bias", 1)
    if w.shape[0] != x.shape[1] or b.shape != (w.shape[1],):
        raise ValueError(f"dense: kernel {w.shape} / bias {b.shape} do not fit input {x.shape}")
    # float64 accumulation: the head is 0.2% of the work, and it keeps the
    # logits within 1e-4 of Keras where float32 sums of 1024 terms drift.
    return (x.astype(np.float64) @ w.astype(np.float64) + b).astype(np.float32)


def softmax(z):
    """Numerically stable softmax over the last axis: z (N, K) -> (N, K)."""
    z = _check(z, "logits", 2)
    p = np.empty_like(z)
    _softmax(z, p)
    return p
