"""Reproduce the paper's experiments: every variant, split scheme, shuffle, learning rate and step count.

    python -m dsconv.experiments --data ../shared/data/chest_xray/train --out results/

The grid: MobileNet variants (every alpha with weights, at 224, 192, 160 and
128) x split schemes 80/10/10, 70/15/15, 60/20/20 x shuffles (seeds 0, 1, 2)
x learning rates 0.1, 0.01, 0.001 x 1500, 2000, 2500 steps, split by image
(the paper's protocol) and by patient, on the logits and on the pooled
bottleneck. Each variant's images go through the network once, for both
bottlenecks (dsconv.bottlenecks caches them). Each (variant, bottleneck,
protocol, scheme, seed, rate) is trained once to the largest step count and
its snapshots at the smaller ones are evaluated: the random draws of a step
do not depend on the step count, so a snapshot is exactly the shorter run.
A training whose loss ends above where it began (lr 0.1 on the whole folder's
logits) is kept, as retrain.py would keep it: validation judges it.

Selection without peeking (dsconv.reproduction.select): per cell, the rate and
step count with the best mean validation accuracy over the shuffles; the test
partition plays no part in it.

Bacterial or viral (--subtypes): every training also trains a head of three
classes, NORMAL, BACTERIAL and VIRAL (dsconv.subtypes, the pneumonia class
split by file name), on the same partition with the same seed, rate and
snapshots. Its subtype threshold is chosen on the validation partition's
pneumonia X-rays (Youden's J, as dsconv.train --subtypes), and bacterial
against viral is measured on the test partition's pneumonia X-rays, beside
the binary head's figures in the same runs.csv row. Selection stays on the
binary head's validation accuracy; the subtype figures of the chosen setting
are reported, never chosen on.

Written to --out: runs.csv (one row per run, appended as runs finish: an
interrupted grid resumes where it stopped), timing.json (the wall time of
every invocation), table1.md, table3.md, table4.md, figure4.png and
tradeoff.png (with matplotlib), summary.md; data.json fingerprints the
images, and a resumed grid must come from the same ones (dsconv.runlog keeps
these records; dsconv.reproduction selects and writes the tables and figures).
One grid writes to an --out at a time (an fcntl lock on --out/.lock).
"""
import argparse
import contextlib
import math
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numba
import numpy as np

from dsconv import (DsconvError, HelpFormatter, bottlenecks, data, fail, files, interrupted, metrics, mobilenet, note,
                    paper, report, reproduction, runlog, sgd, subtypes, warn, weights)

OUT = "results"
SHUFFLES = 3
LRS = (0.1, 0.01, 0.001)
STEPS = (1500, 2000, 2500)
GROUP_BYS = ("image", "patient")
BOTTLENECKS = ("logits", "pooled")
FIGURE4_EVAL_EVERY = 10


@dataclass(frozen=True)
class Grid:
    """The settings to run; ``variants`` None means every (alpha, resolution) with weights."""
    variants: tuple = None
    schemes: tuple = paper.SCHEMES
    shuffles: int = SHUFFLES
    lrs: tuple = LRS
    steps: tuple = STEPS
    group_bys: tuple = GROUP_BYS
    bottlenecks: tuple = BOTTLENECKS
    subtypes: bool = False


QUICK = Grid(variants=((0.25, 128),), schemes=("80/10/10",), shuffles=2, lrs=(0.1, 0.01), steps=(100, 200))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dsconv.experiments", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="folder with one subfolder of images per class")
    p.add_argument("--out", default=OUT, help="output folder; a runs.csv already there is resumed")
    p.add_argument("--quick", action="store_true",
                   help="a reduced grid: MobileNet 0.25-128, split 80/10/10, 2 shuffles, lr 0.1 and "
                        "0.01, 100 and 200 steps (seconds once its bottlenecks are cached); its tables "
                        "replace those in --out, its runs join runs.csv")
    p.add_argument("--subtypes", action="store_true",
                   help="also bacterial against viral: every training trains a three-class head too (NORMAL, "
                        "BACTERIAL, VIRAL from the file names, dsconv.subtypes) on the same partition, its "
                        "subtype threshold chosen on the validation pneumonia X-rays; runs.csv gets its test "
                        "figures on the pneumonia X-rays and summary.md a column of them for the setting chosen "
                        "on the binary validation accuracy (a second training per run, about as long as the "
                        "first; the runs of a grid without the option get theirs on resuming)")
    p.add_argument("--cache", help=f"bottleneck cache folder (default $DSCONV_CACHE or "
                                   f"{bottlenecks.default_cache_dir()})")
    p.add_argument("--workers", type=int, default=bottlenecks.WORKERS, help="image decoding threads")
    args = p.parse_args(argv)
    if not 1 <= args.workers <= 64:
        p.error("--workers must be from 1 to 64")
    return args


