"""Class activation maps (Zhou et al. 2016): where the network looked.

The classifier is affine in the global average of the last feature maps A
(h x w x F): logit_k = mean_ij(A_ij) . W_k + b_k. So the map
M_k = A . W_k has mean(M_k) + b_k = logit_k exactly, and every pixel's share
of the decision can be read off it. For a softmax only differences between
logits matter, so the map drawn is the contrast of class k against the mean
of all classes, W_k - mean_j W_j: red where the X-ray pushes towards class k,
blue where it pushes away.
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

RED = (230, 30, 30)
BLUE = (30, 90, 230)
OPACITY = 0.6


def class_map(feature_maps, weights):
    """feature_maps (h, w, F), weights (F,) -> (h, w): the map whose mean is the logit less its bias."""
    return np.tensordot(feature_maps.astype(np.float64), np.asarray(weights, np.float64), axes=1)


def contrast(W, b, k):
    """(weights (F,), bias) of class k's logit minus the mean logit; W (F, K), b (K,)."""
    W, b = np.asarray(W, np.float64), np.asarray(b, np.float64)
    return W[:, k] - W.mean(axis=1), b[k] - b.mean()


def overlay(image, cam, caption):
    """The map upsampled onto the X-ray at its own size, with a caption; an RGB image.

    image: a Pillow image; cam (h, w): positive red, negative blue, opacity
    proportional to |cam| / max |cam|. Blended by Pillow in 8 bits: an
    original X-ray has millions of pixels, and float arrays of them took
    half a second.
    """
    size = image.size
    up = np.asarray(Image.fromarray(np.asarray(cam, np.float32), "F").resize(size, Image.BILINEAR))
    scale = OPACITY * 255 / max(float(np.abs(up).max()), 1e-12)
    alpha = Image.fromarray(np.rint(np.abs(up) * scale).astype(np.uint8), "L")
    sign = Image.fromarray(np.where(up >= 0, np.uint8(255), np.uint8(0)), "L")
    colour = Image.composite(Image.new("RGB", size, RED), Image.new("RGB", size, BLUE), sign)
    out = Image.composite(colour, image.convert("L").convert("RGB"), alpha)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(12, size[1] // 24))
    box = draw.textbbox((0, 0), caption, font=font)
    pad = font.size // 3
    draw.rectangle((0, 0, box[2] + 2 * pad, box[3] + 2 * pad), fill=(0, 0, 0))
    draw.text((pad, pad), caption, fill=(255, 255, 255), font=font)
    return out
