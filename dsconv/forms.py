"""The forms an X-ray comes in: the same picture as another file, re-encoded, resized or framed.

A clinic hands dsconv originals (a few thousand pixels a side), JPEG exports
of any quality, PNG or DICOM; the training folder holds 224 x 224 copies saved
as JPEG at quality 75. Each form here turns an image file's bytes into the
bytes of another file of the same X-ray:

- ``REPORT``: the forms of the consistency report (dsconv.consistency),
  each a name and a function;
- ``augment``: a form drawn at random for a training image, seeded by the
  image's content and a draw number, so that it is the same on every run.
  The classifier trains on the bottlenecks of these forms too
  (``python -m dsconv.train --forms N``), each draw cached as its own
  variant, and learns what compression and resizing change.

A form acts on the decoded pixels (mode L or RGB, as dsconv.images gives
them) and encodes the result; grey stays grey.
"""
import io
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from dsconv import dicom, images

# Recorded in bottleneck caches and model files: change it when augment changes.
AUGMENT = ("augment-v2: with p 0.5 each side cropped or padded with black by up to 8%; upscaled x1.5-4 "
           "(bilinear, bicubic or Lanczos) with p 0.5, else downscaled x0.6-1 and back; gamma 0.8-1.25 and "
           "contrast 0.85-1.15; then JPEG quality 20-95 with p 0.8, else PNG")
COPY_SIZE = 224  # the training copies' size (../shared/data/README.md)


def _image(data):
    return images.open_image(data, name="image")


def _png(im):
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _jpeg(im, quality):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def array_bytes(a):
    """uint8 pixels (H, W) or (H, W, 3 or 4) as PNG bytes."""
    return _png(Image.fromarray(a if a.ndim == 2 or a.shape[2] == 3 else a[..., :3]))


def copy224(data):
    """The form of the training copies: RGB, resized to 224 x 224 (Pillow's bicubic), JPEG quality 75."""
    return _jpeg(_image(data).convert("RGB").resize((COPY_SIZE, COPY_SIZE), Image.BICUBIC), 75)


def jpeg(quality):
    def form(data):
        return _jpeg(_image(data), quality)
    form.__name__ = f"jpeg{quality}"
    return form


def png(data):
    return _png(_image(data))


def dicom16(data):
    """A 16-bit MONOCHROME2 DICOM of the grey pixels (x * 257), windowed over the full range."""
    return dicom.write_bytes(np.asarray(_image(data).convert("L"), np.uint16) * 257)


def crop(data, share=0.05):
    """A border of ``share`` of each side cut away."""
    im = _image(data)
    w, h = im.size
    dx, dy = round(w * share), round(h * share)
    return _png(im.crop((dx, dy, w - dx, h - dy)))


def border(data, share=0.05):
    """A black border of ``share`` of each side added, as a scanned or exported film may carry."""
    im = _image(data)
    w, h = im.size
    dx, dy = round(w * share), round(h * share)
    out = Image.new(im.mode, (w + 2 * dx, h + 2 * dy), 0)
    out.paste(im, (dx, dy))
    return _png(out)


REPORT = {"224 copy": copy224, "JPEG 95": jpeg(95), "JPEG 75": jpeg(75), "JPEG 50": jpeg(50),
          "JPEG 30": jpeg(30), "PNG": png, "16-bit DICOM": dicom16, "crop 5%": crop, "border 5%": border}
FILTERS = (Image.BILINEAR, Image.BICUBIC, Image.LANCZOS)


class Form(NamedTuple):
    """A form of training images: ``apply(data, key)`` -> bytes; its bottlenecks are cached under ``name``."""
    name: str
    description: str
    apply: Callable


# Test-time forms (python -m dsconv.train --form-tta K): the same for every image, so that two forms of one X-ray
# are averaged over the same transformations. Recorded in bottleneck caches and model files.
TEST_SEED = "0" * 16
TEST_FORMS = ("form-tta-v1: brought to 224 x 224 (the network's resize, as PNG), then augment's draw k "
              f"with the fixed seed {TEST_SEED}")


def canonical(data):
    """The image brought to the training copies' size (the network's own resize, no blur), as PNG bytes."""
    return _png(Image.fromarray(images.decode(data, COPY_SIZE)))


