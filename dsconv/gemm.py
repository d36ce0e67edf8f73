"""Matrix products with the bias + ReLU6 epilogue fused: the pointwise layers and the stem.

    y[:m, n0:n1] = relu6(a[:m] @ w[:, n0:n1] + b)

a is flat (m, K), row-major, read in place; w (K, N) is packed once per
network into panels of NR columns (``pack``), so that the micro-kernel reads
one contiguous row of a panel per step of K. The micro-kernel computes an
MR x NR block of y in vector registers: per step of K it loads NR floats of
the panel, broadcasts one float of each of the MR rows of a and accumulates
with fused multiply-adds (summed in order of K, as a naive loop, with one
rounding per step); then it adds the bias, clamps to [0, 6] and stores the
block once, masked at the right edge. Rows past m re-read row m - 1 and are
not stored.

Numba has no vector types, so the micro-kernel is written in LLVM IR
through ``numba.extending.intrinsic`` (``_micro_kernel``) and inlined into
the @njit driver ``gemm``; LLVM compiles it for the host CPU (AVX-512 zmm
registers here, pairs of AVX2 ymm registers elsewhere).
"""
import numpy as np
from llvmlite import binding, ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16  # floats per vector of the micro-kernel: one AVX-512 register
NR = 2 * LANES  # columns per packed panel
# Rows per micro-kernel: MR x NR accumulators fill 28 of the 32 AVX-512
# registers (x 2 for a narrow panel of LANES columns); 16 AVX2 registers hold
# half as many floats each.
MR = 14 if "+avx512f" in binding.get_host_cpu_features().flatten() else 3


def pack(w):
    """w (K, N) -> (panels, K, NR) float32: columns [p NR, (p + 1) NR) of w in panel p, zero-padded."""
    k, n = w.shape
    panels = -(-n // NR)
    padded = np.zeros((k, panels * NR), np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, NR).transpose(1, 0, 2))


def _micro_kernel(mr, nv):
    """The intrinsic computing an mr x (nv LANES) block of y (see the module docstring).

    kernel(a, a0, lda, w, w0, ldw, k, y, y0, ldy, b, b0, rows, cols): the
    block's first element is a[a0], its panel row 0 is w[w0] (rows of the
    panel ldw apart), y[y0] and b[b0]; rows <= mr and cols <= nv LANES are
    the part of the block inside y.
    """
    f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
    vec, mask = ir.VectorType(f32, LANES), ir.VectorType(ir.IntType(1), LANES)
    vptr = vec.as_pointer()

    @intrinsic
    def kernel(typingctx, a, a0, lda, w, w0, ldw, k, y, y0, ldy, b, b0, rows, cols):
        sig = types.void(a, a0, lda, w, w0, ldw, k, y, y0, ldy, b, b0, rows, cols)

        def codegen(context, builder, signature, args):
            a, a0, lda, w, w0, ldw, k, y, y0, ldy, b, b0, rows, cols = args
            arrays = signature.args

            def base(i, value, offset):
                return builder.gep(context.make_array(arrays[i])(context, builder, value).data, [offset])

            pa, pw, py, pb = base(0, a, a0), base(3, w, w0), base(7, y, y0), base(10, b, b0)
            mod = builder.module
            fma = cgutils.get_or_insert_function(mod, ir.FunctionType(vec, [vec] * 3), "llvm.fma.v16f32")
            store = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), [vec, vptr, i32, mask]),
                                                   "llvm.masked.store.v16f32.p0")
            load = cgutils.get_or_insert_function(mod, ir.FunctionType(vec, [vptr, i32, mask, vec]),
                                                  "llvm.masked.load.v16f32.p0")
            zero, six = ir.Constant(vec, [0.0] * LANES), ir.Constant(vec, [6.0] * LANES)
            undef, splat0 = ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)
            one = ir.Constant(i64, 1)

            def splat(value, undefined):
                return builder.shuffle_vector(builder.insert_element(undefined, value, ir.Constant(i32, 0)),
                                              undefined, splat0)

            # rows of a, past the last one clamped to it
            row = [builder.gep(pa, [builder.mul(builder.select(builder.icmp_signed("<", ir.Constant(i64, r), rows),
                                                               ir.Constant(i64, r), builder.sub(rows, one)), lda)])
                   for r in range(mr)]
            entry = builder.block
            loop, done = builder.append_basic_block("mk.loop"), builder.append_basic_block("mk.done")
            builder.cbranch(builder.icmp_signed(">", k, ir.Constant(i64, 0)), loop, done)

            builder.position_at_end(loop)  # for kk in range(k): acc[r, v] += a[r, kk] * w[kk, v]
            kk = builder.phi(i64)
            acc = [builder.phi(vec) for _ in range(mr * nv)]
            panel = builder.gep(pw, [builder.mul(kk, ldw)])
            wv = [builder.load(builder.bitcast(builder.gep(panel, [ir.Constant(i64, v * LANES)]), vptr), align=4)
                  for v in range(nv)]
            new = []
            for r in range(mr):
                av = splat(builder.load(builder.gep(row[r], [kk])), undef)
                new += [builder.call(fma, [av, wv[v], acc[r * nv + v]]) for v in range(nv)]
            kn = builder.add(kk, one)
            body = builder.block
            kk.add_incoming(ir.Constant(i64, 0), entry)
            kk.add_incoming(kn, body)
            for p, q in zip(acc, new):
                p.add_incoming(zero, entry)
                p.add_incoming(q, body)
            builder.cbranch(builder.icmp_signed("<", kn, k), loop, done)

            builder.position_at_end(done)  # y = min(max(acc + b, 0), 6), masked to the block's part inside y
            sums = []
            for q in new:
                p = builder.phi(vec)
                p.add_incoming(zero, entry)
                p.add_incoming(q, body)
                sums.append(p)
            lane = ir.Constant(ir.VectorType(i64, LANES), list(range(LANES)))
            inside, bias = [], []
            for v in range(nv):
                limit = splat(builder.sub(cols, ir.Constant(i64, v * LANES)), ir.Constant(ir.VectorType(i64, LANES),
                                                                                          ir.Undefined))
                inside.append(builder.icmp_signed("<", lane, limit))
                at = builder.bitcast(builder.gep(pb, [ir.Constant(i64, v * LANES)]), vptr)
                bias.append(builder.call(load, [at, ir.Constant(i32, 4), inside[v], zero]))
            for r in range(mr):
                with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, r), rows)):
                    out = builder.gep(py, [builder.mul(ir.Constant(i64, r), ldy)])
                    for v in range(nv):
                        s = builder.fadd(sums[r * nv + v], bias[v])
                        s = builder.select(builder.fcmp_ordered(">", s, zero), s, zero)
                        s = builder.select(builder.fcmp_ordered("<", s, six), s, six)
                        at = builder.bitcast(builder.gep(out, [ir.Constant(i64, v * LANES)]), vptr)
                        builder.call(store, [s, at, ir.Constant(i32, 4), inside[v]])
            return context.get_dummy_value()

        return sig, codegen

    return kernel


