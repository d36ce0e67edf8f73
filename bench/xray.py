"""One original-size X-ray from file to probability and heatmap: the time, and where it goes.

    python bench/xray.py                          # the newest runs/*/model.h5, the largest original
    python bench/xray.py --model runs/x/model.h5 --image ../shared/data/originals/NORMAL/IM-0001.jpeg

Times Model.diagnose (what `predict --heatmap` and the page run per image)
on one image (with the model's test-time forms, --form-tta, if it has them), its parts measured by wrapping the functions it calls (the
X-ray's own decode runs on a second thread beside the network's input and
pass, so the parts can add up to more than the whole), then the PNG that
predict writes. The first call compiles or loads the kernels
and is not counted; the median of --repeats calls is reported.
"""
import argparse
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dsconv  # noqa: E402
from dsconv import bottlenecks, cam, forms, images  # noqa: E402
from dsconv.mobilenet import MobileNet  # noqa: E402

ORIGINALS = ROOT.parent / "shared" / "data" / "originals"
PARTS = [("decode for the network (JPEG draft, resize, scale)", images, "decode"),
         ("decode the X-ray for the overlay", images, "open_image"),
         ("network: one fused pass (pooled and last maps)", MobileNet, "forward_maps"),
         ("class map and overlay at the X-ray's size", cam, "overlay"),
         ("test-time forms: the canonical 224 image", forms, "canonical"),
         ("test-time forms: made from it", forms, "augment"),
         ("test-time forms: their passes", bottlenecks, "forward")]


INSIDE = threading.local()  # per thread, the timed part running now, if any (diagnose decodes on two)


def timed(spent, label, owner, name):
    """Wrap owner.name so that its calls add to spent[label]; a call inside another timed one counts there."""
    f = getattr(owner, name)

    def wrapper(*a, **k):
        if getattr(INSIDE, "label", None):
            return f(*a, **k)
        INSIDE.label = label
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            spent[label] += time.perf_counter() - t
            INSIDE.label = None
    setattr(owner, name, wrapper)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a trained model file (default: the newest runs/*/model.h5)")
    p.add_argument("--image", help="an X-ray (default: the largest file in ../shared/data/originals)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls (median reported)")
    a = p.parse_args()
    models = sorted((ROOT / "runs").glob("*/model.h5"), key=lambda q: q.stat().st_mtime)
    model_path = Path(a.model) if a.model else (models[-1] if models else None)
    if model_path is None:
        sys.exit("error: no runs/*/model.h5; train one (the README's first command) or give --model")
    image = Path(a.image) if a.image else max(ORIGINALS.rglob("*.jpeg"), key=lambda q: q.stat().st_size)
    model = dsconv.load_model(model_path, cache_dir=False)
    model.diagnose(image)  # compiles or loads the kernels
    spent = defaultdict(float)
    for part in PARTS:
        timed(spent, *part)
    totals, png_times, shares = [], [], defaultdict(list)
    for _ in range(a.repeats):
        spent.clear()
        t = time.perf_counter()
        _, heat, _ = model.diagnose(image)
        totals.append(time.perf_counter() - t)
        t = time.perf_counter()
        cam.png(heat)
        png_times.append(time.perf_counter() - t)
        for label, s in spent.items():
            shares[label].append(s)
    with Image.open(image) as im:
        size = f"{im.size[0]} x {im.size[1]} {im.mode}"
    total = statistics.median(totals)
    print(f"{image.name} ({size}, {image.stat().st_size / 1e6:.1f} MB), model {model_path} "
          f"(MobileNet {model.variant}): file -> probability and heatmap {total * 1000:.0f} ms "
          f"(median of {a.repeats}), + {statistics.median(png_times) * 1000:.0f} ms for the heatmap's PNG")
    accounted = 0.0
    for label, _, _ in PARTS:
        ms = statistics.median(shares[label]) * 1000
        accounted += ms
        print(f"  {label:52s} {ms:7.1f} ms")
    rest = total * 1000 - accounted
    print(f"  {'the rest (head, caption, bookkeeping)':52s} {rest:7.1f} ms" if rest >= 0 else
          f"  the parts overlap by {-rest:.1f} ms (the X-ray's own decode runs beside the network's input and pass)")


if __name__ == "__main__":
    main()
