"""A set of images that are not frontal chest X-rays, built on the fly, for the X-ray check.

    from bench.nonxray import build
    cases = build(folder)     # writes the images, returns [(path, group, must_flag)]

Groups: synthetic (noise, blank, gradients, checkerboards, rendered text
documents, shapes, a CT-like phantom, tiny and colour images), photos (the
ImageNet sample photos in ../shared and the pictures matplotlib and, where
installed, scikit-image ship, each also in grey), other (an MRI slice and
elevation maps that matplotlib ships), and derived: hard cases made from
training X-rays. Of those, a 2 x 2 mosaic of four X-rays and a corner crop
(no whole chest) must be flagged; rotated (90, 180 degrees) and negative
X-rays are still whole chest X-rays shown wrongly, so their share is
reported but not counted. Nothing here is committed as an image: the photos
and X-rays are read where they lie.
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SAMPLES = SHARED / "weights" / "sample_images"
TRAIN = SHARED / "data" / "chest_xray" / "train"
WORDS = ("the patient was seen in clinic today and reported a cough for three days with mild fever no "
         "history of asthma invoice total amount due payment terms thirty days page of report").split()


def _noise(rng):
    out = {}
    for k, size in enumerate((224, 512, 97)):
        out[f"uniform-grey-{size}"] = rng.integers(0, 256, (size, size), dtype=np.uint8)
        out[f"uniform-colour-{size}"] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        out[f"gauss-grey-{size}"] = np.clip(rng.normal(128, 20 + 30 * k, (size, size)), 0, 255).astype(np.uint8)
    out["gauss-smooth"] = np.asarray(Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8))
                                     .resize((400, 400), Image.BICUBIC))
    out["salt-pepper"] = np.where(rng.random((300, 300)) < 0.05, 255, 0).astype(np.uint8)
    return out


def _flat_and_gradients():
    out = {f"blank-{v}": np.full((300, 300), v, np.uint8) for v in (0, 128, 255)}
    out["blank-colour"] = np.full((300, 300, 3), (40, 90, 200), np.uint8)
    ramp = np.linspace(0, 255, 400)
    out["gradient-horizontal"] = np.tile(ramp, (300, 1)).astype(np.uint8)
    out["gradient-vertical"] = np.tile(ramp[:, None], (1, 300)).astype(np.uint8)
    yy, xx = np.mgrid[-1:1:400j, -1:1:400j]
    out["gradient-radial"] = (255 * np.clip(1 - np.hypot(xx, yy), 0, 1)).astype(np.uint8)
    out["sine-rings"] = (127.5 + 127.5 * np.sin(20 * np.hypot(xx, yy))).astype(np.uint8)
    for period in (4, 16, 64):
        out[f"checkerboard-{period}"] = (255 * (((np.arange(256)[:, None] // period)
                                                  + (np.arange(256)[None] // period)) % 2)).astype(np.uint8)
    out["stripes"] = (255 * ((np.arange(300)[None] // 10) % 2) * np.ones((300, 1))).astype(np.uint8)
    out["one-pixel"] = np.full((1, 1), 90, np.uint8)
    out["tiny-8"] = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    return out


def _documents(rng):
    out = {}
    font = ImageFont.load_default()
    for k in range(4):
        im = Image.new("L", (600 + 100 * k, 800), 255 if k % 2 == 0 else 235)
        d = ImageDraw.Draw(im)
        y = 40
        while y < 760:
            d.text((40, y), " ".join(rng.choice(WORDS, 10 + k)), fill=0, font=font)
            y += 14 + 4 * k
        if k == 3:
            d.rectangle((40, 300, 500, 500), outline=0)
        out[f"document-{k}"] = np.asarray(im)
    im = Image.new("L", (400, 400), 0)
    ImageDraw.Draw(im).text((20, 190), "NO IMAGE", fill=255, font=font)
    out["caption-on-black"] = np.asarray(im)
    return out


def _shapes(rng):
    out = {}
    for k in range(3):
        im = Image.new("RGB" if k == 2 else "L", (400, 400), "white" if k else "black")
        d = ImageDraw.Draw(im)
        for _ in range(12):
            x, y = rng.integers(0, 350, 2)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3)) if k == 2 else int(rng.integers(0, 256))
            d.ellipse((x, y, x + rng.integers(20, 120), y + rng.integers(20, 120)), fill=fill)
        out[f"shapes-{k}"] = np.asarray(im)
    out["ct-phantom"] = _phantom(256)
    return out


def _phantom(n):
    """A CT-like slice: the (modified) Shepp-Logan head phantom's ellipses (value, a, b, x0, y0, angle)."""
    ellipses = [(1, .69, .92, 0, 0, 0), (-.8, .6624, .874, 0, -.0184, 0), (-.2, .11, .31, .22, 0, -18),
                (-.2, .16, .41, -.22, 0, 18), (.1, .21, .25, 0, .35, 0), (.1, .046, .046, 0, .1, 0),
                (.1, .046, .046, 0, -.1, 0), (.1, .046, .023, -.08, -.605, 0), (.1, .023, .023, 0, -.606, 0),
                (.1, .023, .046, .06, -.605, 0)]
    yy, xx = np.mgrid[1:-1:n * 1j, -1:1:n * 1j]
    img = np.zeros((n, n))
    for v, a, b, x0, y0, deg in ellipses:
        t = np.radians(deg)
        u, w = (xx - x0) * np.cos(t) + (yy - y0) * np.sin(t), -(xx - x0) * np.sin(t) + (yy - y0) * np.cos(t)
        img[(u / a) ** 2 + (w / b) ** 2 <= 1] += v
    return (255 * np.clip(img, 0, 1)).astype(np.uint8)


