"""Cold start: compile time in a first process, start-up of a second one.

    python bench/coldstart.py

Spawns fresh Python processes, each timing its own import of dsconv, the
first forward pass of a MobileNet (batch 1, random weights), a second one,
and a first batch of 3 (which, on 2 threads, runs whole images too).
The first process gets an empty Numba cache directory (NUMBA_CACHE_DIR), so
it compiles every kernel; the next ones load the cache. Start-up = process
start to the end of the first forward pass.
"""
import argparse
import json
import os
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alpha", type=float, default=1.0, help="width multiplier")
    p.add_argument("--resolution", type=int, default=224, help="input size")
    p.add_argument("--runs", type=int, default=3, help="processes after the first (cache warm)")
    a = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as cache:
        for i in range(1 + a.runs):
            r = run(root, cache, a.alpha, a.resolution)
            label = "first process (empty cache, compiles)" if i == 0 else f"process {i + 1} (cache warm)"
            print(f"{label:<40} import {r['import']:5.2f} s, first forward {r['first']:6.2f} s, "
                  f"second forward {r['second']:5.3f} s, then a first batch of 3 {r['batch']:6.2f} s; "
                  f"start-up {r['in_process']:6.2f} s (process wall time {r['wall']:6.2f} s)", flush=True)


if __name__ == "__main__":
    main()
