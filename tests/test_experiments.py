"""python -m dsconv.experiments: the quick grid end to end, resume, snapshots, selection, tables."""
import csv
import json
import math
import re

import numpy as np
import pytest

from dsconv import DsconvError, bottlenecks, data, experiments, reproduction, runlog, sgd, weights
from tests.conftest import copy_xrays, exit_of

pytestmark = pytest.mark.slow  # each test hangs off a model trained for the module, or trains one


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """24 chest X-rays per class, several images of some patients."""
    return copy_xrays(tmp_path_factory.mktemp("xrays"), 24, 25)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_time(rows):
    return sorted(tuple((k, v) for k, v in r.items() if k != "train_s") for r in rows)


def grid_args(small, tmp_path, out):
    return ["--data", str(small), "--out", str(tmp_path / out), "--quick", "--cache", str(tmp_path / "cache")]


@pytest.fixture
def quarter(weights_dir, tmp_path, monkeypatch):
    """Only alpha 0.25 converted and no Keras files to convert: the tables must not depend on ../shared."""
    d = tmp_path / "weights-0.25"
    d.mkdir()
    for f in weights_dir.glob("mobilenet_0.25_*.h5"):
        (d / f.name).symlink_to(f)
    monkeypatch.setenv("DSCONV_WEIGHTS", str(d))
    monkeypatch.setattr(weights, "keras_dirs", lambda: [])
    return d


def test_available_variants_follow_the_weights(converted, quarter):
    assert experiments.available_variants() == tuple((0.25, r) for r in (224, 192, 160, 128))


def test_available_variants_every_converted_alpha(converted):
    alphas = {weights.describe(f)["alpha"] for f in converted.glob("*.h5") if weights.describe(f)["has_head"]}
    assert {a for a, _ in experiments.available_variants()} == alphas


def test_quick_grid_end_to_end_and_resume(quarter, small, tmp_path, monkeypatch, capsys):
    experiments.main(grid_args(small, tmp_path, "a"))
    out = tmp_path / "a"
    for f in ("runs.csv", "table1.md", "table3.md", "table4.md", "figure4.png", "tradeoff.png", "summary.md"):
        assert (out / f).stat().st_size > 0, f
    q = experiments.QUICK
    trainings = len(q.schemes) * q.shuffles * len(q.lrs) * len(q.group_bys) * len(q.bottlenecks)
    rows = read_csv(out / "runs.csv")
    assert len(rows) == trainings * len(q.steps) == 32
    assert {r["alpha"] + "-" + r["resolution"] for r in rows} == {"0.25-128"}
    assert {r["trained_resolution"] for r in rows} == {"224"}
    table4 = (out / "table4.md").read_text()
    assert "| 0.25-128 † |" in table4
    for v, keras in (("1.0-224", "1_0"), ("0.50-160", "5_0"), ("0.75-128", "7_5")):
        assert (f"| {v} (no weights: `python -m dsconv.weights convert PATH/mobilenet_{keras}_224_tf.h5`) "
                "| no weights (") in table4
    assert "| 0.25-224 | not in this grid (96.5 ± 0.21) |" in table4
    summary = (out / "summary.md").read_text()
    assert "validation" in summary and "the test partition played no part" in summary

    # a run row is what a separate training of that many steps gives
    r = next(r for r in rows if r["bottleneck"] == "pooled" and r["group_by"] == "patient"
             and r["seed"] == "1" and r["lr"] == "0.1" and r["steps"] == str(min(q.steps)))
    ds = data.scan(small)
    net = weights.load(0.25, 128, head=True, quiet=True)
    x, _ = bottlenecks.extract(ds.paths, net, "pooled", tmp_path / "cache", progress=False)
    part = data.split(ds.labels, (80, 10, 10), 1, [data.patient_id(p) for p in ds.paths])
    model, _ = sgd.train(x[part == 0], ds.labels[part == 0], ds.classes, lr=0.1, steps=min(q.steps), seed=1)
    _, test = experiments.evaluate(model, x[part == 2], ds.labels[part == 2], 1)
    _, val = experiments.evaluate(model, x[part == 1], ds.labels[part == 1], 1)
    assert runlog.fmt("", test["accuracy"]) == r["test_accuracy"]
    assert runlog.fmt("", val["accuracy"]) == r["val_accuracy"]

    # interrupted after 5 trainings, killed in the middle of writing a row, then resumed
    train = sgd.train
    grid_calls, finished = [], []

    def interrupted(*a, **k):
        if k.get("snapshots"):
            if len(grid_calls) == 5:
                raise KeyboardInterrupt
            grid_calls.append(1)
        out = train(*a, **k)
        if k.get("snapshots"):
            finished.append(1)
        return out
    monkeypatch.setattr(sgd, "train", interrupted)
    with pytest.raises(SystemExit) as e:
        experiments.main(grid_args(small, tmp_path, "b"))
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err
    # the trainings done are kept; one still running beside the interrupted one (two at a time) may be lost
    done = len(read_csv(tmp_path / "b" / "runs.csv")) // len(q.steps)
    assert done in (4, 5) and done <= len(finished)
    with open(tmp_path / "b" / "runs.csv", "a") as f:
        f.write("0.25,128,pooled,image,80/1")

    def counting(*a, **k):
        if k.get("snapshots"):
            grid_calls.append(1)
        return train(*a, **k)
    grid_calls.clear()
    monkeypatch.setattr(sgd, "train", counting)
    experiments.main(grid_args(small, tmp_path, "b"))
    assert len(grid_calls) == trainings - done  # nothing redone
    assert without_time(read_csv(tmp_path / "b" / "runs.csv")) == without_time(rows)
    assert f"resuming: {done * len(q.steps)} runs" in capsys.readouterr().err

    # a finished grid reruns nothing and writes the same tables
    grid_calls.clear()
    experiments.main(grid_args(small, tmp_path, "b"))
    assert grid_calls == []
    assert (tmp_path / "b" / "table4.md").read_text() == table4
    timing = json.loads((tmp_path / "b" / "timing.json").read_text())
    assert [t["trainings"] for t in timing] == [done, trainings - done, 0]
    assert [t["extract"][0]["images"] if t["extract"] else None for t in timing] == [0, 0, None]
    cost = (tmp_path / "b" / "summary.md").read_text().split("## Cost")[1]
    assert cost.count(f"| {timing[0]['started']} |") + cost.count(f"| {timing[1]['started']} |") >= 3


