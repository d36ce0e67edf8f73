"""The page end to end in headless Chromium: upload to rows, for 1 and for 20 original-size X-rays.

    python bench/serve.py runs/<run>/model.h5
    python bench/serve.py runs/<run>/model.h5 --counts "" --screenshots docs

Starts `python -m dsconv.serve MODEL --port 0` on 127.0.0.1, opens the page in
headless Chromium (Debian's chromium and chromium-driver; selenium from the
test extra), puts the files in the page's file input and times until their
rows are drawn, heatmaps included. The first upload is a warm-up; the median
of the timed runs is reported. --screenshots saves the page with four
results (a normal X-ray, a pneumonia, a borderline one, a PDF) at 1280 x 800
(page-desktop.png) and 390 x 844 (page-phone.png), and the viewer
(page-viewer.png).
"""
import argparse
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ORIGINALS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "originals"
COUNTS = "1,20"
REPEATS = 3
SCREENSHOT_FILES = ("NORMAL/IM-0117-0001.jpeg", "PNEUMONIA/person124_virus_237.jpeg",
                    "PNEUMONIA/person1066_bacteria_3000.jpeg")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,800", "--hide-scrollbars"]


def chromium(profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        sys.exit("error: needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def upload(d, paths):
    """Choose the files in the page; (seconds to the first row, to all rows, the page's own status line)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    d.find_element(By.ID, "clear").click()
    t = time.perf_counter()
    d.find_element(By.ID, "files").send_keys("\n".join(str(Path(p).resolve()) for p in paths))
    times = []
    for n in (1, len(paths)):
        WebDriverWait(d, 600, poll_frequency=0.01).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result:not(.pending)")) >= n)
        times.append(time.perf_counter() - t)
    return times[0], times[1], d.find_element(By.ID, "status").text


def screenshots(d, originals, out, scratch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    pdf = scratch / "referral.pdf"
    pdf.write_bytes(b"%PDF-1.4\n")  # what a person may drop by mistake: its row says so
    url = d.current_url
    for name, width, height in (("page-phone.png", 390, 844), ("page-desktop.png", 1280, 800)):
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                          {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 760})
        d.get(url)  # loaded at this size, as a phone would
        WebDriverWait(d, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        upload(d, [originals / f for f in SCREENSHOT_FILES] + [pdf])
        if width < 760:  # a phone: the results, below the controls
            d.execute_script("document.getElementById('tally').scrollIntoView()")
        time.sleep(0.3)
        d.save_screenshot(str(out / name))
        print(f"wrote {out / name}")
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    d.find_elements(By.CSS_SELECTOR, "#results .thumb")[1].click()
    WebDriverWait(d, 120).until(lambda d: d.find_element(By.ID, "viewer").is_displayed() and
                                d.find_element(By.ID, "viewer-note").text == "")
    time.sleep(0.3)
    d.save_screenshot(str(out / "page-viewer.png"))
    print(f"wrote {out / 'page-viewer.png'}")


def sizes(paths):
    from PIL import Image
    return [Image.open(p).size[0] for p in paths]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="classifier file written by `python -m dsconv.train` (model.h5)")
    p.add_argument("--originals", default=str(ORIGINALS), help="folder of original-size X-rays")
    p.add_argument("--counts", default=COUNTS, help="comma-separated numbers of X-rays per upload")
    p.add_argument("--repeats", type=int, default=REPEATS, help="timed uploads per count (median reported)")
    p.add_argument("--screenshots", metavar="DIR", help="also save the page at 1280 x 800 and 390 x 844 and the "
                                                        "viewer as PNGs in this folder")
    a = p.parse_args()
    files = sorted(Path(a.originals).rglob("*.jpeg"))
    server = subprocess.Popen([sys.executable, "-m", "dsconv.serve", a.model, "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = server.stdout.readline()
        url = re.search(r"http://\S+/", line)
        if not url:
            sys.exit(f"error: the server did not start: {line}")
        with tempfile.TemporaryDirectory() as profile:
            d = chromium(profile)
            try:
                d.get(url.group(0))
                upload(d, files[:1])  # warm-up
                for n in [int(c) for c in a.counts.split(",") if c]:
                    chosen = files[::max(1, len(files) // n)][:n]
                    runs = [upload(d, chosen) for _ in range(a.repeats)]
                    print(f"{n:3d} X-ray(s) ({min(sizes(chosen))}-{max(sizes(chosen))} pixels wide): first row "
                          f"{statistics.median(r[0] for r in runs):.2f} s, all rows "
                          f"{statistics.median(r[1] for r in runs):.2f} s after choosing the files "
                          f"(median of {a.repeats}; the page says: {runs[-1][2]})")
                if a.screenshots:
                    screenshots(d, Path(a.originals), Path(a.screenshots), Path(profile))
            finally:
                d.quit()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
