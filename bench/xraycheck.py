"""How many images the X-ray check flags: a set of non-X-rays built on the fly, and the real X-rays.

    python bench/xraycheck.py runs/<run>/model.h5 [--cache DIR]

Builds the non-X-ray set of bench/nonxray.py in a temporary folder, runs
the model's check (Model.warnings: what predict, the API and the page give)
on it and on the X-rays of ../shared (external, external_full, originals,
the training folder), and prints the share flagged per set, with the
distances' range where the model has the distance check. The bottlenecks
of the real X-rays are cached (--cache) as predict caches them.
"""
import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dsconv  # noqa: E402
from bench import nonxray  # noqa: E402
from dsconv import data  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
XRAYS = {"external": DATA / "chest_xray" / "external", "external_full": DATA / "chest_xray" / "external_full",
         "originals": DATA / "originals", "train": DATA / "chest_xray" / "train"}


def flagged(model, paths):
    """(warnings, distances or None) of image paths."""
    feats, failed = model.bottlenecks(paths)
    if failed:
        sys.exit(f"error: {next(iter(failed.values()))}")
    far = model.xray_check.distances(feats) if model.xray_check is not None else None
    return model.warnings_of(paths, feats), far


def line(name, warnings, far):
    n = sum(bool(w) for w in warnings)
    spread = "" if far is None else f"   distance {np.min(far):6.1f} .. {np.max(far):6.1f}"
    return f"{name:34s} {n:5d} of {len(warnings):5d} flagged  {100 * n / len(warnings):5.1f}%{spread}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model file written by python -m dsconv.train")
    p.add_argument("--cache", help="bottleneck cache folder for the real X-rays (default: the training cache)")
    p.add_argument("--show", action="store_true", help="list every non-X-ray not flagged")
    args = p.parse_args(argv)
    model = dsconv.load_model(args.model, cache_dir=args.cache)
    check = model.xray_check
    print(f"model {args.model}: " + (f"threshold {check.threshold:.1f}, {check.info['components']} components, "
                                     f"fitted on {check.info['images']} X-rays" if check else "no distance check"))
    with tempfile.TemporaryDirectory() as d:
        cases = nonxray.build(d)
        model.cache_dir = False
        warnings, far = flagged(model, [c[0] for c in cases])
    groups = defaultdict(list)
    for (path, group, must), w, i in zip(cases, warnings, range(len(cases))):
        groups[(group, must)].append(i)
        if args.show and must and not w:
            print(f"  not flagged: {path.name}" + (f" (distance {far[i]:.1f})" if far is not None else ""))
    pick = lambda idx: ([warnings[i] for i in idx], None if far is None else far[idx])
    must = [i for (g, m), idx in groups.items() if m for i in idx]
    for (g, m), idx in sorted(groups.items()):
        print(line(f"{g} ({'must flag' if m else 'reported only'})", *pick(idx)))
    print(line("non-X-rays to flag, all", *pick(must)))
    model.cache_dir = args.cache
    for name, folder in XRAYS.items():
        print(line(f"X-rays: {name}", *flagged(model, data.image_files(folder))))


if __name__ == "__main__":
    main()
