"""Numba kernels of the MobileNet v1 forward pass.

Every array is NHWC float32. A public function checks shapes and allocates;
a private ``@njit`` function does the work in explicit loops. The one-layer
kernels are Numba parallel loops over the outermost independent axis (batch
x output rows); the fused pass runs on the caller's and helper threads that
claim work with atomic counters (see ``_part``). Batch norm is folded
into the kernels and biases at conversion time (dsconv.weights), so each
convolution is conv + bias + ReLU6.

The two innermost loops are vector code written in LLVM IR: the
micro-kernel of the matrix products (pointwise layers, and the stem as
patches x kernel), ``gemm_block``, and one output row of the depthwise
convolution, ``depthwise_row``; their weights are packed once (``pack``,
``pack_depthwise``). The row kernels (``_*_row``, ``_*_rows``, on flat
buffers) serve both the one-layer public kernels (``stem``, ``depthwise``,
``pointwise``, ``global_avg_pool``, ``dense``, ``softmax``) and the fused
forward pass: ``pack_network`` packs a network's weights once,
``network_buffers`` allocates its activations once per thread count, and
``network`` runs the whole network, whole images per thread or one image
shared by the threads layer by layer.

Compiled once each: a Numba function that calls another links a copy of
the callee's code into its own and optimises and compiles it again, and
Numba's inliner copies every variable of the callee once per block. So the
product (``_product``), the stem's rows, the depthwise row, a layer of the
fused pass (``_layer``) and a thread's part of it (``_part``) are C functions
(``numba.cfunc``, cached, compiled as this module is imported) that the
others call by a name registered with LLVM (``_by_name``, ``_call_entry``); small helpers
with one caller are inlined into it.

Why one file: Numba's cache (``cache=True``) is keyed by the source file
of each cached function and is invalidated only when that file changes.
A cached kernel that inlined an intrinsic or a helper from another file
would keep running the old code after that other file is edited. So every
function the cached kernels call lives here.
"""
import os
import sys
import threading
from collections import namedtuple

import numba
import numpy as np
from llvmlite import binding, ir
from numba import carray, cfunc, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.ufunc import parallel as _numba_threads

# (For the one-layer kernels; the fused pass does not use OpenMP.) Numba's
# OpenMP threads wait at the end of every parallel loop. By default
# GNU OpenMP spins there for ~300000 iterations: when another process holds a
# core, the waiting thread burns its time slice and a 7 ms forward pass took
# 110 ms. Spinning 10000 iterations costs nothing measurable on an idle
# machine. Set before Numba starts its threads; a user's own setting wins. (No
# effect if GNU OpenMP is already loaded: PyTorch, imported first, brings one.)
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def tile_rows(env, host_features):
    """Rows MR of the matrix-product micro-kernel, whose tile is MR x NV vectors of accumulators.

    With AVX-512, 14 x 2: 28 of the 32 registers. Elsewhere a vector of
    LANES floats is two registers of 8 (AVX2, 16 of them) or four of 4
    (NEON, 32): 6 x 1 vector, AVX2's classic 6 x 16 tile, 12 registers of
    accumulators, two for the panel's row and one broadcast. (3 x 2 needed
    17 registers: the spills cost a third of the speed.) NV is 2 from 8
    rows up, else 1. The CPU is the one Numba compiles for (NUMBA_CPU_NAME
    and NUMBA_CPU_FEATURES when set, else the host's). DSCONV_MR overrides
    it (2 to 16), so that tests run either tile on any machine.
    """
    name = env.get("NUMBA_CPU_NAME", "host")
    features = host_features if name == "host" else env.get("NUMBA_CPU_FEATURES", "")
    mr = 14 if "+avx512f" in features else 6
    text = env.get("DSCONV_MR", "")
    if text:
        if text.isdigit() and 2 <= int(text) <= 16:
            return int(text)
        print(f"dsconv: warning: DSCONV_MR={text} is not a whole number from 2 to 16; using {mr}",
              file=sys.stderr)
    return mr


MR = tile_rows(os.environ, binding.get_host_cpu_features().flatten())
NV = 2 if MR >= 8 else 1

# One place for the JIT flags. fastmath stays off: the forward pass must match
# Keras to 1e-4, and reassociated sums would trade that for little speed. (The
# vector micro-kernels below use fused multiply-adds explicitly: one rounding
# per tap instead of two, sums still in order.) Numba's cache does not know
# MR, so a tile set by DSCONV_MR is compiled afresh rather than read from a
# cache of the other tile.
JIT = dict(cache=not os.environ.get("DSCONV_MR"), nogil=True, fastmath=False)


# Constant arguments to the functions below are passed as np.int64(...): a
# Python literal would compile a version of the callee of its own. A small
# helper is inlined (inline="always") into the function that uses it, so
# that it is compiled once, not once alone and once inside.


