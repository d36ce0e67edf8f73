"""Obviously-correct NumPy versions of the kernels, the tests' reference.

Padding follows TensorFlow's SAME rule written out longhand: the output has
ceil(size / stride) pixels, the input is padded by the total the window needs,
with the odd pixel at the bottom / right.
"""
import numpy as np


def pad_same(x, stride):
    # x (N, H, W, C) -> zero-padded so that a 3x3 window with stride fits
    pads = []
    for size in x.shape[1:3]:
        out = (size + stride - 1) // stride
        total = max((out - 1) * stride + 3 - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, ((0, 0), pads[0], pads[1], (0, 0))), [(s + stride - 1) // stride for s in x.shape[1:3]]


def relu6(x):
    return np.minimum(np.maximum(x, 0), 6)


def conv3x3(x, k, b, stride):
    # x (N, H, W, Cin), k (3, 3, Cin, Cout)
    xp, (ho, wo) = pad_same(x.astype(np.float64), stride)
    y = np.zeros((x.shape[0], ho, wo, k.shape[3]))
    for n in range(x.shape[0]):
        for i in range(ho):
            for j in range(wo):
                patch = xp[n, i * stride:i * stride + 3, j * stride:j * stride + 3, :]
                y[n, i, j] = np.tensordot(patch, k, axes=3) + b
    return relu6(y)


def depthwise(x, k, b, stride):
    # x (N, H, W, C), k (3, 3, C)
    xp, (ho, wo) = pad_same(x.astype(np.float64), stride)
    y = np.zeros((x.shape[0], ho, wo, x.shape[3]))
    for n in range(x.shape[0]):
        for i in range(ho):
            for j in range(wo):
                patch = xp[n, i * stride:i * stride + 3, j * stride:j * stride + 3, :]
                y[n, i, j] = (patch * k).sum(axis=(0, 1)) + b
    return relu6(y)


def pointwise(x, w, b):
    # x (N, H, W, Cin), w (Cin, Cout)
    y = np.zeros(x.shape[:3] + (w.shape[1],))
    for cin in range(w.shape[0]):
        y += x[..., cin:cin + 1].astype(np.float64) * w[cin]
    return relu6(y + b)


def global_avg_pool(x):
    return x.astype(np.float64).sum(axis=(1, 2)) / (x.shape[1] * x.shape[2])


def dense(x, w, b):
    return np.array([[sum(float(x[n, k]) * float(w[k, m]) for k in range(w.shape[0])) + b[m]
                      for m in range(w.shape[1])] for n in range(x.shape[0])])


def softmax(z):
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
