"""A trained model: its head (dsconv.classifier) on the frozen networks it was trained on.

    model = dsconv.load_model("runs/.../model.h5")
    model.predict_proba(["a.jpeg", pixels])   # (N, classes)
    model.predict(["a.jpeg"])                 # class names at the threshold
    p, heatmap, xray = model.diagnose("a.jpeg")   # one forward pass: probabilities and the heatmap
    model.warnings(["a.jpeg", pixels])        # "" or why it does not look like a chest X-ray

The command line around it is dsconv.predict; the page, dsconv.serve.
"""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dsconv import bottlenecks, cam, classifier, forms, images, subtypes, warn, weights, xraycheck


class Model:
    """A trained classifier file with the frozen network(s) it needs, in the manner of scikit-learn.

    The model file records the variant: one network or an ensemble (its
    bottlenecks concatenated in order), the bottleneck kind and the
    test-time augmentation; all of it is applied here as at training time.
    """

    def __init__(self, path, threshold=None, cache_dir=None):
        self.path = Path(path)
        self.head = classifier.load(self.path)
        info = self.head.info
        try:
            self.parts = parts(info)
            self.bottleneck = info["bottleneck"]
            self.resolution = int(info["resolution"])
        except KeyError as e:
            raise classifier.ModelError(f"{path}: the model file does not record {e}; train it again "
                                        "with `python -m dsconv.train`") from None
        self.tta = info.get("tta", "none")
        self.blur = float(info.get("blur", 0.0))
        self.form_tta = int(info.get("form_tta", 0))
        if self.tta not in bottlenecks.TTAS:
            raise classifier.ModelError(f"{path}: test-time augmentation {self.tta!r} is not one of "
                                        f"{bottlenecks.TTAS}; this version of dsconv cannot apply it")
        self.alpha = info["alpha"]
        # the frozen networks it was trained on: the converted files with their sha256 if present
        self.nets = [weights.load_recorded(float(p["alpha"]), self.resolution, self.bottleneck == "logits",
                                           p.get("weights_sha256"), p.get("weights_file")) for p in self.parts]
        self.net = self.nets[0]
        self.classes = list(self.head.classes)
        # with subtypes (dsconv.subtypes) the positive class is the sum of two of the head's classes
        self.subtypes = info.get("subtypes")
        self.positive = self.subtypes["positive"] if self.subtypes else self.classes[self.head.positive]
        self.threshold = self.head.threshold if threshold is None else float(threshold)
        self.cache_dir = cache_dir
        self.xray_check = xraycheck.from_head(self.head)  # None: a model file from before the check
        if info.get("preprocessing") not in (None, images.preprocessing(self.blur)):
            warn(f"{path} was trained with preprocessing {info['preprocessing']!r}, "
                 f"this version does {images.preprocessing(self.blur)!r}")

    @property
    def variant(self):
        return variant_name(self.head.info)

    def bottlenecks(self, paths, progress=False, form=None):
        """(features (N, D) of the readable paths, {path: reason} of the others); cached.

        ``form``: a dsconv.forms.Form applied to each file first (its own cache variant).
        """
        feats, failed = bottlenecks.extract(paths, self.nets, self.bottleneck, self.cache_dir, progress=progress,
                                            tta=self.tta, form=form, blur=self.blur)
        return np.concatenate(feats, axis=1), failed

    def scored(self, paths, progress=False, form=None):
        """(bottlenecks (N, D), probabilities (N, C)) of the readable paths, and {path: reason} of the others; cached.

        With test-time forms (info["form_tta"] K, dsconv.forms.test_forms),
        the probabilities are the mean of the file's as given and of its K
        forms'; the bottlenecks are the file's as given. ``form``: as
        bottlenecks().
        """
        x, failed = self.bottlenecks(paths, progress, form)
        p = self.head.probabilities(x)
        if self.form_tta and len(x):
            kept = [q for q in paths if q not in failed]
            for f in forms.test_forms(self.form_tta, form):
                xf, lost = self.bottlenecks(kept, progress, f)
                if lost:
                    raise images.ImageError(next(iter(lost.values())))
                p += self.head.probabilities(xf)
            p /= 1 + self.form_tta
        return x, p, failed

    def _forms_probabilities(self, source, p):
        """p (C,) of one image (path, bytes or uint8 array) averaged with its test-time forms' (form_tta)."""
        if not self.form_tta or (isinstance(source, np.ndarray) and source.dtype != np.uint8):
            return p  # a float array is the network's input already: no file to take forms of
        data = forms.array_bytes(source) if isinstance(source, np.ndarray) else images.read_bytes(source)
        data = forms.canonical(data)  # once: a large original is decoded once, not once a form (the same bytes out)
        x = np.stack([images.scale(images.decode(forms.test_form(data, k), self.resolution, blur=self.blur))
                      for k in range(1, self.form_tta + 1)])
        feats = np.concatenate([self._forward(x, net) for net in self.nets], axis=1)
        return (p + self.head.probabilities(feats).sum(axis=0)) / (1 + self.form_tta)

    def _forward(self, x, net):
        pooled, logits = bottlenecks.forward(net, x, self.tta)
        return pooled if self.bottleneck == "pooled" else logits

    def _pixels_bottlenecks(self, arrays):
        x = np.stack([_prepare(a, self.resolution, self.blur) for a in arrays])
        return np.concatenate([self._forward(x, net) for net in self.nets], axis=1)

    def predict_proba(self, images_):
        """(N, classes) probabilities of image paths and/or arrays.

        An array is either uint8 pixels of any size ((H, W) or (H, W, 3)),
        resized as a file would be, or float (r, r, 3) already scaled to [-1, 1].
        An unreadable file raises dsconv.images.ImageError naming it.
        """
        items = list(images_) if isinstance(images_, (list, tuple)) else [images_]
        paths = [p for p in items if not isinstance(p, np.ndarray)]
        out = np.zeros((len(items), len(self.classes)))
        if paths:
            _, got, failed = self.scored(paths)
            if failed:
                raise images.ImageError(next(iter(failed.values())))
            out[[i for i, p in enumerate(items) if not isinstance(p, np.ndarray)]] = got
        arrays = [i for i, a in enumerate(items) if isinstance(a, np.ndarray)]
        if arrays:
            p = self.head.probabilities(self._pixels_bottlenecks([items[i] for i in arrays]))
            out[arrays] = [self._forms_probabilities(items[i], row) for i, row in zip(arrays, p)]
        return out

    def warnings(self, images_):
        """One string per image (paths and/or arrays as predict_proba): "" or why it is not taken for a chest X-ray.

        The X-ray check of dsconv.xraycheck; a model file from before the
        check has its pixel checks only (``xray_check`` is None).
        """
        items = list(images_) if isinstance(images_, (list, tuple)) else [images_]
        paths = [p for p in items if not isinstance(p, np.ndarray)]
        feats = np.zeros((len(items), self.head.weights.shape[0]), np.float32)
        if paths and self.xray_check is not None:
            got, failed = self.bottlenecks(paths)
            if failed:
                raise images.ImageError(next(iter(failed.values())))
            feats[[i for i, p in enumerate(items) if not isinstance(p, np.ndarray)]] = got
        arrays = [i for i, a in enumerate(items) if isinstance(a, np.ndarray)]
        if arrays and self.xray_check is not None:
            feats[arrays] = self._pixels_bottlenecks([items[i] for i in arrays])
        return self.warnings_of(items, feats)

    def warnings_of(self, sources, feats):
        """warnings() of images whose bottlenecks (N, D) are at hand: the pixel checks, else the distance."""
        far = self.xray_check.distances(feats) if self.xray_check is not None and len(sources) else None
        out = []
        for i, source in enumerate(sources):
            pixels = _pixel_warnings(source)
            out.append(xraycheck.join(pixels) if pixels or far is None else self.xray_check.warning(far[i]))
        return out

    def form_warning(self, source):
        """"" or why an image file (path or bytes) lies outside the forms the model was trained and calibrated on.

        dsconv.forms.caution against the model file's record (info["forms"]);
        the decision stands. Arrays and models that record no forms: "".
        """
        if isinstance(source, np.ndarray) or not self.head.info.get("forms"):
            return ""
        return forms.caution(forms.describe(source), self.head.info["forms"])

    def positive_probability(self, p):
        """P(positive class) of one image's probabilities p (C,): with subtypes, the sum of theirs."""
        return float(self.head.positive_of(p))

    def subtype(self, p):
        """(subtype name, P(subtype | positive)) of one image's probabilities p (C,) at the subtype threshold;
        None for a model without subtypes."""
        if not self.subtypes:
            return None
        group = self.head.positives()
        q = float(subtypes.subtype_scores(p[None], group)[0])
        bacterial = q >= self.subtypes["threshold"]
        return (self.classes[group[0]], q) if bacterial else (self.classes[group[1]], 1 - q)

    def predict(self, images_):
        """Class names: the positive class where its probability reaches the threshold (with subtypes, its
        subtype at the subtype threshold)."""
        p = self.predict_proba(images_)
        return np.array([self.decide(row) for row in p])

    def decide(self, p):
        if self.subtypes:
            return subtypes.decide(p, self.classes, self.head.positives(), self.threshold,
                                   self.subtypes["threshold"])
        if p[self.head.positive] >= self.threshold:
            return self.positive
        others = [k for k in range(len(self.classes)) if k != self.head.positive]
        return self.classes[max(others, key=lambda k: p[k])]

    def linear(self):
        """(W (F, C), b (C,)): the class logits as an affine map of the pooled features.

        F is the networks' pooled widths added up, in order (an ensemble's
        rows are its parts' rows stacked).
        """
        W, b = self.head.affine()
        if self.bottleneck == "logits":
            rows, at = [], 0
            for net in self.nets:
                top = net.params["conv_preds"]
                Wi = W[at:at + top["bias"].shape[0]]
                rows.append(top["kernel"].astype(np.float64) @ Wi)
                b = b + top["bias"].astype(np.float64) @ Wi
                at += top["bias"].shape[0]
            W = np.concatenate(rows)
        return W, b

    def class_map(self, x, w):
        """(h, w) map of one image x (r, r, 3) for pooled-feature weights w (F,): mean = w . bottleneck; with
        weights (F, K), the K maps (h, w, K)."""
        return self._one_pass(x, w)[1]

    def _one_pass(self, x, w):
        """(bottleneck (D,), class map (h, w) for weights w) of one image x (r, r, 3), one fused pass per net.

        The bottleneck is the one bottlenecks.forward gives, bit for bit. An
        ensemble's map is the sum of its parts' maps; with flip TTA each
        part's map is the mean of the image's and the mirror image's
        (flipped back), both from one pass of the pair.
        """
        batch = x[None] if self.tta == "none" else np.stack([x, x[:, ::-1]])
        feats, total, at = [], 0.0, 0
        for net in self.nets:
            wi = w[at:at + net.pooled_width]
            at += net.pooled_width
            pooled, maps = net.forward_maps(batch)
            out = pooled if self.bottleneck == "pooled" else net.logits(pooled)
            m = cam.class_map(maps[0], wi)
            if self.tta == "flip":
                out = (out[:1] + out[1:]) / 2
                m = (m + cam.class_map(maps[1], wi)[:, ::-1]) / 2
            feats.append(out[0])
            total = total + m
        return np.concatenate(feats), total

    def diagnose(self, source, size=None, with_warning=False):
        """(probabilities (C,), heatmap, the X-ray) of one image file: one decode for the network, one pass.

        With test-time forms (form_tta) the probabilities are averaged with
        theirs, as predict_proba's; the map is the image's as given.

        ``with_warning``: a fourth item, the image's warnings() string.

        The heatmap is the class activation map of the positive class (with
        subtypes: of the decided class, the maps of every class made in the
        one pass) over the X-ray, an RGB Pillow image at the X-ray's own size, or with
        ``size`` at most size x size pixels (faster on large X-rays); the
        X-ray is returned at that size too.
        """
        with ThreadPoolExecutor(1) as pool:  # the X-ray at its size decoded beside the network's input and pass
            decoding = pool.submit(images.open_image, source, size)
            x = images.scale(images.decode(source, self.resolution, blur=self.blur))
            W, b = self.linear()
            shown = range(len(self.classes)) if self.subtypes else [self.head.positive]
            feats, maps = self._one_pass(x, np.stack([cam.contrast(W, b, k)[0] for k in shown], axis=1))
            original = decoding.result()
        if size:
            original.thumbnail((size, size))
        p = self._forms_probabilities(source, self.head.probabilities(feats[None])[0])
        caption = f"P({self.positive}) {probability_text(self.positive_probability(p))}"
        if self.subtypes:
            decided = self.decide(p)
            m = maps[..., self.classes.index(decided)]
            caption += f", map of {decided}"
        else:
            m = maps[..., 0]
        caption += f"  MobileNet {self.variant}"
        out = p, cam.overlay(original, m, caption), original
        return out + (self.warnings_of([source], feats[None])[0],) if with_warning else out

    def heatmap(self, source, size=None):
        """The heatmap of diagnose()."""
        return self.diagnose(source, size)[1]


