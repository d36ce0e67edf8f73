"""The X-ray check: its distance, its pixel checks, the model file, predict's rows and the API."""
import csv
import http.client
import json
import shutil
import threading

import h5py

import numpy as np
import pytest
from PIL import Image

import dsconv
from dsconv import classifier, predict, serve, xraycheck
from tests.conftest import CHEST, SAMPLES, copy_xrays, train_small
from tests.test_serve import multipart

pytestmark = pytest.mark.slow  # each test hangs off a model trained for the module, or trains one


@pytest.fixture(scope="module")
def trained(tmp_path_factory, weights_dir):
    """A small 0.25-128 model, and a folder of inputs: noise, a photo, a 1 x 1 image, two X-rays it did not train on."""
    root = tmp_path_factory.mktemp("xraycheck")
    data = copy_xrays(root / "data", 20, 40)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSCONV_WEIGHTS", str(weights_dir))
        model = train_small(data, root / "run", root / "cache", 100, "--tta", "none")
    inputs = root / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8)).save(inputs / "noise.png")
    shutil.copyfile(SAMPLES / "elephant.jpg", inputs / "elephant.jpg")
    Image.new("L", (1, 1), 90).save(inputs / "dot.png")
    trained_on = {p.name for p in data.rglob("*.jpeg")}
    for cls in ("NORMAL", "PNEUMONIA"):
        unseen = next(p for p in sorted((CHEST / cls).glob("*.jpeg"))[7::40] if p.name not in trained_on)
        shutil.copyfile(unseen, inputs / f"xray-{cls}.jpeg")
    return {"model": model, "inputs": inputs, "root": root}


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        predict.main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def by_name(rows):
    return {r["path"].rsplit("/", 1)[-1]: r for r in rows}


def test_distance_is_the_probabilistic_pca_mahalanobis_distance():
    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, 1.0, (400, 12)) @ rng.random((12, 12))
    check = xraycheck.fit(x, np.arange(400) // 2, components=5)
    f = xraycheck.features(x)
    mean = f.mean(axis=0)
    lam, vec = np.linalg.eigh(np.cov(f - mean, rowvar=False))
    lam, vec = lam[::-1], vec[:, ::-1]
    cov = vec[:, :5] @ np.diag(lam[:5]) @ vec[:, :5].T + lam[5:].mean() * (np.eye(12) - vec[:, :5] @ vec[:, :5].T)
    z = xraycheck.features(x[:20]) - mean
    want = np.sqrt(np.einsum("nd,de,ne->n", z, np.linalg.inv(cov), z))
    np.testing.assert_allclose(check.distances(x[:20]), want, rtol=1e-8)
    assert check.info["components"] == 5 and check.info["images"] == 400
    assert np.quantile(check.distances(x), 0.99) <= check.threshold < check.distances(x * 25).min()
    assert xraycheck.fit(x[:19], np.arange(19)) is None and xraycheck.fit(x[:40], np.zeros(40)) is None


@pytest.mark.shared
def test_pixel_checks():
    rng = np.random.default_rng(2)
    grey = Image.fromarray(rng.integers(0, 256, (100, 80), dtype=np.uint8))
    assert xraycheck.pixel_warnings(grey) == []
    assert xraycheck.pixel_warnings(grey.convert("RGB")) == []  # grey in three channels is still grey
    assert "63 x 80 pixels" in xraycheck.pixel_warnings(grey.crop((0, 0, 63, 80)))[0]
    tinted = np.asarray(grey.convert("RGB")).copy()
    tinted[:20, :, 0] = 255
    assert "colour" in xraycheck.pixel_warnings(Image.fromarray(tinted))[0]
    assert "blank" in xraycheck.pixel_warnings(Image.new("L", (200, 200), 30))[0]
    xray = Image.open(sorted((CHEST / "NORMAL").glob("*.jpeg"))[0])
    assert xraycheck.pixel_warnings(xray) == []
    assert xraycheck.join("a", "", ["b", "c"]) == "a; b; c" and xraycheck.join("", []) == ""


def test_predict_warns_instead_of_deciding(converted, trained, capsys, tmp_path):
    code, out, err = run(capsys, trained["model"], trained["inputs"], "--format", "json", "--no-cache")
    rows = by_name(json.loads(out))
    assert code == 0 and "failed" not in err  # a warning is not a failure
    assert "3 of 5 images got a warning instead of a decision" in err
    for name in ("noise.png", "elephant.jpg", "dot.png"):
        r = rows[name]
        assert r["warning"].startswith(xraycheck.NOT_XRAY) and r["decision"] is None
        assert 0 <= r["probability"] <= 1 and r["error"] is None
    assert "pixels" in rows["dot.png"]["warning"] and "times as far" in rows["noise.png"]["warning"]
    for cls in ("NORMAL", "PNEUMONIA"):
        r = rows[f"xray-{cls}.jpeg"]
        assert r["warning"] == "" and r["decision"] in ("NORMAL", "PNEUMONIA")
    code, _, _ = run(capsys, trained["model"], trained["inputs"], "--format", "csv", "-o", tmp_path / "p.csv",
                     "--no-cache")
    table = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader((tmp_path / "p.csv").open())}
    assert code == 0 and table["noise.png"]["warning"] == rows["noise.png"]["warning"]
    assert table["noise.png"]["decision"] == "" and table["xray-NORMAL.jpeg"]["warning"] == ""
    code, out, _ = run(capsys, trained["model"], trained["inputs"], "--no-cache")
    assert code == 0 and "warning: " + rows["elephant.jpg"]["warning"] in out
    # the heatmap path (one pass per image) gives the same warnings
    code, out, _ = run(capsys, trained["model"], trained["inputs"], "--format", "json", "--heatmap",
                       tmp_path / "heat")
    assert code == 0 and {n: r["warning"] for n, r in by_name(json.loads(out)).items()} == \
        {n: r["warning"] for n, r in rows.items()}


