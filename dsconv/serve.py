"""A page for the clinic: drop X-rays on it, read P(pneumonia) and the heatmaps.

    python -m dsconv.serve runs/.../model.h5 [--host 127.0.0.1] [--port 8000]

Loads the model once and serves, with the standard library only:

    GET  /              the page (dsconv/static/index.html: nothing from the internet)
    GET  /api/health    {"status": "ok"}
    GET  /api/model     the model's description (variant, threshold, what it was trained on)
    POST /api/predict   multipart/form-data, one or more `file` fields ->
                        {"results": [{"name", "probability", "label", "threshold", "borderline",
                        "warning", "probabilities": {class: p}, "subtype" (a model with subtypes:
                        {"class", "probability": P(class | positive), "of", "threshold"}),
                        "heatmap": "data:image/png;base64,...", "image": ...,
                        "date_time", "model_sha256", "threshold_source", "patient_id",
                        "study_date", "accession_number"}, ...]}
                        in upload order; an unreadable file gets {"name", "error", "detail"}.
                        ?images=0 leaves the images out; ?size=N sends them at most N
                        pixels a side (default 800), ?size=full at the X-ray's own size

"warning" is "" or why the file does not look like a chest X-ray (as
predict's `warning`); with a warning, "label" is null: no decision.
"form_warning" is "" or why the file's form (DICOM, an original, a low JPEG
quality) lies outside those the model was trained and calibrated on (as
predict's `form_warning`); the decision stands.

No file is a 400, a body over --max-upload-mb a 413; every error is JSON.
Probabilities are those of `python -m dsconv.predict` for the same files.

These are patient images: each upload is written to a private temporary
folder (mode 0700, named with the server's pid so that the next start removes
it if the server was killed) and deleted as soon as it is read; no bottleneck
is cached, and the log holds methods, known routes, statuses and timings,
never a file name or a request line as sent. It listens on
127.0.0.1 only, unless --host says otherwise.
"""
import argparse
import io
import ipaddress
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from dsconv import DsconvError, HelpFormatter, api, fail, files, images, note, warn
from dsconv.model import load_model

