"""The same X-ray, the same answer: forms of one X-ray, the form-invariant head, the contract, the report."""
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from dsconv import consistency, forms, images, sgd
from tests.conftest import CHEST, ORIGINALS, train_small


def jpeg_bytes(pixels, quality):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("quality", [20, 30, 50, 75, 90, 95])
def test_jpeg_quality_read_from_the_header(quality):
    pixels = np.random.default_rng(quality).integers(0, 256, (64, 48), dtype=np.uint8)
    assert abs(forms.describe(jpeg_bytes(pixels, quality))["quality"] - quality) <= 1


@pytest.mark.shared
def test_describe_kinds(tmp_path):
    copy = next((CHEST / "NORMAL").glob("*.jpeg"))
    original = next(ORIGINALS.rglob("*.jpeg"))
    d = forms.describe(copy)
    assert (d["width"], d["height"], d["format"], d["quality"]) == (224, 224, "JPEG", 75)
    assert forms.kind(d) == "224 copy" and forms.kind(forms.describe(original)) == "original"
    dcm = forms.dicom16(original.read_bytes())
    assert forms.kind(forms.describe(dcm)) == "DICOM"
    s = forms.summary([forms.describe(p) for p in (copy, original)])
    assert s["kinds"] == {"224 copy": 1, "original": 1} and s["jpeg_quality"][0] <= 75
    assert forms.describe(b"not an image") is None


@pytest.mark.shared
def test_png_and_dicom_forms_hold_the_same_pixels():
    """PNG and 16-bit DICOM are lossless: the network sees the pixels of the file as given, fully decoded
    (a large JPEG as given is decoded at a reduced scale first: tests/test_images.py bounds that)."""
    for source in sorted(ORIGINALS.rglob("*.jpeg"))[:3] + sorted((CHEST / "PNEUMONIA").glob("*.jpeg"))[:2]:
        data = source.read_bytes()
        want = images.resized(images.open_image(data), 224, blur=1.0)
        for form in (forms.png, forms.dicom16):
            assert np.array_equal(images.decode(form(data), 224, blur=1.0), want)


@pytest.mark.shared
def test_copy_form_is_how_the_training_copies_were_made():
    original = next(ORIGINALS.rglob("*.jpeg"))
    d = forms.describe(forms.copy224(original.read_bytes()))
    assert (d["width"], d["height"], d["mode"], d["quality"]) == (224, 224, "RGB", 75)


@pytest.mark.shared
def test_augment_is_seeded_by_content_and_draw():
    data = next((CHEST / "NORMAL").glob("*.jpeg")).read_bytes()
    key = "ab" * 32
    assert forms.augment(data, key, 1) == forms.augment(data, key, 1)
    assert forms.augment(data, key, 1) != forms.augment(data, key, 2)
    assert forms.augment(data, "cd" * 32, 1) != forms.augment(data, key, 1)
    im = Image.open(io.BytesIO(forms.augment(data, key, 1)))
    assert im.mode in ("L", "RGB") and min(im.size) >= 100


@pytest.mark.shared
def test_blur_is_pillows_gaussian_after_the_resize():
    source = next(ORIGINALS.rglob("*.jpeg"))
    from PIL import ImageFilter
    plain = Image.fromarray(images.decode(source, 128)[..., 0])
    want = np.asarray(plain.filter(ImageFilter.GaussianBlur(1.5)))
    got = images.decode(source, 128, blur=1.5)
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 0], got[..., 2])
    assert images.preprocessing(1.5) != images.preprocessing(0) == images.PREPROCESSING


def test_invariant_head_is_sgd_on_projected_features():
    """Invariance K: the same SGD run on z (I - U U^T), weights folded back; and the head ignores U."""
    rng = np.random.default_rng(3)
    n, d = 400, 12
    y = rng.integers(0, 2, n)
    x = rng.standard_normal((n, d)) + y[:, None] * np.linspace(0, 1, d)
    nuisance_dir = np.zeros(d)
    nuisance_dir[[2, 5]] = [3.0, -2.0]
    nuisance = rng.standard_normal((300, 1)) * nuisance_dir + 0.01 * rng.standard_normal((300, d))
    model, _ = sgd.train(x, y, [0, 1], steps=300, standardize=True, weight_decay=0.01, seed=1,
                                nuisance=nuisance, invariance=1)
    # reference: project by hand with NumPy, train without invariance, fold
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    dz = nuisance / x.std(axis=0)
    _, v = np.linalg.eigh(dz.T @ dz / len(dz))
    a = np.eye(d) - np.outer(v[:, -1], v[:, -1])
    ref, _ = sgd.train(z @ a, y, [0, 1], steps=300, standardize=False, weight_decay=0.01, seed=1)
    assert np.allclose(model.weights, a @ ref.weights, rtol=1e-10, atol=1e-12)
    u = v[:, -1]
    plain, _ = sgd.train(x, y, [0, 1], steps=300, standardize=True, weight_decay=0.01, seed=1)
    assert np.abs(u @ model.weights).max() < 1e-10 < 1e-3 < np.abs(u @ plain.weights).max()  # plain leans on u
    # moving an input along the direction removed changes no probability
    shifted = x + 5 * u * x.std(axis=0)
    assert np.allclose(model.probabilities(x), model.probabilities(shifted), atol=1e-9)


