"""python -m dsconv.predict, the load_model API, heatmaps and DICOM input."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dsconv
from dsconv import cam, classifier, images, predict, weights
from dsconv.mobilenet import MobileNet
from tests import dicomfiles
from tests.conftest import CHEST, copy_xrays, train_small

pytestmark = pytest.mark.slow  # each test hangs off a model trained for the module, or trains one


@pytest.fixture(scope="module")
def trained(tmp_path_factory, weights_dir):
    """Two small models on 0.25-128: pooled + standardised, and logits."""
    root = tmp_path_factory.mktemp("predict")
    data = copy_xrays(root / "data", 16, 50)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSCONV_WEIGHTS", str(weights_dir))
        for name, extra in (("pooled", ["--standardize"]), ("logits", ["--bottleneck", "logits"])):
            train_small(data, root / name, root / "cache", 200, "--tta", "none", *extra)
    return {"root": root, "data": data, "cache": root / "cache",
            "pooled": root / "pooled" / "model.h5", "logits": root / "logits" / "model.h5"}


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        predict.main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def sample(n=3):
    return sorted((CHEST / "PNEUMONIA").glob("*.jpeg"))[1:1 + n] + sorted((CHEST / "NORMAL").glob("*.jpeg"))[1:1 + n]


def test_cli_rows_agree_with_the_classifier(converted, trained, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    paths = sample()
    for p in paths:
        shutil.copyfile(p, folder / "sub" / p.name)
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "README").write_text("not an image, not listed")
    code, out, err = run(capsys, trained["pooled"], folder, "--format", "json", "--no-cache")
    assert code == 1 and "1 of 7 images failed" in err
    rows = {r["path"].split("/")[-1]: r for r in json.loads(out)}
    assert set(rows) == {p.name for p in paths} | {"broken.jpeg"}
    assert rows["broken.jpeg"]["probability"] is None and "broken.jpeg" in rows["broken.jpeg"]["error"]
    head = classifier.load(trained["pooled"])
    net = weights.load(0.25, 128, quiet=True)
    x = np.stack([images.load(p, 128) for p in paths])
    want = head.scores(net.forward(x)[0])
    got = np.array([rows[p.name]["probability"] for p in paths])
    np.testing.assert_allclose(got, want, atol=1e-6)
    for p, w in zip(paths, want):
        assert rows[p.name]["decision"] == ("PNEUMONIA" if w >= head.threshold else "NORMAL")
        assert rows[p.name]["variant"] == "0.25-128 pooled"


def test_table_csv_and_threshold(converted, trained, tmp_path, capsys):
    paths = sample(2)
    code, out, _ = run(capsys, trained["pooled"], *paths, "--no-cache")
    assert code == 0 and "P(PNEUMONIA)" in out and out.count("0.25-128 pooled") == 4
    code, _, _ = run(capsys, trained["pooled"], *paths, "--format", "csv", "-o", tmp_path / "p.csv",
                     "--threshold", "0", "--no-cache")
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert code == 0 and lines[0].startswith("path,probability,decision,threshold,variant")
    assert all(",PNEUMONIA,0.0," in ln for ln in lines[1:])  # threshold 0: everything positive


def test_list_file(converted, trained, tmp_path, capsys):
    paths = sample(1)
    listing = tmp_path / "images.txt"
    listing.write_text("# two images\n" + "\n".join(str(p) for p in paths) + "\n\nmissing.jpeg\n")
    code, out, _ = run(capsys, trained["pooled"], listing, "--format", "json", "--no-cache")
    rows = json.loads(out)
    assert code == 1 and len(rows) == 3 and rows[2]["error"] and "missing.jpeg" in rows[2]["error"]


@pytest.mark.parametrize("content", [None, b"", b"garbage, not HDF5"])
def test_missing_or_damaged_model(converted, tmp_path, capsys, content):
    model = tmp_path / "model.h5"
    if content is not None:
        model.write_bytes(content)
    code, _, err = run(capsys, model, *sample(1))
    assert code == 2 and "model.h5" in err and "Traceback" not in err


def test_no_images(converted, trained, tmp_path, capsys):
    code, _, err = run(capsys, trained["pooled"], tmp_path)
    assert code == 2 and "no image files" in err


def test_reuses_the_training_cache(converted, trained, capsys, monkeypatch):
    known = sorted((trained["data"] / "NORMAL").glob("*.jpeg"))[:3]
    monkeypatch.setattr(MobileNet, "forward", lambda *a: pytest.fail("a forward pass ran"))
    code, out, _ = run(capsys, trained["pooled"], *known, "--cache", trained["cache"], "--format", "json")
    assert code == 0 and all(r["probability"] is not None for r in json.loads(out))


def test_api_paths_and_arrays_agree(converted, trained):
    model = dsconv.load_model(trained["logits"], cache_dir=False)
    paths = sample(2)
    by_path = model.predict_proba(paths)
    assert by_path.shape == (4, 2)
    np.testing.assert_allclose(by_path.sum(axis=1), 1, atol=1e-9)
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    scaled = [images.load(p, 128) for p in paths]
    np.testing.assert_allclose(model.predict_proba(pixels), by_path, atol=1e-6)
    np.testing.assert_allclose(model.predict_proba([paths[0], scaled[1], pixels[2], paths[3]]), by_path, atol=1e-6)
    labels = model.predict(paths)
    assert list(labels) == ["PNEUMONIA" if p >= model.threshold else "NORMAL" for p in by_path[:, 1]]
    with pytest.raises(images.ImageError, match="nothere.jpeg"):
        model.predict_proba(["nothere.jpeg"])


@pytest.mark.parametrize("kind", ["pooled", "logits"])
def test_cam_identity_through_the_model(converted, trained, kind):
    # The map's spatial mean plus the bias is the class logit, for both
    # bottlenecks (logits: the ImageNet head composed with the classifier)
    # and with feature standardisation folded in.
    model = dsconv.load_model(trained[kind], cache_dir=False)
    x = np.stack([images.load(p, 128) for p in sample(2)])
    A = model.net.feature_maps(x)
    pooled, logits = model.net.forward(x)
    bottleneck = pooled if kind == "pooled" else logits
    z = model.head.prepare(bottleneck) @ model.head.weights + model.head.bias
    W, b = model.linear()
    for n in range(len(x)):
        for k in range(2):
            assert abs(cam.class_map(A[n], W[:, k]).mean() + b[k] - z[n, k]) < 1e-4
            w, c = cam.contrast(W, b, k)
            assert abs(cam.class_map(A[n], w).mean() + c - (z[n, k] - z[n].mean())) < 1e-4


def test_heatmaps(converted, trained, tmp_path, capsys):
    src = sorted((CHEST / "PNEUMONIA").glob("*.jpeg"))[0]
    wide = tmp_path / "wide.png"
    Image.open(src).convert("L").resize((300, 180)).save(wide)
    code, out, _ = run(capsys, trained["pooled"], wide, src, "--heatmap", tmp_path / "maps",
                       "--format", "json", "--no-cache")
    rows = json.loads(out)
    assert code == 0 and len(list((tmp_path / "maps").glob("*.png"))) == 2
    png = Image.open(rows[0]["heatmap"])
    assert png.size == (300, 180) and png.mode == "RGB"  # the original's own size and aspect


@pytest.mark.parametrize("kind", ["pooled", "logits"])
def test_a_heatmap_costs_one_forward_pass_and_changes_no_probability(converted, trained, tmp_path, capsys,
                                                                      monkeypatch, kind):
    paths = sample(2)
    code, out, _ = run(capsys, trained[kind], *paths, "--format", "json", "--no-cache")
    plain = {r["path"]: r["probability"] for r in json.loads(out)}
    passes = []
    forward_maps = MobileNet.forward_maps
    monkeypatch.setattr(MobileNet, "forward_maps", lambda net, x: passes.append(len(x)) or forward_maps(net, x))
    monkeypatch.setattr(MobileNet, "forward", lambda *a: pytest.fail("a second forward pass ran"))
    monkeypatch.setattr(MobileNet, "feature_maps", lambda *a: pytest.fail("a second forward pass ran"))
    code, out, _ = run(capsys, trained[kind], *paths, "--heatmap", tmp_path / "maps", "--format", "json",
                       "--no-cache")
    rows = json.loads(out)
    assert code == 0 and passes == [1] * len(paths)
    assert all(Path(r["heatmap"]).is_file() for r in rows)
    # the same bottleneck bit for bit; the head's matrix product of one row may round its last bit apart
    assert {r["path"]: r["probability"] for r in rows} == pytest.approx(plain, abs=1e-12)
    monkeypatch.undo()
    model = dsconv.load_model(trained[kind], cache_dir=False)
    x = images.scale(images.decode(paths[0], model.resolution))
    one, _ = model._one_pass(x, np.ones(model.nets[0].pooled_width))
    np.testing.assert_array_equal(one, model.bottlenecks(paths[:1])[0][0])


def test_dicom_gives_the_png_probabilities(converted, trained, tmp_path):
    model = dsconv.load_model(trained["pooled"], cache_dir=False)
    srcs = sample(2)
    pngs, dicoms = [], []
    for i, src in enumerate(srcs):
        gray = np.asarray(Image.open(src).convert("L"))
        Image.fromarray(gray).save(tmp_path / f"{i}.png")
        pngs.append(tmp_path / f"{i}.png")
        folder = tmp_path / f"dcm{i}"
        folder.mkdir()
        dicoms.append(dicomfiles.variants(gray, folder))
    want = model.predict_proba(pngs)
    for kind in dicoms[0]:
        got = model.predict_proba([d[kind] for d in dicoms])
        assert np.abs(got - want).max() <= 1e-4, kind


def test_dicom_without_pydicom_is_one_failed_row(converted, trained, tmp_path, capsys, monkeypatch):
    gray = np.asarray(Image.open(sample(1)[0]).convert("L"))
    dcm = dicomfiles.write(tmp_path / "x.dcm", gray, window=(128, 256))
    monkeypatch.setitem(sys.modules, "pydicom", None)
    code, out, _ = run(capsys, trained["pooled"], dcm, *sample(1), "--format", "json", "--no-cache")
    rows = json.loads(out)
    assert code == 1 and 'pip install "dsconv[dicom]"' in rows[0]["error"]
    assert rows[1]["probability"] is not None