def test_grid_keeps_an_overshooting_training():
    # noisy features of large scale: the training loss ends above where it began, which train refuses; the grid
    # (lr 0.1 on the whole training folder's logits does this) keeps the run, and validation judges it
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 60)
    x = rng.standard_normal((120, 8)) * 20 + 5 * y[:, None]
    with pytest.raises(DsconvError, match="diverged"):
        sgd.train(x, y, ["NORMAL", "PNEUMONIA"], lr=0.1, steps=200, seed=0)
    part = np.repeat([0, 1, 2], 40)
    rows = experiments.train_cell(x, y, part, ["NORMAL", "PNEUMONIA"], 0, 0.1, (100, 200))
    assert [r["steps"] for r in rows] == [100, 200]
    model, _ = sgd.train(x[:40], y[:40], ["NORMAL", "PNEUMONIA"], lr=0.1, steps=200, seed=0, check=False)
    assert rows[1]["test_accuracy"] == np.mean(model.predict(x[80:]) == y[80:])


@pytest.mark.parametrize("sampling", sgd.SAMPLINGS)
def test_snapshot_equals_separate_run(sampling):
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.75).astype(np.int64)
    x = rng.standard_normal((200, 12)) + y[:, None]
    _, curves = sgd.train(x, y, ["n", "p"], lr=0.1, steps=250, batch=20, sampling=sampling, seed=4,
                                 snapshots=(100, 200, 250))
    for steps in (100, 200, 250):
        alone, _ = sgd.train(x, y, ["n", "p"], lr=0.1, steps=steps, batch=20, sampling=sampling, seed=4)
        snap = curves["snapshots"][steps]
        assert np.array_equal(snap.weights, alone.weights) and np.array_equal(snap.bias, alone.bias)
    assert not np.array_equal(curves["snapshots"][100].weights, curves["snapshots"][250].weights)
    with pytest.raises(DsconvError, match="snapshots"):
        sgd.train(x, y, ["n", "p"], steps=10, snapshots=(20,))


