"""Is this a chest X-ray? A warning instead of a decision for inputs unlike the training X-rays.

The head decides between the classes it knows and has no way to say "none
of them": noise gets PNEUMONIA at 0.98, an elephant NORMAL. This check
measures how far an image's bottleneck lies from the X-rays a model was
trained on, in the network's own features, and warns beyond a threshold.

The distance is the Mahalanobis distance under probabilistic PCA (Tipping
and Bishop): with f = sign(x) sqrt(|x|) (the pooled features are
non-negative averages of ReLU6 outputs, skewed; the square root brings them
nearer the Gaussian the distance assumes), mean m, the K leading principal
axes V (D, K) with variances l (K,) and the mean variance s2 of the other
D - K axes,

    d(x)^2 = sum_k ((f - m) . V_k)^2 / l_k  +  |(I - V V^T)(f - m)|^2 / s2

the first term inside the X-rays' main subspace, the second (the residual)
off it. The threshold is the largest out-of-fold distance of the X-rays it
was fitted on (FOLDS folds of patients, each scored by the fit without it):
no held-out X-ray of the run would have been flagged; with n of them, a new
X-ray of the same kind lies beyond it with chance 1 / (n + 1).

Three cheap pixel checks come first, each for a case the distance cannot be
trusted with: an image smaller than MIN_SIDE pixels (an X-ray thumbnail,
blown up to the network's input, can look like a blurred X-ray), a colour
image (X-rays are grey: a coloured overlay, such as dsconv's own heatmap, can
keep the X-ray's features) and a near-constant image (nothing to read; said
in plain words rather than as a distance).

Warnings are strings; several are joined with SEPARATOR, so that other
checks can add theirs (``join``).
"""
from dataclasses import dataclass

from pathlib import Path

import numpy as np

from dsconv import data

COMPONENTS = 64        # principal axes kept; at most a quarter of the images fitted
FOLDS = 5
MIN_IMAGES = 20        # fewer X-rays than this (or a single patient) give no distance check
MIN_SIDE = 64          # pixels, the smaller side
CHROMA = 24            # grey levels between a pixel's largest and smallest channel: a coloured pixel
COLOUR_SHARE = 0.01    # of the pixels
FLAT_STD = 4.0         # grey levels: below this standard deviation an image is blank
CHECK_SIZE = 64        # the pixel checks read the image decoded at about this size (JPEG draft)
SEPARATOR = "; "
TENSORS = ("xray_mean", "xray_components", "xray_variances")
NOT_XRAY = "does not look like a chest X-ray"


def features(x):
    """The bottlenecks as the check sees them: sign(x) sqrt(|x|), float64."""
    x = np.asarray(x, np.float64)
    return np.sign(x) * np.sqrt(np.abs(x))


@dataclass
class XrayCheck:
    """The fitted distribution of the training X-rays' bottlenecks and the threshold; see the module docstring."""
    mean: np.ndarray        # (D,)
    components: np.ndarray  # (D, K)
    variances: np.ndarray   # (K,)
    residual: float         # s2
    threshold: float
    info: dict

    def distances(self, x):
        """(N,) distances of (N, D) bottlenecks."""
        z = features(x) - self.mean
        p = z @ self.components
        off = np.maximum((z * z).sum(axis=1) - (p * p).sum(axis=1), 0.0)
        return np.sqrt((p * p / self.variances).sum(axis=1) + off / self.residual)

    def warning(self, distance):
        if distance <= self.threshold:
            return ""
        return (f"{NOT_XRAY}: its features lie {distance / self.threshold:.1f} times as far from the "
                "training X-rays as the threshold allows")

    def store(self, head):
        """Put the check into a classifier (dsconv.classifier.Classifier): its tensors and info['xray_check']."""
        head.xray_mean, head.xray_components, head.xray_variances = self.mean, self.components, self.variances
        head.info["xray_check"] = dict(self.info, threshold=float(self.threshold), residual=float(self.residual))


