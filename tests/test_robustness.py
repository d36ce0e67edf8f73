"""Issue 12, "nothing lost, nothing silently wrong": each fault a hostile but fair user found, re-run.

Integrity of model and weight files, all-or-nothing outputs, settings,
concurrent writers, Ctrl-C, read-only and stray files, data hygiene, the
micro-kernel tile. Interleavings are forced by hand (two cache objects,
a lock held by the test, a signal sent from inside a patched function), never
by timing.
"""
import csv
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from dsconv import (DsconvError, bottlenecks, classifier, data, experiments, files, kernels, outputs, predict, runlog,
                    sgd, train, weights)
from dsconv.model import Model
from tests.conftest import CHEST, KERAS, REPO, copy_xrays, exit_of

DEAD_PID = 999999999


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """16 chest X-rays per class."""
    return copy_xrays(tmp_path_factory.mktemp("xrays"), 16, 70)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def train_args(small, cache, out, *extra):
    return ["--data", str(small), "--alpha", "0.25", "--resolution", "128", "--split", "50/25/25",
            "--group-by", "image", "--repeats", "2", "--steps", "100", "--lr", "0.1",
            "--cache", str(cache), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, weights_dir, small, cache):
    out = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSCONV_WEIGHTS", str(weights_dir))
        mp.setenv("DSCONV_KERAS_WEIGHTS", "")
        train.main(train_args(small, cache, out))
    return out / "model.h5"


# ---- 1. integrity


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["one weight", "nan weight", "threshold", "class names"])
def test_changed_model_file_refused(model_file, tmp_path, damage):
    path = tmp_path / "model.h5"
    shutil.copyfile(model_file, path)
    with h5py.File(path, "r+") as f:
        if damage == "one weight":
            f["weights"][3, 1] += 1e-3
        elif damage == "nan weight":
            f["weights"][0, 0] = np.nan
        elif damage == "threshold":
            f.attrs["threshold"] = 0.01
        else:
            f.attrs["classes"] = json.dumps(["PNEUMONIA", "NORMAL"])
    with pytest.raises(classifier.ModelError, match=f"{path}: .*checksum"):
        classifier.load(path)


@pytest.mark.parametrize("field, value, message", [
    ("weights", np.nan, "non-finite"), ("bias", np.inf, "non-finite"),
    ("threshold", np.nan, "threshold"), ("threshold", 1.5, "threshold")])
def test_non_finite_or_out_of_range_model_refused(tmp_path, field, value, message):
    # written with a valid checksum: the values themselves are refused
    model = classifier.Classifier(np.ones((4, 2)), np.zeros(2), ["NORMAL", "PNEUMONIA"], positive=1)
    if field == "threshold":
        model.threshold = value
    else:
        getattr(model, field)[1] = value
    model.save(tmp_path / "m.h5")
    with pytest.raises(classifier.ModelError, match=message):
        classifier.load(tmp_path / "m.h5")