@pytest.fixture(scope="module")
def models(tmp_path_factory, weights_dir):
    """Two small models of the same images: trained on the copies alone, and with forms, blur and invariance."""
    import os
    os.environ["DSCONV_WEIGHTS"] = str(weights_dir)
    root = tmp_path_factory.mktemp("forms")
    data = root / "data"
    for cls in ("NORMAL", "PNEUMONIA"):
        (data / cls).mkdir(parents=True)
        names = sorted(p.name for p in (ORIGINALS / cls).glob("*.jpeg"))[:12]
        others = sorted(p.name for p in (CHEST / cls).glob("*.jpeg"))[::50][:28]
        for name in dict.fromkeys(names + others):
            shutil.copyfile(CHEST / cls / name, data / cls / name)
    plain = train_small(data, root / "plain", root / "cache", 300, "--forms", "0", "--blur", "0",
                        "--invariance", "0")
    robust = train_small(data, root / "robust", root / "cache", 300, "--forms", "2", "--blur", "1",
                         "--invariance", "8")
    yield {"plain": plain, "robust": robust, "cache": root / "cache", "root": root}
    os.environ.pop("DSCONV_WEIGHTS", None)


@pytest.mark.slow
def test_model_records_its_forms_and_the_plain_one_warns_on_originals(models, tmp_path):
    from dsconv.model import load_model
    plain, robust = (load_model(models[k], cache_dir=models["cache"]) for k in ("plain", "robust"))
    record = robust.head.info["forms"]
    assert record["seen"]["kinds"] == ["224 copy"] and record["seen"]["augmented"]
    assert record["draws"] == 2 and record["invariance"] == 8 and "gaussian-blur-1px" in record["input"]
    assert robust.head.info["evaluation"]["test partition of --data"]["form"].endswith("JPEG quality 75")
    original = next(ORIGINALS.rglob("*.jpeg"))
    copy = CHEST / original.parent.name / original.name
    assert "original of" in plain.form_warning(original) and plain.form_warning(copy) == ""
    assert robust.form_warning(original) == "" and robust.form_warning(copy) == ""
    dcm = tmp_path / "x.dcm"
    dcm.write_bytes(forms.dicom16(original.read_bytes()))
    assert "DICOM" in robust.form_warning(dcm)
    low = jpeg_bytes(np.asarray(Image.open(copy).convert("L")), 10)
    assert "JPEG quality 10" in robust.form_warning(low)
    # lossless forms of the file as given: the same probabilities, whatever the form
    for form in (forms.png, forms.dicom16):
        path = tmp_path / f"form.{'png' if form is forms.png else 'dcm'}"
        path.write_bytes(form(copy.read_bytes()))
        assert np.array_equal(robust.predict_proba([path]), robust.predict_proba([copy]))


@pytest.mark.slow
def test_predict_rows_carry_the_form_warning(models, tmp_path, capsys):
    from dsconv import predict
    original = next(ORIGINALS.rglob("*.jpeg"))
    with pytest.raises(SystemExit) as e:
        predict.main([str(models["plain"]), str(original), "--format", "json", "--cache", str(models["cache"])])
    assert e.value.code == 0
    out = capsys.readouterr()
    row, = json.loads(out.out)
    assert "original of" in row["form_warning"] and row["decision"] in ("NORMAL", "PNEUMONIA")
    assert "form the model was not trained or calibrated on" in out.err


