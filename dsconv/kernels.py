"""Numba kernels of the MobileNet v1 forward pass.

Every array is NHWC float32. A public function checks shapes and allocates;
a private ``@njit`` function does the work in explicit loops, parallel over
the outermost independent axis (batch x output rows) only. Batch norm is
folded into the kernels and biases at conversion time (dsconv.weights), so
each convolution is conv + bias + ReLU6.

Matrix products (pointwise layers, the stem as patches x kernel) go through
dsconv.gemm, with the bias + ReLU6 epilogue fused and the weights packed
once. The row kernels (``_*_row``, ``_*_rows``, on
flat buffers) serve both the one-layer public kernels and the fused forward
pass at the end of this file (``_network_stacks``, ``_network_bands``),
which runs the whole network per image or per band of rows with its
buffers allocated once (see MobileNet._pooled).
"""
import os

import numpy as np
from numba import njit, prange

from dsconv.gemm import NR, gemm, pack

# Numba's OpenMP threads wait at the end of every parallel loop. By default
# GNU OpenMP spins there for ~300000 iterations: when another process holds a
# core, the waiting thread burns its time slice and a 7 ms forward pass took
# 110 ms. Spinning 10000 iterations costs nothing measurable on an idle
# machine. Set before Numba starts its threads; a user's own setting wins. (No
# effect if GNU OpenMP is already loaded: PyTorch, imported first, brings one.)
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# One place for the JIT flags. fastmath stays off: the forward pass must match
# Keras to 1e-4, and reassociated sums would trade that for little speed.
JIT = dict(cache=True, nogil=True, fastmath=False)


@njit(**JIT)
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


