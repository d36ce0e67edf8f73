"""Train the pneumonia classifier: a softmax layer on frozen MobileNet v1 bottlenecks.

    python -m dsconv.train --data ../shared/data/chest_xray/train

Bottlenecks are computed once and cached (dsconv.bottlenecks); each repeat
(dsconv.repeats) splits the images with its seed (0, 1, ...), trains the head
(dsconv.sgd), picks the decision threshold on the validation partition
and reports test metrics at 0.5 and at that threshold. Written to --out: results.json,
model.h5 (the repeat with the lowest validation loss; every repeat also as
model-seedK.h5), curves.csv and curves.png (with matplotlib). Every model
file carries the X-ray check (dsconv.xraycheck), fitted once on all the
readable X-rays of --data, --val-dir, --test-dir and --site-dir.
"""
import argparse
import dataclasses
import functools
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

from dsconv import (NOT_WRITTEN, DsconvError, HelpFormatter, bottlenecks, classifier, data, fail, files, forms, images,
                    interrupted, metrics, note, paper, repeats, sgd, subtypes, weights, xraycheck)
from dsconv.mobilenet import ALPHAS, check_variant
from dsconv.outputs import Results, outputs_of
from dsconv.settings import Settings

ALPHA = 0.75
RESOLUTION = 224
SPLIT = "80/10/10"
RUN_OPTIONS = ("cache", "workers", "out", "overwrite", "max_pixels")  # flags of the run, not of what it trains
OLD_RUN = re.compile(r"results\.json|model(-seed\d+)?\.h5|[^.].*\.(png|csv)")  # the files --overwrite replaces
GROUP_BY = "patient"
REPEATS = 3
BOTTLENECK = "pooled"
SAMPLING = "balanced"
# Upper bounds checked when the arguments are parsed, so that a typo ends in a message, not out of memory
LIMITS = {"repeats": 100, "steps": 1_000_000, "batch_size": 10_000, "eval_every": 1_000_000, "workers": 64,
          "site_weight": 100, "forms": 8, "form_tta": 16}
