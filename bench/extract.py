"""End-to-end bottleneck extraction, images/s: JPEG file -> decode -> resize -> network -> vector.

    python bench/extract.py                      # 0.25-128 and 0.75-224, 224 copies and originals
    python bench/extract.py --variants 0.25-128 --images 128

Each timed run writes into a fresh temporary cache (so the cache is written,
as in a first run, but never hit). The result is checked first against the
forward pass on directly loaded images, the network is warmed up (JIT) second,
runs are timed third; the median is reported, beside the rate of the
forward pass alone on the same images decoded beforehand (the ceiling).
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dsconv import bottlenecks, images, weights

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
VARIANTS = "0.25-128,0.75-224"
IMAGES = 256
REPEATS = 3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=VARIANTS, help="comma-separated alpha-resolution")
    p.add_argument("--copies", default=str(SHARED / "chest_xray" / "train"), help="folder of the 224 copies")
    p.add_argument("--originals", default=str(SHARED / "originals"), help="folder of original-size X-rays")
    p.add_argument("--images", type=int, default=IMAGES, help="how many of the 224 copies to time")
    p.add_argument("--repeats", type=int, default=REPEATS, help="timed runs (median reported)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    a = p.parse_args()
    sources = {"224 copies": sorted(Path(a.copies).rglob("*.jpeg"))[::7][:a.images],
               "originals": sorted(Path(a.originals).rglob("*.jpeg"))}
    for v in a.variants.split(","):
        alpha, resolution = float(v.split("-")[0]), int(v.split("-")[1])
        net = weights.load(alpha, resolution, quiet=True)
        for name, paths in sources.items():
            with tempfile.TemporaryDirectory() as tmp:
                got, _ = bottlenecks.extract(paths[:4], net, "pooled", tmp, progress=False)
            want, _ = net.forward(np.stack([images.load(q, resolution) for q in paths[:4]]))
            assert np.array_equal(got, want), f"{v} {name}: extract disagrees with the forward pass"
            times = []
            for _ in range(a.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    t = time.perf_counter()
                    bottlenecks.extract(paths, net, "pooled", tmp, workers=a.workers, progress=False)
                    times.append(time.perf_counter() - t)
            med = statistics.median(times)
            fwd = forward_rate(net, paths, a.repeats)
            print(f"MobileNet {v:9s} {name:10s}: {len(paths) / med:6.1f} images/s "
                  f"({len(paths)} files, median of {a.repeats}: {med:.2f} s); the forward pass alone on the "
                  f"decoded images {fwd:6.1f} images/s: {len(paths) / med / fwd:.0%} of it", flush=True)


def forward_rate(net, paths, repeats):
    """Images/s of the network alone on these images already decoded, in batches as extract runs them."""
    x = np.stack([images.load(q, net.resolution) for q in paths])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(x), bottlenecks.BATCH):
            net.forward(x[i:i + bottlenecks.BATCH])
        times.append(time.perf_counter() - t)
    return len(x) / statistics.median(times)


if __name__ == "__main__":
    main()
