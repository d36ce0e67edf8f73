"""Diagnose new X-rays with a trained model: probability, decision, heatmap.

    python -m dsconv.predict runs/.../model.h5 ../shared/data/originals --heatmap heatmaps/

PATH is an image, a folder (walked recursively for image files) or a list
file (.txt: one path a line, relative to the list file). Each image gets
P(positive class), the decision at the model's threshold (--threshold
overrides) and the network variant; CSV and JSON rows also carry p_<CLASS>,
each of the model's classes' probability. A model with subtypes (train
--subtypes) decides NORMAL, BACTERIAL or VIRAL (dsconv.subtypes), its
probability still P(pneumonia). An image that does not look like a
frontal chest X-ray (dsconv.xraycheck: a photo, a document, noise, another
kind of scan) gets a warning instead of a decision: its row keeps the
probability, its decision is empty and its `warning` says why (warnings of
several checks are joined by "; "); the exit status does not change for
it. An image in a form the model was neither trained nor calibrated on (a
DICOM file, an original for a model of 224 copies, a JPEG quality below any
it saw: dsconv.forms) keeps its decision and gets a `form_warning`. An unreadable image is reported on its
own row and the rest go on; the exit status is 1 if any image failed, 2 if
nothing could be done (a missing or damaged model file, no images), 3 if the
output could not be written (dsconv's table of exit statuses). Ctrl-C
writes the rows done so far, the others marked "interrupted", and exits 130.

In Python: dsconv.load_model (dsconv.model).
"""
import argparse
import csv
import io
import json
import os
import sys
from datetime import datetime
from pathlib import Path

import dsconv
from dsconv import (NOT_WRITTEN, PARTIAL, DsconvError, HelpFormatter, bottlenecks, cam, dicom, fail, files, images,
                    note, warn, weights)
from dsconv.model import load_model

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}
MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\0", b"MM\0*")  # JPEG (and .jfif), PNG, GIF, BMP, TIFF
LIST_SUFFIXES = {".txt", ".lst", ".list"}
FORMATS = ("table", "csv", "json")
CHUNK = 64  # images per step of rows_for: what Ctrl-C can lose
INTERRUPTED = "interrupted before this image"
FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what starts a formula in a spreadsheet cell
# what a filed result needs besides the decision: the last columns of the CSV
RECORD = ["borderline", "date_time", "model_sha256", "threshold_source", *dicom.IDENTIFIERS]
# half-width of the borderline band of a model file that records none (train records where its threshold
# would fall on resamples of the validation patients)
BORDERLINE = 0.05


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in rows_for; ``rows`` has every path, those not done marked INTERRUPTED."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows


