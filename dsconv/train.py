"""Train the pneumonia classifier: a softmax layer on frozen MobileNet v1 bottlenecks.

    python -m dsconv.train --data ../shared/data/chest_xray/train

Bottlenecks are computed once and cached (dsconv.features); each repeat
splits the images with its seed (0, 1, ...), trains the head (dsconv.classifier),
picks the decision threshold on the validation partition and reports test
metrics at 0.5 and at that threshold. Written to --out: results.json,
model.h5 (the repeat with the lowest validation loss; every repeat also as
model-seedK.h5), curves.csv and curves.png (with matplotlib).
"""
import argparse
import io
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from dsconv import __version__, classifier, data, features, files, images, metrics, weights
from dsconv.mobilenet import ALPHAS

ALPHA = 0.75
RESOLUTION = 224
SPLIT = "80/10/10"
GROUP_BY = "patient"
REPEATS = 3
POSITIVE = "PNEUMONIA"
BOTTLENECK = "pooled"
SAMPLING = "balanced"
WORKERS = 2


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dsconv.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="folder with one subfolder of images per class")
    p.add_argument("--test-dir", help="evaluate on this folder (same class subfolders) instead of carving "
                                      "a test partition out of --data; the test share of --split then "
                                      "goes to training")
    p.add_argument("--alpha", type=float, default=ALPHA, choices=ALPHAS, help="MobileNet width multiplier")
    p.add_argument("--resolution", type=int, default=RESOLUTION, help="input size r (r x r), a multiple of 32")
    p.add_argument("--bottleneck", default=BOTTLENECK, choices=features.KINDS,
                   help="pooled 1024*alpha features, or the 1000 ImageNet logits (retrain.py's choice)")
    p.add_argument("--split", default=SPLIT, help="train/validation/test percentages")
    p.add_argument("--group-by", default=GROUP_BY, choices=("patient", "image"),
                   help="keep each patient's images on one side of the split, or split images "
                        "independently (the paper)")
    p.add_argument("--repeats", type=int, default=REPEATS, help="number of random splits, seeds 0..N-1")
    p.add_argument("--positive", default=POSITIVE,
                   help="class counted positive for sensitivity (if absent: the last class)")
    p.add_argument("--lr", type=float, default=classifier.LR, help="SGD learning rate")
    p.add_argument("--steps", type=int, default=classifier.STEPS, help="SGD steps")
    p.add_argument("--batch-size", type=int, default=classifier.BATCH, help="images per SGD step")
    p.add_argument("--sampling", default=SAMPLING, choices=classifier.SAMPLINGS,
                   help="batches drawn class first (balanced, retrain.py) or from all images (natural)")
    p.add_argument("--eval-every", type=int, default=classifier.EVAL_EVERY,
                   help="record training curves every this many steps")
    p.add_argument("--standardize", action="store_true",
                   help="scale bottlenecks to zero mean, unit variance on the training partition "
                        "(not in retrain.py)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (not in retrain.py)")
    p.add_argument("--target-sensitivity", type=float,
                   help="choose the highest threshold reaching this validation sensitivity "
                        "instead of maximising Youden's J")
    p.add_argument("--cache", help=f"bottleneck cache folder (default $DSCONV_CACHE or "
                                   f"{features.default_cache_dir()})")
    p.add_argument("--workers", type=int, default=WORKERS, help="image decoding threads")
    p.add_argument("--out", help="output folder (default: a new folder under runs/)")
    args = p.parse_args(argv)
    for name in ("repeats", "steps", "batch_size", "eval_every", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr {args.lr} must be a positive number, such as 0.01")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        p.error(f"--weight-decay {args.weight_decay} must be zero or a positive number")
    try:
        data.parse_split(args.split)
    except data.DataError as e:
        p.error(str(e))
    if args.target_sensitivity is not None and not 0 < args.target_sensitivity <= 1:
        p.error("--target-sensitivity must be in (0, 1], such as 0.95")
    return args


def fresh_out_dir(args):
    base = Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-{args.alpha:g}-{args.resolution}")
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def clean(x):
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def bottlenecks(ds, net, args, cache_dir, skipped):
    """The Dataset of the readable images and their bottlenecks; unreadable files go to ``skipped``."""
    feats, failed = features.extract(ds.paths, net, args.bottleneck, cache_dir, workers=args.workers)
    skipped.update({str(p): msg for p, msg in failed.items()})
    ds = ds.subset(np.array([p not in failed for p in ds.paths], bool))
    for c, n in ds.counts().items():
        if n == 0:
            raise data.DataError(f"{ds.root / c}: no readable image in this class folder")
    return ds, feats


def run_repeat(seed, args, pct, ds, x, test, positive):
    """Split, train, choose the threshold, evaluate: (result dict, Classifier, curves)."""
    groups = [data.patient_id(p) for p in ds.paths] if args.group_by == "patient" else None
    part = data.split(ds.labels, pct, seed, groups)
    if test is None:
        test = (x[part == 2], ds.labels[part == 2])
    tr, va = part == 0, part == 1
    if len(np.unique(ds.labels[tr])) < len(ds.classes):
        raise data.DataError(f"seed {seed}: a class has no training image; give more images or a "
                             "larger training share in --split")
    model, curves = classifier.train(
        x[tr], ds.labels[tr], ds.classes, x[va], ds.labels[va], lr=args.lr, steps=args.steps,
        batch=args.batch_size, sampling=args.sampling, eval_every=args.eval_every,
        standardize=args.standardize, weight_decay=args.weight_decay, seed=seed)
    model.positive = positive
    y_val = ds.labels[va] == positive
    s_val = model.scores(x[va])
    if not (y_val.any() and (~y_val).any()):
        model.threshold, rule = 0.5, "0.5 (the validation partition lacks a class)"
    elif args.target_sensitivity is not None:
        model.threshold = metrics.sensitivity_threshold(y_val, s_val, args.target_sensitivity)
        rule = f"highest reaching validation sensitivity {args.target_sensitivity:g}"
    else:
        model.threshold, rule = metrics.youden_threshold(y_val, s_val), "max Youden's J on validation"
    y_test, s_test = test[1] == positive, model.scores(test[0])
    sizes = {name: int(n) for name, n in zip(data.PARTITIONS, (tr.sum(), va.sum(), len(test[1])))}
    result = {
        "seed": seed, "sizes": sizes,
        "class_counts": {
            "train": {c: int(n) for c, n in zip(ds.classes, np.bincount(ds.labels[tr], minlength=len(ds.classes)))},
            "val": {c: int(n) for c, n in zip(ds.classes, np.bincount(ds.labels[va], minlength=len(ds.classes)))},
            "test": {c: int(n) for c, n in zip(ds.classes, np.bincount(test[1], minlength=len(ds.classes)))}},
        "threshold": model.threshold, "threshold_rule": rule,
        "validation": metrics.evaluate(y_val, s_val, 0.5) if len(y_val) else None,
        "validation_loss": curves["val_loss"][-1],
        "test": metrics.evaluate(y_test, s_test, 0.5),
        "test_at_threshold": metrics.evaluate(y_test, s_test, model.threshold),
    }
    return result, model, curves


def pct(v):
    return "   n/a" if v is None or math.isnan(v) else f"{100 * v:6.2f}"


def table(runs, summary):
    """The per-repeat and mean +/- std table, as lines."""
    cols = metrics.NAMES
    head = (f"{'seed':>5} {'train':>6} {'val':>5} {'test':>5} | "
            + " ".join(f"{c[:6]:>6}" for c in cols) + " | threshold: thr    acc   sens   spec")
    lines = [head, "-" * len(head)]
    for r in runs:
        t, tt = r["test"], r["test_at_threshold"]
        lines.append(f"{r['seed']:>5} {r['sizes']['train']:>6} {r['sizes']['val']:>5} {r['sizes']['test']:>5} | "
                     + " ".join(pct(t[c]) for c in cols)
                     + f" | {r['threshold']:15.3f} {pct(tt['accuracy'])} {pct(tt['sensitivity'])} "
                       f"{pct(tt['specificity'])}")
    lines.append("-" * len(head))
    s, st = summary["test"], summary["test_at_threshold"]
    lines.append(f"{'mean':>5} {'':>18} | " + " ".join(pct(s[c]["mean"]) for c in cols)
                 + f" | {'':15} {pct(st['accuracy']['mean'])} {pct(st['sensitivity']['mean'])} "
                   f"{pct(st['specificity']['mean'])}")
    lines.append(f"{'std':>5} {'':>18} | " + " ".join(pct(s[c]["std"]) for c in cols)
                 + f" | {'':15} {pct(st['accuracy']['std'])} {pct(st['sensitivity']['std'])} "
                   f"{pct(st['specificity']['std'])}")
    return lines


def curve_files(all_curves, title):
    """{"curves.csv": bytes, "curves.png": bytes (with matplotlib)} of the training curves."""
    keys = ("step", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
    lines = ["seed," + ",".join(keys)]
    for seed, c in all_curves:
        for row in zip(*(c[k] for k in keys)):
            lines.append(f"{seed}," + ",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
    out = {"curves.csv": ("\n".join(lines) + "\n").encode()}
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no curves.png "
              "(pip install matplotlib, or the extra: pip install -e .[plot])")
        return out
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for seed, c in all_curves:
        for ax, k in ((acc, "accuracy"), (loss, "loss")):
            ax.plot(c["step"], c[f"train_{k}"], lw=0.7, color="tab:orange", alpha=0.8,
                    label="train (batch)" if seed == all_curves[0][0] else None)
            ax.plot(c["step"], c[f"val_{k}"], lw=1.2, color="tab:blue",
                    label="validation" if seed == all_curves[0][0] else None)
    for ax, k in ((acc, "accuracy"), (loss, "cross-entropy")):
        ax.set_xlabel("step")
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    out["curves.png"] = png.getvalue()
    return out


def versions():
    import h5py
    import numba
    import PIL
    return {"dsconv": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "h5py": h5py.__version__, "pillow": PIL.__version__,
            "platform": platform.platform()}


def check_partitions(n, percentages, split_text, test_dir):
    """Refuse a split that leaves a partition it asks for empty (it would report "nan%")."""
    sizes = data.split_sizes(n, percentages)
    for name, share, size in zip(("training", "validation", "test"), percentages, sizes):
        if share > 0 and size == 0 and not (name == "test" and test_dir):
            raise data.DataError(f"--split {split_text} leaves the {name} partition empty with {n} images; "
                                 f"give it a larger share or more images")


def hygiene(ds, test_ds):
    """Warnings about the data: contradictory duplicates, test images also in training, tiny classes."""
    out = []
    dups = data.duplicates_across_classes(ds)
    if dups:
        a, b = dups[0]
        out.append(f"{len(dups)} image(s) sit in two class folders with identical content (e.g. {a} and {b}); "
                   "their labels contradict each other")
    if test_ds is not None:
        shared = data.shared_images(test_ds, ds)
        if shared:
            out.append(f"{len(shared)} test image(s) in {test_ds.root} also sit in the training data "
                       f"{ds.root} (e.g. {shared[0][0]} = {shared[0][1]}); the test metrics are optimistic")
    for d in (ds, test_ds) if test_ds is not None else (ds,):
        for c, n in data.small_classes(d).items():
            out.append(f"class {c} in {d.root} has only {n} image(s); a metric on it (sensitivity or "
                       "specificity) means little")
    for w in out:
        print(f"warning: {w}", file=sys.stderr)
    return out


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    times = {}
    out = Path(args.out) if args.out else fresh_out_dir(args)
    try:
        files.check_writable(out, "give another --out")
        percentages = data.parse_split(args.split)
        if args.test_dir:
            percentages = (percentages[0] + percentages[2], percentages[1], 0.0)
        elif percentages[2] == 0:
            raise data.DataError(f"--split {args.split} leaves no test partition; give a test share "
                                 "or --test-dir")
        t = time.perf_counter()
        ds = data.scan(args.data)
        test_ds = data.scan(args.test_dir, ds.classes) if args.test_dir else None
        times["scan_s"] = time.perf_counter() - t
        if args.positive in ds.classes:
            positive = ds.classes.index(args.positive)
        elif args.positive == POSITIVE:
            positive = len(ds.classes) - 1
            print(f"note: no class {POSITIVE}; counting {ds.classes[positive]} as positive "
                  "(choose with --positive)")
        else:
            raise data.DataError(f"--positive {args.positive} is not one of the classes {ds.classes}")
        t = time.perf_counter()
        net = weights.load(args.alpha, args.resolution, head=args.bottleneck == "logits")
        times["load_network_s"] = time.perf_counter() - t
        t = time.perf_counter()
        skipped = {}
        cache_dir = Path(args.cache) if args.cache else None
        ds, x = bottlenecks(ds, net, args, cache_dir, skipped)
        test = None
        if test_ds is not None:
            test_ds, x_test = bottlenecks(test_ds, net, args, cache_dir, skipped)
            test = (x_test, test_ds.labels)
        times["bottlenecks_s"] = time.perf_counter() - t
        check_partitions(len(ds.paths), percentages, args.split, args.test_dir)
        warnings = hygiene(ds, test_ds)
        t = time.perf_counter()
        runs, models, all_curves = [], [], []
        for seed in range(args.repeats):
            result, model, curves = run_repeat(seed, args, percentages, ds, x, test, positive)
            runs.append(result)
            models.append(model)
            all_curves.append((seed, curves))
        times["training_s"] = time.perf_counter() - t
        outputs = report(args, out, net, ds, test_ds, x, positive, skipped, warnings, runs, models, all_curves,
                         times, t_start)
    except (data.DataError, weights.WeightsError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted: nothing was written; the bottlenecks computed so far are cached, so the "
                 "same command resumes")
    try:
        # all or nothing: every file to a temporary name first, then renamed, results.json first
        with files.interrupts_deferred():
            out.mkdir(parents=True, exist_ok=True)
            files.remove_strays(out)
            files.write_all({out / name: b for name, b in outputs.items()})
    except OSError as e:
        sys.exit(f"error: could not write the outputs to {out} ({e.strerror or e}); nothing was written there; "
                 "free some space or give another --out")
    except KeyboardInterrupt:
        sys.exit(f"\ninterrupted: the outputs were written completely to {out}")
    print(f"wrote {out}/: {', '.join(n for n in outputs if not n.startswith('model-'))} "
          f"(total {times['total_s']:.1f} s)")


def report(args, out, net, ds, test_ds, x, positive, skipped, warnings, runs, models, all_curves, times, t_start):
    """Print the table; return {file name: bytes} of every output, results.json first."""
    info = {"alpha": net.alpha, "resolution": net.resolution, "trained_resolution": net.trained_resolution,
            "weights_file": Path(net.weights_path).name, "weights_sha256": net.weights_sha256,
            "bottleneck": args.bottleneck, "features": int(x.shape[1]), "preprocessing": images.PREPROCESSING,
            "dsconv": __version__}
    settings = dict(vars(args))
    training = {k: v for k, v in settings.items() if k not in ("out", "cache", "workers")}
    best = min(range(len(runs)), key=lambda k: (np.nan_to_num(runs[k]["validation_loss"], nan=np.inf), k))
    model_files = {}
    for model, r in zip(models, runs):
        model.info = dict(info, threshold_rule=r["threshold_rule"],
                          training=dict(training, seed=r["seed"], sizes=r["sizes"]))
        model_files[f"model-seed{r['seed']}.h5"] = model.to_bytes()
    model_files["model.h5"] = model_files[f"model-seed{runs[best]['seed']}.h5"]

    summary = {"test": metrics.summary([r["test"] for r in runs]),
               "test_at_threshold": metrics.summary([r["test_at_threshold"] for r in runs])}
    title = (f"MobileNet {net.alpha:g}-{net.resolution} {args.bottleneck}, split {args.split} by "
             f"{args.group_by}, lr {args.lr:g}, {args.steps} steps")
    lines = table(runs, summary)
    print(f"\n{title}; test metrics in %, at 0.5 and at the validation-chosen threshold")
    print("\n".join(lines))
    s = summary["test"]
    def percent(v):
        return "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}%"
    print(f"\ntest accuracy {percent(s['accuracy']['mean'])} ± {100 * np.nan_to_num(s['accuracy']['std']):.2f}, "
          f"sensitivity {percent(s['sensitivity']['mean'])}, specificity {percent(s['specificity']['mean'])} "
          f"(mean ± sample std over {len(runs)} repeat(s), threshold 0.5"
          + ("; n/a: a test partition lacks that class)" if "n/a" in percent(s['sensitivity']['mean'])
             + percent(s['specificity']['mean']) else ")"))
    curves = curve_files(all_curves, title)
    times["total_s"] = time.perf_counter() - t_start
    results = {
        "settings": settings, "network": info,
        "data": {"root": str(ds.root), "classes": ds.classes, "positive": ds.classes[positive],
                 "images": ds.counts(), "test_dir": str(test_ds.root) if test_ds else None,
                 "test_images": test_ds.counts() if test_ds else None,
                 "skipped": len(skipped), "skipped_files": skipped, "warnings": warnings},
        "repeats": runs, "summary": summary, "std": "sample standard deviation (ddof=1) over repeats",
        "model": "model.h5", "model_seed": runs[best]["seed"],
        "model_choice": "the repeat with the lowest final validation loss",
        "versions": versions(), "times": times,
    }
    return {"results.json": (json.dumps(clean(results), indent=2) + "\n").encode(), **model_files, **curves}


if __name__ == "__main__":
    main()
