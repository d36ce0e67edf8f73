"""Every kernel against tests/naive.py: odd sizes, C = 1, both strides, batch > 1."""
import itertools

import numpy as np
import pytest

from dsconv import kernels
from tests import naive

rng = np.random.default_rng(0)


def rand(*shape, lo=-1, hi=1):
    return rng.uniform(lo, hi, shape).astype(np.float32)


def close(got, want, tol=1e-5):
    diff = np.abs(got.astype(np.float64) - want).max()
    assert got.shape == want.shape, (got.shape, want.shape)
    assert diff <= tol, f"largest difference {diff:.3g} > {tol}"


SIZES = [(1, 7, 7), (3, 8, 8), (2, 9, 5), (2, 16, 16), (1, 1, 1), (2, 2, 3)]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("n,h,w", SIZES)
@pytest.mark.parametrize("c", [1, 5, 8, 16, 24])  # 8, 24: the stems of alpha 0.25 and 0.75
def test_stem(n, h, w, c, stride):
    x, k, b = rand(n, h, w, 3), rand(3, 3, 3, c), rand(c)
    close(kernels.stem(x, k, b, stride), naive.conv3x3(x, k, b, stride))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("n,h,w", SIZES)
@pytest.mark.parametrize("c", [1, 3, 17, 129])  # 129: eight full vectors, then one masked lane
def test_depthwise(n, h, w, c, stride):
    # inputs in [0, 6] like ReLU6 activations, weights large enough to clip both ends
    x, k, b = rand(n, h, w, c, lo=0, hi=6), rand(3, 3, c, lo=-2, hi=2), rand(c)
    close(kernels.depthwise(x, k, b, stride), naive.depthwise(x, k, b, stride))


def test_stride2_pads_bottom_right_only():
    # A one-hot input at the top-left pixel: with SAME padding on an even size,
    # output (0, 0) sees input (0, 0) through the kernel's (0, 0) tap, not (1, 1).
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, 0, 0, 0] = 1
    k = np.arange(9, dtype=np.float32).reshape(3, 3, 1) / 10
    y = kernels.depthwise(x, k, np.zeros(1, np.float32), 2)
    assert y.shape == (1, 2, 2, 1)
    assert y[0, 0, 0, 0] == np.float32(0.0)  # k[0, 0]
    x[0, 0, 0, 0], x[0, 1, 1, 0] = 0, 1
    y = kernels.depthwise(x, k, np.zeros(1, np.float32), 2)
    assert y[0, 0, 0, 0] == np.float32(0.4)  # k[1, 1]: input (1, 1) is the window's centre


@pytest.mark.parametrize("n,h,w", SIZES)
@pytest.mark.parametrize("cin,cout", [(1, 1), (3, 7), (16, 33)])
def test_pointwise(n, h, w, cin, cout):
    x, wt, b = rand(n, h, w, cin, lo=0, hi=6), rand(cin, cout), rand(cout)
    close(kernels.pointwise(x, wt, b), naive.pointwise(x, wt, b), 1e-4)


MR = kernels.MR


