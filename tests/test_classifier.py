"""The SGD head against a dozen-line NumPy loop, determinism, sampling, the model file."""
import h5py
import numpy as np
import pytest

from dsconv import DsconvError, classifier, kernels, sgd


def reference_sgd(x, y, w, b, idx, lr):
    """Plain mini-batch gradient descent on mean softmax cross-entropy, written out."""
    w, b = w.copy(), b.copy()
    for rows in idx:
        xb, yb = x[rows], y[rows]
        z = xb @ w + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(rows)), yb] -= 1          # dL/dz * B
        w -= lr * xb.T @ p / len(rows)
        b -= lr * p.sum(axis=0) / len(rows)
    return w, b


def toy(n=300, d=20, seed=1):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.75).astype(np.int64)
    x = (rng.standard_normal((n, d)) + 0.5 * y[:, None]).astype(np.float32)
    return x, y


@pytest.mark.parametrize("sampling", sgd.SAMPLINGS)
def test_sgd_matches_reference(sampling):
    x, y = toy()
    model, _ = sgd.train(x, y, ["n", "p"], lr=0.1, steps=300, batch=50, sampling=sampling, seed=7)
    rng = np.random.default_rng(7)
    w0 = sgd.truncated_normal(rng, (20, 2), sgd.INIT_STD)
    idx = sgd.batches(y, 300, 50, sampling, rng)
    w, b = reference_sgd(x.astype(np.float64), y, w0, np.zeros(2), idx, 0.1)
    err = max(np.abs(model.weights - w).max(), np.abs(model.bias - b).max())
    print(f"\nlargest difference to the reference loop ({sampling}): {err:.2e}")
    assert err < 1e-6
    assert np.abs(w - w0).max() > 0.1  # it did learn


@pytest.mark.slow
def test_standardize_is_sgd_on_standardized_features():
    x, y = toy()
    model, _ = sgd.train(x, y, ["n", "p"], steps=100, standardize=True, seed=3)
    z = (x - x.mean(0, dtype=np.float64)) / x.std(0, dtype=np.float64)
    rng = np.random.default_rng(3)
    w0 = sgd.truncated_normal(rng, (20, 2), sgd.INIT_STD)
    w, b = reference_sgd(z, y, w0, np.zeros(2), sgd.batches(y, 100, 100, "balanced", rng), 0.01)
    assert np.abs(model.weights - w).max() < 1e-6
    assert np.allclose(model.probabilities(x), kernels.softmax(z @ w + b), atol=1e-6)


def test_bitwise_deterministic_and_seeded():
    x, y = toy()
    runs = [sgd.train(x, y, ["n", "p"], x[:50], y[:50], steps=200, seed=s) for s in (0, 0, 1)]
    assert np.array_equal(runs[0][0].weights, runs[1][0].weights)
    assert runs[0][1] == runs[1][1]
    assert not np.array_equal(runs[0][0].weights, runs[2][0].weights)


def test_init_and_sampling():
    rng = np.random.default_rng(0)
    w = sgd.truncated_normal(rng, (1000, 100), 0.001)
    assert np.abs(w).max() <= 0.002 and 0.00085 < w.std() < 0.0009  # std of N(0,1) cut at 2: 0.880
    y = np.array([0] * 100 + [1] * 900)
    idx = sgd.batches(y, 200, 100, "balanced", rng)
    assert abs(np.mean(y[idx]) - 0.5) < 0.01
    assert abs(np.mean(y[sgd.batches(y, 200, 100, "natural", rng)]) - 0.9) < 0.01
    assert len(np.unique(idx[y[idx] == 0])) == 100  # every image of the small class is drawn


def test_curves():
    x, y = toy()
    _, c = sgd.train(x, y, ["n", "p"], x[:60], y[:60], steps=95, eval_every=10)
    assert c["step"] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]
    assert all(len(v) == 10 for v in c.values())
    assert c["val_accuracy"][-1] > 0.7 and c["val_loss"][-1] < c["val_loss"][0]


def test_single_class_refused():
    x, y = toy()
    with pytest.raises(DsconvError, match="single class"):
        sgd.train(x, np.zeros_like(y), ["n", "p"], steps=10)


def test_model_file_round_trip(tmp_path):
    x, y = toy()
    model, _ = sgd.train(x, y, ["NORMAL", "PNEUMONIA"], steps=50, standardize=True)
    model.positive, model.threshold, model.info = 1, 0.37, {"alpha": 0.25, "bottleneck": "pooled"}
    model.save(tmp_path / "m.h5")
    back = classifier.load(tmp_path / "m.h5")
    assert back.classes == ["NORMAL", "PNEUMONIA"] and back.threshold == 0.37 and back.info == model.info
    assert np.array_equal(back.scores(x), model.scores(x))
    assert np.array_equal(back.predict(x), (model.scores(x) >= 0.37).astype(int))


def test_model_file_errors(tmp_path):
    with pytest.raises(classifier.ModelError, match="no such model file"):
        classifier.load(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(classifier.ModelError, match="junk.h5"):
        classifier.load(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(classifier.ModelError, match="not a dsconv classifier"):
        classifier.load(tmp_path / "other.h5")
