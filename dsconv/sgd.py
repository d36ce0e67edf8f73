"""Training the new layer (dsconv.classifier) by mini-batch SGD.

retrain.py's defaults: W (D, C) drawn from N(0, 0.001^2) truncated at 2 sd,
b = 0; each step draws a batch of B = 100 rows with replacement, the class
first (uniformly, ``sampling="balanced"``) then a row of that class, or a row
of the whole set (``"natural"``), and takes one plain gradient step on the
mean softmax cross-entropy L = -1/B sum_i log p_i[y_i]:

    z = (x - mu) / sigma,   p = softmax(z W + b)
    G = (p - onehot(y)) / B                       (B x C)
    W <- W - lr * (z^T G + wd * W)
    b <- b - lr * sum_i G_i

lr = 0.01, 4000 steps, no momentum. Options beyond retrain.py, all off by
default: feature standardisation (mu, sigma: the training rows' mean and
standard deviation, stored with the model; off means mu = 0, sigma = 1), L2
weight decay wd (the gradient of wd/2 |W|^2; off means wd = 0), and form
invariance K: given differences d between the (standardised) bottlenecks
of two forms of one image (dsconv.forms), U (D, K) holds the K leading
eigenvectors of S = mean d d^T, the steps above run on z A with the
projection A = I - U U^T, and the model keeps W = A W'. The decision then
ignores the K directions along which the form an X-ray comes in moves its
bottleneck most (off: A = I).

The arithmetic is float64 (float32 bottlenecks are widened as they are
read), in one Numba loop over the steps that never copies a batch out (the
draws are one index array made up front), and the random draws come from one
numpy.random.default_rng(seed): the same data, settings and seed give
bitwise-identical weights.

Curves: after every ``eval_every`` steps (and the last) the loss and
accuracy of the batch just trained on (retrain.py's "train accuracy") and of
the whole validation set (retrain.py samples 100 validation rows instead).
"""
import math

import numpy as np
from numba import njit

from dsconv import DsconvError
from dsconv.classifier import Classifier, nonzero

# dsconv.kernels is imported in the functions that run it, as in dsconv.mobilenet.
LR = 0.01
STEPS = 4000
BATCH = 100
EVAL_EVERY = 10
LOGIT_LIMIT = 500.0  # |logit| beyond this on the training data: diverged (see _check_converged)
INIT_STD = 0.001
SAMPLINGS = ("balanced", "natural")


def truncated_normal(rng, shape, std):
    """N(0, std^2) redrawn outside 2 std, as tf.truncated_normal."""
    w = rng.standard_normal(shape)
    bad = np.abs(w) > 2
    while bad.any():
        w[bad] = rng.standard_normal(bad.sum())
        bad = np.abs(w) > 2
    return w * std


def batches(labels, steps, batch, sampling, rng):
    """(steps, batch) row indices drawn with replacement; see the module docstring.

    The draws of a step do not depend on ``steps``: the first k rows of a
    longer run are those of a k-step run from the same ``rng`` state.
    """
    labels = np.asarray(labels)
    if sampling == "natural":
        return rng.integers(0, len(labels), (steps, batch))
    if sampling != "balanced":
        raise DsconvError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    counts = np.array([len(m) for m in members])
    # one uniform pair per draw, in step order: the first k steps of a longer run are a shorter run's
    u = rng.random((steps, batch, 2))
    cls = np.minimum((u[..., 0] * len(classes)).astype(np.int64), len(classes) - 1)
    within = np.minimum((u[..., 1] * counts[cls]).astype(np.int64), counts[cls] - 1)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.concatenate(members)[offsets[cls] + within]


# Reassociation lets LLVM vectorise the dot products and contract lets it fuse
# multiply-adds: the sums are then taken in another (still fixed) order than
# the formula's, which changes the last bits of the weights, not the
# determinism: the same data and seed give the same bits on one machine.
SGD_JIT = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"})


@njit(**SGD_JIT)
def _sgd(x, y, idx, w, b, lr, weight_decay):
    """The SGD steps of idx on one model, in place; see the module docstring.

    x (N, D) float32 or float64 bottlenecks (rows read as float64), y (N,)
    labels, idx (S, B) rows drawn per step, w (C, D) the weights transposed,
    b (C,).
    """
    classes, dims = w.shape
    batch = idx.shape[1]
    grad = np.empty((classes, dims))
    gb = np.empty(classes)
    p = np.empty(classes)
    for s in range(idx.shape[0]):
        grad[:] = 0.0
        gb[:] = 0.0
        for j in range(batch):
            i = idx[s, j]
            for c in range(classes):
                z = 0.0
                for d in range(dims):
                    z += np.float64(x[i, d]) * w[c, d]
                p[c] = z + b[c]
            top = p.max()
            total = 0.0
            for c in range(classes):
                p[c] = np.exp(p[c] - top)
                total += p[c]
            for c in range(classes):
                g = (p[c] / total - (1.0 if c == y[i] else 0.0)) / batch
                gb[c] += g
                for d in range(dims):
                    grad[c, d] += np.float64(x[i, d]) * g
        for c in range(classes):
            for d in range(dims):
                w[c, d] -= lr * (grad[c, d] + weight_decay * w[c, d])
            b[c] -= lr * gb[c]


def loss_accuracy(p, y):
    """Mean cross-entropy and accuracy of probabilities p (N, C) for labels y."""
    if len(y) == 0:
        return math.nan, math.nan
    ce = -np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-300)))
    return float(ce), float(np.mean(p.argmax(axis=1) == y))