@njit(inline="always", **JIT)
def same_padding(size, stride):
    """TensorFlow "SAME" for a 3x3 window: (output size, padding before).

    The padding after is whatever remains, so stride 2 on an even size pads
    one row at the bottom only, and stride 1 pads one on each side.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + 3 - size, 0)
    return out, total // 2


# Tuning constants of the kernels below, in float32 elements unless said.
# Floats of depthwise output (or stem patches) each thread keeps for the matrix
# product that follows: 512 KB, a few rows, in L2 with the product's output.
TILE = 1 << 17
# Floats of activations per thread a stack of images may take (4 MB): small
# variants run several images per layer, for matrix products with more rows.
STACK = 1 << 20
# Stacks per thread the fused pass makes at least, where there are images
# enough, so that threads slowed by other work (image decoding, another
# process) take fewer of them.
STACKS = 4
# Output rows of one parallel task in the one-layer stem.
STEM_BAND = 8
# Rows of one parallel task in the one-layer pointwise product.
POINTWISE_ROWS = 256
# Mult-adds per task of a layer the threads share (the images left over
# when there are fewer than the threads: one image, mostly): about 5 to 50
# microseconds. A layer has at most TASKS per thread, each at least one row:
# one, so that each thread works on the same rows layer after layer (its own
# share first), in its own cache; 2 and 4 were 7-20% slower at batch 1.
GRAIN = 250_000
TASKS = 1
# Output pixels (of all images) below which a shared layer is split by output
# channels instead of rows: 7x7 maps yes, 14x14 no.
FEW_PIXELS = 64
# Floats past a 64-byte boundary where each layer's packed weights start. On
# the AVX2 EPYC, products whose weights stream from beyond L2 (a 4 x 4 map
# at 1024 channels) ran 11-18% faster with their panels half a cache line
# off (the whole pass at batch 1: 1.0-128 4-6%, 0.75-128 3-4%) for a reason
# not pinned down; 32 bytes keep AVX2's and NEON's vectors whole. None with
# AVX-512, whose 64-byte vectors would each straddle two lines.
SKEW = 0 if MR >= 8 else 8
# Polls of a counter before a waiting thread gives its core away (sched_yield)
# between polls: a few microseconds of spinning.
SPINS = 2000
# Polls (SPINS with the spin hint, then with sched_yield) a helper thread
# makes for the next pass before it sleeps until woken.
IDLE = SPINS + 1000

# ---------------------------------------------------------------------------
# The two innermost loops in explicit vector code. Numba has no vector types,
# and LLVM's auto-vectoriser gave the depthwise loop a fifth of what the
# hardware does, so these are written in LLVM IR through
# numba.extending.intrinsic and inlined into the @njit functions that call
# them. (They live in this file so that Numba's cache, keyed by this file's
# timestamp, is invalidated when they change.) LLVM compiles them for the
# host CPU: a vector of LANES = 16 floats is one AVX-512 register here, two
# AVX2 registers elsewhere. Both multiply-add with one rounding per tap
# (fused multiply-add) in the order a naive loop sums, add the bias last (as
# Keras adds batch norm after the convolution), clamp to [0, 6] and store
# masked where a row of channels ends mid-vector.

LANES = 16  # floats per vector of the matrix products
# Floats per vector of the depthwise rows: its nine taps stay in registers,
# 9 of AVX-512's 32 at 16 floats, but 18 of AVX2's 16 registers (NEON: 36 of
# 32), so 8 floats elsewhere.
DW_LANES = 16 if MR >= 8 else 8

F32, I1, I32, I64 = ir.FloatType(), ir.IntType(1), ir.IntType(32), ir.IntType(64)


class _IR:
    """The LLVM helpers both micro-kernels use, bound to one builder, on vectors of `lanes` floats."""

    def __init__(self, context, builder, signature, args, lanes=LANES):
        self.context, self.b, self.lanes = context, builder, lanes
        self.types, self.args = signature.args, args
        mod = builder.module
        vec, self.mask = ir.VectorType(F32, lanes), ir.VectorType(I1, lanes)
        self.vptr = vec.as_pointer()
        self.fma = cgutils.get_or_insert_function(mod, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{lanes}f32")
        self.mstore = cgutils.get_or_insert_function(
            mod, ir.FunctionType(ir.VoidType(), [vec, self.vptr, I32, self.mask]), f"llvm.masked.store.v{lanes}f32.p0")
        self.mload = cgutils.get_or_insert_function(
            mod, ir.FunctionType(vec, [self.vptr, I32, self.mask, vec]), f"llvm.masked.load.v{lanes}f32.p0")
        self.zero, self.six = ir.Constant(vec, [0.0] * lanes), ir.Constant(vec, [6.0] * lanes)

    def pointer(self, array, offset):
        """&array[offset] of argument number `array` (a float32 array), offset an i64 value."""
        data = self.context.make_array(self.types[array])(self.context, self.b, self.args[array]).data
        return self.b.gep(data, [offset])

    def at(self, pointer, offset):
        return self.b.gep(pointer, [offset if isinstance(offset, ir.Value) else ir.Constant(I64, offset)])

    def splat(self, value):
        vector = ir.VectorType(value.type, self.lanes)
        undef = ir.Constant(vector, ir.Undefined)
        return self.b.shuffle_vector(self.b.insert_element(undef, value, ir.Constant(I32, 0)), undef,
                                     ir.Constant(ir.VectorType(I32, self.lanes), [0] * self.lanes))

    def first(self, count):
        """The mask of lanes [0, count)."""
        return self.b.icmp_signed("<", ir.Constant(ir.VectorType(I64, self.lanes), list(range(self.lanes))),
                                  self.splat(count))

    def load(self, pointer, mask=None):
        p = self.b.bitcast(pointer, self.vptr)
        if mask is None:
            return self.b.load(p, align=4)
        return self.b.call(self.mload, [p, ir.Constant(I32, 4), mask, self.zero])

    def store_bias_relu6(self, acc, bias, pointer, mask):
        """pointer[:lanes] = min(max(acc + bias, 0), 6) where mask (everywhere if mask is None)."""
        b = self.b
        s = b.fadd(acc, bias)
        s = b.select(b.fcmp_ordered(">", s, self.zero), s, self.zero)
        s = b.select(b.fcmp_ordered("<", s, self.six), s, self.six)
        if mask is None:
            b.store(s, b.bitcast(pointer, self.vptr), align=4)
        else:
            b.call(self.mstore, [s, b.bitcast(pointer, self.vptr), ir.Constant(I32, 4), mask])

    def loop(self, start, stop, carried, body):
        """for i in range(start, stop): carried = body(i, carried); returns the final carried values."""
        b = self.b
        entry = b.block
        head, done = b.append_basic_block("loop"), b.append_basic_block("loop.done")
        b.cbranch(b.icmp_signed("<", start, stop), head, done)
        b.position_at_end(head)
        i = b.phi(I64)
        phis = [b.phi(v.type) for v in carried]
        new = body(i, phis)
        nxt = b.add(i, ir.Constant(I64, 1))
        end = b.block
        i.add_incoming(start, entry)
        i.add_incoming(nxt, end)
        for p, start, value in zip(phis, carried, new):
            p.add_incoming(start, entry)
            p.add_incoming(value, end)
        b.cbranch(b.icmp_signed("<", nxt, stop), head, done)
        b.position_at_end(done)
        out = []
        for start, value in zip(carried, new):
            p = b.phi(start.type)
            p.add_incoming(start, entry)
            p.add_incoming(value, end)
            out.append(p)
        return out


def gemm_block(mr, nv, lanes=LANES):
    """The intrinsic for an mr x (nv lanes) block of y = relu6(a @ w + b).

    kernel(a, a0, lda, seg, gap, w, w0, ldw, k, y, y0, ldy, b, b0, rows,
    cols): the block's first element is a[a0] (rows lda apart; a row's K
    elements in runs of seg, each gap after the previous one's start: a
    matrix product has seg = K, the stem's direct product the 3 rows of a
    3x3 window), row kk of its panel of w is w[w0 + kk ldw :], then y[y0]
    (rows ldy apart) and b[b0]; rows <= mr and cols <= nv lanes of the
    block are inside y. Per step of K: nv vectors of the panel, one float of
    each of the mr rows of a broadcast, mr nv fused multiply-adds into
    registers. Rows past `rows` re-read the last row of a and are not stored.
    """
    @intrinsic
    def kernel(typingctx, a, a0, lda, seg, gap, w, w0, ldw, k, y, y0, ldy, b, b0, rows, cols):
        def codegen(context, builder, signature, args):
            g = _IR(context, builder, signature, args, lanes)
            _, a0, lda, seg, gap, _, w0, ldw, k, _, y0, ldy, _, b0, rows, cols = args
            pa, pw, py, pb = g.pointer(0, a0), g.pointer(5, w0), g.pointer(9, y0), g.pointer(12, b0)
            last = builder.sub(rows, ir.Constant(I64, 1))
            row = [g.at(pa, builder.mul(builder.select(builder.icmp_signed("<", ir.Constant(I64, r), rows),
                                                       ir.Constant(I64, r), last), lda)) for r in range(mr)]

            def run(s, acc):  # the K steps [s seg, (s + 1) seg), at s gap in a's rows
                first, at = builder.mul(s, seg), builder.mul(s, gap)

                def step(q, acc):
                    panel = g.at(pw, builder.mul(builder.add(first, q), ldw))
                    wv = [g.load(g.at(panel, v * lanes)) for v in range(nv)]
                    new = []
                    for r in range(mr):
                        av = g.splat(builder.load(g.at(row[r], builder.add(at, q))))
                        new += [builder.call(g.fma, [av, wv[v], acc[r * nv + v]]) for v in range(nv)]
                    return new
                return g.loop(ir.Constant(I64, 0), seg, acc, step)

            acc = g.loop(ir.Constant(I64, 0), builder.sdiv(k, seg), [g.zero] * (mr * nv), run)

            def store(inside):  # masks per vector, or None: all columns inside (unmasked: faster)
                bias = [g.load(g.at(pb, v * lanes), inside and inside[v]) for v in range(nv)]
                for r in range(mr):
                    with builder.if_then(builder.icmp_signed("<", ir.Constant(I64, r), rows)):
                        out = g.at(py, builder.mul(ir.Constant(I64, r), ldy))
                        for v in range(nv):
                            g.store_bias_relu6(acc[r * nv + v], bias[v], g.at(out, v * lanes), inside and inside[v])

            full = builder.icmp_signed(">=", cols, ir.Constant(I64, nv * lanes))
            with builder.if_else(full) as (whole, part):
                with whole:
                    store(None)
                with part:
                    store([g.first(builder.sub(cols, ir.Constant(I64, v * lanes))) for v in range(nv)])
            return context.get_dummy_value()

        return types.void(a, a0, lda, seg, gap, w, w0, ldw, k, y, y0, ldy, b, b0, rows, cols), codegen

    return kernel


def depthwise_row(stride):
    """The intrinsic for one output row of the depthwise 3x3 convolution with this stride.

    kernel(x, h, w, c, k, b, iy, ix, lo, hi, wo, y): x flat (H, W, C) image,
    k = pack_depthwise(kernel), b (C,), y flat (Wo, C) output row. Output
    pixel ox takes the window whose top-left input pixel is (iy, ix + ox
    stride), DW_LANES channels at a time, each tap one load of the input and
    one of the kernel (the nine taps of DW_LANES channels contiguous in k, in
    L1). Pixels [lo, hi) have their window inside the image: they go two at
    a time, sharing the kernel's loads and the input columns their windows
    have in common. The others (and one left over inside) go one at a time
    and take the taps outside the image (the SAME padding) as zeros, which
    leaves the sum as if they were skipped. Channels past C are masked.
    """
    @intrinsic
    def kernel(typingctx, x, h, w, c, k, b, iy, ix, lo, hi, wo, y):
        def codegen(context, builder, signature, args):
            g = _IR(context, builder, signature, args, DW_LANES)
            _, h, w, c, _, _, iy, ix, lo, hi, wo, _ = args
            zero64, nine = ir.Constant(I64, 0), ir.Constant(I64, 9)
            none = ir.Constant(g.mask, [0] * DW_LANES)
            px, pk, pb, py = (g.pointer(i, zero64) for i in (0, 4, 5, 11))
            line = [g.at(px, builder.mul(builder.add(iy, ir.Constant(I64, ky)), builder.mul(w, c))) for ky in range(3)]
            blocks = builder.sdiv(builder.add(c, ir.Constant(I64, DW_LANES - 1)), ir.Constant(I64, DW_LANES))
            full = builder.sdiv(c, ir.Constant(I64, DW_LANES))

            def inside(v, size):
                return builder.and_(builder.icmp_signed(">=", v, zero64), builder.icmp_signed("<", v, size))

            rows = [inside(builder.add(iy, ir.Constant(I64, ky)), h) for ky in range(3)]

            def pixels(ox, n, border):
                # output pixels [ox, ox + n): input columns left + [0, (n - 1) stride + 3)
                left = builder.add(ix, builder.mul(ox, ir.Constant(I64, stride)))
                cols = [builder.add(left, ir.Constant(I64, j)) for j in range((n - 1) * stride + 3)]
                src = [[g.at(line[ky], builder.mul(col, c)) for col in cols] for ky in range(3)]
                valid = [[builder.and_(rows[ky], inside(col, w)) for col in cols] for ky in range(3)]
                out = g.at(py, builder.mul(ox, c))

                def block(i, tail):
                    # channels [c0, c0 + DW_LANES): all inside unless tail (then masked; loads and stores
                    # without a mask are the fast ones, AMD's masked stores especially)
                    c0 = builder.mul(i, ir.Constant(I64, DW_LANES))
                    channels = g.first(builder.sub(c, c0)) if tail else None
                    taps_at = g.at(pk, builder.mul(c0, nine))
                    taps = [g.load(g.at(taps_at, t * DW_LANES)) for t in range(9)]  # packed with zeros to whole blocks
                    inputs = {}
                    for p in range(n):
                        acc = g.zero
                        for ky in range(3):
                            for kx in range(3):
                                j = p * stride + kx
                                if (ky, j) not in inputs:
                                    if border and channels is None:
                                        # a tap outside the image: zero, from an unmasked load of the
                                        # kernel instead (masked loads are slow on AMD)
                                        where = builder.select(valid[ky][j], g.at(src[ky][j], c0), taps_at)
                                        inputs[ky, j] = builder.select(valid[ky][j], g.load(where), g.zero)
                                    else:
                                        mask = channels
                                        if border:
                                            mask = builder.select(valid[ky][j], channels, none)
                                        inputs[ky, j] = g.load(g.at(src[ky][j], c0), mask)
                                acc = builder.call(g.fma, [inputs[ky, j], taps[3 * ky + kx], acc])
                        g.store_bias_relu6(acc, g.load(g.at(pb, c0), channels),
                                           g.at(out, builder.add(builder.mul(ir.Constant(I64, p), c), c0)), channels)
                    return []

                g.loop(zero64, full, [], lambda i, _: block(i, False))
                with builder.if_then(builder.icmp_signed("<", full, blocks)):
                    block(full, True)
                return []

            two = ir.Constant(I64, 2)
            pairs = builder.sdiv(builder.sub(hi, lo), two)
            skip = builder.mul(pairs, two)  # the pairs are [lo, lo + skip)
            g.loop(zero64, pairs, [], lambda i, _: pixels(builder.add(lo, builder.mul(i, two)), 2, False))
            # The others, [0, lo) and [lo + skip, wo) (at most one left over inside, then the right border),
            # one at a time in one loop: its code is compiled once.
            g.loop(zero64, builder.sub(wo, skip), [], lambda i, _: pixels(
                builder.select(builder.icmp_signed("<", i, lo), i, builder.add(i, skip)), 1, True))
            return context.get_dummy_value()

        return types.void(x, h, w, c, k, b, iy, ix, lo, hi, wo, y), codegen

    return kernel


_depthwise_s1, _depthwise_s2 = depthwise_row(1), depthwise_row(2)


# Columns per packed panel of a matrix product's weights: one micro-kernel's
# width (NV vectors), so that a micro-kernel reads its weights as one
# contiguous stream, every cache line whole (AVX2: 16 columns, 64 bytes per
# step of K). Panels of two 16-column vectors, of which each micro-kernel
# read every other half, were 1-4% slower on the whole pass (AVX2 EPYC).
NR = NV * LANES


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


def pack_depthwise(k):
    """k (3, 3, C) -> (blocks, 9, DW_LANES) float32: block b holds the nine taps of channels b DW_LANES onwards."""
    c = k.shape[2]
    blocks = -(-c // DW_LANES)
    padded = np.zeros((9, blocks * DW_LANES), np.float32)
    padded[:, :c] = k.reshape(9, c)
    return np.ascontiguousarray(padded.reshape(9, blocks, DW_LANES).transpose(1, 0, 2))


_wide = gemm_block(MR, NV)  # MR x NV LANES
# For the last rows of a product (a tile costs its full height, whatever
# rows it has): tiles of MR // 2 and MR - 2 rows (MR // 2 only below 5), so
# that as few rows as can be are computed for nothing: on AVX2 (6, 4 and 3)
# none from 3 rows up but 5; 49 rows, a 7 x 7 map, are 6 x 7 + 4 + 3, where
# 6 x 8 + a tile of 3 for the last row took 4% longer. (AVX-512: 14, 12, 7.)
_half = gemm_block(max(1, MR // 2), NV)
THIRD = MR - 2 if MR >= 5 else MR // 2
_third = gemm_block(THIRD, NV)


def tile_plan(mr, third):
    """plan[R]: the height of the first tile for R rows, cut into tiles of mr, third and mr // 2 rows.

    The fewest rows computed (the last tile may stick out), then the fewest
    tiles; R < 4 mr (the last block of a product, see _product).
    """
    sizes = sorted({mr, third, max(1, mr // 2)}, reverse=True)
    best, plan = [(0, 0)], [0]
    for rows in range(1, 4 * mr):
        options = [((s, 1) if s >= rows else (s + best[rows - s][0], 1 + best[rows - s][1]), s) for s in sizes]
        cost, size = min(options)
        best.append(cost)
        plan.append(size)
    return np.array(plan, np.int64)


PLAN = tile_plan(MR, THIRD)
_narrow = gemm_block(2 * MR, 1)  # 2 MR x LANES, for panels with at most LANES columns used (NV = 2)
# 2 MR x LANES / 2, for a last vector of at most LANES / 2 columns (NV = 1): the
# stem's 8 or 24 channels at alpha 0.25 or 0.75 take half the multiply-adds
# and, at exactly 8, an unmasked store (AMD's masked stores are slow).
_halfv = gemm_block(2 * MR, 1, LANES // 2)

# B (K x columns) floats up to which the product goes row block by row block,
# all panels for each (the block of a stays in L1); above, panel by panel
# (each panel stays in L2 while every row block passes).
SMALL_B = 1 << 15


# Functions compiled once, as C functions that the others call by name.
# A Numba function that calls another links a copy of the callee's code into
# its own and optimises and compiles it again: the products' and depthwise
# rows' vector code was compiled six and four times over (gemm, _stem_rows,
# _block_rows, _block_cols, the fused pass), and the first process took
# 20 s. Called by name, each is compiled once; a call costs nanoseconds, once
# per band of a product, row of a depthwise layer, or task of a layer. Their
# names (this module's name + their own) are registered with LLVM as this
# module is imported, before anything that calls them is compiled or read
# from the cache (_by_name). Arrays go as their data pointer and sizes (_call_entry):
# the C function makes its views of them (carray).

_FLOATS, _INTS, _INT = types.CPointer(types.float32), types.CPointer(types.int64), types.int64
_ENTRY = dict(cache=JIT["cache"], error_model="numpy")  # no division by zero to check for, and nothing to raise


def _by_name(name, function):
    """Registers the C function (a numba.cfunc) with LLVM as this module's name + name, for _call_entry."""
    binding.add_symbol(f"{__name__}.{name}", function.address)


