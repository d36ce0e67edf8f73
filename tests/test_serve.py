"""python -m dsconv.serve: every rule of the HTTP API, then the page in headless Chromium."""
import base64
import csv
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

import dsconv
from dsconv import predict, serve
from tests import dicomfiles
from tests.conftest import CHEST, ORIGINALS, REPO, copy_xrays, train_small

MAX_MB = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory, weights_dir):
    """A small 0.25-128 model served on 127.0.0.1 (any free port) from a thread; uploads land in a private tmp."""
    root = tmp_path_factory.mktemp("serve")
    data = copy_xrays(root / "data", 12, 60)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSCONV_WEIGHTS", str(weights_dir))
        mp.setenv("DSCONV_CACHE", str(root / "cache"))  # must stay empty: nothing of an upload is kept
        mp.setattr(tempfile, "tempdir", str(root / "tmp"))
        (root / "tmp").mkdir()
        path = train_small(data, root / "run", root / "train-cache", 100)
        model = dsconv.load_model(path, cache_dir=False)
        server = serve.Server(model, path, "127.0.0.1", 0, MAX_MB)
        serve.warm_up(model, server.lock, server.workdir)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield {"server": server, "port": server.server_address[1], "model": path, "root": root}
        server.shutdown()
        server.server_close()
        assert not os.listdir(root / "tmp"), "the server left files behind"


def xrays():
    """Two original-size X-rays (one per class) and a broken file, as (name, bytes)."""
    files = [sorted((ORIGINALS / c).glob("*.jpeg"))[0] for c in ("NORMAL", "PNEUMONIA")]
    return [(p.name, p.read_bytes()) for p in files] + [("broken.jpeg", b"\xff\xd8 not a jpeg")]


