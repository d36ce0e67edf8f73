"""External validation and site adaptation: --val-dir, --site-dir, calibrate, TTA, ensembles, intervals."""
import json
import shutil

import numpy as np
import pytest

import dsconv
from dsconv import bottlenecks, calibrate, cam, data, forms, images, metrics, predict, repeats, sgd, train, weights
from tests.conftest import PLAIN, SHARED, copy_xrays

pytestmark = pytest.mark.slow  # each test hangs off a model trained for the module, or trains one

EXTERNAL = SHARED / "data" / "chest_xray" / "external"


def copy_external(root, per_class, offset):
    """per_class images of each class of the external folder, from ``offset``, copied to root/CLASS."""
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for src in sorted((EXTERNAL / cls).glob("*.jpeg"))[offset:offset + per_class]:
            shutil.copyfile(src, root / cls / src.name)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A small training folder and two disjoint small 'site' folders (labelled, class subfolders)."""
    root = tmp_path_factory.mktemp("external")
    return {"train": copy_xrays(root / "train", 16, 70), "val": copy_external(root / "val", 10, 0),
            "test": copy_external(root / "test", 10, 40), "root": root}


def run(*args):
    train.main([str(a) for a in args])


def common(folders, tmp_path, *extra):
    return ["--data", folders["train"], "--alpha", "0.25", "--resolution", "128", "--steps", "200",
            "--lr", "0.1", "--repeats", "1", "--standardize", "--cache", tmp_path / "cache", *PLAIN, *extra]


def test_val_dir_chooses_the_threshold_and_all_of_data_trains(converted, folders, tmp_path, capsys):
    run(*common(folders, tmp_path, "--val-dir", folders["val"], "--test-dir", folders["test"],
                "--site-weight", "0", "--out", tmp_path / "run"))
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    r = res["repeats"][0]
    assert r["sizes"] == {"train": 32, "val": 20, "test": 20}
    # the threshold is Youden's on the val-dir scores, recomputed here from the model file
    model = dsconv.load_model(tmp_path / "run" / "model.h5", cache_dir=tmp_path / "cache")
    val = data.scan(folders["val"])
    s = model.predict_proba(val.paths)[:, 1]
    assert model.threshold == metrics.youden_threshold(val.labels == 1, s)
    test = data.scan(folders["test"])
    s_test = model.predict_proba(test.paths)[:, 1]
    assert metrics.evaluate(test.labels == 1, s_test, model.threshold) == r["test_at_threshold"]
    assert res["summary"]["test"]["auc"]["mean"] == metrics.auc(test.labels == 1, s_test)
    assert res["summary"]["test_at_threshold"]["accuracy"]["mean"] == r["test_at_threshold"]["accuracy"]
    rep = r["test_report"]
    for k in ("accuracy", "sensitivity", "specificity", "auc"):
        lo, hi = rep["ci95_at_threshold"][k]
        assert lo <= r["test_at_threshold"][k] <= hi
    assert "[" in out and "intervals over patients" in out
    evaluation = model.head.info["evaluation"][str(folders["test"])]
    assert evaluation["accuracy"] == r["test_at_threshold"]["accuracy"]
    assert model.head.info["calibration"]["threshold_dir"] == str(folders["val"])
    pytest.importorskip("matplotlib", reason="the optional extra `plot`")
    assert (tmp_path / "run" / "roc-reliability.png").stat().st_size > 1000


@pytest.mark.parametrize("form_tta", [0, 2])
def test_val_dir_images_train_and_choices_use_out_of_fold_scores(converted, folders, tmp_path, capsys, form_tta):
    """With --form-tta K each validation image's out-of-fold score is the mean over it and its K test-time forms."""
    run(*common(folders, tmp_path, "--val-dir", folders["val"], "--test-dir", folders["test"],
                "--site-weight", "3", "--form-tta", str(form_tta), "--out", tmp_path / "run"))
    model = dsconv.load_model(tmp_path / "run" / "model.h5", cache_dir=tmp_path / "cache")
    net = weights.load(0.25, 128, quiet=True)
    val = data.scan(folders["val"])
    x = bottlenecks.extract(data.scan(folders["train"]).paths, net, "pooled", tmp_path / "cache", tta="flip",
                         progress=False)[0]
    y = data.scan(folders["train"]).labels
    xv = bottlenecks.extract(val.paths, net, "pooled", tmp_path / "cache", tta="flip", progress=False)[0]
    fold = repeats.folds(val.paths, val.labels, repeats.FOLDS, 0)
    patients = [data.patient_id(p) for p in val.paths]
    assert all(len({f for f, q in zip(fold, patients) if q == g}) == 1 for g in patients)
    assert set(fold) == set(range(repeats.FOLDS))

    def head(keep):
        m, _ = sgd.train(np.concatenate([x] + [xv[keep]] * 3), np.concatenate([y] + [val.labels[keep]] * 3),
                                ["NORMAL", "PNEUMONIA"], lr=0.1, steps=200, standardize=True, weight_decay=0.1,
                                seed=0)
        m.positive = 1
        m.adapt(xv)
        return m
    xv_forms = [bottlenecks.extract(val.paths, net, "pooled", tmp_path / "cache", tta="flip", form=f,
                                    progress=False)[0] for f in forms.test_forms(form_tta)]
    oof = np.zeros(len(fold))
    for k in range(repeats.FOLDS):
        fitted = head(fold != k)
        oof[fold == k] = np.mean([fitted.scores(a[fold == k]) for a in [xv, *xv_forms]], axis=0)
    kept = head(np.ones(len(fold), bool))
    assert np.array_equal(kept.weights, model.head.weights)
    assert model.threshold == metrics.youden_threshold(val.labels == 1, oof)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["repeats"][0]["validation"]["auc"] == metrics.auc(val.labels == 1, oof)
    assert "out-of-fold" in res["repeats"][0]["choice"]["validation_scores"]
    # bit for bit again from the cache
    run(*common(folders, tmp_path, "--val-dir", folders["val"], "--test-dir", folders["test"],
                "--site-weight", "3", "--form-tta", str(form_tta), "--out", tmp_path / "again"))
    assert (tmp_path / "again" / "model.h5").read_bytes() == (tmp_path / "run" / "model.h5").read_bytes()