def _call_entry(name, args):
    """An intrinsic's signature and code: a call of the C function registered as `name` (_by_name).

    An array argument goes as its data pointer and its size (1-d) or its
    first two sizes (3-d, the packed weights), any other as an int64.
    """
    for ty in args:
        if isinstance(ty, types.Array) and (ty.dtype not in (types.float32, types.int64) or ty.layout != "C"
                                            or ty.ndim not in (1, 3)):
            raise numba.core.errors.TypingError(f"{name}: arrays must be C-contiguous float32 or int64, 1-d or 3-d;"
                                                f" got {ty}")

    def codegen(context, builder, signature, args):
        values = []
        for ty, value in zip(signature.args, args):
            if isinstance(ty, types.Array):
                a = context.make_array(ty)(context, builder, value)
                values += [a.data, a.nitems] if ty.ndim == 1 else [a.data, *cgutils.unpack_tuple(builder, a.shape)[:2]]
            else:
                values.append(context.cast(builder, value, ty, types.int64))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [v.type for v in values]),
                                            f"{__name__}.{name}")
        builder.call(fn, values)
        return context.get_dummy_value()

    return types.void(*args), codegen


@intrinsic
def _address_of(typingctx, array, index):
    # &array[index], as numba.carray takes it: views without slicing and reshaping, which compile to more code
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.gep(data, [context.cast(builder, args[1], signature.args[1], types.int64)])

    return types.CPointer(array.dtype)(array, index), codegen


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
            _narrow(a, ar, lda, seg, gap, wp, w0, NR, k, y, yr, n, b, j0, min(2 * MR, rows), cols)
            r += 2 * MR
        elif NV == 1 and cols <= LANES // 2:
            _halfv(a, ar, lda, seg, gap, wp, w0, NR, k, y, yr, n, b, j0, min(2 * MR, rows), cols)
            r += 2 * MR
        else:
            size = PLAN[rows]
            if size == MR:
                _wide(a, ar, lda, seg, gap, wp, w0, NR, k, y, yr, n, b, j0, min(MR, rows), cols)
            elif size == THIRD:
                _third(a, ar, lda, seg, gap, wp, w0, NR, k, y, yr, n, b, j0, min(THIRD, rows), cols)
            else:
                _half(a, ar, lda, seg, gap, wp, w0, NR, k, y, yr, n, b, j0, min(size, rows), cols)
            r += size


