"""python -m dsconv.train end to end on a small folder, and its errors."""
import json
import shutil

import numpy as np
import pytest

from dsconv import bottlenecks, classifier, data, report, train, weights
from dsconv.mobilenet import MobileNet
from tests.conftest import CHEST, PLAIN, copy_xrays

pytestmark = pytest.mark.slow  # each test hangs off a model trained for the module, or trains one

BAD = ("empty.jpeg", "corrupt.jpeg", "notes.txt")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """20 images per class from the chest X-rays, plus three unreadable files."""
    root = copy_xrays(tmp_path_factory.mktemp("small"), 20, 60)
    (root / "NORMAL" / "empty.jpeg").write_bytes(b"")
    (root / "PNEUMONIA" / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "PNEUMONIA" / "notes.txt").write_text("to do")
    return root


def run(capsys, *args):
    train.main(list(args))
    return capsys.readouterr()


def common(small, tmp_path):
    return ["--data", str(small), "--alpha", "0.25", "--resolution", "128", "--split", "50/25/25",
            "--group-by", "image", "--repeats", "2", "--steps", "300", "--lr", "0.1", "--tta", "none",
            "--cache", str(tmp_path / "cache"), *PLAIN]


def test_end_to_end_and_exact_rerun(converted, small, tmp_path, capsys, monkeypatch):
    first = run(capsys, *common(small, tmp_path), "--out", str(tmp_path / "a"))
    assert "test accuracy" in first.out and "sensitivity" in first.out and "specificity" in first.out
    assert all(name in first.err for name in BAD)
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["data"]["skipped"] == 3 and res["data"]["images"] == {"NORMAL": 20, "PNEUMONIA": 20}
    assert [r["sizes"] for r in res["repeats"]] == [{"train": 20, "val": 10, "test": 10}] * 2
    assert res["summary"]["test"]["accuracy"]["mean"] >= 0.7
    assert res["network"]["weights_sha256"] == weights.sha256(converted / res["network"]["weights_file"])
    assert (tmp_path / "a" / "curves.csv").read_text().count("\n") == 1 + 2 * 30
    assert (tmp_path / "a" / "roc-reliability.png").stat().st_size > 1000  # of the in-folder test partition

    # the model file alone reproduces the test scores of its repeat
    model = classifier.load(tmp_path / "a" / "model.h5")
    seed = res["model_seed"]
    assert model.info["alpha"] == 0.25 and model.info["resolution"] == 128
    assert model.info["bottleneck"] == "pooled" and model.classes == ["NORMAL", "PNEUMONIA"]
    ds = data.scan(small)
    ds = ds.subset(np.array([p.name not in BAD for p in ds.paths]))
    net = weights.load(0.25, 128, quiet=True)
    x, _ = bottlenecks.extract(ds.paths, net, "pooled", tmp_path / "cache", progress=False)
    test = data.split(ds.labels, (50, 25, 25), seed) == 2
    from dsconv import metrics
    again = metrics.evaluate(ds.labels[test] == 1, model.scores(x[test]), model.threshold)
    assert again == res["repeats"][seed]["test_at_threshold"]

    # a second run computes no bottleneck and gives the same numbers
    def no_forward(self, images):
        raise AssertionError("a bottleneck was computed again")
    monkeypatch.setattr(MobileNet, "forward", no_forward)
    second = run(capsys, *common(small, tmp_path), "--out", str(tmp_path / "b"))
    assert second.out.split("wrote")[0] == first.out.split("wrote")[0]
    res2 = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res2["repeats"] == res["repeats"] and res2["summary"] == res["summary"]
    assert (tmp_path / "a" / "curves.csv").read_bytes() == (tmp_path / "b" / "curves.csv").read_bytes()


def test_test_dir_and_target_sensitivity(converted, small, tmp_path, capsys):
    run(capsys, *common(small, tmp_path), "--test-dir", str(small), "--target-sensitivity", "0.95",
        "--group-by", "patient", "--out", str(tmp_path / "t"))
    res = json.loads((tmp_path / "t" / "results.json").read_text())
    r = res["repeats"][0]
    assert r["sizes"]["test"] == 40 and r["sizes"]["train"] + r["sizes"]["val"] == 40
    assert r["validation"]["sensitivity"] is not None and "0.95" in r["threshold_rule"]


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"), ("single", "at least two"), ("empty", "class folder is empty"),
    ("unreadable", "no readable image"), ("positive", "--positive")])
def test_clear_errors(converted, tmp_path, capsys, case, message):
    root = tmp_path / "d"
    (root / "A").mkdir(parents=True)
    shutil.copyfile(next(CHEST.glob("NORMAL/*.jpeg")), root / "A" / "a.jpeg")
    if case in ("empty", "unreadable", "positive"):
        (root / "B").mkdir()
    if case == "unreadable":
        (root / "B" / "b.jpeg").write_bytes(b"garbage")
    if case == "positive":
        shutil.copyfile(next(CHEST.glob("PNEUMONIA/*.jpeg")), root / "B" / "b.jpeg")
    args = ["--data", str(root / "nope" if case == "missing" else root), "--alpha", "0.25",
            "--resolution", "128", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    if case == "positive":
        args += ["--positive", "C"]
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err


CURVES = {"step": [10, 20], "train_loss": [0.5, 0.4], "train_accuracy": [0.8, 0.9],
          "val_loss": [0.6, 0.5], "val_accuracy": [0.7, 0.8]}


def test_curves_without_matplotlib(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    out = report.curve_files([(0, CURVES)], "t")
    assert list(out) == ["curves.csv"]
    assert capsys.readouterr().err.startswith("note: matplotlib is not installed")
    assert out["curves.csv"].decode().splitlines()[1] == "0,10,0.5,0.8,0.6,0.7"


def test_curves_png():
    pytest.importorskip("matplotlib", reason="the optional extra `plot`")
    assert len(report.curve_files([(0, CURVES), (1, CURVES)], "t")["curves.png"]) > 1000


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--data", "--split", "--group-by", "--repeats", "--bottleneck", "--target-sensitivity"):
        assert flag in out
