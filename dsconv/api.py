"""The page's JSON API apart from HTTP (dsconv.serve): what a request asks, and the answer for its uploads.

An upload is parsed out of its multipart/form-data body, written to the
request's private folder, diagnosed (probability, heatmap, X-ray check,
form) and deleted as soon as it is read; the answer is one result per
upload, or for an unreadable file what is wrong with it in plain words.
"""
import base64
import io
import urllib.parse
from email.message import Message
from email.parser import HeaderParser
from http import HTTPStatus
from pathlib import Path

from PIL import Image

from dsconv import DsconvError, predict, weights

PREVIEW = 800           # longest side of the images sent back to the page, pixels
FULL_SIZE = 8192        # ?size=full: the X-ray's own size, up to this
ACCEPTED = "JPEG, PNG, BMP, GIF, TIFF, WebP or DICOM (.dcm)"
NO_FILE = "no file: send one or more images as multipart/form-data fields named `file`"


class RequestError(Exception):
    """A request the server refuses: HTTP status and a message for the user."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def describe(model, path):
    """The model's description for the page: what it is, its threshold, and everything its file records."""
    return {"file": Path(path).name, "variant": model.variant, "classes": list(model.classes),
            "positive": model.positive, "threshold": model.threshold, "info": model.head.info,
            "sha256": weights.sha256(path), "threshold_source": predict.threshold_source(model),
            "borderline": predict.borderline_band(model), "accepted": ACCEPTED}


def query_options(path):
    """(images wanted, their longest side in pixels) from /api/predict?images=0&size=N (or size=full)."""
    query = urllib.parse.parse_qs(path.partition("?")[2])
    images = query.get("images", ["1"])[-1]
    if images not in ("0", "1"):
        raise RequestError(HTTPStatus.BAD_REQUEST, "images= takes 0 (leave the images out) or 1")
    size = query.get("size", [str(PREVIEW)])[-1]
    if size == "full":
        return images == "1", FULL_SIZE
    if not size.isdigit() or not 64 <= int(size) <= FULL_SIZE:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"size= takes a number of pixels from 64 to {FULL_SIZE}, "
                                                   "or full")
    return images == "1", int(size)


def plain_error(name, content, error):
    """What went wrong with an upload, in one sentence a person understands, and what is accepted."""
    head = content[:1024].lstrip()
    if not content:
        what = "an empty file (0 bytes)"
    elif head.startswith(b"%PDF"):
        what = "a PDF, not an image"
    elif Path(name).suffix.lower() in (".dcm", ".dicom") and content[128:132] != b"DICM":
        what = "not a DICOM file, although its name ends in " + Path(name).suffix.lower()
    elif Path(name).suffix.lower() in (".dcm", ".dicom") or content[128:132] == b"DICM":
        what = "a DICOM file whose image cannot be read (damaged, or compressed in a way not supported here)"
    elif head[:1] in (b"<", b"{", b"[") or head[:5].lower() == b"<?xml":
        what = "a text document, not an image"
    elif Path(name).suffix.lower() in predict.IMAGE_SUFFIXES:
        what = "not a readable image: damaged, cut short, or not the kind its name says"
    else:
        what = "not an image this page can read"
    return f"{name}: {what}; accepted: {ACCEPTED}."


def parse_multipart(content_type, body):
    """[(filename, bytes)] of the `file` fields of a multipart/form-data body; RequestError if malformed."""
    header = Message()
    header["content-type"] = content_type or ""
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not boundary:
        raise RequestError(HTTPStatus.BAD_REQUEST, "send the images as multipart/form-data, one `file` "
                                                   "field per image (curl -F file=@xray.jpeg ...)")
    sections = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(sections) < 2 or not sections[-1].startswith(b"--"):
        raise RequestError(HTTPStatus.BAD_REQUEST, "malformed multipart/form-data body (no closing boundary)")
    files = []
    for section in sections[1:-1]:
        head, sep, content = section.partition(b"\r\n\r\n")
        if not sep:
            raise RequestError(HTTPStatus.BAD_REQUEST, "malformed multipart/form-data body (a part has no headers)")
        # the rest of the boundary line (transport padding) comes before the part's headers
        part = HeaderParser().parsestr(head.partition(b"\r\n")[2].decode("utf-8", "replace"))
        if part.get_param("name", header="content-disposition") != "file":
            continue
        name = Path((part.get_filename() or "").replace("\\", "/")).name
        if name or content:  # a browser sends an empty, nameless part when no file was chosen
            files.append((name or f"file{len(files) + 1}", content))
    return files


def predict_files(model, uploads, lock, workdir, size=PREVIEW, send_images=True):
    """One result per upload, in order: {name, probability, label, threshold, borderline, warning, heatmap,
    image, and predict.RECORD} or {name, error, detail}.

    The files are written into ``workdir`` (private, emptied by the caller);
    the network runs under ``lock``, one request at a time. The images are
    at most ``size`` pixels a side, or left out.
    """
    paths = []
    for i, (name, content) in enumerate(uploads):
        suffix = Path(name).suffix.lower()
        path = Path(workdir) / f"{i:04d}{suffix if suffix in predict.IMAGE_SUFFIXES else ''}"
        path.write_bytes(content)
        paths.append(path)
    done = []
    with lock:
        # without images the X-ray is still decoded for the overlay: small, so that it costs little
        done = []
        for path in paths:
            done.append(_diagnose(model, path, size if send_images else 64))
            path.unlink()  # read: the patient image leaves the disk now, not when the request ends
    rows = predict.stamp([{"path": io.BytesIO(content), "probability": None if row["p"] is None else
                           model.positive_probability(row["p"])} for (_, content), row in zip(uploads, done)], model)
    results = []
    for (name, content), path, row, record in zip(uploads, paths, done, rows):
        if row["p"] is None:
            results.append({"name": name, "error": plain_error(name, content, row["error"]),
                            "detail": str(row["error"]).replace(str(path), name)})
            continue
        result = {"name": name, "probability": record["probability"],
                  "label": None if row["warning"] else model.decide(row["p"]),
                  "threshold": model.threshold, "warning": row["warning"], "form_warning": row["form_warning"],
                  "probabilities": {c: float(v) for c, v in zip(model.classes, row["p"])}}
        subtype = model.subtype(row["p"])
        if subtype:  # what the positive class would be, whatever the threshold: the page's slider moves it
            result["subtype"] = {"class": subtype[0], "probability": subtype[1], "of": model.positive,
                                 "threshold": model.subtypes["threshold"]}
        result.update({k: record[k] for k in predict.RECORD})
        if send_images:
            heat, original = row["heatmap"], row["image"]
            original = original.resize(heat.size, Image.BILINEAR)  # the page swaps one for the other
            result.update(heatmap=_data_url(heat, "PNG"), image=_data_url(original, "JPEG"))
        results.append(result)
    return results


def _diagnose(model, path, size):
    """{p: probabilities, heatmap, image: the X-ray, warning} of one upload, from one forward pass; or {p: None, error}."""
    try:
        p, heat, original, warning = model.diagnose(path, size, with_warning=True)
    except (DsconvError, OSError) as e:
        return {"p": None, "error": e}
    return {"p": p, "heatmap": heat, "image": original, "warning": warning, "form_warning": model.form_warning(path)}


def _data_url(im, fmt):
    buf = io.BytesIO()
    im.save(buf, fmt, **({"compress_level": 1} if fmt == "PNG" else {"quality": 85}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
