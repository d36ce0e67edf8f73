"""Keras -> dsconv conversion, finding and loading weights, and their errors."""
import h5py
import numpy as np
import pytest

from dsconv import weights
from tests.conftest import KERAS, SHARED

BROKEN = SHARED / "weights" / "broken" / "mobilenet_1_0_224_tf_no_top_missing_conv_pw_13.h5"


@pytest.mark.parametrize("name,alpha,head", [
    ("mobilenet_2_5_224_tf.h5", 0.25, True),          # Keras 2.1.4 layout
    ("mobilenet_2_5_224_tf_no_top.h5", 0.25, False),  # Keras 2.0.4 layout
    ("mobilenet_7_5_224_tf.h5", 0.75, True),
    ("mobilenet_7_5_224_tf_no_top.h5", 0.75, False),
])
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


def test_broken_file_names_the_layer(tmp_path):
    with pytest.raises(weights.WeightsError, match="conv_pw_13"):
        weights.convert(BROKEN, tmp_path)
    assert not list(tmp_path.iterdir()), "nothing is written for a refused file"


def test_broken_file_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        weights.main(["convert", str(BROKEN), "--out", str(tmp_path)])
    assert "conv_pw_13" in str(e.value)


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
