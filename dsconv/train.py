"""Train the pneumonia classifier: a softmax layer on frozen MobileNet v1 bottlenecks.

    python -m dsconv.train --data ../shared/data/chest_xray/train

Bottlenecks are computed once and cached (dsconv.bottlenecks); each repeat
(dsconv.repeats) splits the images with its seed (0, 1, ...), trains the head
(dsconv.classifier), picks the decision threshold on the validation partition
and reports test metrics at 0.5 and at that threshold. Written to --out: results.json,
model.h5 (the repeat with the lowest validation loss; every repeat also as
model-seedK.h5), curves.csv and curves.png (with matplotlib). Every model
file carries the X-ray check (dsconv.xraycheck), fitted once on all the
readable X-rays of --data, --val-dir, --test-dir and --site-dir.
"""
import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

from dsconv import (NOT_WRITTEN, DsconvError, HelpFormatter, __version__, bottlenecks, classifier, data, fail, files,
                    forms, images, interrupted, metrics, paper, repeats, report, subtypes, weights, xraycheck)
from dsconv.mobilenet import ALPHAS, check_variant

ALPHA = 0.75
RESOLUTION = 224
SPLIT = "80/10/10"
OLD_RUN = re.compile(r"results\.json|model(-seed\d+)?\.h5|[^.].*\.(png|csv)")  # the files --overwrite replaces
GROUP_BY = "patient"
REPEATS = 3
BOTTLENECK = "pooled"
SAMPLING = "balanced"
# Upper bounds checked when the arguments are parsed, so that a typo ends in a message, not out of memory
LIMITS = {"repeats": 100, "steps": 1_000_000, "batch_size": 10_000, "eval_every": 1_000_000, "workers": 64,
          "site_weight": 100, "forms": 8}
MAX_DRAWS = 50_000_000  # steps x batch size: the row indices drawn up front, 400 MB
# Beyond retrain.py, chosen for what holds up on a later clinic's X-rays (docs/external-validation.md)
TTA = "flip"
BLUR = 1.0
FORMS = 2
INVARIANCE = 32
SITE_WEIGHT = 5
THRESHOLD_RULE = "accuracy"
STANDARDIZE = True
STEPS = [classifier.STEPS]
WEIGHT_DECAY = [0.1]
# The paper's protocol, one flag away: retrain.py's head and the paper's best cell's split and steps
PAPER = {"standardize": False, "weight_decay": [0.0], "tta": "none", "blur": 0.0, "forms": 0, "invariance": 0,
         "site_dir": "none", "site_weight": 0,
         "threshold_rule": "youden", "group_by": paper.BEST_CELL[3], "split": paper.BEST_CELL[4],
         "steps": [paper.BEST_SETTING[1]]}