def probability_text(p):
    """"= 0.123", or "< 0.001" / "> 0.999": three decimals, never "0.000" or "1.000", which read as certainty."""
    return "< 0.001" if p < 0.0005 else "> 0.999" if p >= 0.9995 else f"= {p:.3f}"


def parts(info):
    """One dict per network of a model's info (alpha, weights_file, weights_sha256, trained_resolution).

    A single network stores scalars, an ensemble lists of them.
    """
    keys = ("alpha", "weights_file", "weights_sha256", "trained_resolution")
    alphas = info["alpha"] if isinstance(info["alpha"], list) else [info["alpha"]]
    columns = {k: info.get(k) if isinstance(info.get(k), list) else [info.get(k)] * len(alphas) for k in keys}
    return [{k: columns[k][i] for k in keys} for i in range(len(alphas))]


def variant_name(info):
    """"0.75-224 pooled", "0.25+0.75-224 pooled flip"."""
    alphas = "+".join(f"{float(p['alpha']):g}" for p in parts(info))
    tta = info.get("tta", "none")
    return f"{alphas}-{info['resolution']} {info['bottleneck']}" + (f" {tta}" if tta != "none" else "")


def _prepare(a, size, blur=0.0):
    if a.dtype == np.uint8:
        from PIL import Image
        im = Image.fromarray(a if a.ndim == 2 or a.shape[2] == 3 else a[..., :3])
        return images.scale(images.resized(im.convert("RGB"), size, blur))
    if a.shape != (size, size, 3):
        raise ValueError(f"a float image must be ({size}, {size}, 3) scaled to [-1, 1], got {a.shape}")
    return a.astype(np.float32)


def _pixel_warnings(source):
    """xraycheck.pixel_warnings of an image path, file bytes or uint8 array; [] for a float array (no pixels)."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8:
            return []
        from PIL import Image
        im = Image.fromarray(source if source.ndim == 2 or source.shape[2] == 3 else source[..., :3])
    else:
        try:
            im = images.open_image(source, xraycheck.CHECK_SIZE)
        except images.ImageError:
            return []  # the network's own decode says what is wrong with the file
    return xraycheck.pixel_warnings(im)


def load_model(path, threshold=None, cache_dir=None):
    """A Model from a classifier file written by `python -m dsconv.train`."""
    return Model(path, threshold, cache_dir)
