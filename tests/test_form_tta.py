"""Test-time forms (--form-tta): every image scored as given and in K fixed forms, averaged, everywhere alike."""
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from dsconv import bottlenecks, consistency, forms, images, train
from tests.conftest import CHEST, ORIGINALS, PLAIN


def png_bytes(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.shared
def test_test_forms_are_fixed_and_the_same_for_every_container():
    copy = sorted((CHEST / "NORMAL").glob("*.jpeg"))[0].read_bytes()
    pixels = np.asarray(Image.open(io.BytesIO(copy)).convert("RGB"))
    assert pixels.shape == (224, 224, 3)
    # canonical: a 224 x 224 image keeps its pixels, whatever file it came in
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(forms.canonical(copy)))), pixels)
    for k in (1, 2):
        a, b = forms.test_form(copy, k), forms.test_form(png_bytes(pixels), k)
        assert a == b == forms.test_form(copy, k)  # no content seed: the same draw for every image
        # draw k of augment with the fixed seed, on the canonical image
        assert a == forms.augment(forms.canonical(copy), forms.TEST_SEED, k)
    # canonical is idempotent, on an original too: a form of the canonical bytes is the file's
    original = sorted((ORIGINALS / "PNEUMONIA").glob("*.jpeg"))[0].read_bytes()
    once = forms.canonical(original)
    assert forms.canonical(once) == once and forms.test_form(once, 3) == forms.test_form(original, 3)
    assert forms.test_form(copy, 1) != forms.test_form(copy, 2)
    jpeg30 = forms.REPORT["JPEG 30"]
    first = forms.Form("JPEG 30", "JPEG 30", lambda data, key: jpeg30(data))
    (f1, f2) = forms.test_forms(2, first)
    assert f1.apply(copy, None) == forms.test_form(jpeg30(copy), 1) and f2.name == "JPEG 30+tta2"
    assert [f.name for f in forms.test_forms(3)] == ["tta1", "tta2", "tta3"]


def test_form_tta_is_on_with_a_site_sample_only():
    base = ["--data", "d"]
    assert train.parse_args(base + ["--val-dir", "v"]).form_tta == train.FORM_TTA > 0
    assert train.parse_args(base).form_tta == 0  # the threshold then comes from a partition without forms
    assert train.parse_args(base + ["--val-dir", "v", "--paper"]).form_tta == 0
    assert train.parse_args(base + ["--val-dir", "v", "--form-tta", "3"]).form_tta == 3


@pytest.fixture(scope="module")
def model_tta(tmp_path_factory, weights_dir):
    """A small 0.25-128 model with a site sample of originals and 2 test-time forms, its test folder of copies."""
    import os
    os.environ["DSCONV_WEIGHTS"] = str(weights_dir)
    root = tmp_path_factory.mktemp("tta")
    for folder, source, names in (("data", CHEST, slice(0, None, 60)), ("site", ORIGINALS, slice(0, 10)),
                                  ("test", CHEST, slice(7, None, 90))):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / folder / cls).mkdir(parents=True)
            for p in sorted((source / cls).glob("*.jpeg"))[names][:20]:
                shutil.copyfile(p, root / folder / cls / p.name)
    train.main(["--data", str(root / "data"), "--val-dir", str(root / "site"), "--test-dir", str(root / "test"),
                "--alpha", "0.25", "--resolution", "128", "--repeats", "1", "--steps", "200", "--lr", "0.1",
                "--cache", str(root / "cache"), "--out", str(root / "run"), *PLAIN, "--blur", "1",
                "--form-tta", "2"])
    yield root
    os.environ.pop("DSCONV_WEIGHTS", None)


def by_hand(model, data):
    """The probabilities of one image file (bytes), computed here: the image and its 2 test-time forms, averaged."""
    rows = []
    for b in [data] + [forms.test_form(data, k) for k in (1, 2)]:
        x = images.scale(images.decode(b, 128, blur=1.0))[None]
        pooled, _ = bottlenecks.forward(model.net, x, model.tta)
        rows.append(model.head.probabilities(pooled)[0])
    return np.mean(rows, axis=0)


@pytest.mark.slow
def test_every_way_in_scores_as_given_and_in_the_test_forms(model_tta):
    from dsconv.model import load_model
    model = load_model(model_tta / "run" / "model.h5", cache_dir=model_tta / "cache")
    assert model.form_tta == 2 and model.head.info["form_tta_description"] == forms.TEST_FORMS
    assert "2 test-time forms" in model.head.info["forms"]["input"]
    paths = sorted((model_tta / "test").rglob("*.jpeg"))[:3] + [sorted((model_tta / "site").rglob("*.jpeg"))[0]]
    want = np.stack([by_hand(model, p.read_bytes()) for p in paths])
    assert np.allclose(model.predict_proba(paths), want, atol=1e-5)
    for p, w in zip(paths, want):
        assert np.allclose(model.diagnose(p)[0], w, atol=1e-5)
    pixels = np.asarray(Image.open(paths[0]).convert("RGB"))  # a 224 copy: its pixels have the file's forms
    assert np.allclose(model.predict_proba([pixels]), want[:1], atol=1e-5)
    plain = load_model(model_tta / "run" / "model.h5", cache_dir=False)
    plain.form_tta = 0
    assert not np.allclose(plain.predict_proba(paths), want, atol=1e-3)  # the forms do move the probabilities


@pytest.mark.slow
def test_training_figures_and_reports_score_as_the_model_does(model_tta, capsys):
    """results.json's test figures, the consistency report and predict are those of the model's own averaging."""
    from dsconv import metrics, predict
    from dsconv.model import load_model
    model = load_model(model_tta / "run" / "model.h5", cache_dir=False)
    paths = sorted((model_tta / "test").rglob("*.jpeg"))
    y = np.array([p.parent.name == "PNEUMONIA" for p in paths])
    s = np.array([by_hand(model, p.read_bytes())[model.head.positive] for p in paths])
    results = json.loads((model_tta / "run" / "results.json").read_text())
    got = results["repeats"][0]["test_at_threshold"]
    want = metrics.evaluate(y, s, model.threshold)
    assert got["auc"] == pytest.approx(want["auc"]) and got["accuracy"] == pytest.approx(want["accuracy"])
    report = consistency.score(model, _dataset(model_tta / "test"), [], progress=False)
    assert np.allclose(report["as given"], s, atol=1e-5)
    with pytest.raises(SystemExit):
        predict.main([str(model_tta / "run" / "model.h5"), str(paths[0]), "--format", "json", "--no-cache"])
    row, = json.loads(capsys.readouterr().out)
    assert row["probability"] == pytest.approx(s[0], abs=1e-5)


def _dataset(root):
    from dsconv import data
    return data.scan(root)