def row(lr, steps, seed, val, test, val_loss=0.1, split="80/10/10"):
    return {"alpha": 0.75, "resolution": 224, "bottleneck": "logits", "group_by": "image", "split": split,
            "seed": seed, "lr": lr, "steps": steps, "trained_resolution": 224, "n_train": 8, "n_val": 1,
            "n_test": 1, "val_accuracy": val, "val_loss": val_loss, "test_accuracy": test,
            "test_sensitivity": test, "test_specificity": test, "test_auc": 1.0, "train_s": 0.1}


def test_selection_uses_validation_only():
    # (0.1, 1500) is best on validation and worst on test; (0.01, 2000) the other way round
    rows = [row(0.1, 1500, s, 0.99, t) for s, t in enumerate((0.80, 0.82, 0.84))]
    rows += [row(0.01, 2000, s, 0.90, 1.0) for s in range(3)]
    rows += [row(0.001, 2500, s, v, 1.0) for s, v in enumerate((1.0, 0.9, 0.9))]  # one lucky seed: mean 0.933
    (cell, chosen), = reproduction.select(rows).items()
    assert cell == (0.75, 224, "logits", "image", "80/10/10")
    assert (chosen["lr"], chosen["steps"]) == (0.1, 1500)
    assert chosen["test"] == pytest.approx(0.82) and chosen["test_std"] == pytest.approx(0.02)
    assert chosen["val"] == pytest.approx(0.99) and chosen["n"] == 3
    # changing every test figure changes no choice
    flipped = [dict(r, test_accuracy=1 - r["test_accuracy"]) for r in rows]
    assert {c: (s["lr"], s["steps"]) for c, s in reproduction.select(flipped).items()} == {cell: (0.1, 1500)}
    # equal validation accuracy: the lower validation loss wins, whatever the test says
    tie = [row(0.1, 1500, 0, 0.95, 0.5, val_loss=0.3), row(0.01, 2500, 0, 0.95, 0.99, val_loss=0.2)]
    (chosen,) = reproduction.select(tie).values()
    assert (chosen["lr"], chosen["steps"], chosen["test"]) == (0.01, 2500, 0.99)
    assert math.isnan(chosen["test_std"])
    # equal validation accuracy sums whose float means differ in the last bit still tie
    a, b = np.array([502, 503, 510]) / 522, np.array([506, 504, 505]) / 522  # as found in the real grid
    assert np.mean(a) != np.mean(b) and a.sum() == pytest.approx(b.sum())
    tie = [row(0.001, 1500, s, v, 0.0, val_loss=0.0993) for s, v in enumerate(a)]
    tie += [row(0.001, 2000, s, v, 1.0, val_loss=0.0974) for s, v in enumerate(b)]
    assert [(s["steps"], s["test"]) for s in reproduction.select(tie).values()] == [(2000, 1.0)]


