"""Binary diagnostic metrics, thresholds, and mean +/- std over repeats.

With the positive class (pneumonia) as 1 and TP, FP, TN, FN the confusion
counts at a threshold t (predict positive when score >= t):

    accuracy    = (TP + TN) / N
    sensitivity = TP / (TP + FN)     (recall, true positive rate)
    specificity = TN / (TN + FP)
    precision   = TP / (TP + FP)
    f1          = 2 precision sensitivity / (precision + sensitivity)
    auc         = P(score of a random positive > score of a random negative),
                  ties counting one half (Mann-Whitney U from average ranks)

An undefined ratio (0 / 0) is NaN. Over repeats, ``summary`` gives the mean
and the sample standard deviation (ddof = 1: the spread between shuffles, as
the paper's "97.6% +/- 0.36" over three shuffles); one repeat has std NaN.
Confidence intervals (``bootstrap``) resample whole patients.
"""
import math

import numpy as np

from dsconv import DsconvError

NAMES = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc")
BOOTSTRAP = 2000


def pct(v, digits=1, width=0):
    """A fraction as a percentage, ``digits`` decimals, right-aligned in ``width``: "93.1"; "n/a" for None or NaN."""
    return ("n/a" if v is None or math.isnan(v) else f"{100 * v:.{digits}f}").rjust(width)


def _ratio(a, b):
    return a / b if b else math.nan