HOST = "127.0.0.1"
PORT = 8000
MAX_UPLOAD_MB = 50
MAX_UPLOAD_LIMIT_MB = 4096  # a request body is held in memory
DRAIN_LIMIT = 1 << 30   # read and drop at most this much of a refused body, so the client sees the 413
STATIC = Path(__file__).resolve().parent / "static"
# The only files ever served: a fixed table, never a path taken from the request.
PAGES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/index.html": ("index.html", "text/html; charset=utf-8")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src data: blob:; connect-src 'self' blob:; form-action 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ROUTES = set(PAGES) | {"/api/health", "/api/model", "/api/predict"}  # the paths the log may name


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # answer even a garbled request line with a status line and headers
    server_version = "dsconv"
    timeout = 120  # an idle or stalled connection gives its thread back

    def do_GET(self):
        self._answer(self._get)

    def do_HEAD(self):
        self._answer(self._get, body=False)

    def do_POST(self):
        self._answer(self._post)

    def _answer(self, work, body=True):
        try:
            status, content_type, payload = work()
        except api.RequestError as e:
            status, content_type, payload = e.status, "application/json", {"error": str(e)}
        except Exception as e:  # a bug or an unforeseen input must not take the server down
            if self.server.stopping.is_set():  # the interpreter is shutting down under this request
                status, content_type = HTTPStatus.SERVICE_UNAVAILABLE, "application/json"
                payload = {"error": "the server is stopping; send the images again once it is back"}
                self.close_connection = True
            else:
                self.log_error("internal error (%s)", type(e).__name__)  # its text could hold an upload's name
                status, content_type = HTTPStatus.INTERNAL_SERVER_ERROR, "application/json"
                payload = {"error": f"internal error ({type(e).__name__}: {e})"}
        if self.server.stopping.is_set():
            self.close_connection = True  # no connection outlives a stopped server
        data = payload if isinstance(payload, bytes) else json.dumps(payload, default=str).encode()
        headers = getattr(self, "headers", None) or {}  # none yet when the request line itself is refused
        if self.command == "POST" or "Content-Length" in headers or "Transfer-Encoding" in headers:
            # bytes beyond a wrong Content-Length must never be read as the next request
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _get(self):
        path = self.path.split("?", 1)[0]
        if path == "/api/health":
            return HTTPStatus.OK, "application/json", {"status": "ok"}
        if path == "/api/model":
            return HTTPStatus.OK, "application/json", dict(self.server.description,
                                                           max_upload_mb=self.server.max_upload / 2 ** 20)
        if path in PAGES:
            return HTTPStatus.OK, PAGES[path][1], self.server.pages[PAGES[path][0]]
        if path == "/api/predict":
            raise api.RequestError(HTTPStatus.METHOD_NOT_ALLOWED, "POST the images to /api/predict")
        raise api.RequestError(HTTPStatus.NOT_FOUND, f"nothing at {path[:200]}")

    def _post(self):
        if self.path.split("?", 1)[0] != "/api/predict":
            self._refuse_body()
            raise api.RequestError(HTTPStatus.NOT_FOUND, f"nothing to POST to at {self.path[:200]}; use /api/predict")
        length = self._length()
        if length > self.server.max_upload:
            self._refuse_body()
            raise api.RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the upload is {length / 2 ** 20:.1f} MB, over the server's limit of "
                               f"{self.server.max_upload / 2 ** 20:g} MB (--max-upload-mb); send fewer images at once")
        if length == 0:
            raise api.RequestError(HTTPStatus.BAD_REQUEST, api.NO_FILE)
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise api.RequestError(HTTPStatus.BAD_REQUEST, "the upload ended early")
        uploads = api.parse_multipart(self.headers.get("Content-Type"), body)
        del body
        if not uploads:
            raise api.RequestError(HTTPStatus.BAD_REQUEST, api.NO_FILE)
        send_images, size = api.query_options(self.path)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="request-", dir=self.server.workdir) as workdir:
            results = api.predict_files(self.server.model, uploads, self.server.lock, workdir, size, send_images)
        self.log_message("%d image(s) in %.2f s", len(uploads), time.perf_counter() - t)
        return HTTPStatus.OK, "application/json", {"results": results}

    def _length(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise api.RequestError(HTTPStatus.LENGTH_REQUIRED, "send the upload with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length", "0"))  # none: no body
        except ValueError:
            self.close_connection = True
            raise api.RequestError(HTTPStatus.BAD_REQUEST, "the upload needs a valid Content-Length") from None
        if length < 0:
            self.close_connection = True
            raise api.RequestError(HTTPStatus.BAD_REQUEST, "negative Content-Length")
        return length

    def _refuse_body(self):
        """Drop a body we will not use, so that the client reads our answer, then close."""
        self.close_connection = True
        try:
            left = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        if self.headers.get("Expect", "").lower() == "100-continue" or left > DRAIN_LIMIT:
            return  # the client waits for us (Expect) or would take too long to drain
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)

    def handle_expect_100(self):
        # curl asks first for large bodies: refuse an oversize upload before it is sent
        try:
            if int(self.headers.get("Content-Length", "0")) > self.server.max_upload:
                return True  # do_POST answers 413 without reading the body
        except ValueError:
            pass
        return super().handle_expect_100()

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusals (a malformed request line, an unknown method) in JSON too
        self.close_connection = True
        self._answer(lambda: (code, "application/json", {"error": message or HTTPStatus(code).phrase}),
                     body=getattr(self, "command", None) != "HEAD" and code >= 200 and code not in (204, 304))

    def log_request(self, code="-", size="-"):
        # the method and route only, never the request line as sent: a broken or hostile client
        # can put a file name or file bytes there
        method = self.command if self.command in ("GET", "HEAD", "POST") else "(other method)"
        path = (getattr(self, "path", None) or "").split("?", 1)[0]
        self.log_message("%s %s %s", method, path if path in ROUTES else "(other path)", code)

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.log_date_time_string()} {self.address_string()} {format % args}\n")