@cfunc(types.void(_FLOATS, _INT, _INT, _INT, _INT, _INT, _INT, _FLOATS, _INT, _INT, _FLOATS, _INT, _FLOATS, _INT,
                  _INT, _INT, _INT), **_ENTRY)
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


def _check(x, name, ndim):
    if x.dtype != np.float32 or x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d float32 array, got {x.ndim}-d {x.dtype}")
    return np.ascontiguousarray(x)


@cfunc(types.void(_FLOATS, _INT, _INT, _INT, _FLOATS, _INT, _INT, _FLOATS, _INT, _INT, _FLOATS, _INT, _INT, _INT,
                  _FLOATS, _INT), **_ENTRY)
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


@cfunc(types.void(_FLOATS, _INT, _INT, _INT, _FLOATS, _INT, _INT, _FLOATS, _INT, _INT, _INT, _INT, _INT, _FLOATS,
                  _INT, _INT), **_ENTRY)
def _depthwise_row_entry(x, nx, h, w, k, blocks, taps, b, c, oy, stride, top, left, y, ny, wo):
    _depthwise_row(carray(x, nx), h, w, carray(k, (blocks, taps, DW_LANES)), carray(b, c), oy, stride, top, left,
                   carray(y, ny), wo)


_by_name("depthwise_row", _depthwise_row_entry)


