"""MobileNet v1 (Howard et al. 2017) as a table, and its forward pass.

The paper's Table 2: a 3x3 stem convolution with stride 2, then 13
depthwise-separable blocks (depthwise 3x3 + pointwise 1x1, each followed by
batch norm and ReLU6), global average pooling and the 1000-class ImageNet
head. Widths scale with alpha as ``int(c * alpha)``. Layer names are Keras'
(``conv1``, ``conv_dw_N``, ``conv_pw_N``, ``conv_preds``), so weight loading
is a dictionary lookup.

``count`` gives the mult-adds and parameters of the 1000-class network (the
paper's Table 3). The paper's table and its errata (rows where counting the
layers disagrees with it) are in dsconv.paper; tests/test_mobilenet.py checks
``count`` against both.
"""
import hashlib
import threading

import numpy as np

from dsconv import DsconvError

# dsconv.kernels is imported in the methods that run it: importing it loads
# its compiled code (0.4 s), which --help and the table need not wait for.

ALPHAS = (1.0, 0.75, 0.5, 0.25)
RESOLUTIONS = (224, 192, 160, 128)
STEM = 32
# (output channels, depthwise stride) of blocks 1..13.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
CLASSES = 1000


MAX_RESOLUTION = 512  # a batch of 32 at 512 already needs about 1 GB of activations (alpha 1.0, flip TTA)


def check_variant(alpha, resolution):
    if alpha not in ALPHAS:
        raise DsconvError(f"alpha must be one of {ALPHAS}, got {alpha}")
    if not 32 <= resolution <= MAX_RESOLUTION or resolution % 32:
        raise DsconvError(f"resolution must be a multiple of 32 from 32 to {MAX_RESOLUTION}, got {resolution}")


def width(c, alpha):
    return int(c * alpha)


def layer_shapes(alpha, head=True):
    """{Keras layer name: {tensor: shape}} of the folded network, in order."""
    c = width(STEM, alpha)
    shapes = {"conv1": {"kernel": (3, 3, 3, c), "bias": (c,)}}
    for i, (out, _) in enumerate(BLOCKS, 1):
        out = width(out, alpha)
        shapes[f"conv_dw_{i}"] = {"kernel": (3, 3, c), "bias": (c,)}
        shapes[f"conv_pw_{i}"] = {"kernel": (c, out), "bias": (out,)}
        c = out
    if head:
        shapes["conv_preds"] = {"kernel": (c, CLASSES), "bias": (CLASSES,)}
    return shapes


def feature_size(alpha):
    return width(BLOCKS[-1][0], alpha)


