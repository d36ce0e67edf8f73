"""The fused forward pass's compiled layers: a whole network on a stack of images, or a task of one layer.

Promises: where each layer's packed weights lie in Packed.weights (the
table's layout, and views of one layer's weights); _layer, a task of one
layer (0: the stem) on a stack of images, a C function called by name
(_call_layer) by both the whole stacks and the shared images; _stack, the
whole network on a stack; the pooling. forward.py packs the weights and
allocates; crew.py shares the work between threads.

    _block_rows, _block_cols          one depthwise-separable block: a band of rows, or a range of channels
    _pool_flat, _sums                 global average pooling, summed in float64
    BLOCKS, STEM_*, HEAD, DW_*, CIN, PW_*, COUT, STRIDE, BLOCK_WORDS   the table's layout
    _stem_weights, _block_weights     a layer's packed weights: views of Packed.weights
    _by_channels, _shared_tasks, _out_side   how a shared layer is split, and its output's side
    _layer, _call_layer               a task of one layer, a C function called by name
    _stack                            the whole network on a stack of images, serially
"""
import numpy as np
from numba import carray, cfunc, njit
from numba.extending import intrinsic

from .config import DW_LANES, FEW_PIXELS, GRAIN, JIT, NR, TASKS
from .conv import _call_depthwise_row, _call_stem_rows, same_padding
from .entry import C_FLAGS, FLAT, FLAT_INTS, INT, _address_of, _by_name, _call_entry, _doubles_at, c_signature
from .product import gemm


# ---------------------------------------------------------------------------
# One depthwise-separable block, and the pooling


