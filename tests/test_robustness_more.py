"""Issue 27, "nothing lost, nothing silently wrong: the second round": each failure found, re-run.

Divergence, outputs, inputs, resource bounds, exit statuses, CSV cells. Damaged
HDF5 files are in tests/test_robustness_hdf5.py, the server in tests/test_serve.py.
"""
import csv
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsconv import (INTERRUPTED, NOT_WRITTEN, PARTIAL, USER_ERROR, calibrate, consistency, data, experiments, imagenet,
                    predict, serve, train, weights)
from dsconv.model import Model
from tests import dicomfiles
from tests.conftest import CHEST, REPO, copy_xrays, exit_of, train_small

DEAD_PID = 999999999


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """16 chest X-rays per class."""
    return copy_xrays(tmp_path_factory.mktemp("xrays"), 16, 70)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, weights_dir, small, cache):
    out = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSCONV_WEIGHTS", str(weights_dir))
        mp.setenv("DSCONV_KERAS_WEIGHTS", "")
        return train_small(small, out, cache, 100, "--tta", "none")


# ---- 2. divergence by what the model does


@pytest.mark.slow
@pytest.mark.parametrize("lr", ["25", "1000"])
def test_overshooting_rate_refused_and_no_model_written(converted, small, cache, tmp_path, capsys, lr):
    out = tmp_path / "run"
    code = exit_of(lambda: train_small(small, out, cache, 100, "--tta", "none", "--lr", lr))
    err = capsys.readouterr().err
    assert code == 2 and "diverged" in err and "use a lower --lr" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_paper_rates_train_without_alarm(converted, small, cache, tmp_path):
    for lr in ("0.01", "0.1"):
        model = train_small(small, tmp_path / lr, cache, 300, "--paper", "--lr", lr, "--split", "50/25/25")
        assert model.is_file()


# ---- 3. outputs: written through or followed, never replaced; a run's folder guarded


def predict_csv(model_file, paths, output, capsys):
    code = exit_of(lambda: predict.main([str(model_file), *map(str, paths), "--format", "csv", "-o", str(output),
                                         "--no-cache"]))
    return code, capsys.readouterr()


@pytest.mark.slow
def test_predict_output_onto_a_fifo_a_symlink_and_stdout(converted, model_file, small, tmp_path, capsys):
    paths = sorted((small / "NORMAL").glob("*.jpeg"))[:2]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    code, _ = predict_csv(model_file, paths, fifo, capsys)
    reader.join(timeout=60)
    assert code == 0 and stat.S_ISFIFO(os.lstat(fifo).st_mode) and got[0].startswith("path,probability")
    target, link = tmp_path / "target.csv", tmp_path / "link.csv"
    target.write_text("old")
    link.symlink_to(target)
    stray = tmp_path / f".target.csv.{DEAD_PID}.0.tmp"
    stray.write_text("left by a killed run")
    code, _ = predict_csv(model_file, paths, link, capsys)
    assert code == 0 and link.is_symlink() and target.read_text().startswith("path,probability")
    assert not stray.exists()
    code, out = predict_csv(model_file, paths, "-", capsys)
    assert code == 0 and out.out.startswith("path,probability") and not (tmp_path / "-").exists()


@pytest.mark.slow
def test_predict_to_a_full_standard_output_says_so(converted, model_file, small):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "dsconv.predict", str(model_file), str(small / "NORMAL"),
                            "--no-cache"], cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=600)
    assert r.returncode == NOT_WRITTEN and "Traceback" not in r.stderr and "None" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: could not write standard output")