@intrinsic
def _call_depthwise_row(typingctx, x, h, w, k, b, oy, stride, top, left, y, wo):
    return _call_entry("depthwise_row", (x, h, w, k, b, oy, stride, top, left, y, wo))


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


# Where the fused pass's weights lie in Packed.weights: Packed.table holds
# the number of blocks, then the stem's kernel offset, panels and K, and
# bias offset and size (HEAD words in all), then ENTRY words per block:
# depthwise kernel offset and blocks of DW_LANES channels, bias offset and
# size, pointwise kernel offset and panels, bias offset and size, stride.
HEAD, ENTRY, COUT, STRIDE = 6, 9, 7, 8  # COUT, STRIDE: where in a block's entry


@njit(inline="always", **JIT)
def _stem_weights(weights, table):
    # the stem's packed kernel (panels, 27, NR) and its bias (C,): views of weights
    return carray(_address_of(weights, table[1]), (table[2], table[3], NR)), carray(_address_of(weights, table[4]),
                                                                                   table[5])


@njit(inline="always", **JIT)
def _block_weights(weights, table, j):
    # block j's packed depthwise kernel (blocks, 9, DW_LANES), its bias (C,),
    # packed pointwise kernel (panels, C, NR), its bias (Cout,), and its stride
    e = HEAD + j * ENTRY
    c = table[e + 3]
    return (carray(_address_of(weights, table[e]), (table[e + 1], 9, DW_LANES)),
            carray(_address_of(weights, table[e + 2]), c),
            carray(_address_of(weights, table[e + 4]), (table[e + 5], c, NR)),
            carray(_address_of(weights, table[e + 6]), table[e + COUT]), table[e + STRIDE])


