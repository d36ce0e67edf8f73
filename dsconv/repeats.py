"""The repeats of python -m dsconv.train: each splits, fits the head, chooses on validation and tests.

``run_repeat`` is one repeat: the split of its seed, ``fit`` (the weight
decay and step count chosen on validation, cross-fitted when the images of
a --val-dir also train), the threshold, and the test metrics with
patient-bootstrap intervals. ``table`` shows the results of the repeats.
"""
import math
from typing import NamedTuple

import numpy as np

from dsconv import data, forms, metrics, sgd, subtypes

FOLDS = 5
BAND_RESAMPLES = 500  # patient resamples for the borderline band, each choosing the threshold again
REPORT_SENSITIVITY = 0.95  # the specificity reported at this test sensitivity, without --target-sensitivity


class Part(NamedTuple):
    """Bottlenecks with their labels and files: a validation or test set.

    ``forms``: bottlenecks of other forms of the same images (dsconv.forms),
    one array per form, rows aligned with ``x``; they train, never score.
    ``tta``: bottlenecks of the images' test-time forms (forms.test_forms),
    rows aligned; the images are scored by the mean of the probabilities of
    x and of these (as the model file then predicts).
    """
    x: np.ndarray
    labels: np.ndarray
    paths: list
    forms: tuple = ()
    tta: tuple = ()


def probabilities(model, part, rows=slice(None)):
    """(N, C) probabilities of a Part's images (``rows``), the mean over the images as given and their part.tta."""
    return np.mean([model.probabilities(a[rows]) for a in (part.x, *part.tta)], axis=0)


def choose_threshold(settings, y, scores):
    """(threshold, rule) on validation labels y (positive True) and scores, by the Settings' rule."""
    if not (y.any() and (~y).any()):
        return 0.5, "0.5 (the validation set lacks a class)"
    t, rule = metrics.choose_threshold(y, scores, settings.threshold_rule, settings.target_sensitivity)
    return t, f"{rule} on validation"


def assess(y, scores, threshold, paths, target):
    """Metrics of a test set at 0.5 and at the threshold, patient-bootstrap 95% intervals, specificity at target."""
    groups = [data.patient_id(p) for p in paths]
    return {"at_0.5": metrics.evaluate(y, scores, 0.5),
            "at_threshold": metrics.evaluate(y, scores, threshold),
            "ci95_at_threshold": metrics.bootstrap(y, scores, threshold, groups),
            "patients": len(set(groups)),
            "specificity_at_sensitivity": {"target": target,
                                           "specificity": metrics.specificity_at(y, scores, target)}}


def borderline(choose, rule, y, scores, paths, threshold):
    """The model file's borderline record: {band: [low, high] around the threshold, rule: how it was found}.

    The band is where ``choose(y, scores)`` (the rule that chose the
    threshold, described by ``rule``) puts the threshold on patient
    resamples of the labels y and scores: 95% interval. The page calls a
    score in it borderline rather than giving it a confident decision. None
    without scores of both classes.
    """
    if not (y.any() and (~y).any()):
        return None
    low, high = metrics.threshold_spread(y, scores, choose, [data.patient_id(p) for p in paths], n=BAND_RESAMPLES)
    return {"band": [min(low, threshold), max(high, threshold)],
            "rule": f"95% interval of the threshold chosen again ({rule}) on {BAND_RESAMPLES} resamples of the "
                    "patients it was chosen on"}


def by_form(paths, y, scores, threshold):
    """{form: metrics at threshold} of a set that mixes forms (224 copies, originals, DICOM; dsconv.forms.kind),
    else None: a threshold chosen on a mix may suit one form and not another."""
    kinds = np.array([forms.kind(forms.describe(p)) for p in paths])
    if len(set(kinds)) < 2:
        return None
    return {k: dict(metrics.evaluate(y[kinds == k], scores[kinds == k], threshold), images=int(np.sum(kinds == k)))
            for k in sorted(set(kinds))}


def folds(paths, labels, k, seed):
    """Fold 0..k-1 per image: whole patients, dealt round-robin per class in a random order."""
    groups = np.array([data.patient_id(q) for q in paths])
    fold = np.zeros(len(paths), np.int64)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        names = rng.permutation(np.unique(groups[labels == c]))
        for i, g in enumerate(names):
            fold[(groups == g) & (labels == c)] = i % k
    return fold


