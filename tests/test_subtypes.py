"""Bacterial or viral (dsconv.subtypes): labels from names, the three-class head, the decision, and the model
with subtypes through predict, calibrate, the heatmaps and the page."""
import csv
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest

import dsconv
from dsconv import calibrate, cam, classifier, data, images, serve, sgd, subtypes
from tests.conftest import copy_xrays, train_small
from tests.test_classifier import reference_sgd
from tests.test_serve import browser, choose, open_page  # noqa: F401 (browser: a fixture)

CLASSES = ["NORMAL", "BACTERIAL", "VIRAL"]


@pytest.mark.shared
def test_labels_from_file_names(tmp_path):
    for name, cls in (("person23_bacteria_87.jpeg", "BACTERIAL"), ("person1_virus_6.jpeg", "VIRAL")):
        assert subtypes.label_of(Path("x") / name) == cls
    root = copy_xrays(tmp_path / "d", 4, 50)
    ds = data.scan(root)
    split, group = subtypes.split(ds, ds.classes.index("PNEUMONIA"))
    assert split.classes == CLASSES and group == [1, 2] and split.paths == ds.paths
    for p, y in zip(split.paths, split.labels):
        assert CLASSES[y] == ("NORMAL" if "NORMAL" in p.parts else "BACTERIAL" if "_bacteria_" in p.name else "VIRAL")


@pytest.mark.shared
def test_a_name_with_neither_is_an_error_naming_it(tmp_path):
    root = copy_xrays(tmp_path / "d", 4, 50)
    odd = root / "PNEUMONIA" / "person9_pneumonia_1.jpeg"
    odd.write_bytes(next((root / "NORMAL").iterdir()).read_bytes())
    ds = data.scan(root)
    with pytest.raises(data.DataError, match=r"person9_pneumonia_1\.jpeg: .*neither '_bacteria_' nor '_virus_'"):
        subtypes.split(ds, 1)
    with pytest.raises(data.DataError, match="both"):
        subtypes.label_of("person9_bacteria_virus_1.jpeg")


def test_three_class_head_matches_the_reference_loop():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    x = (rng.standard_normal((300, 12)) + np.eye(3, 12)[y]).astype(np.float32)
    model, _ = sgd.train(x, y, CLASSES, lr=0.1, steps=300, batch=50, seed=5)
    rng = np.random.default_rng(5)
    w0 = sgd.truncated_normal(rng, (12, 3), sgd.INIT_STD)
    w, b = reference_sgd(x.astype(np.float64), y, w0, np.zeros(3), sgd.batches(y, 300, 50, "balanced", rng), 0.1)
    err = max(np.abs(model.weights - w).max(), np.abs(model.bias - b).max())
    print(f"\nlargest difference to the reference loop (3 classes): {err:.2e}")
    assert err < 1e-6 and np.abs(w - w0).max() > 0.1
    model.positive = [1, 2]  # P(pneumonia): the sum of its subtypes'
    p = model.probabilities(x)
    assert np.allclose(model.scores(x), p[:, 1] + p[:, 2], atol=1e-12)


