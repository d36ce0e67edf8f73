"""End-to-end forward pass, images/s, dsconv against ONNX Runtime and PyTorch.

    python bench/forward.py                 # 4 alphas x 4 resolutions x batch 1 and 32
    python bench/forward.py --quick         # the issue's target cells only, < 1 minute
    python bench/forward.py --alpha 1.0 --resolution 224 --batch 32

Random weights (the same ones for every runtime, in the same process), up to
the pooled features. Each runtime's output is first checked against dsconv's,
then it is warmed up, then timed (median of the repeats that fit in
--seconds, at least 3); each runtime runs its repeats in one block so that
one's spinning threads do not slow the next. Peers missing from the
environment are skipped (pip install -e ".[bench]"; PyTorch only as
torch==2.13.0). Ends with a Markdown table of the ratios dsconv / peer.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dsconv import mobilenet  # noqa: E402

THREADS = os.cpu_count()  # --threads
QUICK = [(1.0, 224, 1), (1.0, 224, 32), (0.25, 128, 32)]
SECONDS = 2.0


def random_net(alpha, resolution, seed=0):
    """He-scaled random weights: activations stay in ReLU6's working range through all 27 layers."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, tensors in mobilenet.layer_shapes(alpha, head=False).items():
        k = tensors["kernel"]
        fan_in = int(np.prod(k[:-1])) if name != "conv1" and "dw" not in name else (27 if name == "conv1" else 9)
        params[name] = {"kernel": (rng.standard_normal(k) * np.sqrt(2 / fan_in)).astype(np.float32),
                        "bias": (rng.standard_normal(tensors["bias"]) * 0.01).astype(np.float32)}
    return mobilenet.MobileNet(alpha, params, resolution)


def median_rate(run, images, seconds):
    run(images)  # warm-up: compilation, caches, thread pools
    t = time.perf_counter()
    run(images)
    repeats = int(min(20, max(3, seconds / (time.perf_counter() - t))))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - t)
    return len(images) / statistics.median(times)


def peers(net):
    """{name: run(images) -> pooled} of the peers that are installed."""
    from bench import peers as p
    found = {}
    for name, make, module in (("ORT", p.onnx_runtime, "onnxruntime"), ("PyTorch", p.pytorch, "torch")):
        try:
            __import__(module)
        except ImportError:
            continue
        found[name] = make(net, THREADS)
    return found


def cell(alpha, resolution, batch, seconds):
    net = random_net(alpha, resolution)
    images = np.random.default_rng(1).uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32)
    ours = lambda x: net.forward(x)[0]  # noqa: E731
    want = ours(images)
    rates, diffs = {"dsconv": median_rate(ours, images, seconds)}, {}
    for name, run in peers(net).items():
        diffs[name] = float(np.abs(run(images) - want).max()) / max(1.0, float(np.abs(want).max()))
        rates[name] = median_rate(run, images, seconds)
    return rates, diffs


def main():
    global THREADS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only 1.0-224 batch 1 and 32, 0.25-128 batch 32, shorter")
    p.add_argument("--alpha", type=float, nargs="+", default=mobilenet.ALPHAS, help="width multipliers")
    p.add_argument("--resolution", type=int, nargs="+", default=mobilenet.RESOLUTIONS, help="input sizes")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="images per forward pass")
    p.add_argument("--seconds", type=float, default=SECONDS, help="time budget per runtime and cell")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest difference to dsconv allowed, relative to the largest feature")
    p.add_argument("--threads", type=int, default=THREADS, help="threads for every runtime (default: the CPUs)")
    a = p.parse_args()
    THREADS = a.threads
    import numba
    numba.set_num_threads(THREADS)
    cells = QUICK if a.quick else [(al, r, b) for al in a.alpha for r in a.resolution for b in a.batch]
    seconds = a.seconds / 4 if a.quick else a.seconds
    print(f"{THREADS} threads for every runtime; images/s (median); ratio = dsconv / peer; "
          "diff = largest |peer - dsconv| / max(1, largest feature); "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')} (PyTorch shares Numba's OpenMP runtime)")
    table, bad = [], []
    for alpha, resolution, batch in cells:
        rates, diffs = cell(alpha, resolution, batch, seconds)
        line = f"{alpha:g}-{resolution} b{batch}: dsconv {rates['dsconv']:7.1f}"
        for name in diffs:
            line += f" | {name} {rates[name]:7.1f} ratio {rates['dsconv'] / rates[name]:5.2f} diff {diffs[name]:.1e}"
            if diffs[name] > a.tolerance:
                bad.append(f"{alpha:g}-{resolution} b{batch} {name}")
        print(line, flush=True)
        table.append((alpha, resolution, batch, rates))
    names = [n for n in ("ORT", "PyTorch") if n in table[0][3]]
    print("\n| variant | batch | dsconv images/s | " + " | ".join(f"{n} images/s | dsconv/{n}" for n in names) + " |")
    print("|---|---:|---:|" + "---:|---:|" * len(names))
    for alpha, resolution, batch, rates in table:
        print(f"| {alpha:g}-{resolution} | {batch} | {rates['dsconv']:.0f} | "
              + " | ".join(f"{rates[n]:.0f} | {rates['dsconv'] / rates[n]:.2f}" for n in names) + " |")
    if bad:
        raise SystemExit(f"outputs differ from dsconv's by more than {a.tolerance:g}: {', '.join(bad)}")


if __name__ == "__main__":
    main()
