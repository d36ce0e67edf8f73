"""Kernel microbenchmarks: every distinct layer shape of a MobileNet (default 1.0-224).

    python bench/kernels.py            # batch 1 and 32, and one image per thread
    python bench/kernels.py --batch 32 --repeats 20
    python bench/kernels.py --alpha 0.25 --resolution 128

Each shape is checked against tests/naive.py (first and last image), warmed
up (JIT compilation or cache load), then timed; one line per shape with the
median time, GFLOP/s (stem, pointwise) or GB/s (depthwise: input + output
read / written once) and the share of the network's time (shapes that repeat,
blocks 7-11, count once per repeat).

Two ways to run a layer: "batch N", the public kernels (dsconv.kernels.stem,
depthwise, pointwise) on N images, parallel over rows on all the threads;
and "one image per thread", the serial kernels forward() runs, every thread
on its own image at the same time, which is how forward() spends its time on
batches. Two limits are measured in the same run, on all the threads: the
cores' multiply-add peak (independent fused multiply-adds in registers, no
memory: what no matrix product can pass) and a large NumPy matmul's (the
BLAS's sgemm). After each batch, the whole fused pass (MobileNet.forward) on
random weights: images/s, GFLOP/s (the network's mult-adds without the head)
and its fraction of both.
"""
import argparse
import functools
import os
import statistics
import sys
import time

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.forward import random_net  # noqa: E402
from dsconv import kernels, mobilenet  # noqa: E402
from tests import naive  # noqa: E402

THREADS = os.cpu_count()  # --threads
BATCHES = (1, 32)