@njit(inline="always", **JIT)
def _stack(x, g, r, weights, table, act0, act1, tile, pooled, maps):
    # The whole network on a stack of g images, serially, layer by layer:
    # x flat (g, r, r, 3) -> pooled (g, F), and the last feature maps into
    # maps (flat (g, s, s, F)) unless it is empty. Activations alternate
    # between the flat buffers act0 and act1.
    side, src, dst = r, act1, act0
    for i in range(table[0] + 1):
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
# stacks claimed and done, then per shared layer (stem and blocks) a done
# count and TASKS T claim flags, then the pooling's claims, then the helper
# threads that have finished their part (the last).


def _counters(blocks, threads):
    """Zeroed counters of one fused pass of a network with this many blocks, on T threads."""
    return np.zeros(_layer_counters.py_func(blocks + 1, threads) + 2, np.int64)  # (plain Python: nothing to compile)


@njit(inline="always", **JIT)
def _layer_counters(i, threads):
    # index of shared layer i's done count, its claim flags following; "layer" blocks + 1: the pooling's claims
    return 2 + i * (TASKS * threads + 1)


@intrinsic
def _atomic_add(typingctx, counters, index, value):
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i = context.cast(builder, args[1], signature.args[1], types.int64)
        v = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", builder.gep(data, [i]), v, "seq_cst")

    return types.int64(counters, index, value), codegen


@intrinsic
def _atomic_load(typingctx, counters, index):
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i = context.cast(builder, args[1], signature.args[1], types.int64)
        return builder.load_atomic(builder.gep(data, [i]), "seq_cst", 8)

    return types.int64(counters, index), codegen


@intrinsic
def _relax(typingctx, spins):
    """A spin-wait's pause: the CPU's spin hint (x86 PAUSE) up to SPINS polls, then sched_yield()."""
    def codegen(context, builder, signature, args):
        mod = builder.module
        with builder.if_else(builder.icmp_signed("<", args[0], ir.Constant(I64, SPINS))) as (spin, give):
            with spin:
                if binding.get_process_triple().startswith(("x86_64", "i686", "i386")):
                    builder.call(cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), []),
                                                                "llvm.x86.sse2.pause"), [])
            with give:
                builder.call(cgutils.get_or_insert_function(mod, ir.FunctionType(I32, []), "sched_yield"), [])
        return context.get_dummy_value()

    return types.void(spins), codegen


@njit(inline="always", **JIT)
def _wait(counters, index, target):
    # until counters[index] reaches target
    spins = 0
    while _atomic_load(counters, index) < target:
        _relax(spins)
        spins += 1


@njit(inline="always", **JIT)
def _by_channels(g, out, c, tile):
    # whether a shared layer of g images with out x out outputs from c channels is split by output channels
    return g * out * out < FEW_PIXELS and g * out * out * c <= tile.shape[0]