def paper_flags():
    """PAPER as the flags it stands for."""
    return " ".join("--no-standardize" if k == "standardize" else
                    f"--{k.replace('_', '-')} {v[0] if isinstance(v, list) else v}" for k, v in PAPER.items())


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dsconv.train", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="folder with one subfolder of images per class")
    p.add_argument("--test-dir", help="evaluate on this folder (same class subfolders) instead of carving "
                                      "a test partition out of --data; the test share of --split then "
                                      "goes to training")
    p.add_argument("--val-dir", help="a labelled folder (same class subfolders), such as a sample of the site "
                                     "the model will serve: the threshold, step count and weight decay are "
                                     "chosen on it instead of on a validation partition of --data, whose "
                                     "share then goes to training; with --test-dir too, all of --data trains")
    p.add_argument("--site-dir", help="adapt to a site: standardise bottlenecks with the statistics of this "
                                      "folder's images (labels not used; class subfolders or not); default: "
                                      "the --val-dir if given; 'none' to adapt to nothing")
    p.add_argument("--alpha", type=alpha_list, default=[ALPHA], metavar="A[,A...]",
                   help=f"MobileNet width multiplier, one of {', '.join(map(str, ALPHAS))}; several "
                        "separated by commas concatenate their bottlenecks (an ensemble)")
    p.add_argument("--tta", default=TTA, choices=bottlenecks.TTAS,
                   help="test-time augmentation: flip averages each image's bottleneck with its mirror "
                        "image's, in training and prediction alike")
    p.add_argument("--forms", type=int, default=FORMS, metavar="N",
                   help="train on N more forms of each training (and --val-dir) image too: re-encoded at a random "
                        "JPEG quality or as PNG, rescaled, its grey levels bent a little (dsconv.forms), so that "
                        "the decision depends less on the form an X-ray comes in; each costs one more "
                        "bottleneck pass over the images (cached)")
    p.add_argument("--invariance", type=int, default=INVARIANCE, metavar="K",
                   help="with --forms: the decision ignores the K directions along which the forms of an image "
                        "move its bottleneck most (dsconv.classifier: form invariance); 0: none")
    p.add_argument("--blur", type=float, default=BLUR, metavar="SIGMA",
                   help="Gaussian blur of every input after its resize to r x r, in pixels (training and "
                        "prediction alike): it smooths away JPEG blocks and resampling, in which the forms of "
                        "an X-ray differ most; 0: none (retrain.py)")
    p.add_argument("--resolution", type=int, default=RESOLUTION, help="input size r (r x r), a multiple of 32")
    p.add_argument("--bottleneck", default=BOTTLENECK, choices=bottlenecks.KINDS,
                   help="pooled 1024*alpha features, or the 1000 ImageNet logits (retrain.py's choice)")
    p.add_argument("--split", default=SPLIT, help="train/validation/test percentages")
    p.add_argument("--group-by", default=GROUP_BY, choices=("patient", "image"),
                   help="keep each patient's images on one side of the split, or split images "
                        "independently (the paper)")
    p.add_argument("--repeats", type=int, default=REPEATS, help="number of random splits, seeds 0..N-1")
    p.add_argument("--positive", default=data.POSITIVE,
                   help="class counted positive for sensitivity (if absent: the last class)")
    p.add_argument("--subtypes", action="store_true",
                   help="three classes: the positive class split into BACTERIAL and VIRAL by the file names "
                        "('_bacteria_', '_virus_'); pneumonia is decided at the threshold on P(bacterial) + "
                        "P(viral), then its subtype at a second threshold chosen on validation (dsconv.subtypes)")
    p.add_argument("--lr", type=float, default=classifier.LR, help="SGD learning rate")
    p.add_argument("--steps", type=number_list(int), default=STEPS, metavar="N[,N...]",
                   help="SGD steps; several: the one with the best validation AUC (one training, "
                        "snapshots)")
    p.add_argument("--batch-size", type=int, default=classifier.BATCH, help="images per SGD step")
    p.add_argument("--sampling", default=SAMPLING, choices=classifier.SAMPLINGS,
                   help="batches drawn class first (balanced, retrain.py) or from all images (natural)")
    p.add_argument("--eval-every", type=int, default=classifier.EVAL_EVERY,
                   help="record training curves every this many steps")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=STANDARDIZE,
                   help="scale bottlenecks to zero mean, unit variance on the training partition "
                        "(not in retrain.py)")
    p.add_argument("--weight-decay", type=number_list(float), default=WEIGHT_DECAY, metavar="WD[,WD...]",
                   help="L2 weight decay (not in retrain.py); several: the one with the best validation AUC")
    p.add_argument("--paper", action="store_true",
                   help=f"the paper's protocol (retrain.py): {paper_flags()}; flags given explicitly still win")
    p.add_argument("--site-weight", type=int, default=SITE_WEIGHT,
                   help="with --val-dir: its images also train, each this many times, and every choice "
                        f"made on them uses out-of-fold scores ({repeats.FOLDS} folds of patients); 0: they only "
                        "validate")
    p.add_argument("--threshold-rule", default=THRESHOLD_RULE, choices=metrics.THRESHOLD_RULES,
                   help="choose the decision threshold maximising Youden's J (sensitivity + specificity) "
                        "or accuracy on validation")
    p.add_argument("--target-sensitivity", type=float,
                   help="choose the highest threshold reaching this validation sensitivity "
                        "instead of following --threshold-rule")
    p.add_argument("--cache", help=f"bottleneck cache folder (default $DSCONV_CACHE or "
                                   f"{bottlenecks.default_cache_dir()})")
    p.add_argument("--workers", type=int, default=bottlenecks.WORKERS, help="image decoding threads")
    p.add_argument("--out", help="output folder (default: a new folder under runs/)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out: its files are removed once the new ones are written")
    images.add_max_pixels(p)
    if "--paper" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**PAPER)
    args = p.parse_args(argv)
    for name, most in LIMITS.items():
        least, values = 0 if name in ("site_weight", "forms") else 1, np.atleast_1d(getattr(args, name))
        if not least <= values.min() <= values.max() <= most:
            p.error(f"--{name.replace('_', '-')} must be from {least} to {most}")
    if not 0 <= args.invariance <= 256:
        p.error("--invariance must be from 0 to 256 directions")
    if not (math.isfinite(args.blur) and 0 <= args.blur <= 8):
        p.error(f"--blur {args.blur} must be from 0 to 8 pixels")
    if args.max_pixels < 1:
        p.error("--max-pixels must be positive")
    images.set_max_pixels(args.max_pixels)
    if max(args.steps) * args.batch_size > MAX_DRAWS:
        p.error(f"--steps {max(args.steps)} x --batch-size {args.batch_size} draws more than {MAX_DRAWS:,} rows; "
                "use fewer steps or a smaller batch")
    try:
        check_variant(args.alpha[0], args.resolution)
    except DsconvError as e:
        p.error(f"--resolution: {e}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr {args.lr} must be a positive number, such as 0.01")
    if not all(math.isfinite(w) and w >= 0 for w in args.weight_decay):
        p.error(f"--weight-decay {','.join(f'{w:g}' for w in args.weight_decay)} must be zero or positive "
                "number(s)")
    try:
        data.parse_split(args.split)
    except data.DataError as e:
        p.error(str(e))
    if args.target_sensitivity is not None and not 0 < args.target_sensitivity <= 1:
        p.error("--target-sensitivity must be in (0, 1], such as 0.95")
    return args