def median_time(f, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _fma_chains(lanes, chains=12, unroll=4):
    """(intrinsic (n, seed) -> float64, flops per trip): n trips of `unroll` rounds of `chains` independent
    fused multiply-adds on vectors of `lanes` floats, in registers (no memory traffic), with the kernels' own
    LLVM helpers (kernels._IR)."""
    @intrinsic
    def chains_of(typingctx, n, seed):
        def codegen(context, builder, signature, args):
            g = kernels._IR(context, builder, signature, args, lanes)
            v = g.splat(builder.fptrunc(args[1], kernels.F32))
            a, b = (builder.fmul(v, g.splat(ir.Constant(kernels.F32, c))) for c in (0.999, 0.001))
            start = [builder.fadd(v, g.splat(ir.Constant(kernels.F32, float(i)))) for i in range(chains)]

            def trip(_, acc):
                for _ in range(unroll):
                    acc = [builder.call(g.fma, [x, a, b]) for x in acc]
                return acc
            total = functools.reduce(builder.fadd, g.loop(ir.Constant(kernels.I64, 0), args[0], start, trip))
            return builder.fpext(builder.extract_element(total, ir.Constant(kernels.I32, 0)), ir.DoubleType())

        return types.float64(types.int64, types.float64), codegen

    return chains_of, 2 * lanes * chains * unroll


def fma_meter(repeats, trips=2_000_000):
    """A function that measures the GFLOP/s of fused multiply-adds in registers on all the threads: what no
    matrix product can pass (a machine's speed moves; call it beside what it is compared with)."""
    chains_of, flops = _fma_chains(kernels.DW_LANES)  # one native vector: 8 floats AVX2, 16 AVX-512

    @njit(parallel=True, cache=False)
    def run(n, threads):
        out = np.zeros(threads)
        for t in prange(threads):
            out[t] = chains_of(n, 1.0 + t)
        return out.sum()

    run(10, THREADS)
    return lambda: flops * trips * THREADS / median_time(lambda: run(trips, THREADS), repeats) / 1e9


def sgemm_peak(repeats, size=4096):
    """GFLOP/s of a large float32 NumPy matmul (the BLAS's, all threads)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), np.float32) for _ in range(2))
    c = np.empty_like(a)
    np.matmul(a, b, out=c)
    return 2 * size ** 3 / median_time(lambda: np.matmul(a, b, out=c), repeats) / 1e9


def network_layers(alpha=1.0, resolution=224):
    """[(kind, Keras names, input shape (H, W, Cin), Cout, stride)], distinct shapes in order."""
    side, c = resolution, 3
    rows = [("stem", ["conv1"], (side, side, 3), mobilenet.width(mobilenet.STEM, alpha), 2)]
    side, c = resolution // 2, rows[0][3]
    for i, (out, stride) in enumerate(mobilenet.BLOCKS, 1):
        out = mobilenet.width(out, alpha)
        rows.append(("depthwise", [f"conv_dw_{i}"], (side, side, c), c, stride))
        side = -(-side // stride)
        rows.append(("pointwise", [f"conv_pw_{i}"], (side, side, c), out, 1))
        c = out
    distinct = []
    for kind, names, shape, cout, stride in rows:
        same = [r for r in distinct if r[0] == kind and r[2:] == (shape, cout, stride)]
        if same:
            same[0][1].extend(names)
        else:
            distinct.append((kind, names, shape, cout, stride))
    return distinct


# Thread t runs one layer on its own image x[t] (flat (H, H, C)) into y[t], as forward() does.
# Not cached: Numba's cache would not see a change to the dsconv kernels these call.
@njit(parallel=True, **dict(kernels.JIT, cache=False))
def _per_image_stem(x, h, k, b, stride, y, tile):
    for t in prange(x.shape[0]):
        kernels.stem_rows(x[t], h, h, k, b, stride, y[t], 0, -(-h // stride), tile[t])


@njit(parallel=True, **dict(kernels.JIT, cache=False))
def _per_image_depthwise(x, h, k, b, stride, y, tile):
    ho, top = kernels.same_padding(h, stride)
    for t in prange(x.shape[0]):
        for oy in range(ho):
            kernels._depthwise_row(x[t], h, h, k, b, oy, stride, top, top, y[t, oy * ho * b.shape[0]:], ho)


@njit(parallel=True, **dict(kernels.JIT, cache=False))
def _per_image_pointwise(x, h, k, b, stride, y, tile):
    for t in prange(x.shape[0]):
        kernels.gemm(x[t], h * h, k, b, y[t], 0, b.shape[0])


def case(kind, n, shape, cout, stride, rng, per_image=False):
    """(run(), check() -> largest difference, flops, bytes) for one layer shape.

    per_image: n images, one per thread, through the serial kernels of forward().
    """
    h, w, cin = shape
    lo = -1 if kind == "stem" else 0  # images in [-1, 1], activations in [0, 6]
    x = rng.uniform(lo, 1 if kind == "stem" else 6, (n, h, w, cin)).astype(np.float32)
    if kind == "stem":
        k, b = rng.uniform(-0.5, 0.5, (3, 3, 3, cout)).astype(np.float32), rng.uniform(-1, 1, cout).astype(np.float32)
        run = lambda: kernels.stem(x, k, b, stride)  # noqa: E731
        ref = lambda i: naive.conv3x3(x[i:i + 1], k, b, stride)  # noqa: E731
    elif kind == "depthwise":
        k, b = rng.uniform(-0.5, 0.5, (3, 3, cin)).astype(np.float32), rng.uniform(-1, 1, cin).astype(np.float32)
        run = lambda: kernels.depthwise(x, k, b, stride)  # noqa: E731
        ref = lambda i: naive.depthwise(x[i:i + 1], k, b, stride)  # noqa: E731
    else:
        k = (rng.uniform(-1, 1, (cin, cout)) / np.sqrt(cin)).astype(np.float32)
        b = rng.uniform(-1, 1, cout).astype(np.float32)
        # the public kernel minus packing the weights, which forward() does once per network
        wp, y2 = kernels.pack(k), np.empty((n * h * w, cout), np.float32)
        run = lambda: kernels._pointwise(x.reshape(-1, cin), wp, b, y2, THREADS) or y2.reshape(n, h, w, cout)  # noqa: E731
        ref = lambda i: naive.pointwise(x[i:i + 1], k, b)  # noqa: E731

    if per_image:
        ho, wo = -(-h // stride), -(-w // stride)
        y = np.empty((n, ho, wo, cout), np.float32)
        driver = {"stem": _per_image_stem, "depthwise": _per_image_depthwise, "pointwise": _per_image_pointwise}[kind]
        kk = (kernels.pack(k.reshape(27, cout)) if kind == "stem" else kernels.pack_depthwise(k)
              if kind == "depthwise" else kernels.pack(k))
        tile = np.empty((n, 1 << 17), np.float32)

        def per_image():
            driver(x.reshape(n, -1), h, kk, b, stride, y.reshape(n, -1), tile)
            return y
        run = per_image

    def check():
        y = run()
        return max(float(np.abs(y[i:i + 1] - ref(i)).max()) for i in sorted({0, n - 1}))

    ho, wo = -(-h // stride), -(-w // stride)
    taps = 27 * cout if kind == "stem" else 9 * cin if kind == "depthwise" else cin * cout
    flops = 2 * n * ho * wo * taps
    bytes_ = 4 * n * (h * w * cin + ho * wo * cout)
    return run, check, flops, bytes_


def fused(n, repeats, fma, sgemm, alpha=1.0, resolution=224, rounds=5):
    """The whole fused pass (MobileNet.forward, random weights) at batch n: images/s, GFLOP/s (the network's
    mult-adds without the head) and its fraction of the multiply-add peak, measured in turn with it
    (fma() measures the peak again; median of the rounds' ratios), and of the sgemm peak measured before."""
    net = random_net(alpha, resolution)
    x = np.random.default_rng(1).uniform(-1, 1, (n, resolution, resolution, 3)).astype(np.float32)
    net.forward(x)
    madds = mobilenet.count(alpha, resolution)[0] - net.pooled_width * mobilenet.CLASSES
    rates, ratios = [], []
    for _ in range(rounds):
        rates.append(2 * madds * n / median_time(lambda: net.forward(x), repeats) / 1e9)
        ratios.append(rates[-1] / fma())
    gflops = statistics.median(rates)
    print(f"  the fused pass (forward) at batch {n}: {gflops / 2 / madds * 1e9:.1f} images/s, {gflops:.1f} GFLOP/s = "
          f"{statistics.median(ratios):.0%} of the multiply-add peak (in turn with it, {rounds} rounds), "
          f"{gflops / sgemm:.0%} of the sgemm peak")


def bench(n, repeats, peak, per_image=False, alpha=1.0, resolution=224):
    rng = np.random.default_rng(0)
    layers = network_layers(alpha, resolution)
    rows = []
    for kind, names, shape, cout, stride in layers:
        run, check, flops, bytes_ = case(kind, n, shape, cout, stride, rng, per_image)
        err = check()  # also the warm-up: compiles or loads the cache
        tol = 1e-4 if kind == "pointwise" else 1e-5
        if err > tol:
            raise SystemExit(f"{kind} {shape}: largest difference {err:.3g} > {tol}, not timing a wrong kernel")
        run()
        rows.append((kind, names, shape, cout, stride, median_time(run, repeats), flops, bytes_, err))
    total = sum(len(names) * t for _, names, *_, t, _, _, _ in rows)
    how = f"one image per thread ({n} at once)" if per_image else f"batch {n}"
    print(f"\nMobileNet {alpha:g}-{resolution}, {how}, {THREADS} threads, median of {repeats}; "
          f"network (sum of layers) {total * 1e3:.2f} ms = {n / total:.1f} images/s")
    print(f"{'layer':<22} {'input':>15} {'out':>5} {'s':>2} {'ms':>8} {'rate':>14} {'share':>6} {'err':>8}")
    pw_flops = pw_time = 0.0
    for kind, names, shape, cout, stride, t, flops, bytes_, err in rows:
        label = names[0] if len(names) == 1 else f"{names[0]}..{names[-1].split('_')[-1]}"
        rate = f"{bytes_ / t / 1e9:7.1f} GB/s" if kind == "depthwise" else f"{flops / t / 1e9:6.1f} GFLOP/s"
        if kind == "pointwise":
            pw_flops += len(names) * flops
            pw_time += len(names) * t
            rate += f" {flops / t / 1e9 / peak:4.0%}"
        print(f"{label:<22} {'x'.join(map(str, shape)):>15} {cout:>5} {stride:>2} {t * 1e3:8.3f} {rate:>14} "
              f"{len(names) * t / total:6.1%} {err:8.1e}")
    for kind in ("stem", "depthwise", "pointwise"):
        share = sum(len(r[1]) * r[5] for r in rows if r[0] == kind) / total
        print(f"  {kind:<10} {share:6.1%} of the time")
    print(f"  pointwise GEMMs (with epilogue): {pw_flops / pw_time / 1e9:.1f} GFLOP/s = "
          f"{pw_flops / pw_time / 1e9 / peak:.0%} of the sgemm peak {peak:.1f} GFLOP/s")


def main():
    global THREADS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=BATCHES, help="batch sizes to run")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per shape (median reported)")
    p.add_argument("--threads", type=int, default=THREADS, help="threads for every runtime (default: the CPUs)")
    p.add_argument("--alpha", type=float, default=1.0, help="width multiplier")
    p.add_argument("--resolution", type=int, default=224, help="input size")
    a = p.parse_args()
    THREADS = a.threads
    import numba
    numba.set_num_threads(THREADS)
    fma = fma_meter(a.repeats)
    before = fma()
    print(f"multiply-add peak (fused multiply-adds in registers, {THREADS} threads): {before:.1f} GFLOP/s")
    peak = sgemm_peak(a.repeats)
    print(f"sgemm peak (4096^3 NumPy matmul, BLAS threads as configured): {peak:.1f} GFLOP/s = "
          f"{peak / statistics.mean([before, fma()]):.0%} of the multiply-add peak (measured before and after it)")
    for n in a.batch:
        bench(n, a.repeats, peak, alpha=a.alpha, resolution=a.resolution)
        fused(n, a.repeats, fma, peak, a.alpha, a.resolution)
    bench(THREADS, a.repeats, peak, per_image=True, alpha=a.alpha, resolution=a.resolution)


if __name__ == "__main__":
    main()
