"""How well could a frozen MobileNet tell bacterial from viral pneumonia at best? A bound for docs/subtypes.md.

    python bench/subtype_bound.py [ALPHA ...]        # default 0.75; 0.75 1.0: the two concatenated (avg only)

For each alpha at 224 (flip-averaged, blur 1, as train's defaults): the last
feature maps of every pneumonia X-ray of the training folder and of the
external folder, pooled globally (``avg``, train's bottleneck) or over a 3 x 3
grid of regions (``3x3``: where an opacity lies, which the global mean
loses). A logistic regression (L2, classes balanced, by Newton's method: a
converged fit, not train's SGD head) is trained on the training folder and
one patient half of external (bench/halves.py's), that half weighted x5 as
train's --val-dir, and tested on the other half: its AUC, and the best that
any threshold could do, the largest smaller recall of the two with the
threshold chosen on the test half itself (an oracle: no rule chosen on other
X-rays does better).
"""
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dsconv import data, images, metrics, repeats, weights

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "chest_xray"
SITE_WEIGHT, L2 = 5.0, 1.0  # L2 penalty per feature (standardised features)


def pooled(paths, alpha):
    """{"avg": (N, C), "3x3": (N, 9C)} of the flip-averaged last feature maps of ``paths`` at 224."""
    net = weights.load(alpha, 224)
    out = {"avg": [], "3x3": []}
    with ThreadPoolExecutor(2) as pool:
        for i in range(0, len(paths), 32):
            x = np.stack(list(pool.map(lambda p: images.scale(images.decode(p, 224, blur=1.0)), paths[i:i + 32])))
            _, maps = net.forward_maps(np.concatenate([x, x[:, :, ::-1]]))
            m = (maps[:len(x)] + maps[len(x):, :, ::-1]) / 2  # the mirror's maps mirrored back: regions align
            s = m.shape[1]
            cut = [(k * s // 3, -(-(k + 1) * s // 3)) for k in range(3)]  # 7 -> 0-3, 2-5, 4-7
            out["avg"].append(m.mean((1, 2)))
            out["3x3"].append(np.concatenate([m[:, a:b, c:d].mean((1, 2)) for a, b in cut for c, d in cut], 1))
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def logistic(X, y, w, lam):
    """Weights (D + 1,) of L2-regularised logistic regression, Newton's method."""
    X1 = np.hstack([X, np.ones((len(X), 1))])
    b, R = np.zeros(X1.shape[1]), lam * np.eye(X1.shape[1])
    R[-1, -1] = 0
    for _ in range(30):
        p = 1 / (1 + np.exp(-X1 @ b))
        step = np.linalg.solve((X1 * (w * p * (1 - p))[:, None]).T @ X1 + R, X1.T @ (w * (p - y)) + R @ b)
        b -= step
        if np.abs(step).max() < 1e-6:
            break
    return b


def main(alphas):
    tr_ds = data.scan(SHARED / "train")
    positive = data.positive_index(tr_ds.classes)
    train = [p for p, y in zip(tr_ds.paths, tr_ds.labels) if y == positive]
    ext = data.scan(SHARED / "external")
    half = repeats.folds(ext.paths, ext.labels, 2, 0)
    keep = ext.labels == data.positive_index(ext.classes)
    paths = train + [p for p, k in zip(ext.paths, keep) if k]
    where = np.concatenate([np.full(len(train), -1), half[keep]])
    bact = np.array(["_bacteria_" in p.name for p in paths])
    t0 = time.perf_counter()
    feats = [pooled(paths, a) for a in alphas]
    print(f"{len(paths)} pneumonia X-rays ({len(train)} training, {keep.sum()} external) through "
          f"{', '.join(map(str, alphas))} in {time.perf_counter() - t0:.0f} s")
    print(f"{'alpha':9s} {'pooling':7s} {'site->test':10s} {'AUC':>6s} {'oracle recalls':>15s} {'at t':>5s}")
    for kind in ("avg", "3x3") if len(alphas) == 1 else ("avg",):  # 3x3 of two networks: too many features for Newton
        X = np.hstack([f[kind] for f in feats])
        for site in (0, 1):
            tr, te = (where == -1) | (where == site), where == 1 - site
            mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-6
            Z = (X - mu) / sd
            w = np.where(where[tr] == site, SITE_WEIGHT, 1.0)
            share = np.average(bact[tr], weights=w)
            w = w * np.where(bact[tr], 0.5 / share, 0.5 / (1 - share))
            b = logistic(Z[tr], bact[tr].astype(float), w, L2 * X.shape[1])
            s, y = 1 / (1 + np.exp(-(Z[te] @ b[:-1] + b[-1]))), bact[te]
            best = max((min(np.mean(s[y] >= t), np.mean(s[~y] < t)), t) for t in s)
            print(f"{'+'.join(map(str, alphas)):9s} {kind:7s} {'AB'[site]} -> {'AB'[1 - site]}     "
                  f"{metrics.auc(y, s):6.3f} {best[0]:15.3f} {best[1]:5.2f}", flush=True)


if __name__ == "__main__":
    main([float(a) for a in sys.argv[1:]] or [0.75])