def test_tables():
    cell = {"lr": 0.1, "steps": 2500, "val": 0.97, "test": 0.9612, "test_std": 0.0041, "sensitivity": 0.96,
            "specificity": 0.95, "n": 3}
    selected = {reproduction.Cell(0.75, 224, "logits", "image", "80/10/10"): dict(cell, trained_resolution=224),
                reproduction.Cell(0.75, 192, "logits", "image", "80/10/10"): dict(cell, trained_resolution=224)}
    t4 = reproduction.table4(selected, experiments.Grid(), {0.75, 0.25})
    lines = t4.splitlines()
    assert "## Split by image (the paper's protocol), logits bottleneck" in lines
    assert "| Model | 80/10/10 | 70/15/15 | 60/20/20 |" in lines
    assert ("| 0.75-224 | 96.1 ± 0.41 (97.6 ± 0.36) · 0.1/2500 | not in this grid (96.8 ± 0.75) | "
            "not in this grid (96.0 ± 0.35) |") in lines
    assert any(line.startswith("| 0.75-192 † | 96.1 ± 0.41 (97.4 ± 0.25)") for line in lines)
    assert any(line.startswith("| 1.0-224 (no weights: `python -m dsconv.weights convert "
                               "PATH/mobilenet_1_0_224_tf.h5`) | no weights (98.0 ± 0.17) |") for line in lines)
    assert any(line.startswith("| 0.50-192 (no weights: `python -m dsconv.weights convert "
                               "PATH/mobilenet_5_0_224_tf.h5`) | no weights (96.8 ± 0.45) |") for line in lines)
    assert any(line.startswith("| 0.25-128 | not in this grid (97.2 ± 0.21) |") for line in lines)
    assert sum(line.startswith("| ") and "Model" not in line for line in lines) == 16
    assert "patient" not in t4.split("†")[0]  # only the protocols that were run
    assert "the test partition played no part" in t4

    t3 = reproduction.table3().splitlines()
    assert "| 0.75-224 | 325 * | 317 | 2.59 | 2.59 |" in t3 and "| 0.25-128 | 14 | 14 | 0.47 | 0.47 |" in t3
    assert "| 0.50-224 | 149 * | 150 | 1.34 | 1.34 |" in t3

    rows = [dict(row(0.1, 1500, s, 0.9, 0.9), n_train=4172, n_val=522, n_test=522) for s in range(3)]
    rows += [dict(row(0.1, 1500, s, 0.9, 0.9), group_by="patient", n_train=4170 + s, n_val=522, n_test=524 - s)
             for s in range(3)]
    t1 = reproduction.table1(rows, ("80/10/10", "70/15/15")).splitlines()
    assert "| 80/10/10 | 4172 \\| 522 \\| 522 | 4172 \\| 522 \\| 522 | 4170–4172 \\| 522 \\| 522–524 |" in t1
    assert "| 70/15/15 | 3652 \\| 782 \\| 782 | not run | not run |" in t1


def test_foreign_runs_csv_refused(quarter, small, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "runs.csv").write_text("seed,accuracy\n0,0.9\n")
    with pytest.raises(SystemExit) as e:
        experiments.main(grid_args(small, tmp_path, "out"))
    assert e.value.code == 2 and re.search("runs.csv.*another --out", capsys.readouterr().err)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        experiments.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--data", "--out", "--quick", "--subtypes", "--cache", "--workers"):
        assert flag in text
    parser_flags = text.count("  --")
    assert parser_flags >= 5 and "(default: results)" in text


# ---- --subtypes: bacterial against viral beside every training


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """100 chest X-rays per class: at least 3 bacterial and 3 viral in every validation and test partition of
    the quick grid."""
    return copy_xrays(tmp_path_factory.mktemp("mixed"), 100, 10)


def naive_auc(y, s):
    """P(score of a bacterial X-ray > score of a viral one), ties one half, by every pair."""
    pos, neg = s[y], s[~y]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def youden_j(y, s, t):
    return np.mean(s[y] >= t) + np.mean(s[~y] < t) - 1


def naive_subtype_figures(p, names, t):
    """runs.csv's subtype figures at threshold t, recomputed: p (N, 3) NORMAL, BACTERIAL, VIRAL; names: file names."""
    truth = np.array([0 if "bacteria" not in n and "virus" not in n else 1 if "bacteria" in n else 2 for n in names])
    pneumonia = truth > 0
    s = p[pneumonia, 1] / (p[pneumonia, 1] + p[pneumonia, 2])
    y = truth[pneumonia] == 1
    decided = [0 if q[1] + q[2] < 0.5 else 1 if q[1] / (q[1] + q[2]) >= t else 2 for q in p]
    return {"subtype_test_accuracy": np.mean((s >= t) == y), "subtype_test_sensitivity": np.mean(s[y] >= t),
            "subtype_test_specificity": np.mean(s[~y] < t), "subtype_test_auc": naive_auc(y, s),
            "subtype_test_classes_accuracy": np.mean(np.array(decided) == truth)}


def binary_part(rows):
    return sorted(tuple((k, r[k]) for k in runlog.BINARY if k != "train_s") for r in rows)


def subtype_part(rows):
    return sorted(tuple((k, r[k]) for k in runlog.KEY + runlog.SUBTYPES if k != "subtype_train_s") for r in rows)


def headline_row(summary, kind):
    """The cells of the summary's headline row of a bottleneck."""
    line = next(ln for ln in summary.splitlines() if ln.startswith("| 0.25-128") and f"| {kind} |" in ln)
    return [c.strip() for c in line.strip("|").split("|")]