class Server(ThreadingHTTPServer):
    """The HTTP server holding one model, the lock its network runs under, and the private upload folder."""
    daemon_threads = True

    def __init__(self, model, model_path, host=HOST, port=PORT, max_upload_mb=MAX_UPLOAD_MB):
        self.model, self.lock = model, threading.Lock()
        self.stopping = threading.Event()  # set once the server is being stopped: requests cut short get a 503
        self.description = api.describe(model, model_path)
        self.max_upload = int(max_upload_mb * 2 ** 20)
        self.pages = {name: (STATIC / name).read_bytes() for name, _ in PAGES.values()}
        # every request's folder lives in here; removed whole when the server stops
        remove_leftovers()
        self._workdir = tempfile.TemporaryDirectory(prefix=f"dsconv-serve-{os.getpid()}-")
        self.workdir = self._workdir.name
        super().__init__((host, port), Handler)

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}/"

    def handle_error(self, request, client_address):
        # a client that went away mid-answer: one line, not a traceback
        e = sys.exc_info()[1]
        warn(f"connection from {client_address[0]} failed ({type(e).__name__}: {e})")

    def server_close(self):
        self.stopping.set()
        super().server_close()
        self._workdir.cleanup()


def remove_leftovers():
    """Delete the upload folders of servers that were killed (kill -9, out of memory) and so could not."""
    for folder in Path(tempfile.gettempdir()).glob("dsconv-serve-*-*"):
        pid = folder.name.split("-")[2]
        if pid.isdigit() and folder.is_dir() and not folder.is_symlink() and folder.stat().st_uid == os.getuid() \
                and not files.alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def warm_up(model, lock, workdir):
    """One gray image through the whole request path, so that the first real one does not compile kernels."""
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(buf, "PNG")
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        api.predict_files(model, [("warm-up.png", buf.getvalue())], lock, d)


def exposed(host):
    """True if the address is reachable from other machines (not a loopback address)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _stopped(*_):
    note("stopped (SIGTERM)")
    sys.exit(0)  # SIGTERM, like Ctrl-C, is how a server is meant to stop


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dsconv.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("model", help="classifier file written by `python -m dsconv.train` (model.h5)")
    p.add_argument("--host", default=HOST, help="address to listen on; anything but a loopback address "
                                                "exposes patient uploads to the network")
    p.add_argument("--port", type=int, default=PORT, help="port to listen on (0: any free port)")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                   help="largest upload accepted, all files of one request together, in MB")
    images.add_max_pixels(p)
    args = p.parse_args(argv)
    if args.max_pixels < 1:
        p.error("--max-pixels must be positive")
    images.set_max_pixels(args.max_pixels)
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port}: a port is from 1 to 65535 (0: any free port)")
    if not (math.isfinite(args.max_upload_mb) and 0 < args.max_upload_mb <= MAX_UPLOAD_LIMIT_MB):
        p.error(f"--max-upload-mb {args.max_upload_mb}: give a number of MB above 0 and at most {MAX_UPLOAD_LIMIT_MB}")
    signal.signal(signal.SIGTERM, _stopped)
    server = None
    try:
        model = load_model(args.model, cache_dir=False)
        try:
            server = Server(model, args.model, args.host, args.port, args.max_upload_mb)
        except OSError as e:
            raise OSError(f"cannot listen on {args.host} port {args.port} ({e.strerror or e}); "
                          "choose another --port or --host") from None
        if exposed(args.host):
            warn(f"listening on {args.host}, not on this machine only: anyone who can reach it can upload images "
                 "and read the results")
        warm_up(model, server.lock, server.workdir)
        print(f"dsconv: serving MobileNet {model.variant} ({args.model}) at {server.url}  (Ctrl-C to stop)",
              flush=True)
        server.serve_forever()
    except (DsconvError, OSError) as e:
        fail(e)
    except KeyboardInterrupt:
        if server is not None:
            server.stopping.set()
        print(file=sys.stderr)
        note("stopped")
    finally:
        if server is not None:
            server.server_close()


if __name__ == "__main__":
    main()