def _photos():
    out = {}
    for p in sorted(SAMPLES.glob("*.jpg")):
        out[p.stem] = Image.open(p).convert("RGB")
    try:
        import matplotlib.cbook as cbook
        out["grace-hopper"] = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
        out["mpl-logo"] = Image.open(cbook.get_sample_data("logo2.png")).convert("RGB")
        out["mpl-present"] = Image.open(cbook.get_sample_data("Minduka_Present_Blue_Pack.png")).convert("RGB")
    except ImportError:
        pass
    try:
        from skimage import data
        for name in ("astronaut", "camera", "coffee", "coins", "chelsea", "moon", "page", "text", "rocket",
                     "brick", "grass", "gravel", "horse", "clock", "hubble_deep_field", "immunohistochemistry",
                     "retina", "microaneurysms", "logo", "motorcycle_left", "cell"):
            try:
                a = np.asarray(getattr(data, name)())
            except Exception:  # an image that would need a download
                continue
            a = (a * 255).astype(np.uint8) if a.dtype == bool else np.clip(a, 0, 255).astype(np.uint8)
            out[f"skimage-{name}"] = Image.fromarray(a[..., :3] if a.ndim == 3 else a)
    except ImportError:
        pass
    grey = {f"{k}-grey": im.convert("L") for k, im in out.items() if im.mode == "RGB"}
    return {**out, **grey}


def _others():
    out = {}
    try:
        import matplotlib.cbook as cbook
    except ImportError:
        return out
    with cbook.get_sample_data("s1045.ima.gz") as f:  # an MRI slice, 256 x 256 16-bit (opened ungzipped)
        mri = np.frombuffer(f.read(), np.uint16).reshape(256, 256).astype(np.float64)
    out["mri-slice"] = (255 * mri / mri.max()).astype(np.uint8)
    for name in ("topobathy.npz", "jacksboro_fault_dem.npz"):
        z = cbook.get_sample_data(name)  # opened as an NpzFile
        z = np.asarray(z["topo"] if "topo" in z.files else z["elevation"], np.float64)
        out[Path(name).stem] = (255 * (z - z.min()) / np.ptp(z)).astype(np.uint8)
    return out


def _derived(rng):
    """Hard cases from training X-rays: (name, image, must_flag)."""
    xrays = sorted((TRAIN / "NORMAL").glob("*.jpeg"))[::300] + sorted((TRAIN / "PNEUMONIA").glob("*.jpeg"))[::900]
    out = []
    for k, p in enumerate(xrays[:8]):
        im = Image.open(p).convert("L")
        w, h = im.size
        out += [(f"{p.stem}-rot90", im.transpose(Image.ROTATE_90), False),
                (f"{p.stem}-rot180", im.transpose(Image.ROTATE_180), False),
                (f"{p.stem}-negative", Image.eval(im, lambda v: 255 - v), False),
                (f"{p.stem}-corner", im.crop((0, 0, w // 2, h // 2)) if k % 2 else im.crop((w // 2, h // 2, w, h)),
                 True)]
        four = [Image.open(q).convert("L").resize((w // 2, h // 2)) for q in rng.choice(xrays, 4)]
        mosaic = Image.new("L", (w // 2 * 2, h // 2 * 2))
        for i, t in enumerate(four):
            mosaic.paste(t, (i % 2 * (w // 2), i // 2 * (h // 2)))
        out.append((f"{p.stem}-mosaic", mosaic, True))
    return out


def build(folder, seed=0):
    """Write the set as PNGs into folder; [(path, group, must_flag)] in a fixed order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = []

    def put(name, im, group, must):
        im = im if isinstance(im, Image.Image) else Image.fromarray(im)
        path = folder / f"{group}-{name}.png"
        im.save(path)
        cases.append((path, group, must))
    for part in (_noise(rng), _flat_and_gradients(), _documents(rng), _shapes(rng)):
        for name, a in part.items():
            put(name, a, "synthetic", True)
    for name, im in _photos().items():
        put(name, im, "photo", True)
    for name, a in _others().items():
        put(name, a, "other", True)
    for name, im, must in _derived(rng):
        put(name, im, "derived", must)
    return cases
