"""Diagnose new X-rays with a trained model: probability, decision, heatmap.

    python -m dsconv.predict runs/.../model.h5 ../shared/data/originals --heatmap heatmaps/

PATH is an image, a folder (walked recursively for image files) or a list
file (.txt: one path a line, relative to the list file). Each image gets
P(positive class), the decision at the model's threshold (--threshold
overrides) and the network variant. An unreadable image is reported on its
own row and the rest go on; the exit status is 1 if any image failed, 2 if
nothing could be done (a missing or damaged model file, no images). Ctrl-C
writes the rows done so far, the others marked "interrupted", and exits 130.

In Python:

    model = dsconv.load_model("runs/.../model.h5")
    model.predict_proba(["a.jpeg", pixels])   # (N, classes)
    model.predict(["a.jpeg"])                 # class names at the threshold
"""
import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

from dsconv import DsconvError, HelpFormatter, bottlenecks, cam, classifier, files, images, weights

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}
LIST_SUFFIXES = {".txt", ".lst", ".list"}
FORMATS = ("table", "csv", "json")
CHUNK = 64  # images per step of rows_for: what Ctrl-C can lose
INTERRUPTED = "interrupted before this image"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in rows_for; ``rows`` has every path, those not done marked INTERRUPTED."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows


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
        if self.tta not in bottlenecks.TTAS:
            raise classifier.ModelError(f"{path}: test-time augmentation {self.tta!r} is not one of "
                                        f"{bottlenecks.TTAS}; this version of dsconv cannot apply it")
        self.alpha = info["alpha"]
        self.nets = [_network(part, self.resolution, self.bottleneck) for part in self.parts]
        self.net = self.nets[0]
        self.classes = list(self.head.classes)
        self.positive = self.classes[self.head.positive]
        self.threshold = self.head.threshold if threshold is None else float(threshold)
        self.cache_dir = cache_dir
        if info.get("preprocessing") not in (None, images.PREPROCESSING):
            print(f"dsconv: warning: {path} was trained with preprocessing {info['preprocessing']!r}, "
                  f"this version does {images.PREPROCESSING!r}", file=sys.stderr)

    @property
    def variant(self):
        return variant_name(self.head.info)

    def bottlenecks(self, paths, progress=False):
        """(features (N, D) of the readable paths, {path: reason} of the others); cached."""
        return bottlenecks.extract_ensemble(paths, self.nets, self.bottleneck, self.cache_dir,
                                         progress=progress, tta=self.tta)

    def _pixels_bottlenecks(self, arrays):
        x = np.stack([_prepare(a, self.resolution) for a in arrays])
        out = []
        for net in self.nets:
            pooled, logits = bottlenecks.forward(net, x, self.tta)
            out.append(pooled if self.bottleneck == "pooled" else logits)
        return np.concatenate(out, axis=1)

    def predict_proba(self, images_):
        """(N, classes) probabilities of image paths and/or arrays.

        An array is either uint8 pixels of any size ((H, W) or (H, W, 3)),
        resized as a file would be, or float (r, r, 3) already scaled to [-1, 1].
        An unreadable file raises dsconv.images.ImageError naming it.
        """
        items = list(images_) if isinstance(images_, (list, tuple)) else [images_]
        paths = [p for p in items if not isinstance(p, np.ndarray)]
        feats = np.zeros((len(items), self.head.weights.shape[0]), np.float32)
        if paths:
            got, failed = self.bottlenecks(paths)
            if failed:
                raise images.ImageError(next(iter(failed.values())))
            feats[[i for i, p in enumerate(items) if not isinstance(p, np.ndarray)]] = got
        arrays = [i for i, a in enumerate(items) if isinstance(a, np.ndarray)]
        if arrays:
            feats[arrays] = self._pixels_bottlenecks([items[i] for i in arrays])
        return self.head.probabilities(feats)

    def predict(self, images_):
        """Class names: the positive class where its probability reaches the threshold."""
        p = self.predict_proba(images_)
        return np.array([self.decide(row) for row in p])

    def decide(self, p):
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
        """(h, w) map of one image x (r, r, 3) for pooled-feature weights w (F,): mean = w . bottleneck."""
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

    def diagnose(self, source, size=None):
        """(probabilities (C,), heatmap, the X-ray) of one image file: one decode for the network, one pass.

        The heatmap is the class activation map of the positive class over
        the X-ray, an RGB Pillow image at the X-ray's own size, or with
        ``size`` at most size x size pixels (faster on large X-rays); the
        X-ray is returned at that size too.
        """
        original = images.open_image(source, size)
        if size:
            original.thumbnail((size, size))
        x = images.scale(images.decode(source, self.resolution))
        w, _ = cam.contrast(*self.linear(), self.head.positive)
        feats, m = self._one_pass(x, w)
        p = self.head.probabilities(feats[None])[0]
        caption = f"P({self.positive}) = {p[self.head.positive]:.3f}  MobileNet {self.variant}"
        return p, cam.overlay(original, m, caption), original

    def heatmap(self, source, size=None):
        """The heatmap of diagnose()."""
        return self.diagnose(source, size)[1]


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