def test_form(data, draw):
    """Test-time form ``draw`` (1, 2, ...) of an image file (bytes): canonical, then augment's draw with TEST_SEED.

    canonical(canonical(data)) is canonical(data), so the form of the canonical bytes is the file's.
    """
    return augment(canonical(data), TEST_SEED, draw)


def test_forms(n, first=None):
    """The n test-time forms as Forms, each applied after the Form ``first`` if given (a consistency report's)."""
    name, description = (f"{first.name}+", f"{first.description}; then ") if first else ("", "")
    before = first.apply if first else (lambda data, key: data)
    return [Form(f"{name}tta{k}", f"{description}{TEST_FORMS}; draw {k}",
                 lambda data, key, k=k: test_form(before(data, key), k)) for k in range(1, n + 1)]


def draws(n):
    """The first n random forms of augment, as Forms."""
    return [Form(f"aug{k}", f"{AUGMENT}; draw {k}", lambda data, key, k=k: augment(data, key, k))
            for k in range(1, n + 1)]


def augment(data, key, draw):
    """A random form of an image file (bytes) for training; the same for the same content ``key`` and ``draw``.

    What the draw imitates: a film scanned with a margin, or an export cut
    tighter; an original is larger and was never JPEG-encoded at 224
    (upscaled, the network's own resize brings it back down); an export is
    compressed harder or not at all; another room's detector or export
    setting changes the grey levels a little.
    """
    rng = np.random.default_rng([int(key[:16], 16), draw])
    im = _image(data)
    w, h = im.size
    if rng.random() < 0.5:  # a box beyond the image pads it with black, one inside crops it
        left, top, right, bottom = rng.uniform(-0.08, 0.08, 4) * (w, h, w, h)
        im = im.crop((round(left), round(top), w - round(right), h - round(bottom)))
        w, h = im.size
    if rng.random() < 0.5:
        s = rng.uniform(1.5, 4.0)
        im = im.resize((round(w * s), round(h * s)), FILTERS[rng.integers(len(FILTERS))])
    else:
        s = rng.uniform(0.6, 1.0)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), FILTERS[rng.integers(len(FILTERS))])
        im = im.resize((w, h), FILTERS[rng.integers(len(FILTERS))])
    gamma, contrast = np.exp(rng.uniform(np.log(0.8), np.log(1.25))), rng.uniform(0.85, 1.15)
    x = np.arange(256) / 255.0
    lut = np.clip(np.rint((0.5 + (x ** gamma - 0.5) * contrast) * 255), 0, 255).astype(np.uint8)
    im = im.point(list(lut) * len(im.getbands()))
    return _jpeg(im, rng.integers(20, 96)) if rng.random() < 0.8 else _png(im)


# ---- what form a file is in: read from its header, without decoding its pixels

# The IJG standard luminance table (JPEG Annex K), row by row: quality q scales it by 50/q (q < 50) or 2 - q/50.
IJG_LUMA = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
                     92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float64)


def jpeg_quality(table):
    """The IJG quality (1-100) whose luminance table is nearest ``table`` (64 values, row by row).

    Entries at 255 are left out: at low qualities the scaled table is cut off there.
    """
    table = np.asarray(table, np.float64)
    kept = table < 255
    scale = np.mean(table[kept] * 100 / IJG_LUMA[kept]) if kept.any() else 5000.0
    return int(np.clip(round(100 - scale / 2 if scale <= 100 else 5000 / scale), 1, 100))


def describe(source):
    """{"format", "width", "height", "mode", "quality" (JPEG only)} of an image file, from its header; None if unknown."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            d = {"format": im.format, "width": im.size[0], "height": im.size[1], "mode": im.mode}
            if im.format == "JPEG" and getattr(im, "quantization", None):
                d["quality"] = jpeg_quality(im.quantization[0])
            return d
    except Exception:  # not a Pillow image: perhaps DICOM
        pass
    try:
        import pydicom
        ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source, stop_before_pixels=True)
        return {"format": "DICOM", "width": int(ds.Columns), "height": int(ds.Rows),
                "mode": f"{int(ds.get('BitsStored', 8))}-bit {ds.get('PhotometricInterpretation', '')}".strip()}
    except Exception:  # pydicom missing, or not DICOM either: the decoder will say what is wrong
        return None


def kind(d):
    """A file's form in a word or two: "224 copy" (224 x 224 or smaller), "original", "DICOM"."""
    if d is None:
        return "unreadable"
    if d["format"] == "DICOM":
        return "DICOM"
    return f"{COPY_SIZE} copy" if max(d["width"], d["height"]) <= COPY_SIZE else "original"