def test_quick_grid_subtypes(quarter, mixed, tmp_path, monkeypatch, capsys):
    experiments.main(grid_args(mixed, tmp_path, "plain"))
    experiments.main(grid_args(mixed, tmp_path, "sub") + ["--subtypes"])
    plain, sub = read_csv(tmp_path / "plain" / "runs.csv"), read_csv(tmp_path / "sub" / "runs.csv")
    # the binary figures do not change with the option; the subtype columns are filled only with it
    assert len(sub) == len(plain) == 32 and binary_part(sub) == binary_part(plain)
    assert all(r[k] == "" for r in plain for k in runlog.SUBTYPES)
    assert all(r[k] != "" for r in sub for k in runlog.SUBTYPES)
    assert (tmp_path / "sub" / "table4.md").read_text() == (tmp_path / "plain" / "table4.md").read_text()
    summary = (tmp_path / "sub" / "summary.md").read_text()
    assert "bacterial vs viral, by image | by patient |" in summary
    assert "bacterial vs viral" not in (tmp_path / "plain" / "summary.md").read_text()
    for kind in ("logits", "pooled"):
        with_, without = headline_row(summary, kind), headline_row((tmp_path / "plain" / "summary.md").read_text(),
                                                                  kind)
        assert with_[:6] == without and len(with_) == 8

    # each row's figures, recomputed from a three-class head trained apart, labels read from the names here
    ds = data.scan(mixed)
    net = weights.load(0.25, 128, head=True, quiet=True)
    names = [p.name for p in ds.paths]
    three = np.array([0 if y == 0 else 1 if "_bacteria_" in n else 2 for y, n in zip(ds.labels, names)])
    checked = 0
    for kind, group_by, seed, lr in (("pooled", "patient", 1, 0.1), ("logits", "image", 0, 0.01)):
        x, _ = bottlenecks.extract(ds.paths, net, kind, tmp_path / "cache", progress=False)
        groups = [data.patient_id(p) for p in ds.paths] if group_by == "patient" else None
        part = data.split(ds.labels, (80, 10, 10), seed, groups)
        for steps in experiments.QUICK.steps:
            r = next(r for r in sub if (r["bottleneck"], r["group_by"], r["seed"], r["lr"], r["steps"])
                     == (kind, group_by, str(seed), f"{lr:g}", str(steps)))
            model, _ = sgd.train(x[part == 0], three[part == 0], ["NORMAL", "BACTERIAL", "VIRAL"], lr=lr,
                                 steps=steps, seed=seed, check=False)
            t = float(r["subtype_threshold"])
            # the threshold is one with the largest Youden's J on the validation pneumonia X-rays
            pv = model.probabilities(x[part == 1])[three[part == 1] > 0]
            sv, yv = pv[:, 1] / (pv[:, 1] + pv[:, 2]), three[part == 1][three[part == 1] > 0] == 1
            assert yv.any() and (~yv).any()
            assert youden_j(yv, sv, t) == pytest.approx(max(youden_j(yv, sv, c) for c in list(sv) + [np.inf]))
            te = np.flatnonzero(part == 2)
            expected = naive_subtype_figures(model.probabilities(x[te]), [names[i] for i in te], t)
            for k, v in expected.items():
                assert float(r[k]) == pytest.approx(v, abs=1e-5), (k, r)
            checked += 1
    assert checked == 4

    # the summary's column: the chosen setting's mean ± std over the shuffles, read from runs.csv here
    for kind in ("logits", "pooled"):
        cells = headline_row(summary, kind)
        for g, setting, cell in zip(("image", "patient"), cells[5].split("; "), cells[6:]):
            lr, steps = setting.split("/")
            rs = [r for r in sub if (r["bottleneck"], r["group_by"], r["lr"], r["steps"]) == (kind, g, lr, steps)]
            assert len(rs) == experiments.QUICK.shuffles
            acc = [100 * float(r["subtype_test_accuracy"]) for r in rs]
            auc = [float(r["subtype_test_auc"]) for r in rs]
            assert cell.startswith(f"{np.mean(acc):.1f} ± {np.std(acc, ddof=1):.2f}, AUC {np.mean(auc):.3f} ± "
                                   f"{np.std(auc, ddof=1):.3f} ("), cell