MAX_DRAWS = 50_000_000  # steps x batch size: the row indices drawn up front, 400 MB
# Beyond retrain.py, chosen for what holds up on a later clinic's X-rays (docs/external-validation.md)
TTA = "flip"
BLUR = 1.0
FORMS = 2
INVARIANCE = 32
FORM_TTA = 6
SITE_WEIGHT = 5
THRESHOLD_RULE = "accuracy"
STANDARDIZE = True
STEPS = [sgd.STEPS]
WEIGHT_DECAY = [0.1]
# The paper's protocol, one flag away: retrain.py's head and the paper's best cell's split and steps
PAPER = {"standardize": False, "weight_decay": [0.0], "tta": "none", "blur": 0.0, "forms": 0, "invariance": 0,
         "form_tta": 0, "site_dir": "none", "site_weight": 0,
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
                        "move its bottleneck most (dsconv.sgd: form invariance); 0: none")
    p.add_argument("--blur", type=float, default=BLUR, metavar="SIGMA",
                   help="Gaussian blur of every input after its resize to r x r, in pixels (training and "
                        "prediction alike): it smooths away JPEG blocks and resampling, in which the forms of "
                        "an X-ray differ most; 0: none (retrain.py)")
    p.add_argument("--form-tta", type=int, default=FORM_TTA, metavar="K",
                   help="with --val-dir: score every image (site sample, test images, and later every input to "
                        "predict, the API and the page) by the mean of its probabilities as given and in K "
                        "test-time forms, the same K for every image (dsconv.forms.test_forms): decisions then "
                        "depend less on the form an X-ray comes in; each costs one more forward pass per image "
                        "scored; 0: none. Without --val-dir: 0")
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
    p.add_argument("--lr", type=float, default=sgd.LR, help="SGD learning rate")
    p.add_argument("--steps", type=number_list(int), default=STEPS, metavar="N[,N...]",
                   help="SGD steps; several: the one with the best validation AUC (one training, "
                        "snapshots)")
    p.add_argument("--batch-size", type=int, default=sgd.BATCH, help="images per SGD step")
    p.add_argument("--sampling", default=SAMPLING, choices=sgd.SAMPLINGS,
                   help="batches drawn class first (balanced, retrain.py) or from all images (natural)")
    p.add_argument("--eval-every", type=int, default=sgd.EVAL_EVERY,
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
        least, values = 0 if name in ("site_weight", "forms", "form_tta") else 1, np.atleast_1d(getattr(args, name))
        if not least <= values.min() <= values.max() <= most:
            p.error(f"--{name.replace('_', '-')} must be from {least} to {most}")
    if not 0 <= args.invariance <= 256:
        p.error("--invariance must be from 0 to 256 directions")
    if not (math.isfinite(args.blur) and 0 <= args.blur <= 8):
        p.error(f"--blur {args.blur} must be from 0 to 8 pixels")
    if args.max_pixels < 1:
        p.error("--max-pixels must be positive")
    images.set_max_pixels(args.max_pixels)
    if not args.val_dir:
        args.form_tta = 0  # the threshold is then chosen on a partition of --data, without its test-time forms
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


def fresh_out_dir(settings):
    alphas = "+".join(f"{a:g}" for a in settings.alpha)
    base = Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-{alphas}-{settings.resolution}")
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def bottlenecks_of(ds, extract, skipped):
    """The Dataset of the readable images and their bottlenecks; unreadable files go to ``skipped``.

    ``extract``: bottlenecks.extract with the training's networks and settings.
    """
    feats, failed = extract(ds.paths)
    ds = ds.readable(failed)
    skipped.update({str(p): msg for p, msg in failed.items()})
    for c, n in ds.counts().items():
        if n == 0:
            raise data.DataError(f"{ds.root / c}: no readable image in this class folder")
    return ds, np.concatenate(feats, axis=1)


def forms_of(ds, extract, kinds, flag, mask=None):
    """The bottlenecks of ds's images (those in ``mask``) in each Form of ``kinds`` (forms.draws(n) or
    forms.test_forms(n)), one array per form, rows aligned; ``flag``: the option that turns them off."""
    paths = ds.paths if mask is None else [q for q, m in zip(ds.paths, mask) if m]
    out = []
    for form in kinds:
        feats, failed = extract(paths, form=form)
        if failed:
            raise data.DataError(f"{len(failed)} image(s) could not be read in their {form.name} form, such as "
                                 f"{next(iter(failed.values()))}; remove them or give {flag} 0")
        out.append(np.concatenate(feats, axis=1))
    return tuple(out)


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    settings = Settings.from_args(args)
    options = {k: getattr(args, k) for k in RUN_OPTIONS}
    times = {}
    out = Path(args.out) if args.out else fresh_out_dir(settings)
    try:
        if (out / "results.json").exists() and not args.overwrite:
            raise DsconvError(f"{out}: holds a run already (results.json); give another --out, or --overwrite "
                              "to replace it")
        files.check_writable(out, "give another --out")
        train_pct, val_pct, test_pct = data.parse_split(settings.split)
        if settings.val_dir:
            train_pct, val_pct = train_pct + val_pct, 0.0
        if settings.test_dir:
            train_pct, test_pct = train_pct + test_pct, 0.0
        elif test_pct == 0:
            raise data.DataError(f"--split {settings.split} leaves no test partition; give a test share "
                                 "or --test-dir")
        percentages = (train_pct, val_pct, test_pct)
        t = time.perf_counter()
        ds = data.scan(settings.data)
        val_ds = data.scan(settings.val_dir, ds.classes) if settings.val_dir else None
        test_ds = data.scan(settings.test_dir, ds.classes) if settings.test_dir else None
        site_paths = data.image_files(settings.site_dir) if settings.site_dir else None
        times["scan_s"] = time.perf_counter() - t
        positive = data.positive_index(ds.classes, settings.positive)
        if ds.classes[positive] != settings.positive:
            note(f"no class {data.POSITIVE}; counting {ds.classes[positive]} as positive (choose with --positive)")
        if settings.subtypes:
            settings = dataclasses.replace(settings, positive=ds.classes[positive])
            ds, group = subtypes.split(ds, positive)
            val_ds, test_ds = (subtypes.split(d, positive)[0] if d else None for d in (val_ds, test_ds))
            positive = group
        data.warn_overlaps([(n, d) for n, d in (("--data", ds), ("--val-dir", val_ds), ("--test-dir", test_ds)) if d])
        t = time.perf_counter()
        nets = [weights.load(a, settings.resolution, head=settings.bottleneck == "logits") for a in settings.alpha]
        times["load_network_s"] = time.perf_counter() - t
        t = time.perf_counter()
        skipped = {}
        cache_dir = Path(args.cache) if args.cache else None
        extract = functools.partial(bottlenecks.extract, nets=nets, kinds=settings.bottleneck, cache_dir=cache_dir,
                                    workers=args.workers, tta=settings.tta, blur=settings.blur)
        ds, x = bottlenecks_of(ds, extract, skipped)
        x_forms = forms_of(ds, extract, forms.draws(settings.forms), "--forms")
        val = test = site = None
        if val_ds is not None:
            val_ds, x_val = bottlenecks_of(val_ds, extract, skipped)
            trained = forms_of(val_ds, extract, forms.draws(settings.forms), "--forms") if settings.site_weight else ()
            val = repeats.Part(x_val, val_ds.labels, val_ds.paths, trained,
                               forms_of(val_ds, extract, forms.test_forms(settings.form_tta), "--form-tta"))
        if test_ds is not None:
            test_ds, x_test = bottlenecks_of(test_ds, extract, skipped)
            test = repeats.Part(x_test, test_ds.labels, test_ds.paths,
                                tta=forms_of(test_ds, extract, forms.test_forms(settings.form_tta), "--form-tta"))
        if site_paths is not None:
            site, failed = extract(site_paths)
            site = np.concatenate(site, axis=1)
            skipped.update({str(q): msg for q, msg in failed.items()})
            classifier.check_site(site, x.std(axis=0), settings.site_dir)
        times["bottlenecks_s"] = time.perf_counter() - t
        t = time.perf_counter()
        xrays = [(ds.root, ds.paths, x)] + [(d.root, d.paths, p.x) for d, p in ((val_ds, val), (test_ds, test))
                                            if d is not None]
        if site is not None:
            xrays.append((settings.site_dir, [q for q in site_paths if q not in failed], site))
        check = xraycheck.fit_folders(xrays)
        times["xray_check_s"] = time.perf_counter() - t
        data.check_partitions(len(ds.paths), percentages, settings.split, settings.test_dir)
        warnings = data.hygiene([d for d in (ds, val_ds, test_ds) if d is not None])
        t = time.perf_counter()
        runs, models, all_curves, test_scores = [], [], [], []
        def tta_of(mask):  # a carved test partition's test-time forms, as each repeat splits
            return forms_of(ds, extract, forms.test_forms(settings.form_tta), "--form-tta", mask)
        for seed in range(settings.repeats):
            result, model, curves, s_test = repeats.run_repeat(seed, settings, percentages, ds, x, val, test, site,
                                                               positive, x_forms,
                                                               tta_of if settings.form_tta else None)
            runs.append(result)
            models.append(model)
            all_curves.append((seed, curves))
            test_scores.append(s_test)
        times["training_s"] = time.perf_counter() - t
        if check is None:
            note(f"too few X-rays (under {xraycheck.MIN_IMAGES}, or one patient) to fit the X-ray check; the "
                 "model file has none, and only its pixel checks run")
        else:
            for model in models:
                check.store(model)
        results = Results(nets, ds, val_ds, test_ds, val, test, site, x.shape[1], positive, skipped, warnings, runs,
                          models, all_curves, test_scores, times, t_start)
        outputs = outputs_of(settings, options, results)
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


if __name__ == "__main__":
    main()