def number_list(kind):
    """An argparse type: "4000" -> [4000]; "1000,4000" -> [1000, 4000], sorted, without repeats."""
    def parse(text):
        try:
            return sorted(set(kind(v) for v in text.split(",")))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give a number or several separated by commas") from None
    parse.__name__ = kind.__name__
    return parse


def alpha_list(text):
    """"0.75" -> [0.75]; "0.25,0.75" -> [0.25, 0.75]."""
    try:
        alphas = [float(a) for a in text.split(",")]
    except ValueError:
        alphas = []
    if not alphas or any(a not in ALPHAS for a in alphas) or len(set(alphas)) != len(alphas):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more of {', '.join(map(str, ALPHAS))}, "
                                         "separated by commas, each once")
    return alphas


def fresh_out_dir(args):
    alphas = "+".join(f"{a:g}" for a in args.alpha)
    base = Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-{alphas}-{args.resolution}")
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


def bottlenecks_of(ds, nets, args, cache_dir, skipped):
    """The Dataset of the readable images and their bottlenecks; unreadable files go to ``skipped``."""
    feats, failed = bottlenecks.extract(ds.paths, nets, args.bottleneck, cache_dir, workers=args.workers,
                                        tta=args.tta, blur=args.blur)
    ds = ds.readable(failed)
    skipped.update({str(p): msg for p, msg in failed.items()})
    for c, n in ds.counts().items():
        if n == 0:
            raise data.DataError(f"{ds.root / c}: no readable image in this class folder")
    return ds, np.concatenate(feats, axis=1)


