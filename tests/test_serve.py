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
from dsconv import api, predict, serve
from tests import dicomfiles
from tests.conftest import CHEST, ORIGINALS, REPO, copy_xrays, train_small

pytestmark = pytest.mark.slow  # each test hangs off a model trained for the module, or trains one

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
        site = root / "site"  # a "site sample": the threshold, its figures and the borderline band come from it
        for cls in ("NORMAL", "PNEUMONIA"):
            (site / cls).mkdir(parents=True)
            for src in sorted((ORIGINALS / cls).glob("*.jpeg"))[-8:]:
                shutil.copyfile(src, site / cls / src.name)
        path = train_small(data, root / "run", root / "train-cache", 100, "--val-dir", str(site))
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


def cli_rows(model, folder, fmt="json"):
    """What `python -m dsconv.predict --format json` (or csv) says of the files in folder, by file name."""
    out = io.StringIO()
    with pytest.raises(SystemExit), pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", out)
        predict.main([str(model), *sorted(map(str, folder.iterdir())), "--format", fmt, "--no-cache"])
    rows = json.loads(out.getvalue()) if fmt == "json" else list(csv.DictReader(io.StringIO(out.getvalue())))
    return {r["path"].rsplit("/", 1)[-1]: r for r in rows}


def shown(p):
    """A probability as the page writes it: never 0.000 or 1.000."""
    return "< 0.001" if p < 0.0005 else "> 0.999" if p >= 0.9995 else f"{p:.3f}"


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
    assert set(results[2]) == {"name", "error", "detail"} and str(tempfile.gettempdir()) not in results[2]["detail"]
    folder = tmp_path / "same"
    folder.mkdir()
    for name, content in files:
        (folder / name).write_bytes(content)
    want = cli_rows(served["model"], folder)
    for r in results[:2]:
        assert r["probability"] == want[r["name"]]["probability"]  # exactly
        assert r["label"] == want[r["name"]]["decision"] and r["threshold"] == want[r["name"]]["threshold"]
        heat, image = decode_data_url(r["heatmap"], "png"), decode_data_url(r["image"], "jpeg")
        assert heat.mode == "RGB" and max(heat.size) <= api.PREVIEW and heat.size == image.size


def test_results_carry_what_a_filed_result_needs(served):
    status, _, body = post(served, xrays()[:1])
    r = body["results"][0]
    model = dsconv.load_model(served["model"])
    assert r["model_sha256"] == dsconv.weights.sha256(served["model"]) and r["warning"] == ""
    assert r["threshold_source"].startswith("max accuracy on validation (out-of-fold scores of 16 images of site")
    band = model.head.info["borderline"]["band"]
    assert r["borderline"] == (band[0] <= r["probability"] <= band[1]) and band[0] <= model.threshold <= band[1]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", r["date_time"])
    site = model.head.info["site_evaluation"]
    assert site["images"] == 16 and site["scores"].startswith("out-of-fold") and len(site["ci95"]["specificity"]) == 2


def test_images_left_out_or_at_full_size(served):
    files = xrays()[1:2]
    width = Image.open(io.BytesIO(files[0][1])).size[0]
    _, _, light = request(served, "POST", "/api/predict?images=0", *multipart_args(files))
    _, _, full = request(served, "POST", "/api/predict?size=full", *multipart_args(files))
    a, b = light["results"][0], full["results"][0]
    assert "image" not in a and "heatmap" not in a and a["probability"] == b["probability"]
    assert width > api.PREVIEW and decode_data_url(b["image"], "jpeg").size[0] == width
    assert decode_data_url(b["heatmap"], "png").size[0] == width
    for query in ("images=no", "size=12", "size=big"):
        status, _, body = request(served, "POST", "/api/predict?" + query, *multipart_args(files))
        assert status == 400 and "=" in body["error"]


def multipart_args(files):
    body, ctype = multipart(files)
    return body, {"Content-Type": ctype}


