"""The fused forward pass, the public entry: weights packed once, buffers once per thread count, then passes.

Promises: network(x, packed, buffers, pooled, maps) runs the whole network
up to the pooled features (and the last feature maps) on threads() threads,
the same bits however the threads share the work; pack_network and
network_buffers make its weights and buffers; threads() is the thread
count a pass runs on.

    Packed, pack_network       every layer's packed weights in one array, and the table of where
    Buffers, network_buffers   activations, tiles and counters for T threads
    network                    one pass (checks the arrays the threads will read by address)
    threads                    numba.get_num_threads(), without its locks
"""
from collections import namedtuple

import numba
import numpy as np
from numba.np.ufunc import parallel as _numba_threads

from .config import SKEW, STACK, TILE
from .conv import pack_depthwise
from .crew import MAIL, _counters, _crew, _passes, _post
from .fused import (BLOCK_WORDS, BLOCKS, CIN, COUT, DW_BIAS, DW_BLOCKS, DW_KERNEL, HEAD, PW_BIAS, PW_KERNEL,
                    PW_PANELS, STEM_BIAS, STEM_C, STEM_K, STEM_KERNEL, STEM_PANELS, STRIDE)
from .product import pack


# ---------------------------------------------------------------------------
# Packed weights and buffers


Packed = namedtuple("Packed", "weights table")
Buffers = namedtuple("Buffers", "stack act tile counters table shapes")


def pack_network(stem, blocks):
    """A network's weights packed once for network(): Packed(weights, table).

    stem (kernel (3, 3, 3, C), bias (C,)); blocks: per depthwise-separable
    block (depthwise kernel (3, 3, C), its bias (C,), pointwise kernel
    (C, Cout), its bias (Cout,), depthwise stride), in order. weights: every
    layer's packed kernel and bias in one float32 array, each starting
    SKEW floats past a 64-byte boundary; table: where they lie (its
    layout: fused.py), int64.
    """
    kernel, bias = stem
    parts = [pack(np.ascontiguousarray(kernel, np.float32).reshape(27, -1)), np.ascontiguousarray(bias, np.float32)]
    for kd, bd, wp, bp, _ in blocks:
        parts += [pack_depthwise(np.asarray(kd, np.float32)), np.ascontiguousarray(bd, np.float32),
                  pack(np.asarray(wp, np.float32)), np.ascontiguousarray(bp, np.float32)]
    offsets = np.cumsum([0] + [-(-p.size // 16) * 16 for p in parts])
    space = np.zeros(offsets[-1] + 32, np.float32)
    weights = space[(-space.ctypes.data // 4) % 16 + SKEW:][:offsets[-1]]
    for p, o in zip(parts, offsets):
        weights[o:o + p.size] = p.ravel()
    table = np.zeros(HEAD + len(blocks) * BLOCK_WORDS, np.int64)
    table[BLOCKS] = len(blocks)
    table[STEM_KERNEL], (table[STEM_PANELS], table[STEM_K]) = offsets[0], parts[0].shape[:2]
    table[STEM_BIAS], table[STEM_C] = offsets[1], parts[1].size
    for j, (*_, stride) in enumerate(blocks):
        kd, bd, wp, bp = parts[2 + 4 * j:6 + 4 * j]
        o = offsets[2 + 4 * j:6 + 4 * j]
        e = HEAD + j * BLOCK_WORDS
        table[e + DW_KERNEL], table[e + DW_BLOCKS], table[e + DW_BIAS], table[e + CIN] = o[0], len(kd), o[1], bd.size
        table[e + PW_KERNEL], table[e + PW_PANELS], table[e + PW_BIAS], table[e + COUT] = o[2], len(wp), o[3], bp.size
        table[e + STRIDE] = stride
    return Packed(weights, table)


def network_buffers(packed, resolution, threads):
    """Buffers(stack, act (T, 2, S), tile (T, tile), counters, table, shapes): network()'s at this size on T threads.

    A stack is as many images as fit STACK floats of their largest
    activation (at least one); S holds a stack, or the images left over for
    the shared pass (fewer than the threads). counters: those of a pass,
    zeroed when it is posted. table: packed.table, the weights they are
    for; shapes: of one image's input, pooled features and last maps.
    """
    table = packed.table
    side, c = resolution // 2, table[STEM_C]
    largest, row = side * side * c, side * (27 + c)  # a row of the stem's patches and their outputs
    for j in range(table[BLOCKS]):
        e = HEAD + j * BLOCK_WORDS
        stride, cout = table[e + STRIDE], table[e + COUT]
        row = max(row, -(-side // stride) * c)
        side, c = -(-side // stride), cout
        largest = max(largest, side * side * c)
    stack = max(1, STACK // largest)
    return Buffers(stack, np.empty((threads, 2, largest * max(stack, threads - 1)), np.float32),
                   np.empty((threads, max(TILE, row)), np.float32), _counters(table[BLOCKS], threads), table,
                   ((resolution, resolution, 3), (c,), (side, side, c)))


# ---------------------------------------------------------------------------
# A pass


def network(x, packed, buffers, pooled, maps=None):
    """The whole network up to the pooled features: x (N, r, r, 3) float32 -> pooled (N, F), in place.

    With ``maps`` (N, s, s, F) float32, the last feature maps (s = r / 32)
    are written there too: what a class activation map needs, from the same
    pass. Every array C-contiguous.

    Whole images per thread, in stacks of up to ``buffers.stack`` images
    (so that the late layers' matrix products have enough rows), while there
    are at least as many images as threads: no synchronisation between
    layers. Then the images left over (a single image, mostly) shared by all
    the threads, layer by layer: a thread that finishes its part of a layer
    polls a counter for the others, no operating-system wake-up in between.
    One call at a time per ``buffers``. The threads take the arrays by
    address, so their shapes are checked here (ValueError).
    """
    if buffers.table is not packed.table:
        raise ValueError("network: these buffers were made for other weights (network_buffers(packed, ...))")
    n = len(x)
    checks = [("images", x, buffers.shapes[0]), ("pooled", pooled, buffers.shapes[1])]
    if maps is not None:
        checks.append(("maps", maps, buffers.shapes[2]))
    for name, a, shape in checks:
        if a.dtype != np.float32 or a.shape != (n, *shape) or not a.flags.c_contiguous:
            raise ValueError(f"network: {name} should be a C-contiguous float32 array of shape {(n, *shape)}, "
                             f"got {a.dtype} {a.shape}")
    threads = buffers.tile.shape[0]
    args = (x, x.shape[0], x.shape[1], buffers.stack, *packed, buffers.act, buffers.tile, pooled,
            _NO_MAPS if maps is None else maps, buffers.counters)
    if threads == 1:
        mail = np.zeros(MAIL, np.int64)
        _post(mail, 1, *args)
        _passes(0, mail, 0)
    else:
        _crew().run(threads, args)


_NO_MAPS = np.empty((0, 1, 1, 1), np.float32)


def threads():
    """numba.get_num_threads(): the thread count numba.set_num_threads() set for the calling thread.

    Numba's function takes two locks on every call, one of them shared
    between processes: 6 to 25 microseconds, a few percent of a small
    network's pass. Once Numba has started its threading layer, this reads
    the count from the layer directly.
    """
    if getattr(_numba_threads, "_is_initialized", False):
        read = getattr(_numba_threads, "_get_num_threads", None)
        if read is not None:
            return read()
    return numba.get_num_threads()
