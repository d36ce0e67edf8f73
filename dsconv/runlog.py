"""The record of a dsconv.experiments --out: runs.csv, timing.json and data.json.

runs.csv holds one row per run, appended and flushed as each training
finishes, so an interrupted grid resumes where it stopped; timing.json the
wall time of every invocation; data.json the fingerprint of the images
(their content hashes and classes), so that a resumed grid comes from the
same ones.
"""
import csv
import json
import math
import os

from dsconv import data, files, note, warn

TIMING = "timing.json"
DATA = "data.json"

# A run is keyed by its settings; its train_s is its share of the one training that serves every step count.
KEY = ("alpha", "resolution", "bottleneck", "group_by", "split", "seed", "lr", "steps")
BINARY = KEY + ("trained_resolution", "n_train", "n_val", "n_test", "val_accuracy", "val_loss",
                "test_accuracy", "test_sensitivity", "test_specificity", "test_auc", "train_s")
# --subtypes (dsconv.experiments): the three-class head of the same training, empty without it. Bacterial against
# viral on the test partition's pneumonia X-rays (bacterial positive: sensitivity is the bacterial recall,
# specificity the viral recall) at the subtype threshold chosen on the validation partition's; classes_accuracy:
# the two-step decision over NORMAL, BACTERIAL and VIRAL on the whole test partition.
SUBTYPES = ("subtype_threshold", "subtype_test_accuracy", "subtype_test_sensitivity", "subtype_test_specificity",
            "subtype_test_auc", "subtype_test_classes_accuracy", "subtype_train_s")
COLUMNS = BINARY + SUBTYPES


def fmt(name, value):
    """A CSV cell: settings in their canonical spelling, metrics to 6 significant digits, thresholds exact."""
    if name in ("alpha", "lr"):
        return f"{float(value):g}"
    if isinstance(value, float) and math.isnan(value):
        return ""
    if name == "subtype_threshold":  # exactly: saturated scores sit within 1e-9 of 1, and it decides them
        return repr(float(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def key_of(row):
    return tuple(fmt(k, row[k]) for k in KEY)


def read_runs(path):
    """{key: row} of a runs.csv; a last line cut short by an interruption is dropped from the file.

    A later row of the same settings replaces an earlier one (a resumed --subtypes grid appends the subtype
    figures of runs that lacked them). A runs.csv from before --subtypes is given its columns, empty.
    """
    if not path.exists():
        return {}
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        files.write_text(path, text)
    lines = text.splitlines()
    if not lines:
        return {}
    if tuple(lines[0].split(",")) == BINARY:
        # written before --subtypes: its runs get empty subtype cells, and the file the header they now have
        lines = [",".join(COLUMNS)] + [line + "," * len(SUBTYPES) for line in lines[1:]]
        files.write_text(path, "\n".join(lines) + "\n")
        note(f"{path} predates --subtypes; its columns are added (empty)")
    if tuple(lines[0].split(",")) != COLUMNS:
        raise data.DataError(f"{path}: not a runs.csv of this version of dsconv.experiments (columns "
                             f"differ); give another --out or move the file away")
    rows = {}
    for r in csv.DictReader(lines):
        row = parse_row(r)
        rows[key_of(row)] = row
    return rows


def parse_row(cells):
    """A run from its CSV cells (strings)."""
    row = {k: cells[k] for k in COLUMNS}
    for k in ("alpha", "lr") + COLUMNS[COLUMNS.index("val_accuracy"):]:
        row[k] = float(row[k]) if row[k] != "" else math.nan
    for k in ("resolution", "seed", "steps", "trained_resolution", "n_train", "n_val", "n_test"):
        row[k] = int(row[k])
    return row


class RunLog:
    """runs.csv, appended to after every training, so an interruption loses at most one.

    Written unbuffered, whole rows or nothing: a write that fails (a full
    disk) cuts the file back to where it was, and closing has nothing left
    to flush that could fail again.
    """

    def __init__(self, path):
        self.path = path
        self.rows = read_runs(path)
        new = not path.exists() or path.stat().st_size == 0
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        if new:
            self._append(",".join(COLUMNS) + "\n")

    def _append(self, text):
        size = os.fstat(self.fd).st_size
        data = text.encode()
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            os.ftruncate(self.fd, size)
            raise

    def add(self, rows):
        """Append runs; they are kept as read back from the file, so a resumed grid selects the same.

        A run without the SUBTYPES figures gets them empty."""
        rows = [{**dict.fromkeys(SUBTYPES, math.nan), **row} for row in rows]
        cells = [{k: fmt(k, row[k]) for k in COLUMNS} for row in rows]
        self._append("".join(",".join(c.values()) + "\n" for c in cells))
        for row, c in zip(rows, cells):
            self.rows[key_of(row)] = parse_row(c)

    def close(self):
        os.close(self.fd)


def check_same_data(out, ds, log):
    """Refuse to resume a runs.csv made from other images; record the fingerprint of these."""
    path = out / DATA
    mine = {"root": str(ds.root), "images": len(ds.paths), "fingerprint": data.fingerprint(ds)}
    try:
        theirs = json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        theirs = None
    if log.rows and theirs and theirs.get("fingerprint") != mine["fingerprint"]:
        raise data.DataError(f"{out / 'runs.csv'} holds runs on other data ({theirs.get('images')} images from "
                             f"{theirs.get('root')}; these are {mine['images']} from {ds.root}); give another "
                             "--out, or move runs.csv away to start over")
    if log.rows and not theirs:
        warn(f"{out / 'runs.csv'} does not record which images it was made from; resuming it, on the "
             "assumption that they are these")
    if theirs != mine:
        files.write_text(path, json.dumps(mine, indent=1) + "\n")


def read_timing(out):
    path = out / TIMING
    try:
        return json.loads(path.read_text()) if path.exists() else []
    except ValueError:
        warn(f"{path} is damaged; earlier wall times are lost")
        return []


def write_timing(out, timing):
    """Append this invocation's times to timing.json (also when interrupted)."""
    files.write_text(out / TIMING, json.dumps(read_timing(out) + [timing], indent=1) + "\n")