def forms_of(ds, nets, args, cache_dir):
    """The bottlenecks of --forms random forms of the (readable) images of ds, one array per form, rows aligned."""
    out = []
    for form in forms.draws(args.forms):
        feats, failed = bottlenecks.extract(ds.paths, nets, args.bottleneck, cache_dir, workers=args.workers,
                                            tta=args.tta, form=form, blur=args.blur)
        if failed:
            raise data.DataError(f"{len(failed)} image(s) could not be read in their {form.name} form, such as "
                                 f"{next(iter(failed.values()))}; remove them or give --forms 0")
        out.append(np.concatenate(feats, axis=1))
    return out


def versions():
    import h5py
    import numba
    import PIL
    return {"dsconv": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "h5py": h5py.__version__, "pillow": PIL.__version__,
            "platform": platform.platform()}


def network_info(nets, args, width):
    """The model file's description of the frozen side: scalars for one network, lists for an ensemble."""
    one = lambda values: values[0] if len(values) == 1 else values
    info = {"alpha": one([n.alpha for n in nets]), "resolution": args.resolution,
            "trained_resolution": one([n.trained_resolution for n in nets]),
            "weights_file": one([Path(n.weights_path).name for n in nets]),
            "weights_sha256": one([n.weights_sha256 for n in nets]),
            "bottleneck": args.bottleneck, "features": int(width), "preprocessing": images.preprocessing(args.blur),
            "dsconv": __version__}
    if args.tta != "none":
        info["tta"] = args.tta
    if args.blur:
        info["blur"] = args.blur
    return info


def decision_info(args, r, val_ds):
    """What the page says of the decision: the borderline band and, with --val-dir, the site sample's figures.

    The site sample's figures are those of the validation scores the
    threshold was chosen on (out-of-fold with --site-weight), at that
    threshold, with patient-bootstrap 95% intervals.
    """
    out = {}
    if r["borderline"] is not None:
        out["borderline"] = r["borderline"]
    rep = r["validation_report"]
    if args.val_dir and rep:
        out["site_evaluation"] = dict(
            {k: rep["at_threshold"][k] for k in ("accuracy", "sensitivity", "specificity", "auc")},
            dir=str(val_ds.root), images=r["sizes"]["val"], patients=rep["patients"],
            ci95=rep["ci95_at_threshold"], threshold=r["threshold"],
            scores=r["choice"]["validation_scores"],
            confusion=rep["at_threshold"]["confusion"])
    return out


def subtype_summary(runs, best):
    """results.json's summary.subtypes: the test figures of the model kept, and their mean and std over repeats."""
    tests = [r["subtypes"]["test"] for r in runs]
    return dict(runs[best]["subtypes"]["test"], threshold=runs[best]["subtypes"]["threshold"],
                threshold_rule=runs[best]["subtypes"]["threshold_rule"],
                over_repeats=dict(metrics.summary([t["bacterial_vs_viral"] for t in tests],
                                                  ("accuracy", "sensitivity", "specificity", "auc")),
                                  classes_accuracy=metrics.summary([t for t in tests], ("accuracy",))["accuracy"]),
                sensitivity="recall of BACTERIAL (bacterial positive)", specificity="recall of VIRAL")