def multipart(files, field="file", boundary="dsconv-test-boundary"):
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n"
             for name, content in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(served, method, path, body=None, headers=None):
    """(status, headers, decoded JSON or raw bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        is_json = r.getheader("Content-Type") == "application/json"
        return r.status, r, json.loads(data) if is_json else data
    finally:
        conn.close()


def post(served, files, **kw):
    body, ctype = multipart(files, **kw)
    return request(served, "POST", "/api/predict", body, {"Content-Type": ctype})


def raw(served, data):
    """Send bytes on a fresh socket, return what the server answers (until it closes)."""
    with socket.create_connection(("127.0.0.1", served["port"]), timeout=60) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode("latin-1"), body


def decode_data_url(url, kind):
    prefix = f"data:image/{kind};base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))


def cli_rows(model, folder):
    """What `python -m dsconv.predict --format json` says of the files in folder, by file name."""
    out = io.StringIO()
    with pytest.raises(SystemExit), pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", out)
        predict.main([str(model), *sorted(map(str, folder.iterdir())), "--format", "json", "--no-cache"])
    return {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(out.getvalue())}


def test_health_and_model(served):
    status, r, body = request(served, "GET", "/api/health")
    assert status == 200 and body == {"status": "ok"}
    status, r, m = request(served, "GET", "/api/model")
    assert status == 200 and m["variant"] == "0.25-128 pooled flip" and m["positive"] == "PNEUMONIA"
    assert m["threshold"] == dsconv.load_model(served["model"]).threshold and m["max_upload_mb"] == MAX_MB
    assert m["info"]["alpha"] == 0.25 and m["info"]["training"]["steps"] == [100]
    assert r.getheader("Cache-Control") == "no-store"


def test_predict_gives_the_cli_probabilities_in_upload_order(served, tmp_path):
    files = xrays()
    status, _, body = post(served, files)
    assert status == 200
    results = body["results"]
    assert [r["name"] for r in results] == [n for n, _ in files]
    assert "broken.jpeg" in results[2]["error"] and str(tempfile.gettempdir()) not in results[2]["error"]
    assert set(results[2]) == {"name", "error"}
    folder = tmp_path / "same"
    folder.mkdir()
    for name, content in files:
        (folder / name).write_bytes(content)
    want = cli_rows(served["model"], folder)
    for r in results[:2]:
        assert r["probability"] == want[r["name"]]["probability"]  # exactly
        assert r["label"] == want[r["name"]]["decision"] and r["threshold"] == want[r["name"]]["threshold"]
        heat, image = decode_data_url(r["heatmap"], "png"), decode_data_url(r["image"], "jpeg")
        assert heat.mode == "RGB" and max(heat.size) <= serve.PREVIEW and heat.size == image.size


def test_dicom_upload(served, tmp_path):
    gray = np.asarray(Image.open(io.BytesIO(xrays()[0][1])).convert("L"))
    png = io.BytesIO()
    Image.fromarray(gray).save(png, "PNG")
    dicomfiles.write(tmp_path / "x.dcm", gray, window=(128, 256))
    status, _, body = post(served, [("x.png", png.getvalue()), ("x.dcm", (tmp_path / "x.dcm").read_bytes())])
    a, b = body["results"]
    assert status == 200 and abs(a["probability"] - b["probability"]) <= 1e-4 and b["heatmap"]


def test_refusals_are_json(served):
    for status, _, body in [
        post(served, []),                                          # no file
        post(served, [("notes.txt", b"hello")], field="comment"),  # no `file` field
        request(served, "POST", "/api/predict"),                  # no body at all
        request(served, "POST", "/api/predict", b"{}", {"Content-Type": "application/json"}),
        request(served, "POST", "/api/predict", b"--x\r\nbroken", {"Content-Type": "multipart/form-data; boundary=x"}),
    ]:
        assert status == 400 and "error" in body
    status, _, body = request(served, "GET", "/api/predict")
    assert status == 405 and "POST" in body["error"]
    code, head, body = raw(served, b"GET / GARBAGE/1.1\r\n\r\n")
    assert code == 400 and "application/json" in head and "error" in json.loads(body)
    code, head, body = raw(served, b"PUT / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert code == 501 and "error" in json.loads(body)
    status, _, _ = request(served, "GET", "/api/health")
    assert status == 200  # still serving


@pytest.mark.parametrize("path", ["/../setup.cfg", "/static/index.html", "/dsconv/serve.py", "/%2e%2e/setup.cfg",
                                  "/..%2fsetup.cfg", "/index.html/../../setup.cfg", "//etc/passwd", "/api"])
def test_nothing_else_is_served(served, path):
    code, head, body = raw(served, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert code == 404 and json.loads(body)["error"].startswith("nothing at")


def test_the_page_is_served_with_its_limits(served):
    status, r, body = request(served, "GET", "/")
    assert status == 200 and r.getheader("Content-Type").startswith("text/html") and b"/api/predict" in body
    assert "default-src 'none'" in r.getheader("Content-Security-Policy")
    assert b"http://" not in body and b"https://" not in body  # nothing from the internet


def test_oversize_upload_is_413(served):
    big = [("big.jpeg", b"\0" * (MAX_MB * 2 ** 20))]
    status, _, body = post(served, big)  # the body is sent whole, then refused
    assert status == 413 and f"{MAX_MB:g} MB" in body["error"]
    # curl's way: headers with Expect: 100-continue, refused before the body is sent
    code, head, body = raw(served, b"POST /api/predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                   b"Content-Type: multipart/form-data; boundary=b\r\n"
                                   b"Content-Length: 999999999\r\n\r\n")
    assert code == 413 and "error" in json.loads(body)
    status, _, _ = request(served, "GET", "/api/health")
    assert status == 200


def test_concurrent_uploads(served):
    files = xrays()[:1]
    answers = [None] * 3

    def go(k):
        answers[k] = post(served, files)

    threads = [threading.Thread(target=go, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a[0] == 200 for a in answers)
    assert len({a[2]["results"][0]["probability"] for a in answers}) == 1


def test_nothing_is_kept(served):
    post(served, xrays())
    work = served["server"].workdir
    assert stat.S_IMODE(os.stat(work).st_mode) == 0o700
    assert os.listdir(work) == []
    assert not (served["root"] / "cache").exists() or not any((served["root"] / "cache").rglob("*.h5"))


def test_exposed_hosts():
    assert not any(map(serve.exposed, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert all(map(serve.exposed, ["0.0.0.0", "192.168.1.5", "::", "example.org"]))


def ctrl_c_on():
    # a shell that runs the tests in the background ignores SIGINT, and a child would inherit that
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_command_line_serves_and_stops_on_ctrl_c(served, weights_dir, tmp_path):
    env = dict(os.environ, DSCONV_WEIGHTS=str(weights_dir), TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "dsconv.serve", str(served["model"]), "--port", "0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_on)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        status, _, body = request({"port": port}, "GET", "/api/health")
        assert status == 200 and body == {"status": "ok"}
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.strip()][-1] == "dsconv: stopped"
    assert os.listdir(tmp_path) == []


# ---- the page in headless Chromium ----

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        message = "Chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    root = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={root / 'profile'}", "--window-size=1280,800"]:
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(root / "downloads"),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.downloads = root / "downloads"
    yield driver
    driver.quit()


def wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def test_page(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    d = browser
    d.get(f"http://127.0.0.1:{served['port']}/")
    wait(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    panel = d.find_element(By.ID, "model").text
    assert "MobileNet 0.25-128 pooled" in panel and "TRAINING" in panel.upper() and "model.h5" in panel
    assert "test partition of --data" in panel and "sensitivity" in panel  # the file's own test figures
    assert re.search(r"accuracy\s+\d+\.\d%\s", panel) and re.search(r"\d+\.\d–\d+\.\d%", panel)  # interval

    files = xrays()
    files[2] = ("=1+2 broken.jpeg", files[2][1])  # a spreadsheet formula, if the CSV let it through
    for name, content in files:
        (tmp_path / name).write_bytes(content)
    d.find_element(By.ID, "files").send_keys("\n".join(str(tmp_path / n) for n, _ in files))
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result:not(.pending)")) == 3)
    rows = d.find_elements(By.CSS_SELECTOR, "#results .result")
    assert [r.find_element(By.CLASS_NAME, "name").text for r in rows] == [n for n, _ in files]
    assert "error" in rows[2].get_attribute("class") and "cannot be read" in rows[2].text
    want = cli_rows(served["model"], tmp_path)
    for r, (name, _) in zip(rows[:2], files):
        assert r.find_element(By.CLASS_NAME, "prob").text.startswith(f"{want[name]['probability']:.3f}")
        assert r.find_element(By.CLASS_NAME, "label").text == want[name]["decision"]
        img = r.find_element(By.CSS_SELECTOR, "img.heatmap")
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        assert d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
    d.find_element(By.ID, "show-heatmap").click()
    assert len(d.find_elements(By.CSS_SELECTOR, "#results img.xray")) == 2
    assert not d.find_elements(By.CSS_SELECTOR, "#results img.heatmap")

    def labels():
        return [e.text for e in d.find_elements(By.CSS_SELECTOR, "#results .label")]

    slider = d.find_element(By.ID, "threshold")
    slider.send_keys(Keys.HOME)  # threshold 0: everything is pneumonia
    assert labels() == ["PNEUMONIA", "PNEUMONIA"] and d.find_element(By.ID, "threshold-value").text == "0.000"
    slider.send_keys(Keys.END)   # threshold 1: nothing is
    assert labels() == ["NORMAL", "NORMAL"] and "the model's own is" in d.find_element(By.ID, "threshold-note").text

    d.find_element(By.ID, "csv").click()
    csv_file = driver_download(d, "dsconv-results.csv")
    table = list(csv.DictReader(io.StringIO(csv_file.read_text())))
    assert [r["name"] for r in table] == [n for n, _ in files[:2]] + ["'" + files[2][0]]
    assert table[2]["error"].startswith("'=1+2 broken.jpeg")
    assert [r["label"] for r in table] == ["NORMAL", "NORMAL", ""] and table[0]["threshold"] == "1"
    assert float(table[0]["probability"]) == want[files[0][0]]["probability"] and "broken" in table[2]["error"]

    d.find_element(By.ID, "reset").click()
    assert labels() == [want[n]["decision"] for n, _ in files[:2]]

    d.set_window_size(390, 844)  # a phone: no sideways scrolling
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    d.set_window_size(1280, 800)


def driver_download(d, name, timeout=30):
    path = d.downloads / name
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and path.stat().st_size:
            return path
        time.sleep(0.1)
    raise AssertionError(f"{name} was not downloaded")


def test_model_panel_shows_whatever_the_file_records(served, browser):
    # calibration and evaluation of any shape (dicts of any keys), unknown keys, and a missing training
    from selenium.webdriver.common.by import By
    d = browser
    d.get(f"http://127.0.0.1:{served['port']}/")
    wait(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    described = d.execute_script("return model")
    info = {k: v for k, v in described["info"].items() if k != "training"}
    info.update(calibration={"site_dir": "clinic/xrays", "site_images": 314, "target_sensitivity": 0.95,
                             "new_key": [1, 2]},
                evaluation={"held-out": {"images": 522, "accuracy": 0.973, "auc": 0.9951, "brier": 0.02},
                            "clinic": {"dir": "clinic/test", "sensitivity": 0.99, "specificity": 0.61}},
                something_new={"a": None, "b": True})
    d.execute_script("renderModel(arguments[0])", dict(described, info=info))
    panel = d.find_element(By.ID, "model").text
    for text in ["clinic/xrays", "95.0%", "new key", "1, 2", "held-out", "97.3%", "0.9951", "brier", "clinic/test",
                 "61.0%", "something new", "yes", "MobileNet 0.25-128 pooled"]:
        assert text in panel, text
    assert "TRAINING" not in panel.upper()
    d.execute_script("renderModel(arguments[0])", dict(described, info={"evaluation": [0.9, "x"]}))
    assert "0.9, x" in d.find_element(By.ID, "model").text


def test_many_files_go_in_several_requests_and_keep_their_order(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    d = browser
    d.get(f"http://127.0.0.1:{served['port']}/")
    wait(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    names = []
    for k, src in enumerate(sorted((CHEST / "NORMAL").glob("*.jpeg"))[:6]):
        names.append(f"{5 - k}-{src.name}")  # upload order is not name order
        shutil.copyfile(src, tmp_path / names[-1])
    d.find_element(By.ID, "files").send_keys("\n".join(str(tmp_path / n) for n in names))
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result:not(.pending)")) == 6)
    assert [e.text for e in d.find_elements(By.CSS_SELECTOR, "#results .name")] == names
    assert d.find_element(By.ID, "status").text.startswith("6 images in")