def available_variants():
    """(alpha, resolution) with weights (with the ImageNet head) for every alpha and the paper's resolutions."""
    out = []
    for alpha in mobilenet.ALPHAS:
        try:
            weights.find(alpha, 224, head=True)
        except weights.WeightsError:
            continue
        out += [(alpha, r) for r in mobilenet.RESOLUTIONS]
    return tuple(out)


def evaluate(model, x, y, positive):
    """(mean cross-entropy, metrics.evaluate at 0.5) of a model on bottlenecks x, labels y."""
    p = model.probabilities(x)
    loss, _ = sgd.loss_accuracy(p, y)
    return loss, metrics.evaluate(y == positive, p[:, positive], 0.5)


def evaluate_subtypes(model, x, ds3, group, part):
    """runs.csv's subtype figures of a three-class head (runlog.SUBTYPES): the subtype threshold chosen on the
    validation partition's pneumonia X-rays, bacterial against viral on the test partition's, the two-step
    decision (pneumonia at 0.5, as the binary figures) over the whole test partition."""
    va, te = part == 1, part == 2
    p_val = model.probabilities(x[va])
    pneumonia = np.isin(ds3.labels[va], group)
    t, _ = subtypes.choose_threshold(ds3.labels[va][pneumonia] == group[0],
                                     subtypes.subtype_scores(p_val[pneumonia], group))
    paths = [q for q, m in zip(ds3.paths, te) if m]
    test = subtypes.assess(ds3.labels[te], model.probabilities(x[te]), group, 0.5, t, ds3.classes, paths,
                           intervals=False)
    e = test["bacterial_vs_viral"]
    return {"subtype_threshold": t, "subtype_test_accuracy": e["accuracy"], "subtype_test_sensitivity":
            e["sensitivity"], "subtype_test_specificity": e["specificity"], "subtype_test_auc": e["auc"],
            "subtype_test_classes_accuracy": test["accuracy"]}


def train_cell(x, labels, part, classes, seed, lr, steps, binary=True, three=None):
    """One training to max(steps), evaluated at each step count: [metrics dict per step count].

    ``binary``: train the two-class head (runlog.BINARY's figures); ``three``: (Dataset of the three
    classes, their subtype indices) to train the three-class head too (runlog.SUBTYPES'), or None.
    """
    positive = data.positive_index(classes)
    tr, va, te = part == 0, part == 1, part == 2
    out = [{"steps": s} for s in steps]
    if binary:
        t = time.perf_counter()
        _, curves = sgd.train(x[tr], labels[tr], classes, lr=lr, steps=max(steps), eval_every=max(steps),
                              seed=seed, snapshots=steps, check=False)
        train_s = time.perf_counter() - t
        for row, s in zip(out, steps):
            model = curves["snapshots"][s]
            val_loss, val = evaluate(model, x[va], labels[va], positive)
            _, test = evaluate(model, x[te], labels[te], positive)
            row.update({"n_train": int(tr.sum()), "n_val": int(va.sum()), "n_test": int(te.sum()),
                        "val_accuracy": val["accuracy"], "val_loss": val_loss,
                        "test_accuracy": test["accuracy"], "test_sensitivity": test["sensitivity"],
                        "test_specificity": test["specificity"], "test_auc": test["auc"],
                        "train_s": train_s / len(steps)})
    if three:
        ds3, group = three
        t = time.perf_counter()
        _, curves = sgd.train(x[tr], ds3.labels[tr], ds3.classes, lr=lr, steps=max(steps),
                              eval_every=max(steps), seed=seed, snapshots=steps, check=False)
        train_s = time.perf_counter() - t
        for row, s in zip(out, steps):
            row.update(evaluate_subtypes(curves["snapshots"][s], x, ds3, group, part), subtype_train_s=train_s /
                       len(steps))
    return out