def fit(settings, x, y, classes, val, site, positive, seed, x_forms=()):
    """Train the head for every weight decay of the Settings (dsconv.settings), snapshots at every step count;
    keep the best on validation.

    Returns (Classifier adapted to ``site``, its curves, its validation
    scores, the choice: every candidate's validation AUC and loss and the one
    taken, its validation probabilities (N, C)). ``positive``: the positive
    class's index, or its subtypes' indices (dsconv.subtypes). Best: highest
    validation AUC, then lowest validation loss, then fewer steps and more
    weight decay (the simpler model).

    ``x_forms``: the training images' bottlenecks in other forms, rows
    aligned with x; they train beside x (and val.forms beside the validation
    images that train).

    With --val-dir and --site-weight W > 0 the validation images train too,
    each W times (as they are: mapping them onto the training statistics
    first did worse on the external folder). Then every validation score is
    out-of-fold: FOLDS models, each trained without one fold of validation
    patients, score that fold; those scores choose the candidate and the
    threshold, and a last model trained on all of them is the one kept.
    """
    y_val = np.isin(val.labels, positive)
    cross = settings.val_dir is not None and settings.site_weight > 0 and len(val.labels) > 0
    if cross:
        fold = folds(val.paths, val.labels, FOLDS, seed)
        runs = [(fold != k, fold == k) for k in range(FOLDS)] + [(np.ones(len(fold), bool), None)]
    else:
        runs = [(None, None)]
    candidates = {}
    for wd in settings.weight_decay:
        for extra, scored in runs:
            xs = np.concatenate([x, *x_forms]) if len(x_forms) else x
            ys = np.concatenate([y] * (1 + len(x_forms)))
            nuisance = [f - x for f in x_forms]
            if extra is not None:
                site_rows = [v[extra] for v in (val.x, *val.forms)]
                xs = np.concatenate([xs] + site_rows * settings.site_weight)
                ys = np.concatenate([ys] + [val.labels[extra]] * (len(site_rows) * settings.site_weight))
                nuisance += [f[extra] - val.x[extra] for f in val.forms]
            # with cross-fitting no validation image is held out of the kept model: no validation curve
            last, curves = sgd.train(
                xs, ys, classes, None if cross else val.x, val.labels, lr=settings.lr, steps=max(settings.steps),
                batch=settings.batch_size, sampling=settings.sampling, eval_every=settings.eval_every,
                standardize=settings.standardize, weight_decay=wd, seed=seed, snapshots=settings.steps[:-1],
                nuisance=np.concatenate(nuisance) if nuisance else None, invariance=settings.invariance)
            for steps in settings.steps:
                model = curves["snapshots"][steps] if steps != max(settings.steps) else last
                model.positive = positive
                # validation images of the training clinic are scored as they are: the site's
                # statistics would move them, not bring them closer to the training distribution
                unadapted = probabilities(model, val) if site is not None and settings.val_dir is None else None
                if site is not None:
                    model.adapt(site)
                c = candidates.setdefault((wd, steps), {"weight_decay": wd, "steps": steps,
                                                        "proba": np.zeros((len(y_val), len(classes)))})
                if scored is None:
                    c["model"] = model
                    if not cross:
                        c["proba"] = probabilities(model, val) if unadapted is None else unadapted
                else:
                    c["proba"][scored] = probabilities(model, val, scored)
                c["curves"] = curves
    for c in candidates.values():
        c["scores"] = c["proba"][:, np.atleast_1d(positive)].sum(axis=1)
        c["val_auc"] = metrics.auc(y_val, c["scores"]) if len(y_val) else math.nan
        if len(classes) == 2:  # from the (out-of-fold) scores
            p = np.empty((len(y_val), 2))
            p[:, positive], p[:, 1 - positive] = c["scores"], 1 - c["scores"]
        else:  # the (out-of-fold) probabilities
            p = c["proba"]
        c["val_loss"] = sgd.loss_accuracy(p, val.labels)[0] if len(y_val) else math.nan
    nan_last = lambda v, sign: (math.isnan(v), sign * v if not math.isnan(v) else 0)
    best = min(candidates.values(), key=lambda c: (nan_last(c["val_auc"], -1), nan_last(c["val_loss"], 1),
                                                   c["steps"], -c["weight_decay"]))
    choice = {"weight_decay": best["weight_decay"], "steps": best["steps"],
              "rule": "highest validation AUC, then lowest validation loss, then fewer steps, more weight decay",
              "validation_scores": f"out-of-fold ({FOLDS} folds of patients; --val-dir images train "
                                   f"x{settings.site_weight})" if cross else "of the model kept",
              "candidates": [{k: c[k] for k in ("weight_decay", "steps", "val_auc", "val_loss")}
                             for c in candidates.values()]}
    curves = {k: v for k, v in best["curves"].items() if k != "snapshots"}
    return best["model"], curves, best["scores"], choice, best["proba"]