@pytest.mark.slow
def test_csv_cells_that_a_spreadsheet_would_run_are_quoted(converted, model_file, small, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(sorted((small / "NORMAL").glob("*.jpeg"))[0], "=HYPERLINK(1).jpeg")
    (tmp_path / "@SUM(1).jpeg").write_bytes(b"\xff\xd8 not a jpeg")
    code, _ = predict_csv(model_file.resolve(), ["=HYPERLINK(1).jpeg", "@SUM(1).jpeg"], "rows.csv", capsys)
    rows = list(csv.DictReader(open("rows.csv")))
    assert code == PARTIAL and [r["path"] for r in rows] == ["'=HYPERLINK(1).jpeg", "'@SUM(1).jpeg"]
    assert rows[0]["error"] == "" and rows[1]["error"].startswith("'@SUM(1).jpeg: cannot be read")


@pytest.mark.slow
def test_second_train_into_a_run_refused_then_overwritten(converted, small, cache, tmp_path, capsys):
    out = tmp_path / "run"
    train_small(small, out, cache, 50, "--tta", "none", "--repeats", "2")
    assert (out / "model-seed1.h5").exists()
    code = exit_of(lambda: train_small(small, out, cache, 50, "--tta", "none"))
    assert code == USER_ERROR and "--overwrite" in capsys.readouterr().err
    train_small(small, out, cache, 50, "--tta", "none", "--overwrite")
    assert not (out / "model-seed1.h5").exists() and (out / "model-seed0.h5").exists()
    assert json.loads((out / "results.json").read_text())["settings"]["repeats"] == 1


# ---- 4. inputs: broken links counted, images known by content, a site sample that means something


@pytest.mark.slow
def test_broken_links_and_unnamed_images_get_rows(converted, model_file, small, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    jpeg = sorted((small / "NORMAL").glob("*.jpeg"))[0]
    shutil.copyfile(jpeg, folder / "photo.jfif")
    dicomfiles.write(folder / "IM0001", np.asarray(Image.open(jpeg).convert("L")))  # DICOM, no extension
    (folder / "dangling.jpeg").symlink_to(folder / "gone.jpeg")
    (folder / "loop").symlink_to(folder / "loop")
    (folder / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "rows.json"
    code = exit_of(lambda: predict.main([str(model_file), str(folder), "--format", "json", "-o", str(out),
                                         "--no-cache"]))
    rows = {os.path.basename(r["path"]): r for r in json.loads(out.read_text())}
    assert code == PARTIAL and "2 of 4 images failed" in capsys.readouterr().err
    assert set(rows) == {"photo.jfif", "IM0001", "dangling.jpeg", "loop"}
    assert rows["photo.jfif"]["probability"] is not None and rows["IM0001"]["probability"] is not None
    assert rows["dangling.jpeg"]["error"] and rows["loop"]["error"]


@pytest.mark.slow
def test_broken_links_in_training_data_are_counted(converted, small, cache, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(small, data_dir)
    (data_dir / "NORMAL" / "dangling.jpeg").symlink_to(tmp_path / "gone.jpeg")
    (data_dir / "NORMAL" / "loop.jpeg").symlink_to(data_dir / "NORMAL" / "loop.jpeg")
    train_small(data_dir, tmp_path / "run", cache, 50, "--tta", "none")
    skipped = json.loads((tmp_path / "run" / "results.json").read_text())["data"]["skipped_files"]
    assert {os.path.basename(p) for p in skipped} == {"dangling.jpeg", "loop.jpeg"}


@pytest.mark.slow
def test_calibrate_refuses_copies_of_one_image(converted, model_file, small, tmp_path, capsys):
    site = tmp_path / "site"
    site.mkdir()
    for k in range(4):
        shutil.copyfile(sorted((small / "NORMAL").glob("*.jpeg"))[0], site / f"copy{k}.jpeg")
    out = tmp_path / "site.h5"
    code = exit_of(lambda: calibrate.main([str(model_file), "--site-dir", str(site), "--out", str(out),
                                           "--cache", str(tmp_path / "cache")]))
    err = capsys.readouterr().err.strip()
    assert code == USER_ERROR and "1 different readable image(s) among 4" in err and "at least 16" in err
    assert not out.exists() and len(err.splitlines()) == 1


@pytest.mark.slow
def test_calibrate_removes_stale_temporary_files(converted, model_file, small, tmp_path):
    stray = tmp_path / f".site.h5.{DEAD_PID}.0.tmp"
    stray.write_bytes(b"left by a killed run")
    calibrate.main([str(model_file), "--val-dir", str(small), "--out", str(tmp_path / "site.h5"),
                    "--cache", str(tmp_path / "cache")])
    assert (tmp_path / "site.h5").exists() and not stray.exists()


# ---- 5. resources: pixel limits before decoding, bounds when parsed


@pytest.mark.slow
def test_huge_dicom_refused_before_decoding(converted, model_file, tmp_path, capsys):
    # The limit lowered to 100,000 pixels stands for the default 178,956,970: a deflated DICOM that inflates
    # beyond it is refused before pydicom inflates it, any other before its pixels are decoded.
    bomb = dicomfiles.write(tmp_path / "bomb", np.zeros((1000, 1000), np.uint16), deflated=True)
    assert bomb.stat().st_size < 2 ** 14
    code = exit_of(lambda: predict.main([str(model_file), str(bomb), "--no-cache", "--max-pixels", "100000"]))
    assert code == PARTIAL and "the deflated DICOM data inflates to more than" in capsys.readouterr().out
    small_dicom = dicomfiles.write(tmp_path / "small.dcm", np.full((400, 300), 1000, np.uint16))
    code = exit_of(lambda: predict.main([str(model_file), str(small_dicom), "--no-cache", "--max-pixels", "100000"]))
    assert code == PARTIAL and "over the limit of 100,000 pixels" in capsys.readouterr().out
    assert exit_of(lambda: predict.main([str(model_file), str(small_dicom), "--no-cache"])) == 0


@pytest.mark.parametrize("flag, value", [
    ("--resolution", "4096"), ("--batch-size", "1000000000"), ("--steps", "100000000"), ("--repeats", "100000"),
    ("--split", "80/nan/20"), ("--split", "inf/0/20"), ("--max-pixels", "0")])
@pytest.mark.shared
def test_train_bounds_refused_at_parse_time(small, capsys, flag, value):
    assert exit_of(lambda: train.parse_args(["--data", str(small), flag, value])) == USER_ERROR
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


# ---- 7. exit statuses


def test_every_entry_point_says_a_user_error_in_one_line(converted, tmp_path, capsys):
    """Exit 2 and one `error: ` line on standard error, from every python -m dsconv entry point."""
    none = str(tmp_path / "none")
    calls = {"train": lambda: train.main(["--data", none, "--out", str(tmp_path / "t")]),
             "experiments": lambda: experiments.main(["--data", none, "--out", str(tmp_path / "e")]),
             "predict": lambda: predict.main([none + ".h5", none]),
             "calibrate": lambda: calibrate.main([none + ".h5", "--val-dir", none, "--out", str(tmp_path / "c.h5")]),
             "consistency": lambda: consistency.main([none + ".h5", none]),
             "serve": lambda: serve.main([none + ".h5"]),
             "weights": lambda: weights.main(["convert", none + ".h5"]),
             "imagenet": lambda: imagenet.main([none + ".jpeg", "--alpha", "0.25", "--classes", none + ".txt"])}
    package = Path(train.__file__).parent
    assert set(calls) == {p.stem for p in package.glob("*.py") if '__name__ == "__main__"' in p.read_text()}
    for name, call in calls.items():
        code = exit_of(call)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == USER_ERROR and len(err) == 1 and err[0].startswith("error: "), (name, code, err)


@pytest.mark.slow
def test_exit_statuses_are_the_table(converted, model_file, small, tmp_path, capsys, monkeypatch):
    assert exit_of(lambda: predict.main([str(tmp_path / "none.h5"), str(small)])) == USER_ERROR
    assert exit_of(lambda: calibrate.main([str(tmp_path / "none.h5"), "--val-dir", str(small), "--out",
                                           str(tmp_path / "x.h5")])) == USER_ERROR
    assert exit_of(lambda: train.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")])) == USER_ERROR
    assert exit_of(lambda: weights.main(["convert", str(tmp_path / "none.h5")])) == USER_ERROR
    assert exit_of(lambda: imagenet.main([str(tmp_path / "none.jpeg"), "--alpha", "0.25"])) == PARTIAL
    capsys.readouterr()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "scan", ctrl_c)
    assert exit_of(lambda: train.main(["--data", str(small), "--out", str(tmp_path / "o")])) == INTERRUPTED
    assert exit_of(lambda: calibrate.main([str(model_file), "--val-dir", str(small), "--out",
                                           str(tmp_path / "x.h5")])) == INTERRUPTED
    assert "interrupted: nothing" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_during_heatmaps_keeps_the_rows_done(converted, model_file, small, tmp_path, capsys, monkeypatch):
    paths = sorted((small / "NORMAL").glob("*.jpeg"))[:5]
    diagnose = Model.diagnose
    calls = []

    def interrupted(self, path, *a, **kw):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return diagnose(self, path, *a, **kw)
    monkeypatch.setattr(Model, "diagnose", interrupted)
    out = tmp_path / "rows.csv"
    code = exit_of(lambda: predict.main([str(model_file), *map(str, paths), "--format", "csv", "-o", str(out),
                                         "--heatmap", str(tmp_path / "maps")]))
    assert code == INTERRUPTED and "3 of 5 images done" in capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert all(r["heatmap"] for r in rows[:3]) and len(list((tmp_path / "maps").glob("*.png"))) == 3
    assert all(r["error"] == predict.INTERRUPTED for r in rows[3:])


# ---- 6. the server against hostile clients


def start_server(model_file, tmp, log):
    env = dict(os.environ, TMPDIR=str(tmp))
    proc = subprocess.Popen([sys.executable, "-m", "dsconv.serve", str(model_file), "--port", "0"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    assert "http://127.0.0.1:" in line, line
    return proc, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def exchange(port, data):
    """Send bytes on a fresh socket; everything the server answers until it closes (at most 60 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.slow
def test_hostile_clients_leave_no_name_in_the_log(converted, model_file, tmp_path):
    tmp = tmp_path / "tmp"
    dead, live = tmp / f"dsconv-serve-{DEAD_PID}-abc", tmp / f"dsconv-serve-{os.getpid()}-abc"
    for d in (dead, live):
        (d / "request-x").mkdir(parents=True)
        (d / "request-x" / "0000.jpeg").write_bytes(b"a patient's X-ray")
    name = b"Jane_Doe_DOB_1998-03-02.jpeg"
    jpeg = sorted((CHEST / "NORMAL").glob("*.jpeg"))[0].read_bytes()
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + name + b'"\r\n\r\n' + jpeg +
            b"\r\n--b--\r\n")
    post = b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    with open(tmp_path / "log", "w") as log:
        proc, port = start_server(model_file, tmp, log)
        try:
            assert not dead.exists() and live.exists()  # a killed server's uploads, not a running one's
            # a Content-Length too short: the rest of the body is never read as a request
            answer = exchange(port, post + b"Content-Length: 40\r\n\r\n" + body)
            assert answer.count(b"HTTP/1.") == 1 and b" 400 " in answer.split(b"\r\n")[0]
            # the name in the request line and in a garbled request line, and a GET carrying a body
            for request in (b"GET /" + name + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                            b'Content-Disposition: form-data; name="file"; filename="' + name + b'"\r\n\r\n',
                            b"GET /api/health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nGET /" + name
                            + b" HTTP/1.1\r\n\r\n"):
                answer = exchange(port, request)
                assert answer.count(b"HTTP/1.") == 1 and answer.startswith(b"HTTP/1.")
            answer = exchange(port, post + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert b" 200 " in answer.split(b"\r\n")[0] and b'"probability"' in answer
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    text = (tmp_path / "log").read_bytes()
    assert proc.returncode == 0 and b"Jane" not in text and jpeg[:64] not in text and b"JFIF" not in text
    assert b"POST /api/predict 200" in text and b"(other path) 404" in text
    assert sorted(os.listdir(tmp)) == [live.name]


@pytest.mark.slow
def test_killed_server_uploads_removed_at_next_start(converted, model_file, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with open(tmp_path / "log", "w") as log:
        proc, _ = start_server(model_file, tmp, log)
        proc.kill()
        proc.wait(timeout=60)
        assert len(os.listdir(tmp)) == 1  # what kill -9 leaves
        proc, _ = start_server(model_file, tmp, log)
        try:
            assert os.listdir(tmp) == [f"dsconv-serve-{proc.pid}-" + os.listdir(tmp)[0].split("-", 3)[3]]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    assert os.listdir(tmp) == []


@pytest.mark.parametrize("flag, value", [("--port", "70000"), ("--port", "-1"), ("--max-upload-mb", "inf"),
                                         ("--max-upload-mb", "nan"), ("--max-upload-mb", "-5"),
                                         ("--max-upload-mb", "0")])
@pytest.mark.slow
def test_server_settings_refused_in_one_line(model_file, capsys, flag, value):
    assert exit_of(lambda: serve.main([str(model_file), flag, value])) == USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert flag in err[-1] and "Traceback" not in "".join(err)


def test_runs_csv_on_a_full_disk_keeps_whole_rows(tmp_path):
    # a file size limit (RLIMIT_FSIZE) stands for the full disk: the row that does not fit leaves no part behind
    script = f"""
        import resource
        from pathlib import Path
        from dsconv import runlog
        path = Path({str(tmp_path / "runs.csv")!r})
        row = dict.fromkeys(runlog.COLUMNS, 1.0)
        row.update(resolution=128, seed=0, steps=10, trained_resolution=224, n_train=1, n_val=1, n_test=1,
                   group_by="image", split="80/10/10", bottleneck="pooled")
        log = runlog.RunLog(path)
        log.add([row])
        resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 10, path.stat().st_size + 10))
        try:
            log.add([dict(row, seed=1)])
        except OSError as e:
            print("refused", e.errno)
        log.close()
        """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("refused") and not r.stderr, r.stderr
    lines = (tmp_path / "runs.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[1].split(",")[5] == "0"


@pytest.mark.slow
def test_read_only_cache_warns_once_in_predict(converted, model_file, small, tmp_path, readonly, capsys,
                                               monkeypatch):
    cache = tmp_path / "ro"
    cache.mkdir()
    monkeypatch.setattr(predict, "CHUNK", 2)
    paths = sorted((small / "NORMAL").glob("*.jpeg"))[:6]
    with readonly(cache):
        code = exit_of(lambda: predict.main([str(model_file), *map(str, paths), "--cache", str(cache)]))
    err = capsys.readouterr().err
    assert code == 0 and err.count("cannot write the bottleneck cache") == 1, err