def test_calibration_identity(converted, folders, tmp_path, capsys):
    # A model calibrated on a folder and evaluated on it reproduces the chosen threshold's sensitivity.
    run(*common(folders, tmp_path, "--out", tmp_path / "run", "--split", "70/15/15"))
    site = folders["test"]
    calibrate.main([str(tmp_path / "run" / "model.h5"), "--site-dir", str(site), "--val-dir", str(site),
                    "--target-sensitivity", "0.8", "--out", str(tmp_path / "site.h5"),
                    "--cache", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert "optimistic" in out
    model = dsconv.load_model(tmp_path / "site.h5", cache_dir=False)
    ds = data.scan(site)
    y, s = ds.labels == 1, model.predict_proba(ds.paths)[:, 1]
    sens = metrics.evaluate(y, s, model.threshold)["sensitivity"]
    assert sens >= 0.8 and not any(metrics.evaluate(y, s, t)["sensitivity"] >= 0.8 for t in s[s > model.threshold])
    cal = model.head.info["calibration"]
    assert cal["site_images"] == 20 and cal["threshold_images"] == 20 and cal["target_sensitivity"] == 0.8
    assert cal["on_threshold_dir"]["sensitivity"] == sens
    band = model.head.info["borderline"]  # the borderline band around the new threshold, on the site's images
    assert band["band"][0] <= model.threshold <= band["band"][1] and "site's labelled images" in band["rule"]
    assert "site_evaluation" not in model.head.info  # the training run's figures were at another threshold
    # the site's standardised bottlenecks have mean 0 and deviation 1: the site's own statistics
    x, _ = bottlenecks.extract(data.image_files(site), model.net, "pooled", False, progress=False, tta=model.tta)
    z = model.head.prepare(x)
    assert np.abs(z.mean(axis=0)).max() < 1e-9 and np.abs(z.std(axis=0)[x.std(axis=0) > 0] - 1).max() < 1e-9
    # predict's CLI applies the same adaptation and threshold
    with pytest.raises(SystemExit):
        predict.main([str(tmp_path / "site.h5"), str(site), "--format", "json", "--no-cache"])
    rows = {r["path"]: r for r in json.loads(capsys.readouterr().out)}
    assert [rows[str(p)]["probability"] for p in ds.paths] == pytest.approx(s.tolist(), abs=0)


def test_adaptation_of_an_unstandardised_head_maps_onto_the_training_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, (200, 5))
    y = (x[:, 0] > 3).astype(int)
    model, _ = sgd.train(x, y, ["a", "b"], steps=50, seed=0)
    site = rng.normal(-1, 0.5, (80, 5))
    model.adapt(site)
    z = model.prepare(site)
    assert np.allclose(z.mean(axis=0), x.mean(axis=0)) and np.allclose(z.std(axis=0), x.std(axis=0))
    W, b = model.affine()  # the preparation folded into the weights gives the same logits
    assert np.allclose(site @ W + b, model.prepare(site) @ model.weights + model.bias)


def test_calibrate_refuses_what_it_cannot_do(converted, folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        calibrate.main([str(tmp_path / "nothere.h5"), "--val-dir", str(folders["val"]),
                        "--out", str(tmp_path / "x.h5")])
    assert e.value.code == 2 and "nothere.h5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        calibrate.main([str(tmp_path / "m.h5"), "--out", str(tmp_path / "x.h5")])
    assert "--site-dir" in capsys.readouterr().err


def test_flip_tta_is_the_mean_of_image_and_mirror_and_cached_apart(converted, folders, tmp_path):
    net = weights.load(0.25, 128, quiet=True)
    paths = data.scan(folders["val"]).paths[:6]
    flip, failed = bottlenecks.extract(paths, net, "pooled", tmp_path, tta="flip", progress=False)
    x = np.stack([images.load(p, 128) for p in paths])
    mirror = np.stack([images.load(p, 128)[:, ::-1] for p in paths])
    want = (net.forward(x)[0].astype(np.float64) + net.forward(mirror)[0]) / 2
    assert not failed and np.abs(flip - want).max() < 1e-5
    plain, _ = bottlenecks.extract(paths, net, "pooled", tmp_path, progress=False)
    assert np.abs(plain - net.forward(x)[0]).max() < 1e-6 and np.abs(plain - flip).max() > 1e-3
    assert sorted(d.name.split("-")[3] for d in tmp_path.iterdir()) == ["pooled", "pooled"]
    assert any(d.name.split("-")[4] == "flip" for d in tmp_path.iterdir())


def test_ensemble_with_tta_is_consistent_between_train_predict_and_heatmaps(converted, folders, tmp_path):
    run(*common(folders, tmp_path, "--alpha", "0.25,0.75", "--tta", "flip", "--val-dir", folders["val"],
                "--test-dir", folders["test"], "--out", tmp_path / "run"))
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    model = dsconv.load_model(tmp_path / "run" / "model.h5", cache_dir=False)
    assert model.variant == "0.25+0.75-128 pooled flip" and res["network"]["features"] == 256 + 768
    test = data.scan(folders["test"])
    # probabilities from the two networks' bottlenecks computed here, concatenated
    x = np.stack([images.load(p, 128) for p in test.paths])
    parts = []
    for alpha in (0.25, 0.75):
        net = weights.load(alpha, 128, quiet=True)
        parts.append((net.forward(x)[0].astype(np.float64) + net.forward(x[:, :, ::-1])[0]) / 2)
    want = model.head.scores(np.concatenate(parts, axis=1))
    got = model.predict_proba(test.paths)[:, 1]
    assert np.abs(got - want).max() < 1e-5
    assert metrics.evaluate(test.labels == 1, got, model.threshold)["accuracy"] == pytest.approx(
        res["repeats"][0]["test_at_threshold"]["accuracy"])
    # pixels in, same probabilities
    assert np.abs(model.predict_proba(list(x))[:, 1] - got).max() < 1e-5
    # the map of the concatenation (sum of the parts' maps, each averaged with its mirror's) has
    # the logit contrast as its mean
    W, b = model.linear()
    z = model.head.prepare(np.concatenate(parts, axis=1)) @ model.head.weights + model.head.bias
    for n in range(2):
        for k in range(2):
            w, c = cam.contrast(W, b, k)
            assert abs(model.class_map(x[n], w).mean() + c - (z[n, k] - z[n].mean())) < 1e-4


def test_overlaps_are_reported(converted, folders, tmp_path, capsys):
    leaky = tmp_path / "leaky"
    shutil.copytree(folders["test"], leaky)
    for p in sorted((folders["train"] / "NORMAL").glob("*.jpeg"))[:3]:
        shutil.copyfile(p, leaky / "NORMAL" / ("copy-" + p.name))
    run(*common(folders, tmp_path, "--val-dir", folders["val"], "--test-dir", leaky, "--out", tmp_path / "run"))
    err = capsys.readouterr().err
    assert "3 image(s) of --test-dir" in err and "also in --data" in err


def test_bootstrap_resamples_whole_patients():
    # patient a: three right answers; patient b: one wrong. Resampling two patients gives accuracies
    # 1 (a, a), 3/4 (a, b) or 0 (b, b); resampling images would give others, such as 1/2.
    y = np.array([1, 1, 1, 1])
    s = np.array([0.9, 0.8, 0.7, 0.1])
    ci = metrics.bootstrap(y, s, 0.5, groups=["a", "a", "a", "b"], names=("accuracy",), n=400)
    assert set(ci["accuracy"]) <= {0.0, 0.75, 1.0}
    ci_images = metrics.bootstrap(y, s, 0.5, names=("accuracy",), n=400)
    assert ci_images["accuracy"][0] in (0.25, 0.5)  # not a value that whole patients give
    perfect = metrics.bootstrap([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 0.5)
    assert all(v == [1.0, 1.0] for v in perfect.values())


def test_specificity_at_sensitivity_and_reliability():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.7, 0.3, 0.65, 0.8, 0.9])
    # sensitivity 1.0 needs threshold 0.3: specificity 2/4; sensitivity 0.75 allows 0.65: 3/4
    assert metrics.specificity_at(y, s, 1.0) == 0.5 and metrics.specificity_at(y, s, 0.75) == 0.75
    rows = metrics.reliability(y, s, bins=2)
    # bins [0, 0.5): 0.1, 0.2, 0.3 (one positive); [0.5, 1]: 0.6, 0.65, 0.7, 0.8, 0.9 (three)
    assert rows == [(pytest.approx(0.2), pytest.approx(1 / 3), 3), (pytest.approx(0.73), pytest.approx(0.6), 5)]