def run_repeat(seed, settings, pct, ds, x, val, test, site, positive, x_forms=(), tta_of=None):
    """Split, train, adapt, choose the threshold, evaluate: (result dict, Classifier, curves, (test labels, scores)).

    ``val`` / ``test``: Parts from --val-dir / --test-dir, or None to carve
    them out of ``ds``; ``site``: bottlenecks of --site-dir or None;
    ``x_forms``: bottlenecks of other forms of ds's images (those of the
    training partition train beside them); ``tta_of(mask)``: the test-time
    forms' bottlenecks of ds's images in ``mask`` (a carved test Part's
    tta), or None.
    """
    groups = [data.patient_id(p) for p in ds.paths] if settings.group_by == "patient" else None
    part = data.split(ds.labels, pct, seed, groups)
    carve = lambda k: Part(x[part == k], ds.labels[part == k], [q for q, m in zip(ds.paths, part == k) if m])
    val = carve(1) if val is None else val
    if test is None:
        test = carve(2)
        if tta_of is not None:
            test = test._replace(tta=tta_of(part == 2))
    tr = part == 0
    if len(np.unique(ds.labels[tr])) < len(ds.classes):
        raise data.DataError(f"seed {seed}: a class has no training image; give more images or a "
                             "larger training share in --split")
    model, curves, s_val, choice, p_val = fit(settings, x[tr], ds.labels[tr], ds.classes, val, site, positive, seed,
                                       tuple(f[tr] for f in x_forms))
    y_val = np.isin(val.labels, positive)
    model.threshold, rule = choose_threshold(settings, y_val, s_val)
    p_test = probabilities(model, test)
    y_test, s_test = np.isin(test.labels, positive), p_test[:, np.atleast_1d(positive)].sum(axis=1)
    sizes = {name: int(n) for name, n in zip(data.PARTITIONS, (tr.sum(), len(val.labels), len(test.labels)))}
    target = settings.target_sensitivity or REPORT_SENSITIVITY
    count = lambda labels: {c: int(n) for c, n in zip(ds.classes, np.bincount(labels, minlength=len(ds.classes)))}
    result = {
        "seed": seed, "sizes": sizes,
        "class_counts": {"train": count(ds.labels[tr]), "val": count(val.labels), "test": count(test.labels)},
        "threshold": model.threshold, "threshold_rule": rule, "choice": choice,
        "validation": metrics.evaluate(y_val, s_val, 0.5) if len(y_val) else None,
        "validation_at_threshold": metrics.evaluate(y_val, s_val, model.threshold) if len(y_val) else None,
        "validation_loss": next(c["val_loss"] for c in choice["candidates"]
                                if (c["weight_decay"], c["steps"]) == (choice["weight_decay"], choice["steps"])),
        "test": metrics.evaluate(y_test, s_test, 0.5),
        "test_at_threshold": metrics.evaluate(y_test, s_test, model.threshold),
        "validation_report": assess(y_val, s_val, model.threshold, val.paths, target) if len(y_val) else None,
        "borderline": borderline(lambda yy, ss: choose_threshold(settings, yy, ss)[0], rule, y_val, s_val, val.paths,
                                 model.threshold),
        "test_report": assess(y_test, s_test, model.threshold, test.paths, target),
        "validation_by_form": by_form(val.paths, y_val, s_val, model.threshold),
        "test_by_form": by_form(test.paths, y_test, s_test, model.threshold),
    }
    if np.ndim(positive):
        result["subtypes"] = subtype_choice(model, ds.classes, positive, settings.positive, val, p_val, test, p_test)
    return result, model, curves, (y_test, s_test)


def subtype_choice(model, classes, group, name, val, p_val, test, p_test):
    """Choose the subtype threshold on the validation probabilities (out-of-fold with cross-fitting); record it in
    the model's info (``name``: the positive class they split), and return the subtype figures of the validation
    and test sets (dsconv.subtypes.assess)."""
    pneumonia = np.isin(val.labels, group)
    t, rule = subtypes.choose_threshold(val.labels[pneumonia] == group[0],
                                        subtypes.subtype_scores(p_val[pneumonia], group))
    model.info["subtypes"] = {"positive": name, "classes": [classes[k] for k in group],
                              "threshold": t, "threshold_rule": rule,
                              "score": f"P({classes[group[0]]}) / (P({classes[group[0]]}) + P({classes[group[1]]}))"}
    figures = lambda part, p: subtypes.assess(part.labels, p, group, model.threshold, t, classes, part.paths)
    return {"threshold": t, "threshold_rule": rule, "validation": figures(val, p_val),
            "test": figures(test, p_test)}


def table(runs, summary):
    """The per-repeat and mean +/- std table, as lines."""
    cols = metrics.NAMES
    pct = lambda v: metrics.pct(v, 2, 6)
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
