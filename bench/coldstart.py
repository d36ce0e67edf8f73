"""Cold start: compile time in a first process, start-up of a second one.

    python bench/coldstart.py

Spawns fresh Python processes, each timing its own import of dsconv, the
first forward pass of a MobileNet (batch 1, random weights), a second one,
and a first batch of 3 (which, on 2 threads, runs whole images too).
The first process gets an empty Numba cache directory (NUMBA_CACHE_DIR), so
it compiles every kernel; the next ones load the cache. Start-up = process
start to the end of the first forward pass. (The kernels compiled as C
functions compile as dsconv.kernels is imported: in a first process, most
of the compile time shows as import.)

    python bench/coldstart.py --vs ../dsconv-old --rounds 3

times another checkout of dsconv (its root, with bench/forward.py) the same
way, a first process and a warm one of each in turn with fresh caches, and
prints the medians and their ratios: on these shared machines the speed
moves by a fifth within an hour, so compare within one run.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import numpy as np
from bench.forward import random_net
t1 = time.perf_counter()
net = random_net({alpha}, {resolution})
x = np.zeros((1, {resolution}, {resolution}, 3), np.float32)
net.forward(x)
t2 = time.perf_counter()
net.forward(x)
t3 = time.perf_counter()
net.forward(np.zeros((3, {resolution}, {resolution}, 3), np.float32))  # whole images and shared ones
t4 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "first": t2 - t1, "second": t3 - t2, "batch": t4 - t3,
                  "in_process": t2 - t0}}))
"""


def run(root, cache, alpha, resolution):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=root, alpha=alpha, resolution=resolution)],
                         env=env, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t
    return dict(json.loads(out.strip().splitlines()[-1]), wall=wall)


def compare(roots, rounds, alpha, resolution):
    """Start-up of a first and a warm process for each checkout in turn, `rounds` times; medians and ratios."""
    first, warm = ({root: [] for root in roots} for _ in range(2))
    for k in range(rounds):
        for root in roots:
            with tempfile.TemporaryDirectory() as cache:
                first[root].append(run(root, cache, alpha, resolution)["in_process"])
                warm[root].append(run(root, cache, alpha, resolution)["in_process"])
            print(f"round {k + 1}: {root}: first process {first[root][-1]:6.2f} s, warm {warm[root][-1]:5.2f} s",
                  flush=True)
    this, other = roots
    for name, times in (("first process", first), ("warm process", warm)):
        a, b = statistics.median(times[this]), statistics.median(times[other])
        ratios = statistics.median(x / y for x, y in zip(times[this], times[other]))
        print(f"{name}: this checkout {a:6.2f} s, --vs {b:6.2f} s (medians of {rounds}); this / --vs {a / b:.2f} "
              f"(median of the rounds' ratios {ratios:.2f})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alpha", type=float, default=1.0, help="width multiplier")
    p.add_argument("--resolution", type=int, default=224, help="input size")
    p.add_argument("--runs", type=int, default=3, help="processes after the first (cache warm)")
    p.add_argument("--vs", metavar="DIR", help="another checkout's root: compare its start-up with this one's")
    p.add_argument("--rounds", type=int, default=3, help="with --vs: rounds of a first and a warm process each")
    a = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if a.vs:
        other = os.path.abspath(a.vs)
        if not os.path.isfile(os.path.join(other, "bench", "forward.py")):
            p.error(f"--vs {a.vs}: no bench/forward.py there; give the root of a dsconv checkout")
        compare([root, other], a.rounds, a.alpha, a.resolution)
        return
    with tempfile.TemporaryDirectory() as cache:
        for i in range(1 + a.runs):
            r = run(root, cache, a.alpha, a.resolution)
            label = "first process (empty cache, compiles)" if i == 0 else f"process {i + 1} (cache warm)"
            print(f"{label:<40} import {r['import']:5.2f} s, first forward {r['first']:6.2f} s, "
                  f"second forward {r['second']:5.3f} s, then a first batch of 3 {r['batch']:6.2f} s; "
                  f"start-up {r['in_process']:6.2f} s (process wall time {r['wall']:6.2f} s)", flush=True)


if __name__ == "__main__":
    main()