@pytest.mark.parametrize("m", [1, MR - 1, MR, MR + 1, MR + MR // 2, 2 * MR + 1, 61])
# 300 x 200: panel by panel; 8, 24, 7 and 33: a last vector of at most half the lanes (unmasked at 8)
@pytest.mark.parametrize("k,n", [(1, 1), (27, 8), (27, 24), (5, 16), (3, 17), (2, 7), (64, 48), (300, 200)])
def test_gemm(m, k, n):
    # every row and column remainder of the micro-kernels, both loop orders;
    # a column range leaves the other columns untouched
    a, w, b = rand(m, k, lo=0, hi=6), rand(k, n), rand(n)
    y = np.full((m, n), np.nan, np.float32)
    kernels.gemm(a.ravel(), m, kernels.pack(w), b, y.ravel(), 0, n)
    close(y, naive.relu6(a.astype(np.float64) @ w + b), 1e-4)
    n0 = kernels.NR if n > kernels.NR else 0
    n1 = max(n0 + 1, n - 1)
    y[:] = np.nan
    kernels.gemm(a.ravel(), m, kernels.pack(w), b, y.ravel(), n0, n1)
    close(y[:, n0:n1], naive.relu6(a.astype(np.float64) @ w[:, n0:n1] + b[n0:n1]), 1e-4)
    assert np.isnan(y[:, :n0]).all() and np.isnan(y[:, n1:]).all()


@pytest.mark.parametrize("k,n", [(19, 2 * kernels.NR + 3), (300, 200), (27, 8)])
def test_gemm_every_row_count(k, n):
    # every count of rows of a product's last block (2 MR to 4 MR - 1, cut into tiles by PLAN) and of
    # products smaller than a block, every row written once: no row left out, none beyond m
    for m in range(1, 5 * MR):
        a, w, b = rand(m, k, lo=0, hi=6), rand(k, n), rand(n)
        y = np.full((m + 1) * n, np.nan, np.float32)
        kernels.gemm(a.ravel(), m, kernels.pack(w), b, y, 0, n)
        close(y[:m * n].reshape(m, n), naive.relu6(a.astype(np.float64) @ w + b), 1e-4)
        assert np.isnan(y[m * n:]).all(), m


def test_tile_plan_computes_the_fewest_rows():
    # the last rows of a product cut as PLAN says, against the fewest rows that any combination of the
    # tiles' heights covers them with (brute force); on AVX2 (6, 4 and 3) only 1, 2 and 5 rows compute more
    sizes = sorted({MR, kernels.MR_SHORT, max(1, MR // 2)})
    for rows in range(1, 4 * MR):
        cut = _cut(kernels.PLAN, rows)
        assert set(cut) <= set(sizes), rows
        fewest = min(sum(c) for t in range(1, rows + 2) for c in itertools.combinations_with_replacement(sizes, t)
                     if sum(c) >= rows)
        assert sum(cut) == fewest, (rows, cut)
    plan = kernels.tile_plan(6, 4)
    assert [r for r in range(1, 24) if sum(_cut(plan, r)) > r] == [1, 2, 5]
    assert sorted(_cut(plan, 13)) == [3, 4, 6]  # 49 rows (a 7 x 7 map): blocks of 12, 12, 12 and 13


def _cut(plan, rows):
    cut = []
    while rows > 0:
        cut.append(int(plan[rows]))
        rows -= cut[-1]
    return cut


@pytest.mark.parametrize("n,h,w,c", [(1, 1, 1, 1), (3, 7, 7, 5), (2, 4, 9, 33)])
def test_global_avg_pool(n, h, w, c):
    x = rand(n, h, w, c, lo=0, hi=6)
    close(kernels.global_avg_pool(x), naive.global_avg_pool(x))


@pytest.mark.parametrize("n,k,m", [(1, 1, 1), (3, 17, 5), (2, 64, 1000)])
def test_dense(n, k, m):
    x, w, b = rand(n, k), rand(k, m), rand(m)
    close(kernels.dense(x, w, b), naive.dense(x, w, b))
    # each row alone gives the same bits as in the batch
    np.testing.assert_array_equal(np.concatenate([kernels.dense(x[i:i + 1], w, b) for i in range(n)]),
                                  kernels.dense(x, w, b))


@pytest.mark.parametrize("n,k", [(1, 1), (3, 2), (4, 1000)])
def test_softmax(n, k):
    z = rand(n, k, lo=-30, hi=30)
    z[0, 0] = 1000  # would overflow without subtracting the maximum
    p = kernels.softmax(z)
    close(p, naive.softmax(z), 1e-6)
    assert np.all(np.isfinite(p))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="depthwise"):
        kernels.depthwise(rand(1, 4, 4, 3), rand(3, 3, 4), rand(4), 1)
    with pytest.raises(ValueError, match="float32"):
        kernels.pointwise(np.zeros((1, 2, 2, 3)), rand(3, 3), rand(3))


@pytest.mark.parametrize("h,w,stride", [(9, 10, 2), (7, 7, 1), (2, 3, 2)])
def test_stem_rows_in_the_smallest_tile(h, w, stride):
    # A tile of one output row's patches and outputs: bands of one row, the
    # pixels on the padding's side gathered, nothing written past the tile.
    x, k, b = rand(2, h, w, 3), rand(3, 3, 3, 8), rand(8)
    want = naive.conv3x3(x, k, b, stride)
    ho, wo = want.shape[1:3]
    y = np.full(want.size, np.nan, np.float32)
    room = np.full(wo * (27 + 8) + 64, np.nan, np.float32)
    kernels.stem_rows(x.ravel(), h, w, kernels.pack(k.reshape(27, 8)), b, stride, y, 0, 2 * ho, room[:wo * 35])
    close(y.reshape(want.shape), want)
    assert np.isnan(room[wo * 35:]).all()


def test_threads_is_numba_count_for_the_calling_thread():
    import threading

    import numba
    before = numba.get_num_threads()
    seen = []
    try:
        for n in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(n)
            seen.append((kernels.threads(), numba.get_num_threads()))
        numba.set_num_threads(1)
        other = threading.Thread(target=lambda: seen.append((kernels.threads(), numba.get_num_threads())))
        other.start()
        other.join()  # a thread's own count: the default, whatever this one set
    finally:
        numba.set_num_threads(before)
    assert seen == [(n, n) for n in range(1, numba.config.NUMBA_NUM_THREADS + 1)] + [
        (numba.config.NUMBA_NUM_THREADS,) * 2]


def test_packed_network_holds_each_layer_packed_and_aligned():
    # The views the fused pass takes of the one weight array are the layers' own packed arrays.
    c, blocks = 8, [(rand(3, 3, 8), rand(8), rand(8, 16), rand(16), 2),
                    (rand(3, 3, 16), rand(16), rand(16, 40), rand(40), 1)]
    stem = (rand(3, 3, 3, c), rand(c))
    packed = kernels.pack_network(stem, blocks)
    assert packed.weights.ctypes.data % 64 == 4 * kernels.SKEW and packed.table[0] == 2
    k0, b0 = kernels._stem_weights(packed.weights, packed.table)
    np.testing.assert_array_equal(k0, kernels.pack(stem[0].reshape(27, c)))
    np.testing.assert_array_equal(b0, stem[1])
    for j, (kd, bd, wp, bp, stride) in enumerate(blocks):
        got = kernels._block_weights(packed.weights, packed.table, j)
        for g, want in zip(got, (kernels.pack_depthwise(kd), bd, kernels.pack(wp), bp)):
            np.testing.assert_array_equal(g, want)
        assert got[4] == stride