def test_the_api_gives_the_same_warnings(converted, trained, capsys):
    model = dsconv.load_model(trained["model"], cache_dir=False)
    server = serve.Server(model, trained["model"], "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        files = [(p.name, p.read_bytes()) for p in sorted(trained["inputs"].iterdir())]
        body, ctype = multipart(files)
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
        conn.request("POST", "/api/predict", body=body, headers={"Content-Type": ctype})
        response = conn.getresponse()
        results = {r["name"]: r for r in json.loads(response.read())["results"]}
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
    assert response.status == 200
    _, out, _ = run(capsys, trained["model"], trained["inputs"], "--format", "json", "--no-cache")
    for name, row in by_name(json.loads(out)).items():
        r = results[name]
        assert r["warning"] == row["warning"] and r["label"] == row["decision"]
        assert r["probability"] == row["probability"]
    assert results["noise.png"]["warning"] and results["xray-NORMAL.jpeg"]["warning"] == ""


def test_the_check_round_trips_through_the_model_file(converted, trained, tmp_path):
    head = classifier.load(trained["model"])
    check = xraycheck.from_head(head)
    assert check.threshold == head.info["xray_check"]["threshold"] > 0
    assert check.components.shape == (256, check.info["components"]) and check.info["images"] == 40
    head.save(tmp_path / "again.h5")
    again = xraycheck.from_head(classifier.load(tmp_path / "again.h5"))
    assert again.threshold == check.threshold and np.array_equal(again.components, check.components)
    shutil.copyfile(trained["model"], tmp_path / "altered.h5")
    with h5py.File(tmp_path / "altered.h5", "r+") as f:  # the threshold changed after training
        info = json.loads(f.attrs["info"])
        info["xray_check"]["threshold"] *= 2
        f.attrs["info"] = json.dumps(info, sort_keys=True)
    with pytest.raises(classifier.ModelError, match="checksum"):
        classifier.load(tmp_path / "altered.h5")


def test_an_older_model_file_still_predicts(converted, trained, tmp_path, capsys):
    head = classifier.load(trained["model"])
    head.xray_mean = head.xray_components = head.xray_variances = None
    del head.info["xray_check"]
    head.save(tmp_path / "old.h5")
    code, out, err = run(capsys, tmp_path / "old.h5", trained["inputs"], "--format", "json", "--no-cache")
    rows = by_name(json.loads(out))
    assert code == 0 and "predates the X-ray check" in err
    assert rows["noise.png"]["warning"] == "" and rows["noise.png"]["decision"] in ("NORMAL", "PNEUMONIA")
    assert "pixels" in rows["dot.png"]["warning"] and rows["dot.png"]["decision"] is None  # pixel checks still run
    assert dsconv.load_model(tmp_path / "old.h5").xray_check is None


def test_calibrate_keeps_the_check_and_widens_it_to_the_site(converted, trained, tmp_path, capsys):
    from dsconv import calibrate
    site = tmp_path / "site"
    site.mkdir()
    for p in sorted((CHEST / "NORMAL").glob("*.jpeg"))[3::60][:16]:
        shutil.copyfile(p, site / p.name)
    before = xraycheck.from_head(classifier.load(trained["model"]))
    calibrate.main([str(trained["model"]), "--site-dir", str(site), "--out", str(tmp_path / "site.h5"),
                    "--cache", str(trained["root"] / "cache")])
    assert "X-ray check:" in capsys.readouterr().out
    after = xraycheck.from_head(classifier.load(tmp_path / "site.h5"))
    adapted = dsconv.load_model(tmp_path / "site.h5", cache_dir=False)
    far = after.distances(adapted.bottlenecks(sorted(site.iterdir()))[0])
    assert np.array_equal(after.components, before.components)
    assert after.threshold == max(before.threshold, far.max())
    assert after.info["widened_to_site"]["site_images_beyond"] == int((far > before.threshold).sum())