def collect(paths):
    """Image paths from files, folders (recursive) and list files, in order, without repeats."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += _folder_images(p)
        elif p.suffix.lower() in LIST_SUFFIXES and p.is_file():
            lines = [ln.strip() for ln in p.read_text().splitlines()]
            out += [p.parent / ln for ln in lines if ln and not ln.startswith("#")]
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def _folder_images(folder):
    """The images under a folder, recognised by name or by content; broken links too, so that their rows say so.

    A subfolder that cannot be listed is named in a warning.
    """
    found = []

    def unlisted(e):
        warn(f"{e.filename}: cannot list this folder ({e.strerror}); its images are not scored")
    for root, _, names in os.walk(folder, onerror=unlisted):
        for q in map(Path(root).joinpath, names):
            if q.is_symlink() and not q.exists():  # dangling, or a loop
                found.append(q)
            elif q.is_file() and (q.suffix.lower() in IMAGE_SUFFIXES or _image_content(q)):
                found.append(q)
    return sorted(found)


def _image_content(path):
    """True if the file starts as an image format dsconv reads does (DICOM: its marker at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return True  # its row says why it cannot be read
    return head.startswith(MAGIC) or head[8:12] == b"WEBP" or head[128:132] == b"DICM"


def unique_name(folder, path, used):
    name = Path(path).stem
    k = 1
    while name in used:
        k += 1
        name = f"{Path(path).stem}-{k}"
    used.add(name)
    return folder / f"{name}.png"


def rows_for(model, paths, heatmap_dir=None, progress=True):
    """One dict per path: path, probability, decision, threshold, variant, error (or None).

    Works through CHUNK images at a time; Ctrl-C raises Interrupted with
    the rows done so far and the others marked as not done.
    """
    rows, used = [], set()
    bar = bottlenecks.Progress(len(paths), "predict") if progress else None
    try:
        for i in range(0, len(paths), CHUNK):
            chunk = paths[i:i + CHUNK]
            if heatmap_dir:  # image by image: Ctrl-C keeps the row of every heatmap written
                for path in chunk:
                    rows.append(_row_with_heatmap(model, path, heatmap_dir, used))
            else:
                rows += _rows(model, chunk)
            if bar:
                bar.update(len(rows), final=len(rows) == len(paths))
    except KeyboardInterrupt:
        rows += [_row(model, p, INTERRUPTED) for p in paths[len(rows):]]
        raise Interrupted(rows) from None
    return rows


def _row(model, path, error=None):
    return {"path": str(path), "probability": None, "decision": None, "threshold": model.threshold,
            "variant": model.variant, "warning": "", "form_warning": "", "error": error}


def _rows(model, paths):
    feats, probs, failed = model.scored(paths)
    probs = iter(probs)
    warnings = iter(model.warnings_of([p for p in paths if p not in failed], feats))
    rows = []
    for path in paths:
        row = _row(model, path, failed.get(path))
        if row["error"] is None:
            _decided(model, row, next(probs), next(warnings))
        rows.append(row)
    return rows


def _decided(model, row, p, warning):
    """The row with its probabilities (P(positive) and p_<CLASS> of each of the head's classes), and its decision
    unless there is a warning; a form warning leaves it."""
    row["probability"], row["warning"] = model.positive_probability(p), warning
    row.update({f"p_{c}": float(v) for c, v in zip(model.classes, p)})
    row["form_warning"] = model.form_warning(row["path"])
    row["decision"] = None if warning else model.decide(p)
    return row


def _row_with_heatmap(model, path, heatmap_dir, used):
    """The row of one image and its heatmap from one forward pass (no bottleneck cache)."""
    row = _row(model, path)
    try:
        p, heat, _, warning = model.diagnose(path, with_warning=True)
    except (images.ImageError, OSError) as e:
        row["error"] = str(e) if isinstance(e, images.ImageError) else f"{path}: cannot be read ({e})"
        return row
    _decided(model, row, p, warning)
    try:
        out = unique_name(heatmap_dir, path, used)
        files.write_bytes(out, cam.png(heat))
        row["heatmap"] = str(out)
    except OSError as e:
        row["error"] = f"heatmap: {e}"
    return row


def threshold_source(model):
    """One line: what chose the model's threshold, on which images."""
    info = model.head.info
    if model.threshold != model.head.threshold:
        return f"given with --threshold (the model's own: {model.head.threshold:.3f})"
    calibration, site = info.get("calibration") or {}, info.get("site_evaluation") or {}
    if calibration.get("threshold_dir"):
        scores = str(site.get("scores", "")).split(" (")[0]
        where = (f"{scores} scores of " if scores else "") + \
            f"{calibration.get('threshold_images')} images of {Path(calibration['threshold_dir']).name}"
    else:
        n = ((info.get("training") or {}).get("sizes") or {}).get("val")
        where = "the validation partition of the training folder" + (f", {n} images" if n else "")
    return f"{info.get('threshold_rule', 'rule not recorded')} ({where})"


def borderline_band(model):
    """{low, high, rule, measured}: scores in [low, high] are borderline, too close to the threshold to call.

    The band train recorded around the model's threshold, moved with it if
    --threshold overrides it; else BORDERLINE either side.
    """
    recorded = (model.head.info.get("borderline") or {}).get("band")
    shift = model.threshold - model.head.threshold
    recorded = recorded if recorded and len(recorded) == 2 and all(isinstance(v, float) for v in recorded) else None
    if recorded:
        low, high = recorded[0] + shift, recorded[1] + shift
        rule = model.head.info["borderline"].get("rule", "recorded in the model file")
    else:
        low, high = model.threshold - BORDERLINE, model.threshold + BORDERLINE
        rule = f"{BORDERLINE:g} either side of the threshold, as the model file records no measured band"
    return {"low": max(0.0, low), "high": min(1.0, high), "rule": rule, "measured": bool(recorded)}


def stamp(rows, model, when=None):
    """Add RECORD to each row: borderline or not, date and time, the model file's sha256, the threshold's
    source, and DICOM identifiers.

    The identifiers (PatientID, StudyDate, AccessionNumber) of a DICOM file
    tell rows of different patients apart; other files get empty ones.
    """
    common = {"date_time": when or datetime.now().astimezone().isoformat(timespec="seconds"),
              "model_sha256": weights.sha256(model.path), "threshold_source": threshold_source(model)}
    band = borderline_band(model)
    for r in rows:
        p = r["probability"]
        r.update(borderline=None if p is None else band["low"] <= p <= band["high"], **common,
                 **dicom.identifiers(r["path"]))
    return rows


def render(rows, fmt, positive):
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    classes = dict.fromkeys(k for r in rows for k in r if k.startswith("p_"))
    keys = ["path", "probability", "decision", "threshold", "variant", *classes, "warning", "form_warning", "error"] + \
        (["heatmap"] if any("heatmap" in r for r in rows) else [])
    keys += [k for k in RECORD if any(k in r for r in rows)]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, keys, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
        return buf.getvalue()
    width = max([len("image")] + [len(r["path"]) for r in rows])
    head = f"{'image':{width}s}  P({positive})  decision    variant"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["probability"] is None:
            lines.append(f"{r['path']:{width}s}  error: {r['error']}")
        else:
            lines.append(f"{r['path']:{width}s}  {r['probability']:{len(positive) + 3}.3f}  "
                         f"{r['decision'] or 'none':10s}  {r['variant']}"
                         + (f"  warning: {r['warning']}" if r["warning"] else "")
                         + (f"  caution: {r['form_warning']}" if r.get("form_warning") else "")
                         + (f"  error: {r['error']}" if r["error"] else ""))
    return "\n".join(lines) + "\n"


def _cell(value):
    """A CSV cell that a spreadsheet will not run as a formula: text starting with = + - @ (or a tab, CR) quoted."""
    return "'" + value if isinstance(value, str) and value[:1] in FORMULA else value


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dsconv.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    p.add_argument("model", help="classifier file written by `python -m dsconv.train` (model.h5)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image, folder or list file")
    p.add_argument("--threshold", type=float, help="decision threshold on P(positive) (default: the model's)")
    p.add_argument("--format", default="table", choices=FORMATS, help="output format")
    p.add_argument("--output", "-o", help="write the output to this file instead of standard output (- for it); "
                                          "a FIFO or device is written through, a symlink followed")
    p.add_argument("--heatmap", metavar="DIR", help="write one class activation map PNG per image here")
    p.add_argument("--cache", help="bottleneck cache folder (default: the training cache)")
    p.add_argument("--no-cache", action="store_true", help="keep no bottlenecks on disk")
    images.add_max_pixels(p)
    args = p.parse_args(argv)
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        p.error("--threshold must be between 0 and 1")
    if args.max_pixels < 1:
        p.error("--max-pixels must be positive")
    images.set_max_pixels(args.max_pixels)
    interrupted = False
    try:
        if args.output and args.output != "-":
            files.check_output_file(args.output, "give another --output")
        heatmaps = Path(args.heatmap) if args.heatmap else None
        if heatmaps:
            files.check_writable(heatmaps, "give another --heatmap folder")
        model = load_model(args.model, args.threshold, False if args.no_cache else args.cache)
        if model.xray_check is None:
            note(f"{args.model} predates the X-ray check: only its pixel checks run (image size, colour, blank); "
                 "train the model again to have every input checked")
        paths = collect(args.paths)
        if not paths:
            raise DsconvError(f"no image files in {' '.join(args.paths)}")
        if heatmaps:
            heatmaps.mkdir(parents=True, exist_ok=True)
            files.remove_strays(heatmaps)
        try:
            rows = rows_for(model, paths, heatmaps)
        except Interrupted as e:
            rows, interrupted = e.rows, True
    except (DsconvError, OSError) as e:
        fail(e)
    except KeyboardInterrupt:
        dsconv.interrupted("bottlenecks computed so far are cached")
    stamp(rows, model)
    text = render(rows, args.format, model.positive)
    output = args.output or "-"
    try:
        with files.interrupts_deferred():
            files.write_output(output, text)
    except OSError as e:
        fail(f"could not write {'standard output' if output == '-' else output} ({e.strerror or e}); "
             "give another --output", NOT_WRITTEN)
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        done = sum(r["error"] != INTERRUPTED for r in rows)
        dsconv.interrupted(f"{done} of {len(rows)} images done; the others are marked "
                           f"\"{INTERRUPTED}\"{f' in {args.output}' if output != '-' else ''}")
    warned = sum(bool(r["warning"]) for r in rows)
    if warned:
        note(f"{warned} of {len(rows)} images got a warning instead of a decision")
    cautioned = sum(bool(r.get("form_warning")) for r in rows)
    if cautioned:
        note(f"{cautioned} of {len(rows)} images come in a form the model was not trained or calibrated on "
             "(column form_warning)")
    failed = sum(r["error"] is not None for r in rows)
    if failed:
        print(f"error: {failed} of {len(rows)} images failed", file=sys.stderr)
    sys.exit(PARTIAL if failed else 0)


if __name__ == "__main__":
    main()