@pytest.mark.slow
def test_consistency_report_against_files_written_in_each_form(models, tmp_path, capsys):
    """The report's figures equal those of files written in each form and scored one by one."""
    from dsconv import metrics
    from dsconv.model import load_model
    folder = tmp_path / "site"
    for cls in ("NORMAL", "PNEUMONIA"):
        (folder / cls).mkdir(parents=True)
        for p in sorted((ORIGINALS / cls).glob("*.jpeg"))[12:16]:
            shutil.copyfile(p, folder / cls / p.name)
    out = tmp_path / "report.json"
    consistency.main([str(models["robust"]), str(folder), "--forms", "JPEG 30,224 copy,16-bit DICOM",
                      "--json", str(out), "--cache", str(models["cache"])])
    printed = capsys.readouterr().out
    assert "JPEG 30" in printed and "as given" in printed
    report = json.loads(out.read_text())
    model = load_model(models["robust"], cache_dir=False)
    paths = sorted(folder.rglob("*.jpeg"))
    y = np.array([p.parent.name == "PNEUMONIA" for p in paths])
    given = model.predict_proba(paths)[:, model.head.positive]
    for name, row in zip(["as given", "JPEG 30", "224 copy", "16-bit DICOM"], report["forms"]):
        assert row["form"] == name
        written = []
        for p in paths:
            q = tmp_path / "written" / name / f"{p.stem}.img"
            q.parent.mkdir(parents=True, exist_ok=True)
            q.write_bytes(p.read_bytes() if name == "as given" else forms.REPORT[name](p.read_bytes()))
            written.append(q)
        s = model.predict_proba(written)[:, model.head.positive]
        want = metrics.evaluate(y, s, model.threshold)
        assert row["accuracy"] == pytest.approx(want["accuracy"]) and row["auc"] == pytest.approx(want["auc"])
        assert row["changed_images"] == int(np.sum((s >= model.threshold) != (given >= model.threshold)))
        low, high = report["borderline"]["low"], report["borderline"]["high"]
        assert row["reversed_images"] == sum((a > high and b < low) or (a < low and b > high) for a, b in zip(given, s))


def test_a_confident_call_reversed_is_one_beyond_the_borderline_band_on_each_side():
    """changed counts every decision unlike the form as given; reversed only those confident (outside the band, whose
    edges are borderline as predict says) on both sides."""
    given = [0.9, 0.9, 0.1, 0.55, 0.45, 0.6, 0.61, 0.2]
    other = [0.1, 0.52, 0.9, 0.45, 0.55, 0.39, 0.39, 0.3]
    rows = consistency.rows(np.array([1, 1, 0, 1, 0, 1, 1, 0], bool),
                            {"as given": np.array(given), "JPEG 50": np.array(other)}, 0.5, (0.4, 0.6))
    assert [(r["changed_images"], r["reversed_images"]) for r in rows] == [(0, 0), (6, 3)]
    assert rows[1]["reversed"] == pytest.approx(3 / 8) and rows[1]["accuracy"] == pytest.approx(2 / 8)


@pytest.mark.slow
def test_blur_is_applied_alike_to_files_arrays_and_heatmaps(models):
    """With the defaults' blur, a file, its pixels and diagnose's one pass give the same probabilities."""
    from dsconv.model import load_model
    model = load_model(models["robust"], cache_dir=False)
    assert model.blur == 1.0
    copies = sorted((CHEST / "PNEUMONIA").glob("*.jpeg"))[:2] + sorted((CHEST / "NORMAL").glob("*.jpeg"))[:1]
    from_files = model.predict_proba(copies)
    pixels = [np.asarray(Image.open(p).convert("RGB").resize((128, 128), Image.BILINEAR)) for p in copies]
    assert np.allclose(model.predict_proba(pixels), from_files, atol=1e-6)
    for path, want in zip(copies, from_files):
        assert np.allclose(model.diagnose(path)[0], want, atol=1e-5)
    unblurred = [images.scale(images.decode(p, 128)) for p in copies]  # a float array is taken as it is
    assert not np.allclose(model.predict_proba(unblurred), from_files, atol=1e-3)


def test_consistency_without_pydicom_asks_for_it_or_leaves_the_dicom_form_out(monkeypatch, tmp_path, capsys):
    from dsconv import dicom
    from tests.conftest import exit_of
    monkeypatch.setattr(dicom, "available", lambda: False)
    code = exit_of(lambda: consistency.main([str(tmp_path / "model.h5"), str(tmp_path), "--forms", "JPEG 50,16-bit DICOM"]))
    err = capsys.readouterr().err
    assert code == 2 and "needs pydicom" in err and dicom.INSTALL in err


@pytest.mark.slow
def test_consistency_default_forms_without_pydicom(models, monkeypatch, tmp_path, capsys):
    from dsconv import dicom
    monkeypatch.setattr(dicom, "available", lambda: False)
    folder = tmp_path / "site"
    for cls in ("NORMAL", "PNEUMONIA"):
        (folder / cls).mkdir(parents=True)
        for p in sorted((CHEST / cls).glob("*.jpeg"))[:2]:
            shutil.copyfile(p, folder / cls / p.name)
    out = tmp_path / "report.json"
    consistency.main([str(models["robust"]), str(folder), "--json", str(out), "--cache", str(models["cache"])])
    captured = capsys.readouterr()
    assert "note: the 16-bit DICOM form is left out" in captured.err
    got = [r["form"] for r in json.loads(out.read_text())["forms"]]
    assert got == ["as given"] + [n for n in forms.REPORT if n != "16-bit DICOM"]