def _network(part, resolution, bottleneck):
    """The frozen network a model part was trained on: the converted file with its sha256 if present."""
    alpha, head = float(part["alpha"]), bottleneck == "logits"
    want = part.get("weights_sha256")
    d = weights.weights_dir()
    for path in sorted(d.glob("*.h5")) if d.is_dir() else []:
        meta = weights.describe(path)
        if meta and meta["alpha"] == alpha and (meta["has_head"] or not head) and weights.sha256(path) == want:
            return weights.load_file(path, alpha, resolution)
    net = weights.load(alpha, resolution, head=head, quiet=True)
    if want and net.weights_sha256 != want:
        print(f"dsconv: warning: the model was trained on weights {part.get('weights_file')} "
              f"(sha256 {want[:12]}...), which are not in {d}; using {net.weights_path.name} instead",
              file=sys.stderr)
    return net


def _prepare(a, size):
    if a.dtype == np.uint8:
        from PIL import Image
        im = Image.fromarray(a if a.ndim == 2 or a.shape[2] == 3 else a[..., :3])
        return images.scale(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
    if a.shape != (size, size, 3):
        raise ValueError(f"a float image must be ({size}, {size}, 3) scaled to [-1, 1], got {a.shape}")
    return a.astype(np.float32)


def load_model(path, threshold=None, cache_dir=None):
    """A Model from a classifier file written by `python -m dsconv.train`."""
    return Model(path, threshold, cache_dir)


def collect(paths):
    """Image paths from files, folders (recursive) and list files, in order, without repeats."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.suffix.lower() in LIST_SUFFIXES and p.is_file():
            lines = [ln.strip() for ln in p.read_text().splitlines()]
            out += [p.parent / ln for ln in lines if ln and not ln.startswith("#")]
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def unique_name(folder, path, used):
    name = Path(path).stem
    k = 1
    while name in used:
        k += 1
        name = f"{Path(path).stem}-{k}"
    used.add(name)
    return folder / f"{name}.png"


def rows_for(model, paths, heatmap_dir=None, progress=True):
    """One dict per path: path, probability, decision, threshold, variant, error (or None).

    Works through CHUNK images at a time; Ctrl-C raises Interrupted with
    the rows done so far and the others marked as not done.
    """
    rows, used = [], set()
    bar = bottlenecks.Progress(len(paths), "predict") if progress else None
    try:
        for i in range(0, len(paths), CHUNK):
            chunk = paths[i:i + CHUNK]
            rows += _rows(model, chunk, heatmap_dir, used)
            if bar:
                bar.update(len(rows), final=len(rows) == len(paths))
    except KeyboardInterrupt:
        rows += [_row(model, p, INTERRUPTED) for p in paths[len(rows):]]
        raise Interrupted(rows) from None
    return rows


def _row(model, path, error=None):
    return {"path": str(path), "probability": None, "decision": None, "threshold": model.threshold,
            "variant": model.variant, "error": error}


def _rows(model, paths, heatmap_dir, used):
    if heatmap_dir:
        return [_row_with_heatmap(model, path, heatmap_dir, used) for path in paths]
    feats, failed = model.bottlenecks(paths)
    probs = iter(model.head.probabilities(feats) if len(feats) else [])
    rows = []
    for path in paths:
        row = _row(model, path, failed.get(path))
        if row["error"] is None:
            _decided(model, row, next(probs))
        rows.append(row)
    return rows


def _decided(model, row, p):
    row["probability"], row["decision"] = float(p[model.head.positive]), model.decide(p)
    return row


def _row_with_heatmap(model, path, heatmap_dir, used):
    """The row of one image and its heatmap from one forward pass (no bottleneck cache)."""
    row = _row(model, path)
    try:
        p, heat, _ = model.diagnose(path)
    except (images.ImageError, OSError) as e:
        row["error"] = str(e) if isinstance(e, images.ImageError) else f"{path}: cannot be read ({e})"
        return row
    _decided(model, row, p)
    try:
        out = unique_name(heatmap_dir, path, used)
        png = io.BytesIO()
        heat.save(png, format="PNG", compress_level=1)  # light compression: the default took 5x longer than the rest
        files.write_bytes(out, png.getvalue())
        row["heatmap"] = str(out)
    except OSError as e:
        row["error"] = f"heatmap: {e}"
    return row


def render(rows, fmt, positive):
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    keys = ["path", "probability", "decision", "threshold", "variant", "error"] + \
        (["heatmap"] if any("heatmap" in r for r in rows) else [])
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, keys, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    width = max([len("image")] + [len(r["path"]) for r in rows])
    head = f"{'image':{width}s}  P({positive})  decision    variant"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["probability"] is None:
            lines.append(f"{r['path']:{width}s}  error: {r['error']}")
        else:
            lines.append(f"{r['path']:{width}s}  {r['probability']:{len(positive) + 3}.3f}  "
                         f"{r['decision']:10s}  {r['variant']}" + (f"  error: {r['error']}" if r["error"] else ""))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dsconv.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    p.add_argument("model", help="classifier file written by `python -m dsconv.train` (model.h5)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image, folder or list file")
    p.add_argument("--threshold", type=float, help="decision threshold on P(positive) (default: the model's)")
    p.add_argument("--format", default="table", choices=FORMATS, help="output format")
    p.add_argument("--output", "-o", help="write the output to this file instead of standard output")
    p.add_argument("--heatmap", metavar="DIR", help="write one class activation map PNG per image here")
    p.add_argument("--cache", help="bottleneck cache folder (default: the training cache)")
    p.add_argument("--no-cache", action="store_true", help="keep no bottlenecks on disk")
    args = p.parse_args(argv)
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        p.error("--threshold must be between 0 and 1")
    interrupted = False
    try:
        if args.output:
            files.check_output_file(args.output, "give another --output")
        heatmaps = Path(args.heatmap) if args.heatmap else None
        if heatmaps:
            files.check_writable(heatmaps, "give another --heatmap folder")
        model = load_model(args.model, args.threshold, False if args.no_cache else args.cache)
        paths = collect(args.paths)
        if not paths:
            raise DsconvError(f"no image files in {' '.join(args.paths)}")
        if heatmaps:
            heatmaps.mkdir(parents=True, exist_ok=True)
            files.remove_strays(heatmaps)
        try:
            rows = rows_for(model, paths, heatmaps)
        except Interrupted as e:
            rows, interrupted = e.rows, True
    except (DsconvError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: bottlenecks computed so far are cached", file=sys.stderr)
        sys.exit(130)
    text = render(rows, args.format, model.positive)
    try:
        with files.interrupts_deferred():
            if args.output:
                files.write_text(args.output, text)
            else:
                sys.stdout.write(text)
    except OSError as e:
        print(f"error: could not write {args.output} ({e.strerror or e}); give another --output", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        done = sum(r["error"] != INTERRUPTED for r in rows)
        print(f"\ninterrupted: {done} of {len(rows)} images done; the others are marked "
              f"\"{INTERRUPTED}\"{f' in {args.output}' if args.output else ''}", file=sys.stderr)
        sys.exit(130)
    failed = sum(r["error"] is not None for r in rows)
    if failed:
        print(f"{failed} of {len(rows)} images failed", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
