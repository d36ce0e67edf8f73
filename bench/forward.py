"""End-to-end forward pass, images/s, for one variant (random weights).

    python bench/forward.py --alpha 0.75 --resolution 224 --batch 32
"""
import argparse
import statistics
import time

import numpy as np

from dsconv import mobilenet


def random_net(alpha, resolution, seed=0):
    rng = np.random.default_rng(seed)
    params = {n: {t: (rng.standard_normal(s) * (0.1 if t == "kernel" else 0.01)).astype(np.float32)
                  for t, s in ts.items()} for n, ts in mobilenet.layer_shapes(alpha, head=False).items()}
    return mobilenet.MobileNet(alpha, params, resolution)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alpha", type=float, default=0.75, help="width multiplier")
    p.add_argument("--resolution", type=int, default=224, help="input size")
    p.add_argument("--batch", type=int, default=32, help="images per forward pass")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    a = p.parse_args()
    net = random_net(a.alpha, a.resolution)
    x = np.random.default_rng(1).uniform(-1, 1, (a.batch, a.resolution, a.resolution, 3)).astype(np.float32)
    t = time.perf_counter()
    net.forward(x)
    print(f"first call (compile or cache load + run): {time.perf_counter() - t:.2f} s")
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        net.forward(x)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    madds, _ = mobilenet.count(a.alpha, a.resolution)
    print(f"MobileNet {a.alpha:g}-{a.resolution} batch {a.batch}: {a.batch / med:.1f} images/s, "
          f"{2 * madds * a.batch / med / 1e9:.1f} GFLOP/s (median of {a.repeats})")


if __name__ == "__main__":
    main()
