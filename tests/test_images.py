"""Decoding: every Pillow mode to RGB, 16-bit, large originals with JPEG draft."""
import io

import numpy as np
import pytest
from PIL import Image

from dsconv import images
from tests.conftest import ORIGINALS


def png(array, mode=None):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG") if mode else Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def test_modes_agree_with_rgb():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    want = images.decode(png(rgb), 32)
    assert want.shape == (32, 32, 3) and want.dtype == np.uint8
    rgba = np.concatenate([rgb, np.full((40, 30, 1), 128, np.uint8)], axis=2)
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)  # I;16, full 16-bit range
    buf = io.BytesIO()
    sixteen.save(buf, "PNG")
    for data in (png(gray), png(rgba), buf.getvalue()):
        assert np.array_equal(images.decode(data, 32), want)


@pytest.mark.parametrize("size", [224, 160, 128, 48])
def test_grey_resized_once_same_pixels(size):
    """A grey image is resized as one channel: the same pixels as its RGB copy resized (down and up)."""
    rng = np.random.default_rng(size)
    sources = [png(rng.integers(0, 256, (40, 30), dtype=np.uint8))] + sorted(ORIGINALS.rglob("*.jpeg"))[:6]
    for source in sources:
        im = images.open_image(source, size)
        assert im.mode == "L"
        want = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        assert np.array_equal(images.decode(source, size), want)


def test_scale_range():
    x = images.scale(np.array([0, 255], np.uint8))
    assert x.dtype == np.float32 and x[0] == -1 and x[1] == 1


def test_undecodable_names_file(tmp_path):
    bad = tmp_path / "notes.jpeg"
    bad.write_text("not an image")
    with pytest.raises(images.ImageError, match="notes.jpeg"):
        images.load(bad, 32)


@pytest.mark.shared
@pytest.mark.parametrize("size", [224, 128])
def test_large_originals_draft_close_to_full_decode(size):
    # The reduced-scale JPEG decode must not change what the network sees
    # beyond a couple of grey levels on average (measured: 0.65 at 224).
    diffs = []
    for path in sorted(ORIGINALS.rglob("*.jpeg"))[:12]:
        with Image.open(path) as im:
            full = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float64)
        diffs.append(np.abs(images.decode(path, size) - full).mean())
    print(f"\nmean |draft - full| at {size}: {np.mean(diffs):.2f} grey levels, worst image {max(diffs):.2f}")
    assert np.mean(diffs) < 1.5 and max(diffs) < 4


@pytest.mark.shared
def test_decode_sizes_equals_decode_per_size():
    # one decode for all sizes where JPEG draft would not reduce, one per size where it would
    sizes = (224, 192, 160, 128)
    sources = [sorted((ORIGINALS.parent / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[0],
               sorted(ORIGINALS.glob("*/*.jpeg"))[0],
               png(np.random.default_rng(1).integers(0, 256, (300, 260), dtype=np.uint8))]
    small = io.BytesIO()
    Image.open(sources[1]).resize((300, 250)).save(small, "JPEG")  # under 2 x 128: shared
    sources.append(small.getvalue())
    for src in sources:
        got = images.decode_sizes(src, sizes)
        assert sorted(got) == sorted(sizes)
        for r in sizes:
            assert np.array_equal(got[r], images.decode(src, r)), (src if isinstance(src, str) else "bytes", r)
    with pytest.raises(images.ImageError, match="cannot be read"):
        images.decode_sizes(b"not an image", sizes, name="x.jpeg")