@njit(inline="always", **JIT)
def _shared_tasks(i, side, g, r, table, tile, threads):
    # How many tasks layer i (0: the stem) of the g shared images is split into.
    if i == 0:
        units = g * -(-r // 2)
        macs = units * -(-r // 2) * table[3] * table[2] * NR
    else:
        e = HEAD + (i - 1) * ENTRY
        out, panels, c = -(-side // table[e + STRIDE]), table[e + 5], table[e + 3]
        macs = g * out * out * (9 + panels * NR) * c
        units = panels if _by_channels(g, out, c, tile) else g * out
    return max(1, min(units, TASKS * threads, macs // GRAIN))


@njit(inline="always", **JIT)
def _out_side(i, side, table):
    # the side of layer i's output maps (0: the stem), from its input's
    return -(-side // 2) if i == 0 else -(-side // table[HEAD + (i - 1) * ENTRY + STRIDE])


@cfunc(types.void(_INT, _INT, _INT, _FLOATS, _INT, _INT, _INT, _INT, _FLOATS, _INT, _INTS, _INT, _FLOATS, _INT,
                  _FLOATS, _INT, _FLOATS, _INT), **_ENTRY)
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


# The fused forward pass: its packed weights, its buffers, and the one entry.

Packed = namedtuple("Packed", "weights table")
Buffers = namedtuple("Buffers", "stack act tile counters table shapes")


def pack_network(stem, blocks):
    """A network's weights packed once for network(): Packed(weights, table).

    stem (kernel (3, 3, 3, C), bias (C,)); blocks: per depthwise-separable
    block (depthwise kernel (3, 3, C), its bias (C,), pointwise kernel
    (C, Cout), its bias (Cout,), depthwise stride), in order. weights: every
    layer's packed kernel and bias in one float32 array, each starting
    SKEW floats past a 64-byte boundary; table: where they lie (see
    _stem_weights), int64.
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
    table = [len(blocks), offsets[0], *parts[0].shape[:2], offsets[1], parts[1].size]
    for j, (*_, stride) in enumerate(blocks):
        kd, bd, wp, bp = parts[2 + 4 * j:6 + 4 * j]
        o = offsets[2 + 4 * j:6 + 4 * j]
        table += [o[0], kd.shape[0], o[1], bd.size, o[2], wp.shape[0], o[3], bp.size, stride]
    return Packed(weights, np.array(table, np.int64))


def network_buffers(packed, resolution, threads):
    """Buffers(stack, act (T, 2, S), tile (T, tile), counters, table, shapes): network()'s at this size on T threads.

    A stack is as many images as fit STACK floats of their largest
    activation (at least one); S holds a stack, or the images left over for
    the shared pass (fewer than the threads). counters: those of a pass,
    zeroed when it is posted. table: packed.table, the weights they are
    for; shapes: of one image's input, pooled features and last maps.
    """
    table = packed.table
    side, c = resolution // 2, table[5]
    largest, row = side * side * c, side * (27 + c)  # a row of the stem's patches and their outputs
    for j in range(table[0]):
        e = HEAD + j * ENTRY
        stride, cout = table[e + STRIDE], table[e + COUT]
        row = max(row, -(-side // stride) * c)
        side, c = -(-side // stride), cout
        largest = max(largest, side * side * c)
    stack = max(1, STACK // largest)
    return Buffers(stack, np.empty((threads, 2, largest * max(stack, threads - 1)), np.float32),
                   np.empty((threads, max(TILE, row)), np.float32), _counters(table[0], threads), table,
                   ((resolution, resolution, 3), (c,), (side, side, c)))


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


# A pass as the threads take it: mail[0] is its number, counted up by
# _post after it wrote the pass's thread count and sizes and its arrays'
# addresses in the words after. Every thread, the caller's included, makes
# its views of the arrays from there (_part, in _passes): a call unboxes one array, not
# sixty, and a helper runs pass after pass without leaving compiled code
# (no GIL to take back between passes). The arrays stay alive because the
# caller holds them until every helper has finished.
MAIL = 21


def _pointer(dtype):
    """An intrinsic: an address (int64) -> a pointer to dtype, as numba.carray takes it."""
    @intrinsic
    def at(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return types.CPointer(dtype)(types.int64), codegen

    return at


_floats_at, _ints_at, _doubles_at = _pointer(types.float32), _pointer(types.int64), _pointer(types.float64)


@njit(**JIT)
def _post(mail, threads, x, n_img, r, stack, weights, table, act, tile, pooled, maps, counters):
    # Describes a pass in mail, then counts up its number: a thread that sees the number sees the rest.
    for i in range(counters.size):
        counters[i] = 0
    mail[1], mail[2], mail[3], mail[4] = threads, n_img, r, stack
    mail[5], mail[6] = x.ctypes.data, x.size
    mail[7], mail[8] = weights.ctypes.data, weights.size
    mail[9], mail[10] = table.ctypes.data, table.size
    mail[11], mail[12] = act.ctypes.data, act.shape[2]
    mail[13], mail[14] = tile.ctypes.data, tile.shape[1]
    mail[15], mail[16] = pooled.ctypes.data, pooled.shape[1]
    mail[17], mail[18] = maps.ctypes.data, maps.size
    mail[19], mail[20] = counters.ctypes.data, counters.size
    _atomic_add(mail, 0, 1)


@njit(inline="always", **JIT)
def _pass_counters(mail):
    # the counters of the pass posted in mail: the last one counts the helpers that have finished their part
    return carray(_ints_at(mail[19]), mail[20])


@njit(**JIT)
def _join(mail):
    # The caller's wait for the helpers' parts of the pass in mail: they may
    # still read the buffers after the last task is done.
    counters = _pass_counters(mail)
    _wait(counters, counters.size - 1, mail[1] - 1)


@cfunc(types.void(_INT, _INTS, _INT), **_ENTRY)
def _part(t, words, size):
    # Thread t's part of the fused pass posted in the mail array at words
    # (_post), whose arrays it makes its views of: x flat (N, r, r, 3) -> pooled (N, F),
    # T = len(tile) threads in all: first the W = N - N mod T images that go
    # whole, in stacks of up to `stack`, each thread its stack on its own
    # buffers act[t] and tile[t] (no synchronisation between layers); then
    # the images left over, layer by layer, every layer split into tasks
    # (bands of rows, or ranges of output channels) on act[0]. Any thread
    # claims any task and a layer waits only for the previous one's tasks to
    # be done, so the pass completes however the threads are scheduled, even
    # one after another. maps: the last feature maps, flat (N, s, s, F), or
    # empty. counters: _counters(blocks, T).
    mail = carray(words, size)
    threads, n_img, r, stack = mail[1], mail[2], mail[3], mail[4]
    x = carray(_floats_at(mail[5]), mail[6])
    weights, table = carray(_floats_at(mail[7]), mail[8]), carray(_ints_at(mail[9]), mail[10])
    act = carray(_floats_at(mail[11]), (threads, 2, mail[12]))
    tile = carray(_floats_at(mail[13]), (threads, mail[14]))
    pooled = carray(_floats_at(mail[15]), (n_img, mail[16]))
    maps = carray(_floats_at(mail[17]), mail[18])
    counters = _pass_counters(mail)
    size = r * r * 3
    per_map = maps.size // max(n_img, 1)  # s s F, or 0
    whole = n_img - n_img % threads
    # At most `stack` images each, at least STACKS per thread where there are images enough (a thread
    # that another process slows takes fewer), a multiple of T of them: equal shares.
    stacks = max(-(-whole // stack), min(whole, STACKS * threads))
    stacks = -(-stacks // threads) * threads
    g = n_img - whole
    while True:
        s = _atomic_add(counters, 0, 1)
        if s >= stacks:
            break
        n0, n1 = whole * s // stacks, whole * (s + 1) // stacks
        _stack(x[n0 * size:n1 * size], n1 - n0, r, weights, table, act[t, 0], act[t, 1], tile[t], pooled[n0:n1],
               maps[n0 * per_map:n1 * per_map])
        _atomic_add(counters, 1, 1)
    if g == 0:
        return
    _wait(counters, np.int64(1), stacks)  # act[0] is free
    a, b = act[0, 0], act[0, 1]
    side = r
    blocks = table[0]
    for i in range(blocks + 1):
        src, dst = (a, b) if i % 2 else (b, a)
        tasks = _shared_tasks(i, side, g, r, table, tile[t], threads)
        base = _layer_counters(i, threads)
        first = t * tasks // threads
        for j in range(tasks):
            task = (first + j) % tasks  # its own share first (the rows it made last layer), then the others'
            if _atomic_add(counters, base + 1 + task, 1) == 0:
                _call_layer(i, task, tasks, src, side, g, r, weights, table, dst, tile[t], x[whole * size:])
                _atomic_add(counters, base, 1)
        _wait(counters, base, tasks)
        side = _out_side(i, side, table)
    last = a if blocks % 2 == 0 else b
    c = pooled.shape[1]
    while True:
        n = _atomic_add(counters, _layer_counters(blocks + 1, threads), 1)  # the pooling's claims
        if n >= g:
            break
        m = side * side * c
        if per_map:
            for i in range(m):
                maps[(whole + n) * m + i] = last[n * m + i]
        _pool_flat(last[n * m:], side * side, pooled[whole + n], _sums(tile[t], c))


_by_name("part", _part)


@intrinsic
def _call_part(typingctx, t, mail):
    return _call_entry("part", (t, mail))


@njit(**JIT)
def _passes(t, mail, done):
    # Thread t's parts of fused passes (_part), for both roles. The caller's thread (t = 0) runs
    # its part of the pass posted in mail and returns. A helper runs its part
    # of each pass as soon as it is posted, until none comes for IDLE polls
    # (spin hints, then sched_yield), and returns the number of the last pass
    # it saw. It takes part in a pass of more than t threads; a pass whose
    # number moved on while it read the thread count was not one (the caller
    # waits for every helper of its pass).
    while True:
        if t > 0:
            spins = 0
            while _atomic_load(mail, 0) <= done and spins < IDLE:
                _relax(spins)
                spins += 1
            number = _atomic_load(mail, 0)
            if number <= done:
                return done
            threads = _atomic_load(mail, 1)
            if _atomic_load(mail, 0) != number:
                continue
            done = number
            if t >= threads:
                continue
        _call_part(t, mail)
        if t == 0:
            return done
        counters = _pass_counters(mail)
        _atomic_add(counters, counters.size - 1, 1)  # this helper's part is finished (_join)


class _Crew:
    """The threads besides the caller's that run the fused pass, kept from call to call.

    A helper runs passes in compiled code as they are posted, and after a
    pass polls for the next one for a while (IDLE polls, mostly
    sched_yield: a fraction of a millisecond) before it sleeps on a
    condition: back-to-back passes, batch 1 especially, start without an
    operating-system wake-up (a thread pool's round trip was 80
    microseconds, a tenth of a small network's pass). Helper t runs its part
    of every pass of more than t threads. Daemon threads: idle, they do not
    keep the process alive.
    """

    def __init__(self):
        self.n = 0  # helpers started
        self.mail = np.zeros(MAIL, np.int64)  # the pass posted last (_post)
        self.posted = threading.Condition()
        self.lock = threading.Lock()  # one pass at a time: callers in several threads take turns

    def run(self, threads, args):
        """One fused pass (args: _post's after the thread count) on the caller's thread and helpers 1 .. threads - 1."""
        with self.lock:
            while self.n < threads - 1:
                self.n += 1
                threading.Thread(target=self._helper, args=(self.n,), name=f"dsconv-network-{self.n}",
                                 daemon=True).start()
            number = self.mail[0] + 1
            try:
                with self.posted:
                    _post(self.mail, threads, *args)
                    self.posted.notify_all()
                _passes(0, self.mail, 0)
            finally:  # the buffers are not free before every helper has finished, even on Ctrl-C
                if self.mail[0] == number:  # (the helpers complete the pass: any thread takes any task)
                    _join(self.mail)

    def _helper(self, t):
        done = 0  # the number of the last pass this helper saw
        while True:
            done = _passes(t, self.mail, done)
            with self.posted:
                while self.mail[0] <= done:
                    self.posted.wait()


_crews = {}  # per process: a forked child inherits the parent's crew but none of its threads


def _crew():
    """This process's crew."""
    crew = _crews.get(os.getpid())
    if crew is None:
        crew = _crews[os.getpid()] = _Crew()
    return crew


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
