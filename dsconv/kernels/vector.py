"""The two innermost loops in explicit vector code: LLVM IR builders for Numba intrinsics.

Promises: gemm_block(mr, nv, lanes), the intrinsic of an mr x (nv vectors)
block of relu6(a @ w + b), the matrix products' micro-kernel; and
depthwise_row(stride), the intrinsic of one output row of the depthwise 3x3
convolution. Both multiply-add with one rounding per tap (fused
multiply-add) in the order a naive loop sums, add the bias last (as Keras
adds batch norm after the convolution), clamp to [0, 6] and store masked
where a row of channels ends mid-vector.

    F32, I1, I32, I64   LLVM types
    _IR                 the LLVM helpers both micro-kernels use (loads, masks, fma, loops), bound to a builder
    gemm_block          the matrix product's micro-kernel (product.py makes its five tiles)
    depthwise_row       one output row of the depthwise convolution (conv.py calls it)

Numba has no vector types, and LLVM's auto-vectoriser gave the depthwise
loop a fifth of what the hardware does, so these are written in LLVM IR
through numba.extending.intrinsic and inlined into the functions that call
them (in other files: cache.py keeps their cached code current). LLVM
compiles them for the CPU Numba targets: a vector of LANES = 16 floats is
one AVX-512 register, two AVX2 registers elsewhere.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .config import DW_LANES, LANES

F32, I1, I32, I64 = ir.FloatType(), ir.IntType(1), ir.IntType(32), ir.IntType(64)


# ---------------------------------------------------------------------------
# LLVM helpers


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


# ---------------------------------------------------------------------------
# The matrix product's micro-kernel


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


# ---------------------------------------------------------------------------
# One output row of the depthwise convolution


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