def summary(descriptions):
    """What a set of files looks like: counts per kind, side range, formats, JPEG qualities; JSON-safe."""
    ds = [d for d in descriptions if d is not None]
    if not ds:
        return {"images": 0}
    sides = [min(d["width"], d["height"]) for d in ds]
    quality = [d["quality"] for d in ds if "quality" in d]
    kinds = {}
    for d in ds:
        kinds[kind(d)] = kinds.get(kind(d), 0) + 1
    out = {"images": len(ds), "kinds": kinds, "smaller_side": [int(min(sides)), int(max(sides))],
           "longer_side": [int(min(max(d["width"], d["height"]) for d in ds)),
                           int(max(max(d["width"], d["height"]) for d in ds))],
           "formats": sorted({d["format"] for d in ds})}
    if quality:
        out["jpeg_quality"] = [int(min(quality)), int(max(quality))]
    return out


def words(s):
    """summary() in words: "5216 224 x 224 copies (JPEG quality 75)", "314 originals, 368-1882 pixels ..."."""
    if not s.get("images"):
        return "no images"
    plural = {"224 copy": "224 x 224 copies", "original": "originals", "DICOM": "DICOM files"}
    parts = [f"{n} {k if n == 1 else plural.get(k, k)}" for k, n in sorted(s["kinds"].items())]
    lo, hi = s["longer_side"]
    text = ", ".join(parts) + (f", {lo} pixels" if lo == hi else f", {lo}-{hi} pixels") + " on the longer side"
    if "jpeg_quality" in s:
        qlo, qhi = s["jpeg_quality"]
        text += f", JPEG quality {qlo}" + (f"-{qhi}" if qhi != qlo else "")
    return text


# ---- the preprocessing contract: what the model was trained and calibrated on, and inputs far from it

def contract(training, site=None, test=None, draws=0, invariance=0, preprocessing=""):
    """The model file's record of forms (info["forms"]): summaries of the training, site and test files, in words
    (what the page shows beside each figure) and as numbers (what ``caution`` compares an input with)."""
    seen = [s for s in (training, site) if s and s.get("images")]
    record = {"training": words(training or {}), "input": preprocessing, "draws": draws, "invariance": invariance,
              "summaries": {"training": training, "site": site},
              "seen": {"kinds": sorted({k for s in seen for k in s["kinds"]})}}
    if seen:
        record["seen"]["longer_side"] = [min(s["longer_side"][0] for s in seen), max(s["longer_side"][1] for s in seen)]
    quality = [s["jpeg_quality"] for s in seen if "jpeg_quality" in s]
    if quality:
        record["seen"]["jpeg_quality"] = [min(q[0] for q in quality), max(q[1] for q in quality)]
    if site:
        record["site"] = words(site)
    if test:
        record["evaluation"] = words(test)
    if draws:
        record["augmentation"] = (f"{draws} random form(s) of each training and site image ({AUGMENT})"
                                  + (f", the {invariance} directions they move the bottleneck most ignored"
                                     if invariance else ""))
        record["seen"]["augmented"] = True
    return record


def caution(d, record):
    """"" or why an input (describe()) lies outside the forms a model saw (contract()); the decision stands."""
    if not record or "seen" not in record or d is None:
        return ""
    seen, k = record["seen"], kind(d)
    saw = record.get("site") or record.get("training")
    if k == "DICOM" and k not in seen["kinds"]:
        return (f"a DICOM file, and the model was trained and calibrated on no DICOM ({saw}): its threshold was "
                "not measured on this form; check it on a labelled sample of your DICOM files "
                "(python -m dsconv.consistency, dsconv.calibrate --val-dir)")
    if k == "original" and k not in seen["kinds"] and not seen.get("augmented"):
        return (f"an original of {d['width']} x {d['height']} pixels, and the model was trained and calibrated on "
                f"{saw} only: originals score lower than their copies; train with --forms or calibrate on "
                "originals")
    least = min(seen.get("jpeg_quality", [100])[0], 20 if seen.get("augmented") else 100)
    if d.get("quality", 100) < least:
        return (f"JPEG quality {d['quality']}, below any the model was trained on (from {least}): the decision "
                "may differ from that of a better copy of the same X-ray")
    return ""