def run_grid(grid, ds, log, cache_dir, workers, timing, stream=sys.stderr):
    """Run every training of ``grid`` not yet in ``log``; extraction and training times go to ``timing``.

    The resolutions of an alpha get their bottlenecks together (each image
    decoded once); trainings run on as many threads as Numba has (the SGD
    loop releases the GIL), their rows logged in a fixed order.
    """
    cells = [(v, kind, g, scheme) for v in grid.variants for kind in grid.bottlenecks
             for g in grid.group_bys for scheme in grid.schemes]
    per_cell = grid.shuffles * len(grid.lrs)
    total = len(cells) * per_cell
    done = trained = 0
    start, training = time.perf_counter(), 0.0
    steps = tuple(sorted(grid.steps))
    todos = {}
    for variant in grid.variants:
        alpha, res = variant

        def key(kind, g, scheme, seed, lr, s):
            return runlog.key_of(dict(alpha=alpha, resolution=res, bottleneck=kind, group_by=g, split=scheme,
                                      seed=seed, lr=lr, steps=s))
        def needs(*setting):
            """(binary, subtypes): which heads of a training are still to run."""
            rows = [log.rows.get(key(*setting, s)) for s in steps]
            return (any(r is None for r in rows),
                    grid.subtypes and any(r is None or math.isnan(r["subtype_threshold"]) for r in rows))
        todos[variant] = [(kind, g, scheme, seed, lr) + needs(kind, g, scheme, seed, lr)
                          for (v, kind, g, scheme) in cells if v == variant
                          for seed in range(grid.shuffles) for lr in grid.lrs]
        todos[variant] = [t for t in todos[variant] if t[-2] or t[-1]]
        done += len(cells) // len(grid.variants) * per_cell - len(todos[variant])
    pool = ThreadPoolExecutor(numba.get_num_threads())
    try:
        for alpha in dict.fromkeys(a for a, _ in grid.variants):
            variants = [v for v in grid.variants if v[0] == alpha and todos[v]]
            if not variants:
                continue
            nets = [weights.load(alpha, res, head=True, quiet=True) for _, res in variants]
            vds, feats = timed_bottlenecks(ds, nets, grid.bottlenecks, cache_dir, workers, timing)
            for net, x in zip(nets, feats):
                res, todo = net.resolution, todos[alpha, net.resolution]
                groups = {"image": None, "patient": [data.patient_id(p) for p in vds.paths]}
                three = subtypes.split(vds, data.positive_index(vds.classes)) if grid.subtypes else None
                parts = {}
                for kind, g, scheme, seed, lr, _, _ in todo:
                    if (g, scheme, seed) not in parts:
                        parts[g, scheme, seed] = data.split(vds.labels, data.parse_split(scheme), seed, groups[g])
                jobs = [pool.submit(train_cell, x[kind], vds.labels, parts[g, scheme, seed], vds.classes, seed, lr,
                                    steps, binary, three if sub else None)
                        for kind, g, scheme, seed, lr, binary, sub in todo]
                t = time.perf_counter()
                last = None
                for (kind, g, scheme, seed, lr, binary, _), job in zip(todo, jobs):
                    results = job.result()
                    setting = dict(alpha=alpha, resolution=res, bottleneck=kind, group_by=g, split=scheme,
                                   seed=seed, lr=lr, trained_resolution=net.trained_resolution)
                    # a run trained before without its subtypes keeps its binary figures
                    before = [{} if binary else log.rows[runlog.key_of(dict(setting, steps=r["steps"]))]
                              for r in results]
                    log.add([{**b, **setting, **r} for b, r in zip(before, results)])
                    done += 1
                    trained += 1
                    timing["trainings"] += 1
                    if (kind, g, scheme) != last or done == total:
                        last = (kind, g, scheme)
                        left = (training + time.perf_counter() - t) / trained * (total - done)
                        print(f"grid [{done}/{total} trainings] {alpha:g}-{res} {kind} by {g} {scheme}  "
                              f"{reproduction.clock(time.perf_counter() - start)} elapsed, ~{reproduction.clock(left)} of "
                              "training left (plus bottlenecks)", file=stream, flush=True)
                training += time.perf_counter() - t
                timing["train_s"] = training
    finally:
        pool.shutdown(cancel_futures=True)