@pytest.mark.slow
def test_predict_refuses_a_changed_model_in_one_line(converted, model_file, tmp_path, capsys):
    path = tmp_path / "model.h5"
    shutil.copyfile(model_file, path)
    with h5py.File(path, "r+") as f:
        f["weights"][0, 0] *= 1000
    code = exit_of(lambda: predict.main([str(path), str(next(CHEST.glob("NORMAL/*.jpeg")))]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(path) in err and "checksum" in err


def test_diverged_training_refused():
    x = np.array([[1e10, 0.0], [0.0, 1e10]] * 5)
    y = np.array([0, 1] * 5)
    with pytest.raises(DsconvError, match="diverged.*lower --lr"):
        with np.errstate(all="ignore"):
            sgd.train(x, y, ["A", "B"], lr=1e308, steps=20, batch=4)


def changed_copy(tmp_path):
    out = weights.convert(KERAS / "mobilenet_2_5_224_tf_no_top.h5", tmp_path)
    good = weights.sha256(out)
    with h5py.File(out, "r+") as f:
        f["conv_pw_5/kernel"][0, 0] += 0.5
    return out, good


@pytest.mark.shared
def test_changed_weight_file_is_rebuilt_from_keras(tmp_path, capsys):
    out, good = changed_copy(tmp_path)
    net = weights.load_file(out, 0.25, 128)
    err = capsys.readouterr().err
    assert f"{out}: the weight file fails its checksum" in err and "converting" in err
    assert net.weights_sha256 == good == weights.sha256(out)


@pytest.mark.shared
def test_changed_weight_file_refused_without_keras(tmp_path, monkeypatch):
    out, _ = changed_copy(tmp_path)
    monkeypatch.setattr(weights, "keras_dirs", lambda: [])
    with pytest.raises(weights.WeightsError, match=f"{out}: .*checksum.*convert"):
        weights.load_file(out, 0.25, 128)


# ---- 2. atomic outputs, writability checked first


@pytest.mark.slow
def test_train_on_a_full_disk_ends_in_one_line(weights_dir, model_file, small, cache, tmp_path):
    # model_file's run has filled the cache and converted the weights: the only writes left are the outputs
    out = tmp_path / "out"
    script = f"""
        import resource, sys
        from dsconv import train
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
        train.main({train_args(small, cache, out)!r})
        """
    env = dict(os.environ, DSCONV_WEIGHTS=str(weights_dir), DSCONV_KERAS_WEIGHTS="")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 3, (r.returncode, r.stderr[-800:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write the outputs to {out}") and "Traceback" not in r.stderr
    assert not out.exists() or list(out.iterdir()) == [], "no partial file, no temporary file"


def test_train_checks_out_before_any_work(converted, small, tmp_path, readonly, monkeypatch, capsys):
    def too_late(*a, **k):
        raise AssertionError("the network was loaded before --out was checked")
    monkeypatch.setattr(weights, "load", too_late)
    ro = tmp_path / "ro"
    ro.mkdir()
    with readonly(ro):
        code = exit_of(lambda: train.main(train_args(small, tmp_path / "c", ro / "run")))
    err = capsys.readouterr().err
    assert code == 2 and f"{ro}: cannot write here" in err and "--out" in err


@pytest.mark.slow
def test_predict_checks_output_before_any_work(converted, model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(predict, "rows_for", lambda *a, **k: pytest.fail("worked before checking -o"))
    code = exit_of(lambda: predict.main([str(model_file), str(CHEST / "NORMAL"), "-o",
                                         str(tmp_path / "missing" / "out.csv")]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "missing" in err and "does not exist" in err


# ---- 3. settings


@pytest.mark.parametrize("flag, value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-0.01"), ("--lr", "0"), ("--weight-decay", "-1"),
    ("--weight-decay", "nan"), ("--workers", "-3"), ("--split", "80/10/20")])
@pytest.mark.shared
def test_train_settings_refused_at_parse_time(small, tmp_path, capsys, flag, value):
    code = exit_of(lambda: train.parse_args(["--data", str(small), flag, value]))
    assert code == 2 and flag in capsys.readouterr().err


def test_experiments_workers_refused(capsys):
    assert exit_of(lambda: experiments.parse_args(["--data", "x", "--workers", "0"])) == 2
    assert "--workers" in capsys.readouterr().err


@pytest.mark.slow
def test_split_leaving_a_partition_empty_refused(converted, small, cache, tmp_path, capsys):
    args = train_args(small, cache, tmp_path / "o")
    args[args.index("--split") + 1] = "99/0.5/0.5"
    code = exit_of(lambda: train.main(args))
    assert code == 2 and "leaves the validation partition empty with 32 images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- 4. concurrency


def fake_attrs():
    return {"alpha": 0.25, "resolution": 128, "kind": "pooled", "tensors_sha256": "0" * 64,
            "preprocessing": "test"}


def test_cache_merge_loses_no_other_process_rows(tmp_path):
    v = fake_attrs()
    # two runs open the same cache, each computes its own images, then each merges
    a, b = bottlenecks.Cache(tmp_path, v, 3), bottlenecks.Cache(tmp_path, v, 3)
    a.put(["a" * 64], np.ones((1, 3)))
    b.put(["b" * 64], np.full((1, 3), 2.0))
    a.merge()
    b.merge()
    rows = bottlenecks.Cache(tmp_path, v, 3).rows
    assert sorted(rows) == ["a" * 64, "b" * 64] and rows["b" * 64][0] == 2.0


def test_second_experiments_writer_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code = exit_of(lambda: experiments.main(["--data", str(tmp_path / "nodata"), "--out", str(out), "--quick"]))
    assert code == 2 and "another dsconv.experiments grid is writing there" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_from_other_data_refused(converted, small, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "run_grid", lambda *a, **k: None)
    monkeypatch.setattr(experiments, "write_reports", lambda *a, **k: [])
    out = tmp_path / "out"
    out.mkdir()
    log = runlog.RunLog(out / "runs.csv")
    log.add([dict(alpha=0.25, resolution=128, bottleneck="pooled", group_by="image", split="80/10/10", seed=0,
                  lr=0.1, steps=100, trained_resolution=224, n_train=10, n_val=2, n_test=2, val_accuracy=1.0,
                  val_loss=0.1, test_accuracy=1.0, test_sensitivity=1.0, test_specificity=1.0, test_auc=1.0,
                  train_s=0.1)])
    log.close()
    experiments.main(["--data", str(small), "--out", str(out), "--quick"])
    other = copy_xrays(tmp_path / "other", 3, 90)
    code = exit_of(lambda: experiments.main(["--data", str(other), "--out", str(out), "--quick"]))
    err = capsys.readouterr().err
    assert code == 2 and "holds runs on other data" in err and str(other) in err
    experiments.main(["--data", str(small), "--out", str(out), "--quick"])  # the same data resumes


# ---- 5. interruptions


@pytest.mark.slow
def test_ctrl_c_before_the_outputs_leaves_no_model(converted, model_file, small, cache, tmp_path, monkeypatch,
                                                   capsys):
    clean = outputs.clean

    def interrupted(x):  # train's last step before writing results.json: a Ctrl-C arrives here
        os.kill(os.getpid(), signal.SIGINT)
        return clean(x)
    monkeypatch.setattr(outputs, "clean", interrupted)
    out = tmp_path / "out"
    code = exit_of(lambda: train.main(train_args(small, cache, out)))
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert not (out / "model.h5").exists() or (out / "results.json").exists()


@pytest.mark.slow
def test_ctrl_c_while_writing_completes_the_outputs(converted, model_file, small, cache, tmp_path, monkeypatch,
                                                    capsys):
    write_all = files.write_all

    def interrupted(contents):
        os.kill(os.getpid(), signal.SIGINT)
        return write_all(contents)
    monkeypatch.setattr(files, "write_all", interrupted)
    out = tmp_path / "out"
    code = exit_of(lambda: train.main(train_args(small, cache, out)))
    assert code == 130 and "written completely" in capsys.readouterr().err
    assert {"model.h5", "results.json", "model-seed0.h5", "curves.csv"} <= {p.name for p in out.iterdir()}
    classifier.load(out / "model.h5")


@pytest.mark.slow
def test_ctrl_c_in_predict_writes_the_rows_done(converted, model_file, small, tmp_path, capsys, monkeypatch):
    paths = sorted((small / "NORMAL").glob("*.jpeg"))[:5]
    bottlenecks = Model.bottlenecks
    calls = []

    def interrupted(self, chunk, *rest):
        calls.append(len(chunk))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return bottlenecks(self, chunk, *rest)
    monkeypatch.setattr(Model, "bottlenecks", interrupted)
    monkeypatch.setattr(predict, "CHUNK", 2, raising=False)
    out = tmp_path / "rows.csv"
    code = exit_of(lambda: predict.main([str(model_file), *map(str, paths), "--format", "csv", "-o", str(out),
                                         "--no-cache"]))
    assert code == 130 and "2 of 5 images done" in capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == list(map(str, paths))
    assert all(r["probability"] for r in rows[:2]) and not any(r["probability"] for r in rows[2:])
    assert all(r["error"] == predict.INTERRUPTED for r in rows[2:])


# ---- 6. degraded environments


@pytest.mark.slow
def test_read_only_cache_runs_without_one(converted, small, tmp_path, readonly, capsys):
    net = weights.load(0.25, 128, quiet=True)
    paths = sorted((small / "NORMAL").glob("*.jpeg"))
    first, _ = bottlenecks.extract(paths[:4], net, "pooled", tmp_path, progress=False)
    capsys.readouterr()
    variant_dir = next(tmp_path.iterdir())
    with readonly(variant_dir):
        feats, failed = bottlenecks.extract(paths, net, "pooled", tmp_path, progress=False)
    assert not failed and np.array_equal(feats[:4], first) and feats.shape == (16, 256)
    err = capsys.readouterr().err
    assert err.count("cannot write the bottleneck cache") == 1 and str(variant_dir) in err
    with readonly(tmp_path):  # a variant not cached yet, under a read-only cache folder
        at160 = weights.load(0.25, 160, quiet=True)
        feats, _ = bottlenecks.extract(paths[:2], at160, "pooled", tmp_path, progress=False)
    assert feats.shape == (2, 256) and "running without saving bottlenecks" in capsys.readouterr().err


@pytest.mark.slow
def test_stray_temporary_files_cleaned(converted, model_file, small, cache, tmp_path):
    variant_dir = next(p for p in cache.iterdir() if p.is_dir())
    out = tmp_path / "out"
    out.mkdir()
    strays = [variant_dir / f".part-1-1.h5.{DEAD_PID}.0.tmp", out / f".model.h5.{DEAD_PID}.2.tmp"]
    live = out / f".results.json.{os.getppid()}.0.tmp"  # a running process's: kept
    for p in strays + [live]:
        p.write_bytes(b"half written")
    train.main(train_args(small, cache, out))
    assert not any(p.exists() for p in strays) and live.exists()


# ---- 7. data hygiene


@pytest.mark.shared
def test_hygiene_functions(small, tmp_path):
    root = copy_xrays(tmp_path / "d", 3, 200)
    normal = sorted((root / "NORMAL").iterdir())
    shutil.copyfile(normal[0], root / "PNEUMONIA" / "copy.jpeg")
    ds = data.scan(root)
    assert data.duplicates_across_classes(ds) == [(normal[0], root / "PNEUMONIA" / "copy.jpeg")]
    assert data.small_classes(ds) == {"NORMAL": 3, "PNEUMONIA": 4}
    assert data.small_classes(ds, minimum=4) == {"NORMAL": 3}
    test = copy_xrays(tmp_path / "t", 2, 200)
    shared = data.shared_images(ds, data.scan(test))
    assert {(a.name, b.name) for a, b in shared} == {(p.name, p.name) for p in normal[:2]} | \
        {(p.name, p.name) for p in sorted((test / "PNEUMONIA").iterdir())}
    assert data.fingerprint(ds) != data.fingerprint(data.scan(test))
    renamed = tmp_path / "renamed"
    shutil.copytree(root, renamed)
    (renamed / "NORMAL" / normal[1].name).rename(renamed / "NORMAL" / "other-name.jpeg")
    assert data.fingerprint(data.scan(renamed)) == data.fingerprint(ds)


@pytest.mark.slow
def test_train_warns_about_the_data(converted, small, cache, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(small, root)
    dup = sorted((root / "NORMAL").iterdir())[0]
    shutil.copyfile(dup, root / "PNEUMONIA" / "same-as-normal.jpeg")
    test_dir = copy_xrays(tmp_path / "t", 1, 70)  # its images are also in the training data; one per class
    args = train_args(root, cache, tmp_path / "o", "--test-dir", str(test_dir))
    train.main(args)
    err = capsys.readouterr().err
    assert "sit in two class folders" in err and "same-as-normal.jpeg" in err
    assert "2 image(s) of --test-dir" in err and "also in --data" in err
    assert "class NORMAL" in err and "only 1 image" in err
    warnings = json.loads((tmp_path / "o" / "results.json").read_text())["data"]["warnings"]
    assert len(warnings) == 3


# ---- 8. the micro-kernel tile


@pytest.mark.parametrize("env, host, mr", [
    ({}, "+avx512f,+avx2", 14), ({}, "+avx2,-avx512f", 6), ({"NUMBA_CPU_NAME": "haswell"}, "+avx512f", 6),
    ({"NUMBA_CPU_NAME": "skylake-avx512", "NUMBA_CPU_FEATURES": "+avx512f"}, "", 14),
    ({"DSCONV_MR": "3"}, "+avx512f", 3), ({"DSCONV_MR": "8"}, "", 8)])
def test_tile_choice(env, host, mr):
    assert kernels.tile_rows(env, host) == mr


def test_bad_tile_override_warns(capsys):
    assert kernels.tile_rows({"DSCONV_MR": "1"}, "+avx512f") == 14
    assert "DSCONV_MR=1" in capsys.readouterr().err


@pytest.mark.slow
def test_other_tile_computes_the_same(tmp_path):
    # the AVX2 tile on this machine, compiled afresh: the pointwise kernel against NumPy
    script = """
        import numpy as np
        from dsconv import kernels
        from tests import naive
        assert kernels.MR == 5, kernels.MR
        rng = np.random.default_rng(0)
        for m, k, n in ((1, 3, 1), (11, 27, 40), (61, 64, 33)):
            x, w, b = (rng.uniform(0, 6, (1, 1, m, k)).astype(np.float32),
                       rng.uniform(-1, 1, (k, n)).astype(np.float32), rng.uniform(-1, 1, n).astype(np.float32))
            got = kernels.pointwise(x, w, b)
            assert np.abs(got - naive.relu6(x.astype(np.float64) @ w + b)).max() < 1e-4
        print("ok")
        """
    env = dict(os.environ, DSCONV_MR="5", NUMBA_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]