def test_errors_in_plain_words(served):
    files = [("empty.png", b""), ("scan.pdf", b"%PDF-1.4\n1 0 obj"), ("x.dcm", b"\xff\xd8 a jpeg named dcm"),
             ("page.jpeg", b"<html><body>login</body></html>"), ("broken.jpeg", b"\xff\xd8 not a jpeg")]
    status, _, body = post(served, files)
    said = {r["name"]: r["error"] for r in body["results"]}
    assert status == 200 and set(said) == {n for n, _ in files}
    for name, words in [("empty.png", "an empty file"), ("scan.pdf", "a PDF, not an image"),
                        ("x.dcm", "not a DICOM file"), ("page.jpeg", "a text document, not an image"),
                        ("broken.jpeg", "not a readable image")]:
        assert said[name].startswith(f"{name}: {words}") and "accepted: JPEG, PNG" in said[name], said[name]
        assert "BytesIO" not in said[name] and "0x" not in said[name]
    assert all("detail" in r for r in body["results"])


def test_dicom_identifiers(served, tmp_path):
    gray = np.asarray(Image.open(io.BytesIO(xrays()[0][1])).convert("L"))
    dicomfiles.write(tmp_path / "x.dcm", gray, window=(128, 256),
                     ids={"PatientID": "P-0042", "StudyDate": "20260102", "AccessionNumber": "ACC77"})
    _, _, body = post(served, [("x.dcm", (tmp_path / "x.dcm").read_bytes()), xrays()[0]])
    a, b = body["results"]
    assert (a["patient_id"], a["study_date"], a["accession_number"]) == ("P-0042", "20260102", "ACC77")
    assert (b["patient_id"], b["study_date"], b["accession_number"]) == ("", "", "")
    rows = cli_rows(served["model"], tmp_path, "csv")
    assert rows["x.dcm"]["patient_id"] == "P-0042" and rows["x.dcm"]["model_sha256"] == a["model_sha256"]
    assert rows["x.dcm"]["threshold_source"] == a["threshold_source"] and rows["x.dcm"]["borderline"] in ("True", "False")


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
    assert [ln for ln in err.splitlines() if ln.strip()][-1] == "note: stopped"
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