def test_model_file_keeps_the_subtypes(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    x = rng.standard_normal((90, 6)) + np.eye(3, 6)[y]
    model, _ = sgd.train(x, y, CLASSES, steps=20)
    model.positive, model.info = [1, 2], {"subtypes": {"threshold": 0.6}}
    model.save(tmp_path / "m.h5")
    back = classifier.load(tmp_path / "m.h5")
    assert back.positive == [1, 2] and back.positives() == [1, 2] and back.info == model.info
    assert np.array_equal(back.scores(x), model.scores(x))


@pytest.mark.parametrize("p, want", [
    ((0.60, 0.30, 0.10), "NORMAL"),      # P(pneumonia) 0.40 < 0.5
    ((0.45, 0.10, 0.45), "VIRAL"),       # pneumonia 0.55; P(bacterial | pneumonia) 0.18 < 0.7
    ((0.45, 0.40, 0.15), "BACTERIAL"),   # pneumonia 0.55; 0.727 >= 0.7
    ((0.10, 0.55, 0.35), "VIRAL"),       # the argmax says BACTERIAL; 0.611 < 0.7 says viral
    ((0.50, 0.35, 0.15), "BACTERIAL"),   # exactly at both thresholds: positive, bacterial
])
def test_two_step_decision(p, want):
    assert subtypes.decide(np.array(p), CLASSES, [1, 2], 0.5, 0.7) == want


def test_subtype_threshold_balances_the_recalls():
    # 60 bacterial, 30 viral: the subtype score of a viral X-ray runs high, as the head sees twice as many bacterial
    is_bacterial = np.r_[np.ones(60, bool), np.zeros(30, bool)]
    scores = np.r_[np.linspace(0.65, 0.99, 60), np.linspace(0.45, 0.75, 30)]
    t, rule = subtypes.choose_threshold(is_bacterial, scores)
    recall_b, recall_v = np.mean(scores[:60] >= t), np.mean(scores[60:] < t)
    assert 0.6 < t <= 0.75 and recall_b + recall_v == max(
        np.mean(scores[:60] >= s) + np.mean(scores[60:] < s) for s in scores) and "Youden" in rule
    assert recall_v > 0.7 and np.mean(scores[60:] < 0.5) < 0.35  # at 0.5 most viral X-rays would be called bacterial
    assert subtypes.choose_threshold(np.ones(5, bool), np.ones(5))[0] == 0.5


@pytest.fixture(scope="module")
def subtyped(tmp_path_factory, weights_dir):
    """A small 0.25-128 model with subtypes (no TTA, no forms: the fast path)."""
    root = tmp_path_factory.mktemp("subtypes")
    data_dir = copy_xrays(root / "data", 16, 50)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSCONV_WEIGHTS", str(weights_dir))
        path = train_small(data_dir, root / "run", root / "cache", 200, "--tta", "none", "--forms", "0", "--subtypes")
    return {"root": root, "data": data_dir, "cache": root / "cache", "model": path}


@pytest.mark.slow
def test_training_records_the_subtypes(converted, subtyped):
    results = json.loads((subtyped["root"] / "run" / "results.json").read_text())
    s = results["summary"]["subtypes"]
    tested = results["repeats"][0]["sizes"]["test"]
    assert s["confusion"]["classes"] == CLASSES and np.sum(s["confusion"]["matrix"]) == tested
    assert set(s["bacterial_vs_viral"]["ci95"]) == {"accuracy", "sensitivity", "specificity", "auc"}
    model = dsconv.load_model(subtyped["model"], cache_dir=False)
    assert model.classes == CLASSES and model.positive == "PNEUMONIA" and model.head.positives() == [1, 2]
    assert model.subtypes["threshold"] == s["threshold"] and results["data"]["positive"] == "PNEUMONIA"


@pytest.mark.slow
def test_predict_columns(converted, subtyped, tmp_path, capsys):
    from dsconv import predict
    folder = subtyped["data"]
    with pytest.raises(SystemExit):
        predict.main([str(subtyped["model"]), str(folder), "--format", "csv", "--cache", str(subtyped["cache"])])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 32 and all(f"p_{c}" in rows[0] for c in CLASSES)
    model = dsconv.load_model(subtyped["model"], cache_dir=False)
    for r in rows:
        p = np.array([float(r[f"p_{c}"]) for c in CLASSES])
        assert abs(p.sum() - 1) < 1e-9 and abs(float(r["probability"]) - p[1] - p[2]) < 1e-9
        assert r["decision"] == subtypes.decide(p, CLASSES, [1, 2], model.threshold, model.subtypes["threshold"])
    assert {r["decision"] for r in rows} <= set(CLASSES) and len({r["decision"] for r in rows}) >= 2


@pytest.mark.slow
def test_the_heatmap_is_the_map_of_the_decided_class(converted, subtyped, monkeypatch):
    model = dsconv.load_model(subtyped["model"], cache_dir=False)
    drawn = []
    real = cam.overlay
    monkeypatch.setattr(cam, "overlay", lambda image, m, caption: drawn.append((m, caption)) or real(image, m, caption))
    W, b = model.linear()
    seen = set()
    for path in sorted(subtyped["data"].rglob("*.jpeg")):
        p, _, _ = model.diagnose(path)
        decided = model.decide(p)
        seen.add(decided)
        x = images.scale(images.decode(path, model.resolution, blur=model.blur))
        a = model.net.feature_maps(x[None])[0]
        want = cam.class_map(a, cam.contrast(W, b, CLASSES.index(decided))[0])
        m, caption = drawn[-1]
        assert np.abs(m - want).max() < 1e-6 and f"map of {decided}" in caption
        if len(seen) == 3:
            break
    assert len(seen) >= 2


@pytest.mark.slow
def test_calibrate_chooses_both_thresholds(converted, subtyped, tmp_path, capsys):
    calibrate.main([str(subtyped["model"]), "--val-dir", str(subtyped["data"]), "--out", str(tmp_path / "c.h5"),
                    "--cache", str(subtyped["cache"])])
    out = capsys.readouterr().out
    assert "subtypes there" in out
    model = dsconv.load_model(tmp_path / "c.h5", cache_dir=False)
    record = model.head.info["calibration"]["subtypes"]
    assert model.subtypes["threshold"] == record["threshold"] and "site's labelled" in model.subtypes["threshold_rule"]
    assert np.sum(record["confusion"]["matrix"]) == 32


@pytest.mark.slow
def test_consistency_report_of_a_model_with_subtypes(converted, subtyped, tmp_path, capsys):
    """Its pneumonia folder is split by file name, and its score is P(bacterial) + P(viral) of each file."""
    from dsconv import consistency, forms, metrics
    out = tmp_path / "report.json"
    consistency.main([str(subtyped["model"]), str(subtyped["data"]), "--forms", "JPEG 30", "--json", str(out),
                      "--cache", str(subtyped["cache"])])
    report = json.loads(out.read_text())
    model = dsconv.load_model(subtyped["model"], cache_dir=False)
    paths = sorted(subtyped["data"].rglob("*.jpeg"))
    y = np.array([p.parent.name == "PNEUMONIA" for p in paths])
    assert y.any() and (~y).any()
    for row, name in zip(report["forms"], ["as given", "JPEG 30"]):
        written = []
        for p in paths:
            q = tmp_path / name / p.name
            q.parent.mkdir(exist_ok=True)
            q.write_bytes(p.read_bytes() if name == "as given" else forms.REPORT[name](p.read_bytes()))
            written.append(q)
        p3 = model.predict_proba(written)
        want = metrics.evaluate(y, p3[:, 1] + p3[:, 2], model.threshold)
        assert row["form"] == name and row["accuracy"] == pytest.approx(want["accuracy"])
        assert row["auc"] == pytest.approx(want["auc"]) and row["sensitivity"] == pytest.approx(want["sensitivity"])


@pytest.mark.slow
def test_the_page_shows_the_subtype_under_the_badge(subtyped, weights_dir, browser, tmp_path_factory):  # noqa: F811
    from selenium.webdriver.common.by import By
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSCONV_WEIGHTS", str(weights_dir))
        mp.setenv("DSCONV_CACHE", str(tmp_path_factory.mktemp("serve-cache")))
        model = dsconv.load_model(subtyped["model"], cache_dir=False)
        server = serve.Server(model, subtyped["model"], "127.0.0.1", 0, 4)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            d = browser
            open_page(d, server.server_address[1])
            files = sorted((subtyped["data"] / "PNEUMONIA").glob("*.jpeg"))[:4] + \
                sorted((subtyped["data"] / "NORMAL").glob("*.jpeg"))[:2]
            results = {r.get_attribute("data-name"): r for r in choose(d, files)}
            for f in files:
                p = model.predict_proba([f])[0]
                decided, row = model.decide(p), results[f.name]
                if row.get_attribute("data-state") != "flagged":
                    assert not row.find_elements(By.CLASS_NAME, "subtype")
                    continue
                sub, q = model.subtype(p)
                line = row.find_element(By.CLASS_NAME, "subtype").text
                assert decided == sub and line.startswith(sub) and f"P({sub} | PNEUMONIA)" in line
                assert f"{q:.3f}" in line or q >= 0.9995 or q < 0.0005
                assert row.find_element(By.CLASS_NAME, "badge").text == "PNEUMONIA"
            assert any(r.get_attribute("data-state") == "flagged" for r in results.values())
        finally:
            server.shutdown()
            server.server_close()