def test_subtypes_never_choose():
    # selection is on the binary validation accuracy: any subtype figures leave every choice as it was
    rows = [dict(row(lr, steps, s, val, 0.9), **dict.fromkeys(runlog.SUBTYPES, math.nan))
            for lr, steps, val in ((0.1, 100, 0.9), (0.01, 200, 0.8)) for s in range(2)]
    rng = np.random.default_rng(0)
    noisy = [dict(r, **{k: rng.random() for k in runlog.SUBTYPES}) for r in rows]
    noisy[2]["subtype_test_accuracy"] = noisy[3]["subtype_test_accuracy"] = 1.0  # the setting not chosen is best
    (plain,), (chosen,) = reproduction.select(rows).values(), reproduction.select(noisy).values()
    assert (plain["lr"], plain["steps"]) == (chosen["lr"], chosen["steps"]) == (0.1, 100)
    acc = [noisy[0]["subtype_test_accuracy"], noisy[1]["subtype_test_accuracy"]]
    assert chosen["subtypes"]["subtype_test_accuracy"] == pytest.approx((np.mean(acc), np.std(acc, ddof=1)))


def test_subtypes_resume(quarter, mixed, tmp_path, monkeypatch, capsys):
    experiments.main(grid_args(mixed, tmp_path, "whole") + ["--subtypes"])
    whole = read_csv(tmp_path / "whole" / "runs.csv")
    train = sgd.train
    calls = []

    def counting(x, y, classes, *a, **k):
        if k.get("snapshots"):
            calls.append(len(classes))
            if len(calls) == stop_at:
                raise KeyboardInterrupt
        return train(x, y, classes, *a, **k)
    monkeypatch.setattr(sgd, "train", counting)

    # interrupted, then resumed: the same figures, nothing trained twice but what the interruption lost
    stop_at = 9
    assert exit_of(lambda: experiments.main(grid_args(mixed, tmp_path, "cut") + ["--subtypes"])) == 130
    kept = len(read_csv(tmp_path / "cut" / "runs.csv")) // len(experiments.QUICK.steps)
    assert 0 < kept < 16
    calls.clear()
    stop_at = None
    experiments.main(grid_args(mixed, tmp_path, "cut") + ["--subtypes"])
    assert calls.count(2) == calls.count(3) == 16 - kept
    resumed = read_csv(tmp_path / "cut" / "runs.csv")
    assert binary_part(resumed) == binary_part(whole) and subtype_part(resumed) == subtype_part(whole)

    # a runs.csv from before the option (its columns only): resumed, only the three-class heads trained
    experiments.main(grid_args(mixed, tmp_path, "old"))
    path = tmp_path / "old" / "runs.csv"
    n = len(runlog.BINARY)
    path.write_text("".join(",".join(line.split(",")[:n]) + "\n" for line in path.read_text().splitlines()))
    assert path.read_text().splitlines()[0] == ",".join(runlog.BINARY)
    calls.clear()
    experiments.main(grid_args(mixed, tmp_path, "old") + ["--subtypes"])
    assert "predates --subtypes" in capsys.readouterr().err
    assert calls == [3] * 16
    log = runlog.RunLog(path)
    log.close()
    rows = [{k: runlog.fmt(k, v) for k, v in r.items()} for r in log.rows.values()]
    assert binary_part(rows) == binary_part(whole) and subtype_part(rows) == subtype_part(whole)
    # resumed again, nothing is left to train
    calls.clear()
    experiments.main(grid_args(mixed, tmp_path, "old") + ["--subtypes"])
    assert calls == []


def test_subtypes_need_the_names(quarter, small, tmp_path, capsys):
    root = tmp_path / "data"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted((small / cls).iterdir())[:6]:
            (root / cls / f.name).symlink_to(f)
    odd = root / "PNEUMONIA" / "person9_unknown_1.jpeg"
    odd.symlink_to(next((small / "PNEUMONIA").iterdir()))
    code = exit_of(lambda: experiments.main(["--data", str(root), "--out", str(tmp_path / "out"), "--quick",
                                             "--subtypes", "--cache", str(tmp_path / "cache")]))
    err = capsys.readouterr().err
    assert code == 2 and "person9_unknown_1.jpeg" in err and "_bacteria_" in err
    assert not (tmp_path / "out" / "runs.csv").exists()