@njit(inline="always", **JIT)
def _columns(kx, stride, left, w, wo):
    # the output columns [lo, hi) whose input column ox * stride + kx - left is inside the image
    return max(0, -((kx - left) // stride)), min(wo, (w - 1 + left - kx) // stride + 1)


@njit(**JIT)
def _bias_relu6_flat(y, lo, hi, b):
    # y[lo:hi] = relu6(y + b) in place, y flat (M, C) rows, b (C,)
    c = b.shape[0]
    for i in range(lo, hi, c):
        row = y[i:i + c]
        for j in range(c):
            row[j] = min(max(row[j] + b[j], np.float32(0)), np.float32(6))


@njit(**JIT)
def _stem_rows(x, h, w, k, b, stride, y, t0, t1, tile):
    # Output rows [t0, t1) of a stack of images (G * Ho rows) as a matrix
    # product: the 3x3 patches of a few rows, (pixels, 9 Cin), gathered in
    # tile, times the kernel (9 Cin, C) packed in k.
    # x flat (G, H, W, Cin), b (C,), y flat (G, Ho, Wo, C)
    taps, c = k.shape[1], b.shape[0]
    cin = taps // 9
    ho, top = same_padding(h, stride)
    wo, left = same_padding(w, stride)
    rows = max(1, tile.shape[0] // (wo * taps))
    for r0 in range(t0, t1, rows):
        r1 = min(t1, r0 + rows)
        for t in range(r0, r1):
            img, oy = x[t // ho * h * w * cin:], t % ho
            for ky in range(3):
                iy = oy * stride + ky - top
                for ox in range(wo):
                    # 3 pixels x Cin of the patch, contiguous in the image unless at its border
                    p, ix = ((t - r0) * wo + ox) * taps + ky * 3 * cin, ox * stride - left
                    if iy >= 0 and iy < h and ix >= 0 and ix + 2 < w:
                        s = (iy * w + ix) * cin
                        for j in range(3 * cin):  # unsigned indices: no negative-index wraparound test
                            tile[np.uint64(p + j)] = img[np.uint64(s + j)]
                    else:
                        for j in range(3 * cin):
                            jx = ix + j // cin
                            inside = iy >= 0 and iy < h and jx >= 0 and jx < w
                            tile[p + j] = img[(iy * w + jx) * cin + j % cin] if inside else np.float32(0)
        gemm(tile, (r1 - r0) * wo, k, b, y[r0 * wo * c:])


@njit(inline="always", **JIT)
def _relu6(v):
    return min(max(v, np.float32(0)), np.float32(6))


@njit(**JIT)
def _depthwise_row(x, h, w, k, b, oy, stride, top, left, y, wo):
    # x flat (H, W, C), b (C,); y flat output row (Wo, C); k (3, 3, C), or for
    # stride 1 tiled to (3, 3, P * C) (see row_kernel). The pixels whose 3x3
    # window lies inside the image take all nine taps in one pass with no
    # bounds tests; the others (first and last rows and columns) one by one.
    c = b.shape[0]
    iy = oy * stride - top
    lo = min(wo, -(-left // stride))
    hi = max(lo, min(wo, (w - 3 + left) // stride + 1))
    if iy < 0 or iy + 2 >= h:
        lo = hi = wo
    for ox in range(lo):
        _depthwise_pixel(x, h, w, k, b, iy, ox * stride - left, y[ox * c:ox * c + c])
    if stride == 1:
        _depthwise_inside_s1(x, w, k, b, iy, lo, hi, left, y)
    else:
        _depthwise_inside(x, w, k, b, iy, lo, hi, stride, left, y)
    for ox in range(hi, wo):
        _depthwise_pixel(x, h, w, k, b, iy, ox * stride - left, y[ox * c:ox * c + c])


@njit(**JIT)
def _depthwise_pixel(x, h, w, k, b, iy, ix, dst):
    # One output pixel dst (C,) of the window at input row iy, column ix, taps outside the image skipped.
    c = b.shape[0]
    dst[:] = 0
    for ky in range(3):
        if iy + ky < 0 or iy + ky >= h:
            continue
        for kx in range(3):
            if ix + kx < 0 or ix + kx >= w:
                continue
            s = ((iy + ky) * w + ix + kx) * c
            src, kk = x[s:s + c], k[ky, kx]
            for ci in range(c):
                dst[ci] += src[ci] * kk[ci]
    # The bias last, as Keras adds batch norm after the convolution.
    for ci in range(c):
        dst[ci] = _relu6(dst[ci] + b[ci])


@njit(**JIT)
def _depthwise_inside_s1(x, w, kt, b, iy, lo, hi, left, y):
    # Stride 1, output pixels [lo, hi) of the row, P at a time: each tap reads
    # P * C contiguous floats of input, shifted by a pixel, against the
    # kernel tiled P times in kt (3, 3, P * C), so the nine taps are one loop
    # over P * C floats with a single store, whatever C.
    c = b.shape[0]
    p = kt.shape[2] // c
    k00, k01, k02, k10, k11, k12, k20, k21, k22 = (kt[0, 0], kt[0, 1], kt[0, 2], kt[1, 0], kt[1, 1],
                                                   kt[1, 2], kt[2, 0], kt[2, 1], kt[2, 2])
    for p0 in range(lo, hi, p):
        n = (min(hi, p0 + p) - p0) * c
        s = (iy * w + p0 - left) * c
        a0, a1, a2 = x[s:s + n], x[s + c:s + c + n], x[s + 2 * c:s + 2 * c + n]
        s += w * c
        b0, b1, b2 = x[s:s + n], x[s + c:s + c + n], x[s + 2 * c:s + 2 * c + n]
        s += w * c
        d0, d1, d2 = x[s:s + n], x[s + c:s + c + n], x[s + 2 * c:s + 2 * c + n]
        dst = y[p0 * c:p0 * c + n]
        for j in range(n):  # summed in the order of _depthwise_pixel: the same floats
            dst[j] = (np.float32(0) + a0[j] * k00[j] + a1[j] * k01[j] + a2[j] * k02[j]
                      + b0[j] * k10[j] + b1[j] * k11[j] + b2[j] * k12[j]
                      + d0[j] * k20[j] + d1[j] * k21[j] + d2[j] * k22[j])
    _bias_relu6_flat(y, lo * c, hi * c, b)


@njit(**JIT)
def _depthwise_inside(x, w, k, b, iy, lo, hi, stride, left, y):
    # Other strides, output pixels [lo, hi) of the row: per pixel, the nine taps in one loop over channels.
    c = b.shape[0]
    k00, k01, k02, k10, k11, k12, k20, k21, k22 = (k[0, 0], k[0, 1], k[0, 2], k[1, 0], k[1, 1],
                                                   k[1, 2], k[2, 0], k[2, 1], k[2, 2])
    for ox in range(lo, hi):
        s = (iy * w + ox * stride - left) * c
        r0, r1, r2 = x[s:s + 3 * c], x[s + w * c:s + w * c + 3 * c], x[s + 2 * w * c:s + 2 * w * c + 3 * c]
        a0, a1, a2, b0, b1, b2 = r0[:c], r0[c:2 * c], r0[2 * c:], r1[:c], r1[c:2 * c], r1[2 * c:]
        d0, d1, d2, dst = r2[:c], r2[c:2 * c], r2[2 * c:], y[ox * c:ox * c + c]
        for ci in range(c):
            dst[ci] = _relu6(np.float32(0) + a0[ci] * k00[ci] + a1[ci] * k01[ci] + a2[ci] * k02[ci]
                             + b0[ci] * k10[ci] + b1[ci] * k11[ci] + b2[ci] * k12[ci]
                             + d0[ci] * k20[ci] + d1[ci] * k21[ci] + d2[ci] * k22[ci] + b[ci])


def row_kernel(k, stride, chunk=512):
    """The depthwise kernel (3, 3, C) as _depthwise_row takes it: for stride 1 tiled P times, P * C ~ chunk floats."""
    return np.ascontiguousarray(np.tile(k, (1, 1, max(1, chunk // k.shape[2])))) if stride == 1 else k


@njit(parallel=True, **JIT)
def _stem(x, k, b, y, stride):
    # x (N, H, W, Cin), k packed (9 Cin, C), y (N, Ho, Wo, C): parallel over bands of 8 output rows
    n_img, h, w, cin = x.shape
    _, ho, wo, c = y.shape
    bands = (ho + 7) // 8
    for t in prange(n_img * bands):
        n, r0 = t // bands, t % bands * 8
        tile = np.empty(8 * wo * 9 * cin, np.float32)
        _stem_rows(x[n].ravel(), h, w, k, b, stride, y[n].ravel(), r0, min(ho, r0 + 8), tile)


@njit(parallel=True, **JIT)
def _depthwise(x, k, b, y, stride, pad):
    # x (N, H, W, C), y (N, Ho, Wo, C): parallel over the N * Ho output rows
    n_img, h, w, _ = x.shape
    _, ho, wo, _ = y.shape
    for t in prange(n_img * ho):
        n, oy = t // ho, t % ho
        _depthwise_row(x[n].ravel(), h, w, k, b, oy, stride, pad[0], pad[1], y[n, oy].ravel(), wo)


@njit(parallel=True, **JIT)
def _pointwise(x, w, b, y):
    # x (M, Cin), w packed (Cin, Cout), y (M, Cout): parallel over tiles of 256 rows
    m, cin = x.shape
    cout = b.shape[0]
    xf, yf = x.ravel(), y.ravel()
    for t in prange((m + 255) // 256):
        r0, r1 = t * 256, min(m, t * 256 + 256)
        gemm(xf[r0 * cin:], r1 - r0, w, b, yf[r0 * cout:])


@njit(**JIT)
def _block_rows(x, h, w, kd, bd, wp, bp, stride, y, t0, t1, tile):
    # One depthwise-separable block on output rows [t0, t1) of a stack of
    # images (G * Ho rows), the depthwise output a few rows at a time in tile,
    # so that the pointwise product reads it from cache and multiplies
    # rows * Wo pixels at once, across images: x flat (G, H, W, C) -> y flat
    # (G, Ho, Wo, Cout), wp the packed pointwise kernel (C, Cout).
    c, cout = wp.shape[1], bp.shape[0]
    ho, top = same_padding(h, stride)
    wo, left = same_padding(w, stride)
    rows = max(1, tile.shape[0] // (wo * c))
    for r0 in range(t0, t1, rows):
        r1 = min(t1, r0 + rows)
        for t in range(r0, r1):
            _depthwise_row(x[t // ho * h * w * c:], h, w, kd, bd, t % ho, stride, top, left,
                           tile[(t - r0) * wo * c:], wo)
        gemm(tile, (r1 - r0) * wo, wp, bp, y[r0 * wo * cout:])


@njit(**JIT)
def _block_cols(x, g, side, kd, bd, wp, bp, stride, y, n0, n1, tile):
    # One block on a stack of g images, output channels [n0, n1) only (n0 a
    # multiple of gemm.NR): the whole depthwise output in tile, then its
    # product with columns [n0, n1) of wp.
    c = wp.shape[1]
    ho, top = same_padding(side, stride)
    for t in range(g * ho):
        _depthwise_row(x[t // ho * side * side * c:], side, side, kd, bd, t % ho, stride, top, top,
                       tile[t * ho * c:], ho)
    gemm(tile, g * ho * ho, wp, bp, y, n0, n1)


@njit(**JIT)
def _pool_flat(x, m, out):
    # out (C,) = mean of the m pixels of x flat (m, C)
    c = out.shape[0]
    acc = np.zeros(c, np.float64)  # 49 to 196 terms: the sum is exact enough in float64 only
    for i in range(m):
        px = x[i * c:i * c + c]
        for ci in range(c):
            acc[ci] += px[ci]
    for ci in range(c):
        out[ci] = acc[ci] / m


@njit(**JIT)
def _stack(x, g, r, k0, b0, kd, bd, wp, bp, strides, act0, act1, tile, pooled):
    # The whole network on a stack of g images, serially, layer by layer:
    # x flat (g, r, r, 3) -> pooled (g, F). Activations alternate between the
    # flat buffers act0 and act1.
    side = -(-r // 2)
    _stem_rows(x, r, r, k0, b0, 2, act0, 0, g * side, tile)
    src, dst = act0, act1
    for i in range(len(kd)):
        out = -(-side // strides[i])
        _block_rows(src, side, side, kd[i], bd[i], wp[i], bp[i], strides[i], dst, 0, g * out, tile)
        side, src, dst = out, dst, src
    c = pooled.shape[1]
    for n in range(g):
        _pool_flat(src[n * side * side * c:], side * side, pooled[n])


@njit(parallel=True, **JIT)
def _network_stacks(x, n_img, r, stack, k0, b0, kd, bd, wp, bp, strides, act, tile, pooled):
    # x flat (N, r, r, 3) -> pooled (N, F); thread t runs images [N t / T, N (t + 1) / T),
    # up to `stack` at a time, on its own buffers act[t] (2, S) and tile[t]:
    # no synchronisation between layers.
    threads = tile.shape[0]
    size = r * r * 3
    for t in prange(threads):
        for n0 in range(n_img * t // threads, n_img * (t + 1) // threads, stack):
            n1 = min(n_img * (t + 1) // threads, n0 + stack)
            _stack(x[n0 * size:n1 * size], n1 - n0, r, k0, b0, kd, bd, wp, bp, strides,
                   act[t, 0], act[t, 1], tile[t], pooled[n0:n1])


# Mult-adds below which a layer of the banded pass runs on one thread: a
# parallel loop costs its threads a wake-up and a barrier, tens of
# microseconds, and much more on a loaded machine.
SPLIT = 8_000_000


@njit(parallel=True, **JIT)
def _network_bands(x, g, r, k0, b0, kd, bd, wp, bp, strides, act, tile, pooled):
    # x flat (g, r, r, 3) -> pooled (g, F), layer by layer, every layer large
    # enough split into T bands of the g * Ho output rows (thread t: band t,
    # with tile[t]), or into T ranges of output channels when it has few rows;
    # act[0] holds the activations.
    threads = tile.shape[0]
    a, b = act[0, 0], act[0, 1]
    side = -(-r // 2)
    if g * side * side * k0.size < SPLIT:
        _stem_rows(x, r, r, k0, b0, 2, a, 0, g * side, tile[0])
    else:
        for t in prange(threads):
            _stem_rows(x, r, r, k0, b0, 2, a, g * side * t // threads, g * side * (t + 1) // threads, tile[t])
    src, dst = a, b
    for i in range(len(kd)):
        out = -(-side // strides[i])
        c, cout = wp[i].shape[1], bp[i].shape[0]
        if g * out * out * (9 + cout) * c < SPLIT:
            _block_rows(src, side, side, kd[i], bd[i], wp[i], bp[i], strides[i], dst, 0, g * out, tile[0])
        elif g * out * out < 64 and g * out * out * c <= tile.shape[1]:
            # Few rows (7x7): split the output channels instead, each thread repeating the small
            # depthwise. At 14x14 (196 rows) repeating it costs more than halving the product's rows.
            panels = wp[i].shape[0]
            for t in prange(threads):
                _block_cols(src, g, side, kd[i], bd[i], wp[i], bp[i], strides[i], dst,
                            NR * (panels * t // threads), min(cout, NR * (panels * (t + 1) // threads)), tile[t])
        else:
            for t in prange(threads):
                _block_rows(src, side, side, kd[i], bd[i], wp[i], bp[i], strides[i], dst,
                            g * out * t // threads, g * out * (t + 1) // threads, tile[t])
        side, src, dst = out, dst, src
    c = pooled.shape[1]
    for n in range(g):
        _pool_flat(src[n * side * side * c:], side * side, pooled[n])


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
    y = np.empty((n, ho, wo, b.shape[0]), np.float32)
    kernel(x, k, b, y, stride, (top, left))
    return y


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
    return _conv3x3(_depthwise, x, row_kernel(k, stride), b, stride)


def pointwise(x, w, b):
    """1x1 convolution as a matrix product, + bias + ReLU6.

    x (N, H, W, Cin), w (Cin, Cout), b (Cout,) -> (N, H, W, Cout)
    """
    x, w, b = _check(x, "x", 4), _check(w, "kernel", 2), _check(b, "bias", 1)
    if w.shape[0] != x.shape[3] or b.shape != (w.shape[1],):
        raise ValueError(f"pointwise: kernel {w.shape} / bias {b.shape} do not fit input {x.shape}")
    x2 = x.reshape(-1, x.shape[3])
    y = np.empty((x2.shape[0], w.shape[1]), np.float32)
    _pointwise(x2, pack(w), b, y)
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