_wide = _micro_kernel(MR, 2)  # MR x NR
_narrow = _micro_kernel(2 * MR, 1)  # 2 MR x LANES, for panels with at most LANES columns used

# B (K x columns) floats up to which the product goes row block by row block,
# all panels for each (the block of a stays in L1); above, panel by panel
# (each panel stays in L2 while every row block passes).
SMALL_B = 1 << 15


@njit(inline="always")
def _block(a, k, m, wp, b, y, n, i0, j0, n1):
    # rows [i0, i0 + 2 MR) x columns [j0, j0 + NR) of y
    rows, cols = min(2 * MR, m - i0), min(NR, n1 - j0)
    w0 = j0 // NR * k * NR
    if cols <= LANES:
        _narrow(a, i0 * k, k, wp, w0, NR, k, y, i0 * n + j0, n, b, j0, rows, cols)
    else:
        _wide(a, i0 * k, k, wp, w0, NR, k, y, i0 * n + j0, n, b, j0, min(MR, rows), cols)
        if rows > MR:
            _wide(a, (i0 + MR) * k, k, wp, w0, NR, k, y, (i0 + MR) * n + j0, n, b, j0, rows - MR, cols)


@njit(cache=True, nogil=True)
def gemm(a, m, wp, b, y, n0=0, n1=-1):
    """Columns [n0, n1) of y[:m * N] = relu6(a[:m * K] @ w + b); n0 a multiple of NR.

    a flat (m, K), wp = pack(w) (panels, K, NR), b (N,), y flat (m, N).
    """
    k, n = wp.shape[1], b.shape[0]
    n1 = n if n1 < 0 else n1
    if k * (n1 - n0) <= SMALL_B:
        for i0 in range(0, m, 2 * MR):
            for j0 in range(n0, n1, NR):
                _block(a, k, m, wp, b, y, n, i0, j0, n1)
    else:
        for j0 in range(n0, n1, NR):
            for i0 in range(0, m, 2 * MR):
                _block(a, k, m, wp, b, y, n, i0, j0, n1)