def timed_bottlenecks(ds, nets, kinds, cache_dir, workers, timing):
    """(Dataset of the readable images, [{kind: features} per net]), timing the extraction of uncached images.

    ``nets``: one alpha at several resolutions, whose images are decoded once for all.
    """
    root = bottlenecks.default_cache_dir() if cache_dir is None else cache_dir
    keys = [files.file_key(p) for p in ds.paths if p.stat().st_size]
    missing = []
    for net in nets:
        size = {"pooled": net.pooled_width, "logits": mobilenet.CLASSES}
        cached = [bottlenecks.Cache(root, bottlenecks.attrs(net, k), size[k]).rows for k in kinds]
        missing.append(len({k for k in keys if any(k not in c for c in cached)}))
    t, forward = time.perf_counter(), [0.0] * len(nets)
    feats, failed = bottlenecks.extract(ds.paths, nets, kinds, cache_dir, workers=workers, seconds=forward)
    wall = time.perf_counter() - t
    for net, n, s in zip(nets, missing, forward):
        timing["extract"].append({"variant": f"{net.alpha:g}-{net.resolution}", "images": n, "seconds": s,
                                  "group_wall_s": wall / len(nets)})
    return ds.readable(failed), feats


# ---- selection


def figure4_curves(ds, cell, sel, shuffles, cache_dir, workers):
    """The training curves of a cell at its selected setting, one per shuffle: [(seed, curves)]."""
    net = weights.load(*cell.variant, head=True, quiet=True)
    x, failed = bottlenecks.extract(ds.paths, net, cell.bottleneck, cache_dir, workers=workers, progress=False)
    vds = ds.readable(failed)
    groups = [data.patient_id(p) for p in vds.paths] if cell.group_by == "patient" else None
    out = []
    for seed in range(shuffles):
        part = data.split(vds.labels, data.parse_split(cell.split), seed, groups)
        _, c = sgd.train(x[part == 0], vds.labels[part == 0], vds.classes, x[part == 1],
                         vds.labels[part == 1], lr=sel["lr"], steps=sel["steps"],
                         eval_every=FIGURE4_EVAL_EVERY, seed=seed, check=False)
        out.append((seed, c))
    return out


# ---- summary


def leakage(ds, seeds, scheme):
    """Facts about patients and duplicate files behind the gap between the protocols."""
    keys = [files.file_key(p) for p in ds.paths]
    patients = [data.patient_id(p) for p in ds.paths]
    same = defaultdict(list)
    for i, k in enumerate(keys):
        same[k].append(i)
    dups = [ix for ix in same.values() if len(ix) > 1]
    within = sum(len({patients[i] for i in ix}) == 1 for ix in dups)
    shared = []
    for seed in seeds:
        part = data.split(ds.labels, data.parse_split(scheme), seed)
        train_patients = {patients[i] for i in np.flatnonzero(part == 0)}
        test = np.flatnonzero(part == 2)
        shared.append(np.mean([patients[i] in train_patients for i in test]))
    return {"images": len(keys), "patients": len(set(patients)), "duplicate_groups": len(dups),
            "duplicates_within_patient": within,
            "test_with_patient_in_train": float(np.mean(shared)) if shared else math.nan}


# ---- the command


