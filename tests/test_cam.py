"""Class activation maps: the identity that makes them honest, the overlay and its PNG."""
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from dsconv import cam, images, weights
from tests.conftest import CHEST


@pytest.mark.slow
def test_map_mean_plus_bias_is_the_logit(converted):
    net = weights.load(0.25, 128, quiet=True)
    paths = sorted((CHEST / "NORMAL").glob("*.jpeg"))[:3]
    x = np.stack([images.load(p, 128) for p in paths])
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((net.pooled_width, 2)), rng.standard_normal(2)
    A = net.feature_maps(x)
    pooled, _ = net.forward(x)
    logits = pooled.astype(np.float64) @ W + b
    for n in range(len(x)):
        for k in range(2):
            m = cam.class_map(A[n], W[:, k])
            assert m.shape == A.shape[1:3]
            assert abs(m.mean() + b[k] - logits[n, k]) < 1e-5
            w, c = cam.contrast(W, b, k)
            assert abs(cam.class_map(A[n], w).mean() + c - (logits[n, k] - logits[n].mean())) < 1e-5


@pytest.mark.slow
def test_overlay_keeps_the_image_size_and_colours_by_sign():
    image = Image.fromarray(np.full((60, 90), 128, np.uint8), "L")
    m = np.zeros((6, 6))
    m[0, 0], m[5, 5] = 1.0, -1.0
    out = cam.overlay(image, m, "P(PNEUMONIA) = 0.93")
    assert out.size == (90, 60) and out.mode == "RGB"
    px = np.asarray(out).astype(int)
    assert px[40, 45].tolist() == [128, 128, 128]     # zero evidence: the X-ray untouched
    assert px[59, 89, 2] > px[59, 89, 0]               # negative corner: blue
    top_left = px[:20, :40]
    assert (top_left == 0).any() and (top_left == 255).any()  # the caption box and text


@pytest.mark.parametrize("shape", [(7, 7), (4, 6), (1, 1)])
def test_overlay_is_pillows_upsampling_and_blend(shape):
    """The compiled blend against Pillow's bilinear resize of the map and the blend in floats: within a grey level."""
    rng = np.random.default_rng(sum(shape))
    grey = rng.integers(0, 256, (83, 121), dtype=np.uint8)
    m = rng.standard_normal(shape)
    got = np.asarray(cam.overlay(Image.fromarray(grey, "L"), m, "")).astype(np.float64)
    up = np.asarray(Image.fromarray(m.astype(np.float32), "F").resize((121, 83), Image.BILINEAR), np.float64)
    alpha = np.abs(up)[..., None] * cam.OPACITY / np.abs(m).max()
    colour = np.where(up[..., None] >= 0, np.array(cam.RED, np.float64), np.array(cam.BLUE, np.float64))
    want = grey[..., None] * (1 - alpha) + colour * alpha
    below_caption = slice(30, None)
    assert np.abs(got[below_caption] - want[below_caption]).max() <= 1.0


@pytest.mark.parametrize("mode, shape", [("RGB", (83, 121, 3)), ("L", (50, 7)), ("RGB", (1, 5, 3))])
def test_png_decodes_to_the_same_pixels(mode, shape):
    """The PNG that predict --heatmap writes, read back by Pillow's decoder: every pixel as given."""
    rng = np.random.default_rng(len(shape))
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels[: shape[0] // 2] = 255 - pixels[: shape[0] // 2] // 7  # smooth and noisy rows: both ways of wrapping
    with Image.open(io.BytesIO(cam.png(Image.fromarray(pixels, mode)))) as back:
        back.load()
        assert back.format == "PNG" and back.mode == mode and np.array_equal(np.asarray(back), pixels)
    with pytest.raises(ValueError, match="RGBA"):
        cam.png(Image.new("RGBA", (4, 4)))


def test_deflate_in_parts_is_one_zlib_stream():
    """The PNG's rows deflated in parts on threads: one stream that zlib inflates back, empty data included."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 70_000, dtype=np.uint8).tobytes() + bytes(50_000) + bytes(range(256)) * 300
    for part in (1 << 20, 10_000, 1):
        assert zlib.decompress(cam._deflate(data, part=part)) == data
    assert zlib.decompress(cam._deflate(b"")) == b""
