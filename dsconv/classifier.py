"""The new layer: dense + softmax on bottlenecks (trained by dsconv.sgd), and its model file.

Site adaptation (dsconv.calibrate): the training rows' mean m and standard
deviation s are stored with every model; a model adapted to a site also
stores its images' m', s', and maps their bottlenecks onto the training
distribution before anything else, x -> (x - m') / s' * s + m. With
standardisation on, that is z = (x - m') / s': the site's own statistics.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsconv import DsconvError, files, hdf5

# dsconv.kernels is imported in the functions that run it, as in dsconv.mobilenet.
FORMAT = "dsconv-classifier-v1"
MIN_SITE_IMAGES, MIN_SITE_SPREAD = 16, 0.05  # a site sample to adapt to (Classifier.check_site)
OPTIONAL = ("mean", "std", "train_mean", "train_std", "site_mean", "site_std",
            "xray_mean", "xray_components", "xray_variances")  # the last three: dsconv.xraycheck


class ModelError(DsconvError):
    """A model file that cannot be used, naming it."""


def nonzero(std):
    """Standard deviations with 0 (a constant feature) replaced by 1."""
    return np.where(std == 0, 1.0, std)


@dataclass
class Classifier:
    """A trained head: probabilities from bottlenecks, and what it was trained on.

    ``info`` describes the network variant, preprocessing, bottleneck kind
    and training (see save); ``threshold`` applies to the probability of
    class ``positive``, or with subtypes (dsconv.subtypes) ``positive`` is a
    list of class indices and the sum of their probabilities is the score.
    """
    weights: np.ndarray          # (D, C)
    bias: np.ndarray             # (C,)
    classes: list
    mean: np.ndarray = None      # (D,) feature standardisation, None if off
    std: np.ndarray = None
    positive: int = -1           # or a list of class indices: the positive class's subtypes
    threshold: float = 0.5
    info: dict = field(default_factory=dict)
    train_mean: np.ndarray = None  # (D,) the training rows' statistics (None in older files)
    train_std: np.ndarray = None
    site_mean: np.ndarray = None   # (D,) a site's statistics, None unless adapted
    site_std: np.ndarray = None
    xray_mean: np.ndarray = None        # (D,), (D, K), (K,): the X-ray check (dsconv.xraycheck), None in
    xray_components: np.ndarray = None  # older files; its threshold is in info["xray_check"]
    xray_variances: np.ndarray = None

    def scale_shift(self):
        """(a, c) (D,): prepare(x) = a * x + c."""
        d = self.weights.shape[0]
        a, c = np.ones(d), np.zeros(d)
        if self.site_mean is not None:
            a = self.train_std / self.site_std
            c = self.train_mean - self.site_mean * a
        if self.mean is not None:
            a, c = a / self.std, (c - self.mean) / self.std
        return a, c

    def prepare(self, x):
        x = np.asarray(x, np.float64)
        if self.site_mean is not None:
            x = (x - self.site_mean) / self.site_std * self.train_std + self.train_mean
        return x if self.mean is None else (x - self.mean) / self.std

    def affine(self):
        """(W (D, C), b (C,)): the logits as an affine map of raw bottlenecks, preparation folded in."""
        a, c = self.scale_shift()
        return a[:, None] * self.weights, c @ self.weights + self.bias

    def adapt(self, site_features):
        """Use the statistics of a site's (unlabelled) bottlenecks; see the module docstring."""
        if self.train_mean is None:
            raise ModelError("this model file predates stored training statistics; train it again "
                             "to adapt it to a site")
        x = np.asarray(site_features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.weights.shape[0] or len(x) < 2:
            raise DsconvError(f"site bottlenecks must be (N >= 2, {self.weights.shape[0]}), got {x.shape}")
        self.site_mean, self.site_std = x.mean(axis=0), nonzero(x.std(axis=0))

    def probabilities(self, bottlenecks):
        """(N, C) class probabilities of (N, D) bottlenecks."""
        x = np.asarray(bottlenecks)
        if x.ndim != 2 or x.shape[1] != self.weights.shape[0]:
            raise ValueError(f"expected bottlenecks of shape (N, {self.weights.shape[0]}), got {x.shape}")
        from dsconv import kernels
        return kernels.softmax(kernels.dense(self.prepare(x), self.weights, self.bias))

    def positives(self):
        """The class indices whose probabilities add up to the positive class's: [positive], or its subtypes."""
        return [int(k) for k in np.atleast_1d(self.positive)]

    def positive_of(self, p):
        """P(positive class) of probabilities p (N, C) or (C,): with subtypes, the sum of theirs."""
        return np.asarray(p)[..., self.positives()].sum(axis=-1)

    def scores(self, bottlenecks):
        """Probability of the positive class (the sum of its subtypes')."""
        return self.positive_of(self.probabilities(bottlenecks))

    def predict(self, bottlenecks):
        """1 where the positive class's probability reaches the threshold."""
        return (self.scores(bottlenecks) >= self.threshold).astype(np.int64)

    def save(self, path):
        """Write the model as HDF5 (see load), atomically."""
        files.write_bytes(path, self.to_bytes())

    def to_bytes(self):
        """The model file's bytes."""
        positive = int(self.positive) if np.ndim(self.positive) == 0 else json.dumps(self.positives())
        attrs = {"format": FORMAT, "classes": json.dumps(self.classes), "positive": positive,
                 "threshold": float(self.threshold), "info": json.dumps(self.info, sort_keys=True)}
        tensors = {"weights": self.weights, "bias": self.bias}
        tensors.update({name: getattr(self, name) for name in OPTIONAL if getattr(self, name) is not None})

        def fill(f):
            f.attrs.update(attrs, checksum=files.checksum(attrs, tensors))
            for name, a in tensors.items():
                f[name] = a
        return files.hdf5_bytes(fill)


def load(path):
    """A Classifier from a model file written by save; ModelError if it is missing, damaged or changed.

    The file: datasets ``weights`` (D, C), ``bias`` (C,), optional ``mean``,
    ``std``, ``train_mean``, ``train_std``, ``site_mean``, ``site_std`` (D,),
    ``xray_mean``, ``xray_components``, ``xray_variances`` (dsconv.xraycheck);
    attributes ``format``, ``classes`` (JSON list), ``positive`` (index, or a JSON list of the subtypes'),
    ``threshold``, ``info`` (JSON: alpha, resolution, trained_resolution,
    weights_file, weights_sha256, bottleneck, preprocessing, training
    settings) and ``checksum`` (dsconv.files.checksum) of all of them,
    verified here; non-finite numbers and a threshold outside [0, 1] are
    refused too.
    """
    if not Path(path).exists():
        raise ModelError(f"{path}: no such model file")
    try:
        file_attrs, file_tensors = hdf5.read(path)
    except hdf5.Damaged as e:
        raise ModelError(f"{e}; train it again") from None
    f = file_attrs["/"]
    if f.get("format") != FORMAT:
        raise ModelError(f"{path}: not a dsconv classifier (format {f.get('format')!r}); "
                         "train one with `python -m dsconv.train`")
    try:
        attrs = {k: f[k] for k in ("format", "classes", "positive", "threshold", "info")}
        tensors = {k: file_tensors[k] for k in ("weights", "bias") + OPTIONAL if k in file_tensors}
        stored = f.get("checksum")
        attrs = {k: v.item() if hasattr(v, "item") else v for k, v in attrs.items()}
        model = Classifier(tensors["weights"], tensors["bias"], json.loads(attrs["classes"]),
                           positive=_positive(attrs["positive"]), threshold=float(attrs["threshold"]),
                           info=json.loads(attrs["info"]),
                           **{name: tensors[name] for name in OPTIONAL if name in tensors})
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ModelError(f"{path}: damaged or incomplete model file ({type(e).__name__}: {e}); "
                         "train it again") from None
    if stored is None:
        raise ModelError(f"{path}: the model file carries no checksum (written by an older dsconv, or "
                         "altered); train it again")
    if stored != files.checksum(attrs, tensors):
        raise ModelError(f"{path}: the model file fails its checksum: it was changed after training; "
                         "train it again")
    bad = [k for k, a in tensors.items() if not np.all(np.isfinite(a))]
    if bad:
        raise ModelError(f"{path}: the model holds non-finite numbers (in {', '.join(bad)}); train it "
                         "again, with a lower --lr if training diverged")
    if not 0 <= model.threshold <= 1:
        raise ModelError(f"{path}: the model's threshold {model.threshold} is not a probability in "
                         "[0, 1]; train it again")
    d, c = model.weights.shape
    if model.bias.shape != (c,) or len(model.classes) != c or not all(0 <= k < c for k in model.positives()):
        raise ModelError(f"{path}: inconsistent model file (weights {model.weights.shape}, "
                         f"{len(model.classes)} classes); train it again")
    return model


def _positive(value):
    """The stored ``positive``: an index, or a JSON list of indices (a model with subtypes)."""
    return json.loads(value) if isinstance(value, (str, bytes)) else int(value)


def check_site(site_features, train_std, where):
    """DsconvError unless a site's bottlenecks (N, D) are a sample that Classifier.adapt can use.

    Copies of one image (4 of them once made the model call 78 of 80 X-rays
    pneumonia) give statistics of nothing: at least MIN_SITE_IMAGES different
    images, whose features vary at least MIN_SITE_SPREAD times as much as the
    training images' (``train_std``, median over features), are needed.
    """
    x = np.asarray(site_features, np.float64)
    distinct = len(np.unique(x, axis=0)) if x.ndim == 2 and len(x) else 0
    if distinct < MIN_SITE_IMAGES:
        raise DsconvError(f"{where}: {distinct} different readable image(s) among {len(x)}; site statistics "
                          f"need at least {MIN_SITE_IMAGES} different X-rays of the site; add them there")
    spread = float(np.median(x.std(axis=0) / nonzero(np.asarray(train_std, np.float64))))
    if spread < MIN_SITE_SPREAD:
        raise DsconvError(f"{where}: the images are nearly alike (their features vary {spread:.3f} times as "
                          "much as the training images'); give a sample of the site's X-rays as they come")