def invariant_basis(nuisance, std, invariance):
    """A = I - U U^T (D, D) of the module docstring, or None when there is nothing to be invariant to."""
    if nuisance is None or not invariance or not len(nuisance):
        return None
    d = np.asarray(nuisance, np.float64) / (1.0 if std is None else std)
    _, v = np.linalg.eigh(d.T @ d / len(d))  # eigenvalues ascending
    u = v[:, -min(int(invariance), d.shape[1]):]
    return np.eye(d.shape[1]) - u @ u.T


def train(x, y, classes, x_val=None, y_val=None, lr=LR, steps=STEPS, batch=BATCH,
          sampling="balanced", eval_every=EVAL_EVERY, standardize=False, weight_decay=0.0, seed=0,
          snapshots=(), nuisance=None, invariance=0, check=True):
    """Train the head on bottlenecks x (N, D), labels y; returns (Classifier, curves).

    curves: dict of lists ``step``, ``train_loss``, ``train_accuracy``,
    ``val_loss``, ``val_accuracy`` (NaN without validation data).
    ``snapshots``: step counts at which to keep a copy of the model, returned
    as curves["snapshots"] = {step: Classifier}; since the random draws of a
    step do not depend on ``steps``, each copy is bitwise the model that a
    run of that many steps gives. ``nuisance`` (M, D): differences between
    the raw bottlenecks of two forms of one image, and ``invariance`` (K):
    see the module docstring. ``check``: refuse a model whose training loss
    ended above where it began or whose logits ran away (_check_converged);
    off, only non-finite weights are refused (the experiments grid runs all
    of the paper's rates and lets validation judge them).
    """
    from dsconv import kernels
    x = np.asarray(x)
    x = x if x.dtype == np.float32 else x.astype(np.float64)  # float32 rows are widened as they are read
    y = np.asarray(y, np.int64)
    n_classes = len(classes)
    if len(np.unique(y)) < 2:
        raise DsconvError("the training data holds a single class; a classifier needs at least two")
    rng = np.random.default_rng(seed)
    model = Classifier(truncated_normal(rng, (x.shape[1], n_classes), INIT_STD),
                       np.zeros(n_classes), list(classes))
    model.train_mean = x.mean(axis=0, dtype=np.float64)
    model.train_std = nonzero(x.std(axis=0, dtype=np.float64))
    if standardize:
        model.mean, model.std = model.train_mean, model.train_std
        x = model.prepare(x)
    xv = model.prepare(x_val) if x_val is not None and len(x_val) else np.zeros((0, x.shape[1]))
    yv = np.asarray(y_val if xv.shape[0] else [], np.int64)
    a = invariant_basis(nuisance, model.std if standardize else None, invariance)
    if a is not None:
        x, xv = x @ a, xv @ a
    unfold = (lambda w: w) if a is None else (lambda w: a @ w)  # W = A W'
    idx = batches(y, steps, batch, sampling, rng)
    curves = {k: [] for k in ("step", "train_loss", "train_accuracy", "val_loss", "val_accuracy")}
    keep = set(snapshots)
    if any(not 1 <= k <= steps for k in keep):
        raise DsconvError(f"snapshots {sorted(keep)} must lie within 1..{steps} steps")
    if keep:
        curves["snapshots"] = {}
    wt, b = model.weights.T.copy(), model.bias  # the kernel's layout: (C, D)
    start = _loss(x, y, model.weights, b)[0]
    done = 0
    for stop in sorted(keep | {steps} | set(range(eval_every, steps, eval_every))):
        _sgd(x, y, idx[done:stop], wt, b, float(lr), float(weight_decay))
        done = stop
        w = wt.T
        if stop in keep:
            curves["snapshots"][stop] = Classifier(unfold(w.copy()), b.copy(), list(classes), model.mean, model.std,
                                                   train_mean=model.train_mean, train_std=model.train_std)
        if stop % eval_every == 0 or stop == steps:
            xb, yb = x[idx[stop - 1]], y[idx[stop - 1]]
            curves["step"].append(stop)
            p_train, p_val = kernels.softmax(xb @ w + b), kernels.softmax(xv @ w + b)
            for k, v in zip(("train_loss", "train_accuracy", "val_loss", "val_accuracy"),
                            loss_accuracy(p_train, yb) + loss_accuracy(p_val, yv)):
                curves[k].append(v)
    model.weights = unfold(wt.T.copy())
    if not (np.all(np.isfinite(model.weights)) and np.all(np.isfinite(b))):
        raise DsconvError(f"training diverged (non-finite weights) at learning rate {lr:g}; use a "
                         "lower --lr")
    if check:
        _check_converged(x, y, start, model.weights, b, lr)
    return model, curves


def _check_converged(x, y, start, w, b, lr):
    """DsconvError if SGD overshot: the training loss ends above where it began, or the logits run away.

    Too high a rate leaves finite but huge weights (1e18 at --lr 25) whose
    probabilities are all exactly 0 or 1: LOGIT_LIMIT is far beyond any
    trained model's logits, well below where float64 softmax overflows (709).
    """
    end, logits = _loss(x, y, w, b)
    if end > start or logits > LOGIT_LIMIT:
        why = (f"the training loss ended at {end:.3g}, above the {start:.3g} it began at" if end > start
               else f"its logits reach {logits:.3g}")
        raise DsconvError(f"training diverged at learning rate {lr:g} ({why}); use a lower --lr")


def _loss(x, y, w, b):
    """(mean softmax cross-entropy, largest |logit|) of a head on the training rows."""
    z = x @ w + b
    top = np.abs(z).max()
    z = z - z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y])), float(top)