def count(alpha, resolution):
    """(mult-adds, parameters) of the 1000-class network, as TF-slim counts.

    Parameters are those of the checkpoint: convolution and dense weights,
    the dense bias, and three per batch-norm channel (beta, moving mean,
    moving variance; slim's batch norm has no gamma).
    """
    check_variant(alpha, resolution)
    side, c = resolution // 2, width(STEM, alpha)
    madds, params = side * side * 27 * c, 27 * c + 3 * c
    for out, stride in BLOCKS:
        out = width(out, alpha)
        side = -(-side // stride)
        madds += side * side * (9 * c + c * out)
        params += 9 * c + 3 * c + c * out + 3 * out
        c = out
    return madds + c * CLASSES, params + c * CLASSES + CLASSES


class MobileNet:
    """A MobileNet v1 feature extractor with folded batch norm.

    ``params`` maps Keras layer names to {"kernel", "bias"} float32 arrays
    (see layer_shapes); ``conv_preds`` is optional (the ImageNet head).
    ``weights_path``, ``weights_sha256``: the weight file they came from
    (dsconv.weights) and its sha256; ``trained_resolution``: the resolution
    they were trained at (default: ``resolution``).
    """

    def __init__(self, alpha, params, resolution=224, weights_path=None, weights_sha256=None,
                 trained_resolution=None):
        check_variant(alpha, resolution)
        self.alpha, self.resolution = alpha, resolution
        self.weights_path, self.weights_sha256 = weights_path, weights_sha256
        self.trained_resolution = resolution if trained_resolution is None else trained_resolution
        self.has_head = "conv_preds" in params
        expected = layer_shapes(alpha, self.has_head)
        for name, tensors in expected.items():
            for t, shape in tensors.items():
                got = params.get(name, {}).get(t)
                if got is None or got.shape != shape:
                    raise DsconvError(f"{weights_path or 'weights'}: layer {name}/{t} should be {shape} "
                                     f"for alpha {alpha}, got {None if got is None else got.shape}")
        self.params = {n: {t: np.ascontiguousarray(params[n][t], np.float32) for t in ts}
                       for n, ts in expected.items()}

    def tensors_sha256(self, head=False):
        """sha256 of the backbone's layer names, shapes and float32 tensors (and the head's, with ``head``).

        What a bottleneck depends on, whichever file the weights came from:
        Keras' with-top and no-top files of one alpha hold the same backbone.
        Computed once per network.
        """
        if head and not self.has_head:
            raise ValueError("this network has no ImageNet head")
        hashes = self.__dict__.setdefault("_sha256", {})
        if head not in hashes:
            h = hashlib.sha256()
            for name, tensors in self.params.items():
                if name == "conv_preds" and not head:
                    continue
                for t, a in tensors.items():
                    h.update(f"{name}/{t}{a.shape}".encode())
                    h.update(a.tobytes())
            hashes[head] = h.hexdigest()
        return hashes[head]

    @property
    def pooled_width(self):
        return feature_size(self.alpha)

    def _images(self, images):
        x = np.ascontiguousarray(images, np.float32)
        if x.ndim != 4 or x.shape[1:] != (self.resolution, self.resolution, 3):
            raise ValueError(f"expected images of shape (N, {self.resolution}, {self.resolution}, 3), "
                             f"got {x.shape}")
        return x

    def layers(self, images):
        """Yield (Keras activation name, activation) after every layer.

        images (N, r, r, 3) float32 scaled to [-1, 1]. One kernel call per
        layer: the simple path, for inspection (forward() is the fast one).
        """
        from dsconv import kernels
        x = self._images(images)
        p = self.params
        x = kernels.stem(x, p["conv1"]["kernel"], p["conv1"]["bias"])
        yield "conv1_relu", x
        for i, (_, stride) in enumerate(BLOCKS, 1):
            x = kernels.depthwise(x, p[f"conv_dw_{i}"]["kernel"], p[f"conv_dw_{i}"]["bias"], stride)
            yield f"conv_dw_{i}_relu", x
            x = kernels.pointwise(x, p[f"conv_pw_{i}"]["kernel"], p[f"conv_pw_{i}"]["bias"])
            yield f"conv_pw_{i}_relu", x

    def feature_maps(self, images):
        """The last feature maps, conv_pw_13_relu: (N, r/32, r/32, 1024a)."""
        for _, x in self.layers(images):
            pass
        return x

    def forward(self, images):
        """(pooled (N, 1024a), logits (N, 1000) or None without the head)."""
        pooled = self._pooled(self._images(images))
        return pooled, self.logits(pooled) if self.has_head else None

    def logits(self, pooled):
        from dsconv import kernels
        head = self.params["conv_preds"]
        return kernels.dense(pooled, head["kernel"], head["bias"]).astype(np.float32)

    def forward_maps(self, images):
        """(pooled (N, 1024a), the last feature maps conv_pw_13_relu (N, r/32, r/32, 1024a)) in one fused pass."""
        x = self._images(images)
        side = -(-self.resolution // 32)
        maps = np.empty((len(x), side, side, self.pooled_width), np.float32)
        return self._pooled(x, maps), maps

    def _pooled(self, x, maps=None):
        """The fused forward pass (kernels.network) with this network's packed weights and buffers."""
        from dsconv import kernels
        threads = kernels.threads()
        if getattr(self, "_fused", None) is None or self._fused[0] != threads:
            self._fused = (threads, threading.Lock(), kernels.network_buffers(self.packed, self.resolution, threads))
        _, lock, buffers = self._fused
        pooled = np.empty((len(x), self.pooled_width), np.float32)
        with lock:
            kernels.network(x, self.packed, buffers, pooled, maps)
        return pooled

    @property
    def packed(self):
        """The backbone's weights packed for kernels.network, once."""
        if getattr(self, "_packed", None) is None:
            from dsconv import kernels
            p = self.params
            self._packed = kernels.pack_network(
                (p["conv1"]["kernel"], p["conv1"]["bias"]),
                [(p[f"conv_dw_{i}"]["kernel"], p[f"conv_dw_{i}"]["bias"], p[f"conv_pw_{i}"]["kernel"],
                  p[f"conv_pw_{i}"]["bias"], stride) for i, (_, stride) in enumerate(BLOCKS, 1)])
        return self._packed