def write_reports(out, ds, grid, alphas, log, timing, wall_start, cache_dir, workers):
    """The tables, figures and summary of the runs of ``grid`` in ``log`` (dsconv.reproduction); the names written."""
    rows = [r for r in log.rows.values()
            if (r["alpha"], r["resolution"]) in grid.variants and r["split"] in grid.schemes
            and r["group_by"] in grid.group_bys and r["bottleneck"] in grid.bottlenecks
            and r["seed"] < grid.shuffles and r["lr"] in grid.lrs and r["steps"] in grid.steps]
    selected = reproduction.select(rows)
    files.write_text(out / "table4.md", reproduction.table4(selected, grid, alphas))
    files.write_text(out / "table1.md", reproduction.table1(rows, grid.schemes))
    files.write_text(out / "table3.md", reproduction.table3())
    head = reproduction.headline(grid.schemes)
    figure_cell = reproduction.best_cell(selected, head) if selected else None
    paper_cell = reproduction.paper_setting(rows)
    plt = report.pyplot("figure4.png or tradeoff.png")
    written = ["runs.csv", "table1.md", "table3.md", "table4.md"]
    if plt and selected:
        c, s = paper_cell or figure_cell
        curves = figure4_curves(ds, c, s, grid.shuffles, cache_dir, workers)
        reproduction.figure4(out / "figure4.png", curves, c, s, paper_cell is not None, plt)
        reproduction.tradeoff(out / "tradeoff.png", selected, grid, head, plt)
        written += ["figure4.png", "tradeoff.png"]
    facts = leakage(ds, range(grid.shuffles), head)
    timing["wall_s"] = time.perf_counter() - wall_start
    invocations = [i for i in runlog.read_timing(out) if i["grid"] == timing["grid"]] + [timing]
    trainings = len({runlog.key_of(r)[:-1] for r in rows})
    files.write_text(out / "summary.md", reproduction.summary(selected, rows, trainings, grid, alphas, invocations, facts,
                                                        figure_cell, paper_cell))
    written.append("summary.md")
    return written


def main(argv=None):
    wall_start = time.perf_counter()
    args = parse_args(argv)
    grid = replace(QUICK if args.quick else Grid(), subtypes=args.subtypes)
    out = Path(args.out)
    cache_dir = Path(args.cache) if args.cache else None
    timing = {"started": time.strftime("%Y-%m-%d %H:%M"), "grid": "quick" if args.quick else "full",
              "trainings": 0, "train_s": 0.0, "extract": []}
    log = None
    held = contextlib.ExitStack()
    try:
        files.check_writable(out, "give another --out")
        out.mkdir(parents=True, exist_ok=True)
        try:
            held.enter_context(files.lock(out / ".lock", wait=False))
        except files.Busy:
            raise files.Busy(f"{out}: another dsconv.experiments grid is writing there; wait for it to "
                             "finish or give another --out") from None
        files.remove_strays(out)
        ds = data.scan(args.data)
        if grid.subtypes:
            subtypes.split(ds, data.positive_index(ds.classes))  # every pneumonia file name says which, or stop now
        grid = replace(grid, variants=grid.variants or available_variants())
        if not grid.variants:
            raise weights.WeightsError("no MobileNet weights with the ImageNet head found; see "
                                       "`python -m dsconv.weights --help`")
        log = runlog.RunLog(out / "runs.csv")
        runlog.check_same_data(out, ds, log)
        if log.rows:
            note(f"resuming: {len(log.rows)} runs already in {out / 'runs.csv'}")
        run_grid(grid, ds, log, cache_dir, args.workers, timing)
        alphas = {a for a, _ in available_variants()}
        written = write_reports(out, ds, grid, alphas, log, timing, wall_start, cache_dir, args.workers)
    except (DsconvError, OSError) as e:
        fail(e)
    except KeyboardInterrupt:
        interrupted(f"finished runs are in {out / 'runs.csv'} and bottlenecks are cached; run "
                    "the same command again to continue where it stopped")
    finally:
        with held:
            if log:
                log.close()
                timing["wall_s"] = time.perf_counter() - wall_start
                try:
                    runlog.write_timing(out, timing)
                except OSError as e:
                    warn(f"could not write {out / runlog.TIMING} ({e.strerror or e})")
    print(f"wrote {out}/: {', '.join(written)} ({reproduction.clock(time.perf_counter() - wall_start)} min:s)")


if __name__ == "__main__":
    main()