def print_by_form(figures):
    """The figures of each form of a set that mixes them (repeats.by_form), one line each."""
    for kind, e in (figures or {}).items():
        print(f"    of which {e['images']} {kind}: accuracy {metrics.pct(e['accuracy'])}%, sensitivity "
              f"{metrics.pct(e['sensitivity'])}%, specificity {metrics.pct(e['specificity'])}%, AUC {e['auc']:.3f}")


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    times = {}
    out = Path(args.out) if args.out else fresh_out_dir(args)
    try:
        if (out / "results.json").exists() and not args.overwrite:
            raise DsconvError(f"{out}: holds a run already (results.json); give another --out, or --overwrite "
                              "to replace it")
        files.check_writable(out, "give another --out")
        train_pct, val_pct, test_pct = data.parse_split(args.split)
        if args.val_dir:
            train_pct, val_pct = train_pct + val_pct, 0.0
        if args.test_dir:
            train_pct, test_pct = train_pct + test_pct, 0.0
        elif test_pct == 0:
            raise data.DataError(f"--split {args.split} leaves no test partition; give a test share "
                                 "or --test-dir")
        percentages = (train_pct, val_pct, test_pct)
        t = time.perf_counter()
        ds = data.scan(args.data)
        val_ds = data.scan(args.val_dir, ds.classes) if args.val_dir else None
        test_ds = data.scan(args.test_dir, ds.classes) if args.test_dir else None
        if args.site_dir is None and args.val_dir:
            args.site_dir = args.val_dir
        if args.site_dir == "none":
            args.site_dir = None
        site_paths = data.image_files(args.site_dir) if args.site_dir else None
        times["scan_s"] = time.perf_counter() - t
        positive = data.positive_index(ds.classes, args.positive)
        if ds.classes[positive] != args.positive:
            print(f"note: no class {data.POSITIVE}; counting {ds.classes[positive]} as positive "
                  "(choose with --positive)")
        if args.subtypes:
            args.positive = ds.classes[positive]
            ds, group = subtypes.split(ds, positive)
            val_ds, test_ds = (subtypes.split(d, positive)[0] if d else None for d in (val_ds, test_ds))
            positive = group
        data.warn_overlaps([(n, d) for n, d in (("--data", ds), ("--val-dir", val_ds), ("--test-dir", test_ds)) if d])
        t = time.perf_counter()
        nets = [weights.load(a, args.resolution, head=args.bottleneck == "logits") for a in args.alpha]
        times["load_network_s"] = time.perf_counter() - t
        t = time.perf_counter()
        skipped = {}
        cache_dir = Path(args.cache) if args.cache else None
        ds, x = bottlenecks_of(ds, nets, args, cache_dir, skipped)
        x_forms = forms_of(ds, nets, args, cache_dir)
        val = test = site = None
        if val_ds is not None:
            val_ds, x_val = bottlenecks_of(val_ds, nets, args, cache_dir, skipped)
            val = repeats.Part(x_val, val_ds.labels, val_ds.paths,
                               tuple(forms_of(val_ds, nets, args, cache_dir)) if args.site_weight else ())
        if test_ds is not None:
            test_ds, x_test = bottlenecks_of(test_ds, nets, args, cache_dir, skipped)
            test = repeats.Part(x_test, test_ds.labels, test_ds.paths)
        if site_paths is not None:
            site, failed = bottlenecks.extract(site_paths, nets, args.bottleneck, cache_dir, workers=args.workers,
                                               tta=args.tta, blur=args.blur)
            site = np.concatenate(site, axis=1)
            skipped.update({str(q): msg for q, msg in failed.items()})
            classifier.check_site(site, x.std(axis=0), args.site_dir)
        times["bottlenecks_s"] = time.perf_counter() - t
        t = time.perf_counter()
        xrays = [(ds.root, ds.paths, x)] + [(d.root, d.paths, p.x) for d, p in ((val_ds, val), (test_ds, test))
                                            if d is not None]
        if site is not None:
            xrays.append((args.site_dir, [q for q in site_paths if q not in failed], site))
        check = xraycheck.fit_folders(xrays)
        times["xray_check_s"] = time.perf_counter() - t
        data.check_partitions(len(ds.paths), percentages, args.split, args.test_dir)
        warnings = data.hygiene([d for d in (ds, val_ds, test_ds) if d is not None])
        t = time.perf_counter()
        runs, models, all_curves, test_scores = [], [], [], []
        for seed in range(args.repeats):
            result, model, curves, s_test = repeats.run_repeat(seed, args, percentages, ds, x, val, test, site,
                                                               positive, x_forms)
            runs.append(result)
            models.append(model)
            all_curves.append((seed, curves))
            test_scores.append(s_test)
        times["training_s"] = time.perf_counter() - t
        if check is None:
            print(f"note: too few X-rays (under {xraycheck.MIN_IMAGES}, or one patient) to fit the X-ray check; "
                  "the model file has none, and only its pixel checks run")
        else:
            for model in models:
                check.store(model)
        outputs = outputs_of(args, nets, ds, val_ds, test_ds, val, test, site, x, positive, skipped, warnings,
                             runs, models, all_curves, test_scores, times, t_start)
    except (DsconvError, OSError) as e:
        fail(e)
    except KeyboardInterrupt:
        interrupted("nothing was written; the bottlenecks computed so far are cached, so the same command resumes")
    written = False
    try:
        # all or nothing: every file to a temporary name first, then renamed, results.json first
        with files.interrupts_deferred():
            out.mkdir(parents=True, exist_ok=True)
            files.remove_strays(out)
            files.write_all({out / name: b for name, b in outputs.items()})
            written = True
            for old in set(out.iterdir()) - {out / name for name in outputs}:
                if OLD_RUN.fullmatch(old.name) and old.is_file():
                    old.unlink(missing_ok=True)
    except OSError as e:
        fail(f"could not write the outputs to {out} ({e.strerror or e}); nothing was written there; "
             "free some space or give another --out", NOT_WRITTEN)
    except KeyboardInterrupt:
        interrupted(f"the outputs were written completely to {out}" if written else "nothing was written")
    print(f"wrote {out}/: {', '.join(n for n in outputs if not n.startswith('model-'))} "
          f"(total {times['total_s']:.1f} s)")