def confusion(y, pred):
    """{tp, fp, tn, fn} of 0/1 labels and predictions."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    return {"tp": int(np.sum(y & pred)), "fp": int(np.sum(~y & pred)),
            "tn": int(np.sum(~y & ~pred)), "fn": int(np.sum(y & ~pred))}


def auc(y, scores):
    """ROC AUC by ranks (ties share the average rank); NaN without both classes."""
    y, scores = np.asarray(y).astype(bool), np.asarray(scores, np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2  # ranks s+1..e averaged
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(y, scores, threshold=0.5):
    """All of NAMES plus the confusion counts, at ``threshold``."""
    c = confusion(y, np.asarray(scores) >= threshold)
    sens = _ratio(c["tp"], c["tp"] + c["fn"])
    prec = _ratio(c["tp"], c["tp"] + c["fp"])
    return {"accuracy": _ratio(c["tp"] + c["tn"], sum(c.values())),
            "sensitivity": sens,
            "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
            "precision": prec,
            "f1": _ratio(2 * prec * sens, prec + sens) if not math.isnan(prec + sens) else math.nan,
            "auc": auc(y, scores), "threshold": float(threshold), "confusion": c}


def _roc_points(y, scores):
    """Distinct thresholds (descending) and the sensitivity, specificity at each (score >= t)."""
    y, scores = np.asarray(y).astype(bool), np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, yy = scores[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last row of each run of equal scores
    tp, fp = np.cumsum(yy)[last], np.cumsum(~yy)[last]
    return s[last], tp / max(y.sum(), 1), 1 - fp / max((~y).sum(), 1)


def youden_threshold(y, scores):
    """The threshold maximising J = sensitivity + specificity - 1.

    Every t in (next lower score, best score] gives the same J on these
    scores; the midpoint is taken, so new data is not decided on the edge.
    Ties in J go to the highest threshold.
    """
    t, sens, spec = _roc_points(y, scores)
    k = int(np.argmax(sens + spec - 1))
    return float((t[k] + t[k + 1]) / 2) if k + 1 < len(t) else float(t[k])


def accuracy_threshold(y, scores):
    """The threshold maximising accuracy on (y, scores): midpoint and ties as youden_threshold."""
    y = np.asarray(y).astype(bool)
    t, sens, spec = _roc_points(y, scores)
    k = int(np.argmax(y.mean() * sens + (1 - y.mean()) * spec))
    return float((t[k] + t[k + 1]) / 2) if k + 1 < len(t) else float(t[k])


THRESHOLD_RULES = ("accuracy", "youden")


def choose_threshold(y, scores, rule="accuracy", target=None):
    """(threshold, what chose it): the highest reaching sensitivity ``target`` if given, else by ``rule``."""
    if target is not None:
        return sensitivity_threshold(y, scores, target), f"highest reaching sensitivity {target:g}"
    if rule == "youden":
        return youden_threshold(y, scores), "max Youden's J"
    if rule != "accuracy":
        raise DsconvError(f"threshold rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    return accuracy_threshold(y, scores), "max accuracy"


def sensitivity_threshold(y, scores, target):
    """The highest threshold whose sensitivity on (y, scores) reaches ``target``."""
    t, sens, _ = _roc_points(y, scores)
    k = int(np.argmax(sens >= target - 1e-12))
    return float(t[k])


def summary(runs, names=NAMES):
    """{name: {"mean", "std"}} over a list of evaluate() dicts; std is the sample std."""
    out = {}
    for n in names:
        v = np.array([r[n] for r in runs], np.float64)
        out[n] = {"mean": float(np.mean(v)) if len(v) else math.nan,
                  "std": float(np.std(v, ddof=1)) if len(v) > 1 else math.nan}
    return out


def specificity_at(y, scores, target):
    """The specificity at the highest threshold whose sensitivity on (y, scores) reaches ``target``.

    A property of the ROC curve (the threshold is read off these labels), so
    not a figure a deployed model reaches without them.
    """
    y = np.asarray(y).astype(bool)
    if not y.any() or y.all():
        return math.nan
    return evaluate(y, scores, sensitivity_threshold(y, scores, target))["specificity"]


def bootstrap(y, scores, threshold, groups=None, names=("accuracy", "sensitivity", "specificity", "auc"),
              n=BOOTSTRAP, seed=0):
    """{name: [low, high]}: 95% percentile intervals over ``n`` resamples with replacement.

    With ``groups`` (one patient id per image) whole patients are resampled,
    so that images of one patient, which are not independent, move together.
    The threshold stays fixed. A resample lacking a class leaves that
    resample's undefined metrics out.
    """
    y, scores = np.asarray(y).astype(bool), np.asarray(scores, np.float64)
    ids = np.arange(len(y)) if groups is None else np.unique(np.asarray(groups, str), return_inverse=True)[1]
    members = [np.flatnonzero(ids == g) for g in range(ids.max() + 1)] if len(y) else []
    rng = np.random.default_rng(seed)
    values = {k: [] for k in names}
    for _ in range(n if members else 0):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        e = evaluate(y[idx], scores[idx], threshold)
        for k in names:
            if not math.isnan(e[k]):
                values[k].append(e[k])
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else [math.nan, math.nan]
            for k, v in values.items()}


def threshold_spread(y, scores, choose, groups=None, n=BOOTSTRAP, seed=0):
    """[low, high]: 95% percentile interval of the threshold ``choose(y, scores)`` picks again on resamples.

    Resampled as in bootstrap (whole patients with ``groups``); a resample
    lacking a class is left out. How far the threshold would move had the
    validation sample been another of its size: scores inside that band are
    on the edge, whatever side of the threshold they fall.
    """
    y, scores = np.asarray(y).astype(bool), np.asarray(scores, np.float64)
    ids = np.arange(len(y)) if groups is None else np.unique(np.asarray(groups, str), return_inverse=True)[1]
    members = [np.flatnonzero(ids == g) for g in range(ids.max() + 1)] if len(y) else []
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n if members else 0):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if y[idx].any() and not y[idx].all():
            values.append(choose(y[idx], scores[idx]))
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else [math.nan, math.nan]


def reliability(y, scores, bins=10):
    """(mean predicted probability, observed positive fraction, count) per equal-width bin of scores."""
    y, scores = np.asarray(y).astype(bool), np.asarray(scores, np.float64)
    which = np.minimum((scores * bins).astype(np.int64), bins - 1)
    rows = [(float(scores[which == b].mean()), float(y[which == b].mean()), int((which == b).sum()))
            for b in range(bins) if (which == b).any()]
    return rows


def roc(y, scores):
    """(false positive rate, true positive rate) arrays from (0, 0) to (1, 1)."""
    _, sens, spec = _roc_points(y, scores)
    return np.r_[0.0, 1 - spec], np.r_[0.0, sens]
