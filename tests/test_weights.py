"""Keras -> dsconv conversion, finding and loading weights, and their errors."""
import h5py
import numpy as np
import pytest

from dsconv import mobilenet, weights
from tests import naive
from tests.conftest import KERAS, SHARED

BROKEN = SHARED / "weights" / "broken" / "mobilenet_1_0_224_tf_no_top_missing_conv_pw_13.h5"


@pytest.mark.parametrize("name,alpha,head", [
    ("mobilenet_2_5_224_tf.h5", 0.25, True),          # Keras 2.1.4 layout
    ("mobilenet_2_5_224_tf_no_top.h5", 0.25, False),  # Keras 2.0.4 layout
    ("mobilenet_7_5_224_tf.h5", 0.75, True),
    ("mobilenet_7_5_224_tf_no_top.h5", 0.75, False),
])
@pytest.mark.shared
def test_convert_folds_batch_norm(tmp_path, name, alpha, head):
    out = weights.convert(KERAS / name, tmp_path)
    info = weights.describe(out)
    assert (info["alpha"], info["trained_resolution"], info["has_head"]) == (alpha, 224, head)
    with h5py.File(KERAS / name) as k, h5py.File(out) as d:
        assert d.attrs["source_sha256"] == weights.sha256(KERAS / name)
        # one depthwise layer folded by hand, in float64
        kern = k["conv_dw_7/conv_dw_7/depthwise_kernel:0"][()][:, :, :, 0].astype(np.float64)
        bn = {t: k[f"conv_dw_7_bn/conv_dw_7_bn/{t}:0"][()].astype(np.float64)
              for t in ("gamma", "beta", "moving_mean", "moving_variance")}
        scale = bn["gamma"] / np.sqrt(bn["moving_variance"] + 1e-3)
        np.testing.assert_allclose(d["conv_dw_7/kernel"][()], kern * scale, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(d["conv_dw_7/bias"][()], bn["beta"] - bn["moving_mean"] * scale,
                                   rtol=1e-6, atol=1e-6)
        assert ("conv_preds" in d) == head


@pytest.mark.shared
def test_broken_file_names_the_layer(tmp_path):
    with pytest.raises(weights.WeightsError, match="conv_pw_13"):
        weights.convert(BROKEN, tmp_path)
    assert not list(tmp_path.iterdir()), "nothing is written for a refused file"


@pytest.mark.shared
def test_broken_file_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        weights.main(["convert", str(BROKEN), "--out", str(tmp_path)])
    assert e.value.code == 2 and "conv_pw_13" in capsys.readouterr().err


@pytest.mark.shared
def test_misshapen_layer_refused(tmp_path):
    bad = tmp_path / "bad.h5"
    with h5py.File(KERAS / "mobilenet_2_5_224_tf_no_top.h5") as src, h5py.File(bad, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name in src:
            src.copy(name, dst)
        del dst["conv_pw_5/conv_pw_5/kernel:0"]
        dst["conv_pw_5/conv_pw_5/kernel:0"] = np.zeros((1, 1, 64, 32), np.float32)
    with pytest.raises(weights.WeightsError, match="conv_pw_5"):
        weights.convert(bad, tmp_path / "out")


def test_wrong_alpha_refused(converted):
    with pytest.raises(weights.WeightsError, match="alpha 0.25"):
        weights.load_file(converted / "mobilenet_0.25_224.h5", alpha=0.75)


@pytest.mark.shared
def test_keras_file_is_not_a_dsconv_file():
    with pytest.raises(weights.WeightsError, match="dsconv.weights convert"):
        weights.load_file(KERAS / "mobilenet_2_5_224_tf.h5")


def test_smaller_resolution_uses_224_weights(converted, capsys):
    net = weights.load(0.75, 160)
    assert (net.resolution, net.trained_resolution) == (160, 224)
    assert "224" in capsys.readouterr().err


def test_missing_weights_say_what_to_convert(tmp_path, monkeypatch):
    monkeypatch.setenv("DSCONV_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("DSCONV_KERAS_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(weights, "keras_dirs", lambda: [tmp_path])
    with pytest.raises(weights.WeightsError, match="mobilenet_5_0_224_tf"):
        weights.load(0.5, 224)


@pytest.mark.shared
def test_converts_on_first_use(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSCONV_WEIGHTS", str(tmp_path / "converted"))
    monkeypatch.setattr(weights, "keras_dirs", lambda: [KERAS])
    net = weights.load(0.25, 224, head=True)
    assert net.has_head
    assert (tmp_path / "converted" / "mobilenet_0.25_224.h5").is_file()
    assert "converting" in capsys.readouterr().err


def test_keras_dirs_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DSCONV_KERAS_WEIGHTS", str(tmp_path))
    assert weights.keras_dirs()[0] == tmp_path


def test_list(converted, capsys):
    weights.main(["list"])
    out = capsys.readouterr().out
    assert "mobilenet_0.75_224.h5" in out and "alpha 0.75" in out


def write_keras_file(path, alpha, head, seed=0):
    """A Keras-layout MobileNet v1 file (legacy save_weights HDF5, as in ../shared) of random tensors.

    Returns {layer: {weight: array}} as written: Keras' kernel shapes, batch norm unfolded.
    """
    rng = np.random.default_rng(seed)
    written, order = {}, ["input_1"]
    for name, shapes in mobilenet.layer_shapes(alpha, head).items():
        kernel = shapes["kernel"]
        if name == "conv_preds":
            written[name] = {"kernel": rng.normal(0, 0.05, (1, 1) + kernel), "bias": rng.normal(0, 0.1, 1000)}
            order.append(name)
            continue
        fan_in = 9 if name.startswith("conv_dw") else int(np.prod(kernel[:-1]))
        if name.startswith("conv_dw"):
            written[name] = {"depthwise_kernel": rng.normal(0, (2 / fan_in) ** 0.5, kernel + (1,))}
        else:
            written[name] = {"kernel": rng.normal(0, (2 / fan_in) ** 0.5, kernel if name == "conv1"
                                                  else (1, 1) + kernel)}
        c = shapes["bias"][0]
        written[name + "_bn"] = {"gamma": rng.uniform(0.5, 1.5, c), "beta": rng.normal(0, 0.2, c),
                                 "moving_mean": rng.normal(0, 0.2, c), "moving_variance": rng.uniform(0.5, 2, c)}
        order += [name, name + "_bn", name + "_relu"]
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"], f.attrs["backend"] = b"2.1.4", b"tensorflow"
        f.attrs["layer_names"] = np.array([n.encode() for n in order])
        for name in order:
            group = f.create_group(name)
            tensors = written.get(name, {})
            group.attrs["weight_names"] = np.array([f"{name}/{t}:0".encode() for t in tensors], "S64")
            for t, a in tensors.items():
                group[f"{name}/{t}:0"] = a.astype(np.float32)
    return {n: {t: a.astype(np.float32) for t, a in ts.items()} for n, ts in written.items()}


def naive_forward(keras, x):
    """The network from Keras tensors in float64: conv, batch norm (eps 1e-3), ReLU6, with tests/naive.py."""
    def folded(name, kernel):
        bn = {t: a.astype(np.float64) for t, a in keras[name + "_bn"].items()}
        scale = bn["gamma"] / np.sqrt(bn["moving_variance"] + 1e-3)
        return kernel.astype(np.float64) * scale, bn["beta"] - bn["moving_mean"] * scale
    x = naive.conv3x3(x, *folded("conv1", keras["conv1"]["kernel"]), 2)
    for i, (_, stride) in enumerate(mobilenet.BLOCKS, 1):
        x = naive.depthwise(x, *folded(f"conv_dw_{i}", keras[f"conv_dw_{i}"]["depthwise_kernel"][..., 0]), stride)
        x = naive.pointwise(x, *folded(f"conv_pw_{i}", keras[f"conv_pw_{i}"]["kernel"][0, 0]))
    pooled = naive.global_avg_pool(x)
    head = keras.get("conv_preds")
    return pooled, None if head is None else pooled @ head["kernel"][0, 0].astype(np.float64) + head["bias"]


@pytest.mark.slow
def test_alpha_half_converts_loads_and_runs(tmp_path, monkeypatch, capsys):
    # no alpha 0.5 file is at hand here: Keras-layout files of its shapes, random tensors, prove the path
    keras_dir = tmp_path / "keras"
    keras_dir.mkdir()
    top = write_keras_file(keras_dir / "mobilenet_5_0_224_tf.h5", 0.5, head=True, seed=1)
    no_top = write_keras_file(keras_dir / "mobilenet_5_0_224_tf_no_top.h5", 0.5, head=False, seed=1)
    monkeypatch.setenv("DSCONV_WEIGHTS", str(tmp_path / "converted"))
    monkeypatch.setattr(weights, "keras_dirs", lambda: [keras_dir])
    weights.main(["convert", str(keras_dir / "mobilenet_5_0_224_tf_no_top.h5"), "--out",
                  str(tmp_path / "converted")])
    assert "alpha 0.5, trained at 224, head no" in capsys.readouterr().out
    x = np.random.default_rng(2).uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    net = weights.load(0.5, 96, quiet=True)
    assert (net.alpha, net.has_head, net.pooled_width) == (0.5, False, 512)
    pooled, _ = net.forward(x)
    want, _ = naive_forward(no_top, x)
    d = np.abs(pooled - want).max()
    print(f"\nalpha 0.5 from a Keras-layout file, no top: {d:.3g} from the naive forward")
    assert d <= 1e-4 * max(1.0, np.abs(want).max())
    net = weights.load(0.5, 96, head=True, quiet=True)  # not converted yet: converted on first use
    assert "mobilenet_5_0_224_tf.h5" in capsys.readouterr().err
    assert net.has_head and net.tensors_sha256() == weights.load(0.5, 96, quiet=True).tensors_sha256()
    pooled, logits = net.forward(x)
    want_pooled, want_logits = naive_forward(top, x)
    assert np.abs(pooled - want_pooled).max() <= 1e-4 * max(1.0, np.abs(want_pooled).max())
    assert np.abs(logits - want_logits).max() <= 1e-4 * max(1.0, np.abs(want_logits).max())