def outputs_of(args, nets, ds, val_ds, test_ds, val, test, site, x, positive, skipped, warnings, runs, models,
               all_curves, test_scores, times, t_start):
    """Print the tables; return {file name: bytes} of every output, results.json first."""
    info = network_info(nets, args, x.shape[1])
    described = {name: forms.summary([forms.describe(p) for p in d.paths]) if d else None
                 for name, d in (("training", ds), ("site", val_ds), ("test", test_ds or ds))}
    info["forms"] = forms.contract(described["training"], described["site"], described["test"], args.forms,
                                   args.invariance, info["preprocessing"])
    settings = dict(vars(args))
    training = {k: v for k, v in settings.items() if k not in ("out", "cache", "workers", "overwrite", "max_pixels")}
    best = min(range(len(runs)), key=lambda k: (np.nan_to_num(runs[k]["validation_loss"], nan=np.inf), k))
    test_name = str(test_ds.root) if test_ds else "test partition of --data"
    model_files = {}
    for model, r in zip(models, runs):
        rep = r["test_report"]
        model.info = dict(info, **model.info, threshold_rule=r["threshold_rule"],  # model.info: the X-ray check
                          training=dict(training, seed=r["seed"], sizes=r["sizes"]),
                          evaluation={test_name: dict(
                              {k: rep["at_threshold"][k] for k in ("accuracy", "sensitivity", "specificity", "auc")},
                              images=r["sizes"]["test"], patients=rep["patients"], ci95=rep["ci95_at_threshold"],
                              threshold=r["threshold"], form=info["forms"]["evaluation"])})
        if site is not None or val_ds is not None:
            model.info["calibration"] = {
                "site_dir": str(args.site_dir) if site is not None else None,
                "site_images": int(len(site)) if site is not None else 0,
                "threshold_dir": str(val_ds.root) if val_ds else None,
                "threshold_images": int(len(val.labels)) if val_ds else 0,
                "threshold_rule": r["threshold_rule"], "target_sensitivity": args.target_sensitivity}
        model.info.update(decision_info(args, r, val_ds))
        if "site_evaluation" in model.info:
            model.info["site_evaluation"]["form"] = info["forms"]["site"]
        model.info = clean(model.info)
        model_files[f"model-seed{r['seed']}.h5"] = model.to_bytes()
    model_files["model.h5"] = model_files[f"model-seed{runs[best]['seed']}.h5"]

    summary = {"test": metrics.summary([r["test"] for r in runs]),
               "test_at_threshold": metrics.summary([r["test_at_threshold"] for r in runs])}
    alphas = "+".join(f"{a:g}" for a in args.alpha)
    where = (f"trained on all of --data, threshold on {args.val_dir}" if args.val_dir and args.test_dir
             else f"split {args.split} by {args.group_by}")
    title = (f"MobileNet {alphas}-{args.resolution} {args.bottleneck}"
             + (f" {args.tta}" if args.tta != "none" else "") + (", site-adapted" if site is not None else "")
             + f", {where}, lr {args.lr:g}, steps {','.join(map(str, args.steps))}, weight decay "
               f"{','.join(f'{w:g}' for w in args.weight_decay)}")
    lines = repeats.table(runs, summary)
    print(f"\n{title}; test metrics in %, at 0.5 and at the validation-chosen threshold")
    print("\n".join(lines))
    s = summary["test"]
    percent = {k: metrics.pct(s[k]["mean"], 2) for k in ("accuracy", "sensitivity", "specificity")}
    missing = "n/a" in percent["sensitivity"] + percent["specificity"]
    print(f"\ntest accuracy {percent['accuracy']}% ± {metrics.pct(np.nan_to_num(s['accuracy']['std']), 2)}, "
          f"sensitivity {percent['sensitivity']}%, specificity {percent['specificity']}% "
          f"(mean ± sample std over {len(runs)} repeat(s), threshold 0.5"
          + ("; n/a: a test partition lacks that class)" if missing else ")"))
    r = runs[best]
    if r["validation_report"] and args.val_dir:
        print(f"model.h5 (seed {r['seed']}) on --val-dir {args.val_dir} [{info['forms']['site']}], "
              f"{r['choice']['validation_scores']} scores, threshold chosen on them (optimistic): "
              + report.describe(r["validation_report"], r["threshold"]))
        print_by_form(r["validation_by_form"])
    print(f"model.h5 (seed {r['seed']}) on {test_name} [{info['forms']['evaluation']}]: "
          + report.describe(r["test_report"], r["threshold"]))
    print_by_form(r["test_by_form"])
    if args.subtypes:
        summary["subtypes"] = subtype_summary(runs, best)
        if args.val_dir:
            print(f"  subtypes on --val-dir ({r['choice']['validation_scores']} scores, threshold chosen on them): "
                  + subtypes.describe(r["subtypes"]["validation"], r["subtypes"]["threshold"]))
        print(f"  subtypes on {test_name}: " + subtypes.describe(r["subtypes"]["test"], r["subtypes"]["threshold"]))
    figures = report.curve_files(all_curves, title)
    figures.update(report.test_figures(r["test_report"], *test_scores[best], r["threshold"], f"{title}\n{test_name}"))
    times["total_s"] = time.perf_counter() - t_start
    results = {
        "settings": settings, "network": info,
        "data": {"root": str(ds.root), "classes": ds.classes,
                 "positive": args.positive if args.subtypes else ds.classes[positive],
                 "images": ds.counts(), "test_dir": str(test_ds.root) if test_ds else None,
                 "test_images": test_ds.counts() if test_ds else None,
                 "val_dir": str(val_ds.root) if val_ds else None,
                 "val_images": val_ds.counts() if val_ds else None,
                 "site_dir": str(args.site_dir) if args.site_dir else None,
                 "site_images": int(len(site)) if site is not None else None,
                 "skipped": len(skipped), "skipped_files": skipped, "warnings": warnings},
        "repeats": runs, "summary": dict(summary, form=info["forms"]["evaluation"]), "std": "sample standard deviation (ddof=1) over repeats",
        "ci95": "2.5th and 97.5th percentiles over 2000 resamples of whole patients",
        "model": "model.h5", "model_seed": runs[best]["seed"],
        "model_choice": "the repeat with the lowest final validation loss",
        "versions": versions(), "times": times,
    }
    return {"results.json": (json.dumps(clean(results), indent=2) + "\n").encode(), **model_files, **figures}


if __name__ == "__main__":
    main()