def from_head(head):
    """The check stored in a classifier, or None (a model file written before it existed)."""
    rec = head.info.get("xray_check")
    if rec is None or head.xray_mean is None:
        return None
    return XrayCheck(head.xray_mean, head.xray_components, head.xray_variances, float(rec["residual"]),
                     float(rec["threshold"]), {k: v for k, v in rec.items() if k not in ("threshold", "residual")})


def _fit(f, k):
    """(mean, components, variances, residual) of transformed features f (N, D)."""
    mean = f.mean(axis=0)
    lam, vec = np.linalg.eigh(np.cov(f - mean, rowvar=False))
    lam, vec = np.maximum(lam[::-1], 0.0), vec[:, ::-1]
    floor = 1e-6 * lam.sum() / f.shape[1] + 1e-12  # constant features (a rank-deficient sample) give no zero variance
    return mean, vec[:, :k].copy(), np.maximum(lam[:k], floor), max(float(lam[k:].mean()), floor)


def fit(x, groups, components=COMPONENTS, folds=FOLDS, seed=0):
    """An XrayCheck of X-ray bottlenecks x (N, D), threshold out-of-fold over whole ``groups`` (patients).

    None for fewer than MIN_IMAGES X-rays or a single patient: too few to hold any out.
    """
    f = features(x)
    groups = np.asarray(groups)
    names = np.random.default_rng(seed).permutation(np.unique(groups))
    if len(f) < MIN_IMAGES or len(names) < 2:
        return None
    fold = {g: i % folds for i, g in enumerate(names)}
    fold = np.array([fold[g] for g in groups])
    held_out = np.zeros(len(f))
    # the same number of axes in every fit, so that held-out distances measure what the final fit's do
    components = max(1, min(components, min(np.sum(fold != k) for k in range(folds)) // 4, f.shape[1] - 1))
    for k in range(min(folds, len(names))):
        out = fold == k
        part = XrayCheck(*_fit(f[~out], components), threshold=np.inf, info={})
        held_out[out] = part.distances(x[out])
    mean, vecs, lam, s2 = _fit(f, components)
    info = {"distance": "probabilistic-PCA Mahalanobis of sign(x)sqrt(|x|)", "components": int(vecs.shape[1]),
            "images": int(len(f)), "patients": int(len(names)), "folds": folds,
            "threshold_rule": "largest out-of-fold distance of the X-rays fitted",
            "out_of_fold_quantiles": {q: float(np.quantile(held_out, float(q))) for q in ("0.5", "0.99", "0.999")}}
    return XrayCheck(mean, vecs, lam, s2, float(held_out.max()), info)


def fit_folders(parts):
    """fit() on [(folder, paths, bottlenecks)], each file once, patients (data.patient_id) grouped per folder."""
    seen = {}
    for root, paths, feats in parts:
        for path, f in zip(paths, feats):
            seen.setdefault(Path(path).resolve(), (f"{root}/{data.patient_id(Path(path).name)}", f))
    return fit(np.stack([f for _, f in seen.values()]), [g for g, _ in seen.values()])


def pixel_warnings(im):
    """The pixel checks' warnings of a Pillow image (mode L or RGB), decoded at about CHECK_SIZE or larger."""
    w, h = im.size
    if min(w, h) < MIN_SIDE:
        return [f"{NOT_XRAY}: {w} x {h} pixels, too small to be read (at least {MIN_SIDE} on each side)"]
    out = []
    if im.mode == "RGB":
        a = np.asarray(im, np.int16)
        if ((a.max(axis=2) - a.min(axis=2)) > CHROMA).mean() > COLOUR_SHARE:
            out.append(f"{NOT_XRAY}: a colour image (X-rays are grey)")
    if np.asarray(im.convert("L"), np.float64).std() < FLAT_STD:
        out.append(f"{NOT_XRAY}: the image is blank (nearly one grey level)")
    return out


def join(*warnings):
    """Warnings (strings, lists of strings, empty ones ignored) as one string, SEPARATOR between them."""
    flat = []
    for w in warnings:
        flat += [w] if isinstance(w, str) else list(w)
    return SEPARATOR.join(w for w in flat if w)