def open_page(d, port):
    from selenium.webdriver.common.by import By
    d.get(f"http://127.0.0.1:{port}/")
    wait(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")


def choose(d, paths, count=None):
    """Put the files in the page's file input; wait for their rows."""
    from selenium.webdriver.common.by import By
    before = len(d.find_elements(By.CSS_SELECTOR, "#results .result"))
    d.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result:not(.pending)")) == before + len(paths))
    return d.find_elements(By.CSS_SELECTOR, "#results .result")


def opened(d, element):
    """Open every <details> inside element, so that its text is read."""
    d.execute_script("arguments[0].querySelectorAll('details').forEach((e) => { e.open = true; })", element)
    return element.text


def test_page(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    d = browser
    open_page(d, served["port"])
    files = xrays()
    files[2] = ("=1+2 broken.jpeg", files[2][1])  # a spreadsheet formula, if the CSV let it through
    for name, content in files:
        (tmp_path / name).write_bytes(content)
    rows = choose(d, [tmp_path / n for n, _ in files])
    assert [r.find_element(By.CLASS_NAME, "name").text for r in rows] == [n for n, _ in files]
    assert "error" in rows[2].get_attribute("class") and "not a readable image" in rows[2].text
    want = cli_rows(served["model"], tmp_path)
    for r, (name, _) in zip(rows[:2], files):
        assert r.find_element(By.CLASS_NAME, "prob").text.startswith(shown(want[name]["probability"]))
        assert r.get_attribute("data-decision") == want[name]["decision"]
        assert r.get_attribute("data-state") == ("borderline" if want[name]["borderline"] else
                                                 "flagged" if want[name]["decision"] == "PNEUMONIA" else "clear")
        img = r.find_element(By.CSS_SELECTOR, "img.heatmap")
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        assert d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
    d.find_element(By.ID, "show-heatmap").click()
    assert len(d.find_elements(By.CSS_SELECTOR, "#results img.xray")) == 2
    assert not d.find_elements(By.CSS_SELECTOR, "#results img.heatmap")

    def decisions():
        return [e.get_attribute("data-decision") for e in d.find_elements(By.CSS_SELECTOR, "#results .result")[:2]]

    slider = d.find_element(By.ID, "threshold")
    slider.send_keys(Keys.HOME)  # threshold 0: everything is pneumonia
    assert decisions() == ["PNEUMONIA", "PNEUMONIA"] and d.find_element(By.ID, "threshold-value").text == "0.000"
    slider.send_keys(Keys.END)   # threshold 1: nothing is
    assert decisions() == ["NORMAL", "NORMAL"] and "the model's own is" in d.find_element(By.ID, "threshold-note").text

    d.find_element(By.ID, "csv").click()
    csv_file = driver_download(d, "dsconv-results.csv")
    table = list(csv.DictReader(io.StringIO(csv_file.read_text())))
    assert [r["name"] for r in table] == [n for n, _ in files[:2]] + ["'" + files[2][0]]
    assert table[2]["error"].startswith("'=1+2 broken.jpeg")
    assert [r["label"] for r in table] == ["NORMAL", "NORMAL", ""] and table[0]["threshold"] == "1"
    assert float(table[0]["probability"]) == want[files[0][0]]["probability"] and "broken" in table[2]["error"]
    cli = cli_rows(served["model"], tmp_path, "csv")[files[0][0]]
    for key in ("model_sha256", "threshold_source"):
        assert table[0][key] == cli[key] and table[2][key] == cli[key]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", table[0]["date_time"])

    d.find_element(By.ID, "reset").click()
    assert decisions() == [want[n]["decision"] for n, _ in files[:2]]


def driver_download(d, name, timeout=30):
    path = d.downloads / name
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and path.stat().st_size:
            return path
        time.sleep(0.1)
    raise AssertionError(f"{name} was not downloaded")


def test_model_panel_says_where_the_threshold_came_from(served, browser):
    from selenium.webdriver.common.by import By
    d = browser
    open_page(d, served["port"])
    info = dsconv.load_model(served["model"]).head.info
    site, band = info["site_evaluation"], info["borderline"]["band"]
    sentence = d.find_element(By.ID, "threshold-sentence").text
    assert f"{dsconv.load_model(served['model']).threshold:.3f}" in sentence
    assert f"on the site sample \u201csite\u201d: 16 X-rays of {site['patients']} patients" in sentence and "(out-of-fold)" in sentence
    ci = site["ci95"]["specificity"]
    assert f"specificity {100 * site['specificity']:.1f}% (95% CI {100 * ci[0]:.1f}–{100 * ci[1]:.1f}%)" in sentence
    assert f"measured on {info['forms']['site']}" in sentence and "16 originals" in info["forms"]["site"]
    assert f"P from {band[0]:.3f} to {band[1]:.3f}" in d.find_element(By.ID, "borderline-sentence").text
    # the in-folder figures and the raw fields are folded away until asked for
    panel = d.find_element(By.ID, "model")
    assert "test partition of --data" not in panel.text and "weight decay" not in panel.text
    text = opened(d, panel)
    assert "test partition of --data" in text and "weight decay" in text and "MobileNet 0.25-128 pooled" in text
    assert dsconv.weights.sha256(served["model"]) in text
    legend = d.find_element(By.ID, "legend").text
    assert "red pushed the score towards PNEUMONIA" in legend and "Not a lesion outline" in legend
    assert "cannot be compared between X-rays or patients" in legend  # open at 1280 px


def test_model_panel_shows_whatever_the_file_records(served, browser):
    # calibration and evaluation of any shape (dicts of any keys), unknown keys, and a missing training
    from selenium.webdriver.common.by import By
    d = browser
    open_page(d, served["port"])
    described = d.execute_script("return model")
    info = {k: v for k, v in described["info"].items() if k != "training"}
    info.update(calibration={"site_dir": "clinic/xrays", "site_images": 314, "target_sensitivity": 0.95,
                             "new_key": [1, 2]},
                evaluation={"held-out": {"images": 522, "accuracy": 0.973, "auc": 0.9951, "brier": 0.02},
                            "clinic": {"dir": "clinic/test", "sensitivity": 0.99, "specificity": 0.61}},
                something_new={"a": None, "b": True}, forms={"val_dir": "originals"})
    d.execute_script("renderModel(arguments[0])", dict(described, info=info))
    panel = opened(d, d.find_element(By.ID, "model"))
    for text in ["clinic/xrays", "95.0%", "new key", "1, 2", "held-out", "97.3%", "0.9951", "brier", "clinic/test",
                 "61.0%", "something new", "yes", "MobileNet 0.25-128 pooled", "measured on originals"]:
        assert text in panel, text
    assert "Training" not in [h.text.title() for h in d.find_elements(By.CSS_SELECTOR, "#model h3")]
    d.execute_script("renderModel(arguments[0])", dict(described, info={"evaluation": [0.9, "x"]}))
    assert "0.9, x" in opened(d, d.find_element(By.ID, "model"))


def test_borderline_is_not_a_confident_badge(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    d = browser
    open_page(d, served["port"])
    name, content = xrays()[1]
    (tmp_path / name).write_bytes(content)
    row, = choose(d, [tmp_path / name])
    p = cli_rows(served["model"], tmp_path)[name]["probability"]
    d.execute_script("setThreshold(arguments[0])", round(p, 3))  # the band moves with the threshold tried
    row = d.find_element(By.CSS_SELECTOR, "#results .result")
    assert row.get_attribute("data-state") == "borderline"
    assert row.find_element(By.CLASS_NAME, "badge").text == "BORDERLINE"
    assert "Too close to call" in row.text and "it would be" in row.text
    assert "0 of 1 flagged PNEUMONIA, 1 borderline, 0 not read" in d.find_element(By.ID, "tally").text
    d.execute_script("setThreshold(model.threshold)")


def noise_png(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)).save(path)
    return path


def test_warning_shown_in_place_of_the_badge(served, browser, tmp_path):
    # needs the "is this a chest X-ray?" check of issue 25 item 1 (the warning branch) merged
    from selenium.webdriver.common.by import By
    d = browser
    open_page(d, served["port"])
    row, = choose(d, [noise_png(tmp_path / "noise.png")])
    assert row.find_element(By.CLASS_NAME, "warning").text.startswith("Not read: ")
    assert not row.find_elements(By.CLASS_NAME, "badge") and row.get_attribute("data-state") == "notread"
    assert not row.find_element(By.CLASS_NAME, "prob").is_displayed()
    row.find_element(By.TAG_NAME, "summary").click()  # the probability on request
    assert row.find_element(By.CLASS_NAME, "prob").is_displayed()


def test_a_warning_result_is_drawn_without_a_badge(served, browser):
    # the page's half of the warning contract, on a result as the API gives it
    from selenium.webdriver.common.by import By
    d = browser
    open_page(d, served["port"])
    d.execute_script("rows.push({name: 'photo.jpeg', probability: 0.97, label: 'PNEUMONIA', threshold: model.threshold,"
                     " warning: 'does not look like a frontal chest X-ray'}); render()")
    row = d.find_element(By.CSS_SELECTOR, "#results .result")
    assert row.find_element(By.CLASS_NAME, "warning").text == "Not read: does not look like a frontal chest X-ray"
    assert not row.find_elements(By.CLASS_NAME, "badge") and not row.find_element(By.CLASS_NAME, "prob").is_displayed()
    row.find_element(By.TAG_NAME, "summary").click()
    assert row.find_element(By.CLASS_NAME, "prob").text.startswith("0.970")
    assert "1 not read" in d.find_element(By.ID, "tally").text


def test_errors_a_person_understands(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    d = browser
    open_page(d, served["port"])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "scan.pdf").write_bytes(b"%PDF-1.4\n")
    (tmp_path / "x.dcm").write_bytes(b"\xff\xd8 not dicom")
    (tmp_path / "huge.png").write_bytes(b"\0" * (MAX_MB * 2 ** 20 + 1))  # over the limit: skips itself only
    name, content = xrays()[0]
    (tmp_path / name).write_bytes(content)
    rows = choose(d, [tmp_path / n for n in ("empty.png", "scan.pdf", "x.dcm", "huge.png", name)])
    texts = [r.text for r in rows]
    assert texts[0].startswith("empty.png\nan empty file (0 bytes); accepted: JPEG, PNG")
    assert texts[1].startswith("scan.pdf\na PDF, not an image") and texts[2].startswith("x.dcm\nnot a DICOM file")
    assert texts[3].startswith(f"huge.png\n{MAX_MB + 0.0:.1f} MB, over the server's limit of {MAX_MB} MB")
    assert "BytesIO" not in "".join(texts)
    assert rows[4].get_attribute("data-state") in ("clear", "flagged", "borderline")
    status = d.find_element(By.ID, "status")
    assert "4 not scored" in status.text and "bad" in status.get_attribute("class")
    assert status.value_of_css_property("color") == "rgba(179, 38, 30, 1)"  # red
    assert "4 not read" in d.find_element(By.ID, "tally").text
    d.find_element(By.ID, "filter").send_keys("not read")
    visible = [r for r in d.find_elements(By.CSS_SELECTOR, "#results .result") if r.is_displayed()]
    assert len(visible) == 4
    d.find_element(By.ID, "filter").send_keys("all")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(served, weights_dir, tmp_path, port="0"):
    """`python -m dsconv.serve MODEL --port PORT` in a process; (process, its port) once it serves."""
    env = dict(os.environ, DSCONV_WEIGHTS=str(weights_dir), TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "dsconv.serve", str(served["model"]), "--port", str(port),
                             "--max-upload-mb", str(MAX_MB)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_on)
    line = proc.stdout.readline()
    assert "http://127.0.0.1:" in line, line + proc.stderr.read()
    return proc, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def stop(proc):
    """Ctrl-C; what the server wrote on stderr."""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def test_stopping_mid_request_is_no_500(served, weights_dir, tmp_path):
    # SIGTERM while a request is being scored: the interpreter shuts down under the request's thread
    proc, port = serve_command(served, weights_dir, tmp_path)
    answer = {}
    files = [(f"{k}-{n}", c) for k in range(6) for n, c in xrays()[:2]]  # twelve original-size X-rays

    def go():
        try:
            answer["status"] = request({"port": port}, "POST", "/api/predict", *multipart_args(files))[0]
        except (OSError, http.client.HTTPException) as e:
            answer["error"] = e

    sender = threading.Thread(target=go)
    sender.start()
    time.sleep(0.5)  # the body (a few MB on loopback) is in; twelve forward passes and heatmaps take longer
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    sender.join(60)
    assert answer.get("status") in (None, 503), answer
    assert "RuntimeError" not in err and "Traceback" not in err and " 500 " not in err, err
    assert err.strip().splitlines()[-1] == "note: stopped (SIGTERM)"


def test_a_request_the_shutdown_breaks_is_a_503_not_logged(served, capsys, monkeypatch):
    # what the shutdown does to a request under way (the test above, where it happens at random), made certain:
    # the interpreter refuses the heatmap's thread once the server is stopping
    def shut(*args, **kw):
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    server = served["server"]
    monkeypatch.setattr(server.model, "diagnose", shut)
    monkeypatch.setattr(server, "stopping", threading.Event())
    server.stopping.set()
    status, _, body = post(served, xrays()[:1])
    assert status == 503 and "stopping" in body["error"]
    assert "RuntimeError" not in capsys.readouterr().err
    server.stopping.clear()
    status, _, body = post(served, xrays()[:1])
    assert status == 500 and "RuntimeError" in capsys.readouterr().err  # while serving, a bug is still a bug


def test_banner_and_retry_when_the_server_is_gone(served, browser, weights_dir, tmp_path):
    from selenium.webdriver.common.by import By
    d = browser
    proc, port = serve_command(served, weights_dir, tmp_path)
    try:
        open_page(d, port)
        stop(proc)
        name, content = xrays()[0]
        (tmp_path / name).write_bytes(content)
        row, = choose(d, [tmp_path / name])
        banner = d.find_element(By.ID, "banner")
        assert banner.is_displayed() and "The server cannot be reached: 1 file was not scored" in banner.text
        assert "could not be reached" in row.text and "bad" in d.find_element(By.ID, "status").get_attribute("class")
        proc, _ = serve_command(served, weights_dir, tmp_path, port)  # back on the same port
        d.find_element(By.ID, "retry").click()
        wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#results .result").get_attribute("data-state")
             in ("clear", "flagged", "borderline"))
        assert not d.find_element(By.ID, "banner").is_displayed()
        assert len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 1
    finally:
        if proc.poll() is None:
            stop(proc)


def test_viewer_full_resolution_zoom_and_keyboard(served, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    d = browser
    open_page(d, served["port"])
    # the first stop of the keyboard is the drop zone, with a visible focus ring
    ActionChains(d).send_keys(Keys.TAB).perform()
    focused = d.switch_to.active_element
    assert focused.get_attribute("id") == "drop"
    assert focused.value_of_css_property("outline-style") == "solid"
    assert float(focused.value_of_css_property("outline-width").rstrip("px")) >= 2
    name, content = xrays()[1]
    (tmp_path / name).write_bytes(content)
    width, height = Image.open(io.BytesIO(content)).size
    choose(d, [tmp_path / name])
    for _ in range(30):  # Tab on to the thumbnail, then Enter opens the viewer
        ActionChains(d).send_keys(Keys.TAB).perform()
        if "thumb" in (d.switch_to.active_element.get_attribute("class") or ""):
            break
    assert "thumb" in d.switch_to.active_element.get_attribute("class")
    ActionChains(d).send_keys(Keys.ENTER).perform()
    viewer = d.find_element(By.ID, "viewer")
    wait(d, lambda d: viewer.is_displayed() and d.find_element(By.ID, "viewer-note").text == "" and
         d.execute_script("return document.querySelector('#pane-xray img').naturalWidth") == width)
    assert width > api.PREVIEW  # bigger than the thumbnails' images: the X-ray at its own size
    assert d.execute_script("return document.querySelector('#pane-heat img').naturalWidth") == width
    assert f"({width} x {height} pixels)" in d.find_element(By.ID, "zoom-level").text
    stage = d.find_element(By.ID, "stage")
    assert d.switch_to.active_element == stage
    fit = float(stage.get_attribute("data-zoom"))
    ActionChains(d).send_keys("+").send_keys("+").perform()
    assert float(stage.get_attribute("data-zoom")) == pytest.approx(fit * 1.5625, rel=1e-3)
    moved = d.execute_script("return document.querySelector('#pane-xray img').style.transform")
    ActionChains(d).send_keys(Keys.ARROW_LEFT).perform()
    assert d.execute_script("return document.querySelector('#pane-xray img').style.transform") != moved
    d.find_element(By.ID, "zoom-actual").click()
    assert float(stage.get_attribute("data-zoom")) == 1
    # overlay: the heatmap over the X-ray, its opacity on a slider
    d.find_element(By.ID, "viewer-mode").send_keys("heatmap over")
    assert not d.find_element(By.ID, "pane-heat").is_displayed()
    opacity = d.find_element(By.ID, "opacity")
    opacity.send_keys(Keys.HOME)
    assert d.execute_script("return document.querySelector('#pane-xray img.over').style.opacity") == "0"
    ActionChains(d).send_keys(Keys.ESCAPE).perform()
    assert not viewer.is_displayed()


def test_sort_filter_and_tally(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    d = browser
    open_page(d, served["port"])
    files = xrays()
    for name, content in files:
        (tmp_path / name).write_bytes(content)
    choose(d, [tmp_path / n for n, _ in files])
    want = cli_rows(served["model"], tmp_path)
    d.find_element(By.ID, "sort").send_keys("highest")
    names = [e.get_attribute("data-name") for e in d.find_elements(By.CSS_SELECTOR, "#results .result")]
    scored = sorted(files[:2], key=lambda f: -want[f[0]]["probability"])
    assert names == [n for n, _ in scored] + ["broken.jpeg"]
    states = [e.get_attribute("data-state") for e in d.find_elements(By.CSS_SELECTOR, "#results .result")]
    tally = d.find_element(By.ID, "tally").text
    assert tally.startswith(f"{states.count('flagged')} of 3 flagged PNEUMONIA, {states.count('borderline')} "
                            "borderline, 1 not read")
    d.find_element(By.ID, "filter").send_keys("flagged")
    shown_rows = [e for e in d.find_elements(By.CSS_SELECTOR, "#results .result") if e.is_displayed()]
    assert len(shown_rows) == states.count("flagged")
    d.find_element(By.ID, "filter").send_keys("all")
    d.find_element(By.ID, "sort").send_keys("as uploaded")


def test_printed_report(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    d = browser
    open_page(d, served["port"])
    name, content = xrays()[0]
    (tmp_path / name).write_bytes(content)
    row, = choose(d, [tmp_path / name])
    row.find_element(By.CLASS_NAME, "print").click()  # window.print(): the report of this X-ray is built first
    report = d.find_element(By.ID, "report")
    try:
        d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
        assert report.is_displayed() and not d.find_element(By.TAG_NAME, "main").is_displayed()
        assert not d.find_element(By.TAG_NAME, "header").is_displayed()
        text = report.text
        p = cli_rows(served["model"], tmp_path)[name]
        for words in [name, shown(p["probability"]), p["decision"], dsconv.weights.sha256(served["model"]),
                      "on the site sample", "Borderline band",
                      "not a diagnosis", "Not a lesion outline", "Scored"]:
            assert words in text, words
        assert len(report.find_elements(By.CLASS_NAME, "report-page")) == 1
        assert len(report.find_elements(By.TAG_NAME, "img")) == 2  # the X-ray and its heatmap
    finally:
        d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})
    assert not report.is_displayed()


def test_phone(served, browser, tmp_path):
    d = browser
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 1,
                                                              "mobile": True})
    try:
        open_page(d, served["port"])
        name, content = xrays()[0]
        (tmp_path / name).write_bytes(content)
        choose(d, [tmp_path / name])
        assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        small = d.execute_script("""return [...document.querySelectorAll(
            'main button, main select, main .button, #drop, main summary, main input[type=checkbox]')].filter((e) => e.offsetParent).map((e) => {
            const r = (e.closest('label') || e).getBoundingClientRect();
            return [e.id || e.className || e.tagName, r.width, r.height]; }).filter(([, w, h]) => w < 44 || h < 44)""")
        assert small == []
    finally:
        d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_dicom_identifiers_on_the_row_and_in_the_csv(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    d = browser
    open_page(d, served["port"])
    gray = np.asarray(Image.open(io.BytesIO(xrays()[0][1])).convert("L"))
    dicomfiles.write(tmp_path / "x.dcm", gray, window=(128, 256),
                     ids={"PatientID": "P-0042", "StudyDate": "20260102", "AccessionNumber": "ACC77"})
    row, = choose(d, [tmp_path / "x.dcm"])
    assert row.find_element(By.CLASS_NAME, "ids").text == "Patient ID P-0042 · Study date 2026-01-02 · Accession ACC77"
    (d.downloads / "dsconv-results.csv").unlink(missing_ok=True)  # test_page's
    d.find_element(By.ID, "csv").click()
    table = list(csv.DictReader(io.StringIO(driver_download(d, "dsconv-results.csv").read_text())))
    assert (table[0]["patient_id"], table[0]["study_date"], table[0]["accession_number"]) == \
        ("P-0042", "20260102", "ACC77")


def test_many_files_go_in_several_requests_and_keep_their_order(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    d = browser
    open_page(d, served["port"])
    names = []
    for k, src in enumerate(sorted((CHEST / "NORMAL").glob("*.jpeg"))[:6]):
        names.append(f"{5 - k}-{src.name}")  # upload order is not name order
        shutil.copyfile(src, tmp_path / names[-1])
    choose(d, [tmp_path / n for n in names])
    assert [e.text for e in d.find_elements(By.CSS_SELECTOR, "#results .name")] == names
    assert d.find_element(By.ID, "status").text.startswith("6 images in")
