"""ImageNet top-5 of images: the visible proof that the weights load right.

    python -m dsconv.imagenet ../shared/weights/sample_images/elephant.jpg --alpha 0.25
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from dsconv import PARTIAL, DsconvError, HelpFormatter, fail, images, mobilenet, weights
from dsconv.mobilenet import ALPHAS

ALPHA = 0.75
RESOLUTION = 224
TOP = 5


def class_names(path=None):
    """The 1000 ImageNet class names in Keras' index order, or None if not found."""
    repo = Path(__file__).resolve().parent.parent
    candidates = [Path(path)] if path else [repo.parent / "shared" / "weights" / "imagenet_classes.txt",
                                            Path("../shared/weights/imagenet_classes.txt")]
    for p in candidates:
        if p.is_file():
            names = p.read_text().split()
            if len(names) != 1000:
                raise DsconvError(f"{p}: expected 1000 class names, found {len(names)}")
            return names
    if path:
        raise FileNotFoundError(f"{path}: no such file")
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dsconv.imagenet", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("images", nargs="+", help="image files (anything Pillow reads)")
    parser.add_argument("--alpha", type=float, default=ALPHA, choices=ALPHAS, help="width multiplier")
    parser.add_argument("--resolution", type=int, default=RESOLUTION, help="input size, a multiple of 32")
    parser.add_argument("--top", type=int, default=TOP, help="how many classes to print")
    parser.add_argument("--classes", help="ImageNet class names, one a line "
                                          "(default ../shared/weights/imagenet_classes.txt)")
    args = parser.parse_args(argv)
    try:
        mobilenet.check_variant(args.alpha, args.resolution)
    except DsconvError as e:
        parser.error(f"--resolution: {e}")
    if not 1 <= args.top <= 1000:
        parser.error("--top must be from 1 to 1000")
    try:
        net = weights.load(args.alpha, args.resolution, head=True)
        names = class_names(args.classes)
    except (DsconvError, OSError) as e:
        fail(e)
    from dsconv import kernels  # after the arguments: its compiled code takes 0.4 s to load
    failed = 0
    for path in args.images:
        try:
            x = images.load(path, args.resolution)[None]
        except images.ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        _, logits = net.forward(x)
        p = kernels.softmax(logits)[0]
        print(f"{path}  (MobileNet {args.alpha:g}-{args.resolution})")
        for i in np.argsort(-p)[:args.top]:
            print(f"  {p[i]:7.2%}  {names[i] if names else '':24s} {i}")
    sys.exit(PARTIAL if failed else 0)


if __name__ == "__main__":
    main()