@njit(inline="always", **JIT)
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
            _call_depthwise_row(x[t // ho * h * w * c:], h, w, kd, bd, t % ho, stride, top, left,
                                tile[(t - r0) * wo * c:], wo)
        gemm(tile, (r1 - r0) * wo, wp, bp, y[r0 * wo * cout:], np.int64(0), cout)


@njit(inline="always", **JIT)
def _block_cols(x, g, side, kd, bd, wp, bp, stride, y, n0, n1, tile):
    # One block on a stack of g images, output channels [n0, n1) only (n0 a
    # multiple of NR): the whole depthwise output in tile, then its
    # product with columns [n0, n1) of wp.
    c = wp.shape[1]
    ho, top = same_padding(side, stride)
    for t in range(g * ho):
        _call_depthwise_row(x[t // ho * side * side * c:], side, side, kd, bd, t % ho, stride, top, top,
                            tile[t * ho * c:], ho)
    gemm(tile, g * ho * ho, wp, bp, y, n0, n1)


@njit(inline="always", **JIT)
def _pool_flat(x, m, out, acc):
    # out (C,) = mean of the m pixels of x flat (m, C), summed in acc (C,) float64 (16 to 196 terms: exact
    # enough in float64 only) pixel after pixel: whole vectors of channels at a time, each channel's sum in
    # the pixels' order. (Channel after channel, a sum's adds wait for each other: 0.16 ms for 7 x 7 x 1024.)
    c = out.shape[0]
    for ci in range(c):
        acc[ci] = 0.0
    for i in range(m):
        for ci in range(c):
            acc[ci] += x[i * c + ci]
    for ci in range(c):
        out[ci] = acc[ci] / m


@njit(inline="always", **JIT)
def _sums(tile, c):
    # C float64 sums for _pool_flat in a thread's tile (float32), free once the last layer is done
    return carray(_doubles_at(tile.ctypes.data), c)


# ---------------------------------------------------------------------------
# The weights' table


# Where the fused pass's weights lie in Packed.weights: Packed.table (int64)
# holds HEAD words, then BLOCK_WORDS words per block, at e = HEAD + j BLOCK_WORDS
# for block j. Offsets are in floats from the start of Packed.weights.
BLOCKS = 0  # the number of depthwise-separable blocks
STEM_KERNEL, STEM_PANELS, STEM_K = 1, 2, 3  # the stem's packed kernel: offset, (panels, K = 27, NR)
STEM_BIAS, STEM_C = 4, 5  # its bias: offset, size (the stem's output channels)
HEAD = 6
DW_KERNEL, DW_BLOCKS = 0, 1  # block e's packed depthwise kernel: table[e + DW_KERNEL], (blocks, 9, DW_LANES)
DW_BIAS, CIN = 2, 3  # its bias: offset, size (the block's input channels)
PW_KERNEL, PW_PANELS = 4, 5  # the packed pointwise kernel: offset, (panels, C, NR)
PW_BIAS, COUT = 6, 7  # its bias: offset, size (the block's output channels)
STRIDE = 8  # the depthwise layer's stride
BLOCK_WORDS = 9


@njit(inline="always", **JIT)
def _stem_weights(weights, table):
    # the stem's packed kernel (panels, 27, NR) and its bias (C,): views of weights
    return (carray(_address_of(weights, table[STEM_KERNEL]), (table[STEM_PANELS], table[STEM_K], NR)),
            carray(_address_of(weights, table[STEM_BIAS]), table[STEM_C]))


@njit(inline="always", **JIT)
def _block_weights(weights, table, j):
    # block j's packed depthwise kernel (blocks, 9, DW_LANES), its bias (C,),
    # packed pointwise kernel (panels, C, NR), its bias (Cout,), and its stride
    e = HEAD + j * BLOCK_WORDS
    c = table[e + CIN]
    return (carray(_address_of(weights, table[e + DW_KERNEL]), (table[e + DW_BLOCKS], 9, DW_LANES)),
            carray(_address_of(weights, table[e + DW_BIAS]), c),
            carray(_address_of(weights, table[e + PW_KERNEL]), (table[e + PW_PANELS], c, NR)),
            carray(_address_of(weights, table[e + PW_BIAS]), table[e + COUT]), table[e + STRIDE])


# ---------------------------------------------------------------------------
# A stack of images through the network; how a shared layer is split


@njit(inline="always", **JIT)
def _stack(x, g, r, weights, table, act0, act1, tile, pooled, maps):
    # The whole network on a stack of g images, serially, layer by layer:
    # x flat (g, r, r, 3) -> pooled (g, F), and the last feature maps into
    # maps (flat (g, s, s, F)) unless it is empty. Activations alternate
    # between the flat buffers act0 and act1.
    side, src, dst = r, act1, act0
    for i in range(table[BLOCKS] + 1):
        _call_layer(i, np.int64(0), np.int64(1), src, side, g, r, weights, table, dst, tile, x)
        side, src, dst = _out_side(i, side, table), dst, src
    c = pooled.shape[1]
    if maps.size:
        for i in range(g * side * side * c):  # loops, not slice assignments: those are slow to compile
            maps[i] = src[i]
    for n in range(g):
        _pool_flat(src[n * side * side * c:], side * side, pooled[n], _sums(tile, c))


# Counters the threads of the fused pass share: a task is claimed by adding 1
# to a claim counter (the old value is the task's number) or to the task's
# own flag (0: it is ours), and counted done by adding 1 to a done counter.
# Sequentially consistent atomics: what a thread wrote before counting a
# task done is seen by every thread that sees the count. Their layout:


@njit(inline="always", **JIT)
def _by_channels(g, out, c, tile):
    # whether a shared layer of g images with out x out outputs from c channels is split by output channels
    return g * out * out < FEW_PIXELS and g * out * out * c <= tile.shape[0]


@njit(inline="always", **JIT)
def _shared_tasks(i, side, g, r, table, tile, threads):
    # How many tasks layer i (0: the stem) of the g shared images is split into.
    if i == 0:
        units = g * -(-r // 2)
        macs = units * -(-r // 2) * table[STEM_K] * table[STEM_PANELS] * NR
    else:
        e = HEAD + (i - 1) * BLOCK_WORDS
        out, panels, c = -(-side // table[e + STRIDE]), table[e + PW_PANELS], table[e + CIN]
        macs = g * out * out * (9 + panels * NR) * c
        units = panels if _by_channels(g, out, c, tile) else g * out
    return max(1, min(units, TASKS * threads, macs // GRAIN))


@njit(inline="always", **JIT)
def _out_side(i, side, table):
    # the side of layer i's output maps (0: the stem), from its input's
    return -(-side // 2) if i == 0 else -(-side // table[HEAD + (i - 1) * BLOCK_WORDS + STRIDE])


# ---------------------------------------------------------------------------
# A task of one layer, called by name


@cfunc(c_signature(INT, INT, INT, FLAT, INT, INT, INT, FLAT, FLAT_INTS, FLAT, FLAT, FLAT), **C_FLAGS)
def _layer(i, task, tasks, psrc, nsrc, side, g, r, pw, nw, ptable, nt, pdst, nd, ptile, ntile, px, nx):
    # Task `task` of `tasks` of layer i (0: the stem, from x) on a stack of g
    # images, side x side pixels each, src -> dst (flat): a band of output
    # rows, or a range of output channels where a layer split into several
    # tasks has few pixels (_by_channels). For the layers of whole stacks and
    # of the shared images alike: _call_layer(i, task, tasks, src, side, g, r,
    # weights, table, dst, tile, x).
    src, weights, table, dst = carray(psrc, nsrc), carray(pw, nw), carray(ptable, nt), carray(pdst, nd)
    tile, x = carray(ptile, ntile), carray(px, nx)
    if i == 0:
        k0, b0 = _stem_weights(weights, table)
        rows = g * -(-r // 2)
        _call_stem_rows(x, r, r, k0, b0, np.int64(2), dst, rows * task // tasks, rows * (task + 1) // tasks, tile)
        return
    kd, bd, wp, bp, stride = _block_weights(weights, table, i - 1)
    out = -(-side // stride)
    if tasks > 1 and _by_channels(g, out, wp.shape[1], tile):
        panels, cout = wp.shape[0], bp.shape[0]
        _block_cols(src, g, side, kd, bd, wp, bp, stride, dst, NR * (panels * task // tasks),
                    min(cout, NR * (panels * (task + 1) // tasks)), tile)
    else:
        _block_rows(src, side, side, kd, bd, wp, bp, stride, dst, g * out * task // tasks,
                    g * out * (task + 1) // tasks, tile)


_by_name("layer", _layer)


@intrinsic
def _call_layer(typingctx, i, task, tasks, src, side, g, r, weights, table, dst, tile, x):
    return _call_entry("layer", (i, task, tasks, src, side, g, r, weights, table, dst, tile, x))

