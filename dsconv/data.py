"""Data set folders, labels, patient ids and splits.

A data set is a folder with one subfolder of images per class; class names
are the subfolder names, sorted. Hidden files and folders are ignored; every
other file is a candidate image (files that do not decode are skipped later,
by dsconv.bottlenecks, with a warning).

Splits (``split``) are stratified by class and random with a seed. For
percentages (train, val, test) of n images, the partition sizes are

    n_test = round(n * test / 100),  n_val = round(n * val / 100),
    n_train = n - n_val - n_test

(5216 images: 4172|522|522, 3652|782|782, 3130|1043|1043, the paper's
Table 1), and each partition's size is shared among the classes in
proportion to the class sizes by largest remainders, so the class counts add
up exactly. Grouped by patient, whole patients are dealt out in a random
order until each partition has reached its share of a class, so the sizes
come out close to, not exactly at, the targets.

Hygiene checks compare images by content (the sha256 of the file's bytes,
as the bottleneck cache keys them): ``shared_images`` between two data
sets, ``duplicates_across_classes``, ``small_classes``; ``fingerprint``
names a data set by its contents.
"""
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsconv import DsconvError, files, warn

PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),                   # person23_bacteria_87.jpeg
    re.compile(r"^((?:NORMAL\d+-)?IM-\d+)-\d+"),    # IM-0629-0001, NORMAL2-IM-0383-0001-0002
)
PARTITIONS = ("train", "val", "test")
POSITIVE = "PNEUMONIA"  # the class counted positive (sensitivity, P(positive)) where there is one
MIN_CLASS = 10  # fewer images of a class than this: a metric on it means little


class DataError(DsconvError):
    """A data folder or split that cannot be used, with what to do."""


@dataclass
class Dataset:
    """Image files with their class index; ``classes`` are the sorted folder names."""
    root: Path
    classes: list
    paths: list
    labels: np.ndarray

    def subset(self, keep):
        """The images where ``keep`` (a boolean mask or index array) selects."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep)
        return Dataset(self.root, self.classes, [self.paths[i] for i in idx], self.labels[idx])

    def readable(self, failed):
        """The images not in ``failed`` ({path: reason}, as dsconv.bottlenecks.extract returns)."""
        return self.subset(np.array([p not in failed for p in self.paths], bool))

    def counts(self):
        return {c: int(n) for c, n in zip(self.classes, np.bincount(self.labels, minlength=len(self.classes)))}


def scan(root, classes=None):
    """The Dataset of a folder with one subfolder per class.

    ``classes``: expected class names (a --test-dir must have the training
    classes); by default the sorted subfolder names, at least two.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give a folder with one subfolder of images per class")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        if len(found) < 2:
            raise DataError(f"{root}: found {len(found)} class folder(s) {found}; a classifier needs at "
                            "least two subfolders, one per class (e.g. NORMAL and PNEUMONIA)")
        classes = found
    elif sorted(classes) != found:
        raise DataError(f"{root}: class folders {found} differ from the training classes {list(classes)}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        members = _visible_files(root / name)
        if not members:
            raise DataError(f"{root / name}: the class folder is empty; put its images there or remove it")
        paths += members
        labels += [label] * len(members)
    return Dataset(root, list(classes), paths, np.array(labels, np.int64))


def _visible_files(folder):
    """Every file under ``folder``, recursively and sorted, none hidden or inside a hidden folder."""
    # a dangling link or a loop is kept: decoding it fails, and the file is reported and counted as skipped
    return sorted(p for p in folder.rglob("*") if (p.is_file() or (p.is_symlink() and not p.exists()))
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def positive_index(classes, name=POSITIVE):
    """The index of class ``name``; without a class POSITIVE, the default, the last class."""
    if name in classes:
        return classes.index(name)
    if name != POSITIVE:
        raise DataError(f"--positive {name} is not one of the classes {classes}")
    return len(classes) - 1


def image_files(root):
    """Every file under ``root`` (recursively), hidden ones excepted, sorted: a folder of unlabelled images."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give a folder of the site's images")
    paths = _visible_files(root)
    if not paths:
        raise DataError(f"{root}: no files in this folder; put a sample of the site's images there")
    return paths


def shared_images(a, b):
    """(path in a, path in b) for every image of Dataset b whose bytes equal an image of Dataset a."""

    def key(p):  # empty and unreadable files are reported elsewhere, not matched here
        try:
            return files.file_key(p) if p.stat().st_size else None
        except OSError:
            return None
    keys = {}
    for p in a.paths:
        keys.setdefault(key(p), p)
    keys.pop(None, None)
    return [(keys[k], p) for p in b.paths if (k := key(p)) in keys]


def patient_id(path):
    """The patient of an image from its file name; a file matching no pattern is its own patient.

    person23_bacteria_87.jpeg -> person23; NORMAL2-IM-0383-0001.jpeg -> NORMAL2-IM-0383.
    """
    stem = Path(path).stem
    for pattern in PATIENT_PATTERNS:
        m = pattern.match(stem)
        if m:
            return m.group(1)
    return str(path)


def parse_split(text):
    """"80/10/10" -> (80.0, 10.0, 10.0); "90/10" -> (90.0, 10.0, 0.0)."""
    try:
        parts = [float(x) for x in text.split("/")]
    except ValueError:
        parts = []
    if len(parts) == 2:
        parts.append(0.0)
    if (len(parts) != 3 or not all(map(math.isfinite, parts)) or min(parts) < 0 or parts[0] <= 0
            or abs(sum(parts) - 100) > 1e-6):
        raise DataError(f"--split {text}: give train/validation/test percentages that add up to 100, "
                        "such as 80/10/10")
    return tuple(parts)


def _apportion(total, weights):
    """Integers proportional to ``weights`` summing to ``total`` (largest remainders)."""
    weights = np.asarray(weights, np.float64)
    exact = total * weights / weights.sum()
    out = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[:total - out.sum()]] += 1
    return out


def split_sizes(n, percentages):
    """(n_train, n_val, n_test) as in the module docstring."""
    _, val, test = percentages
    n_test, n_val = round(n * test / 100), round(n * val / 100)
    return n - n_val - n_test, n_val, n_test


def split(labels, percentages, seed, groups=None):
    """Partition index per image, 0 train, 1 val, 2 test; stratified, random with ``seed``.

    ``groups``: one id per image (patients); all images of a group go to the
    same partition. A group's class for stratification is its most frequent.
    """
    labels = np.asarray(labels)
    n_classes = labels.max() + 1
    sizes = split_sizes(len(labels), percentages)
    per_class = np.bincount(labels, minlength=n_classes)
    # targets[p, c]: images of class c wanted in partition p
    targets = np.stack([_apportion(s, per_class) for s in sizes])
    rng = np.random.default_rng(seed)
    part = np.empty(len(labels), np.int64)
    if groups is None:
        for c in range(n_classes):
            idx = rng.permutation(np.flatnonzero(labels == c))
            ends = np.cumsum([targets[2, c], targets[1, c]])
            part[idx[:ends[0]]] = 2
            part[idx[ends[0]:ends[1]]] = 1
            part[idx[ends[1]:]] = 0
        return part
    names, group = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    class_counts = np.zeros((len(names), n_classes), np.int64)
    np.add.at(class_counts, (group, labels), 1)
    group_label = class_counts.argmax(axis=1)
    group_size = np.bincount(group, minlength=len(names))
    group_part = np.zeros(len(names), np.int64)
    for c in range(n_classes):
        filled = np.zeros(3, np.int64)
        for g in rng.permutation(np.flatnonzero(group_label == c)):
            p = 2 if filled[2] < targets[2, c] else 1 if filled[1] < targets[1, c] else 0
            group_part[g] = p
            filled[p] += group_size[g]
    part[:] = group_part[group]
    return part


_keys = {}


def content_keys(ds):
    """{path: sha256 of its bytes} of the readable files of a Dataset (remembered by path, size, mtime)."""
    out = {}
    for p in ds.paths:
        try:
            st = os.stat(p)
            memo = (str(p), st.st_size, st.st_mtime_ns)
            if memo not in _keys:
                _keys[memo] = files.file_key(p)
            out[p] = _keys[memo]
        except OSError:
            continue
    return out


def duplicates_across_classes(ds):
    """[(path_a, path_b)]: byte-identical images filed under two different classes (one pair per clash)."""
    label_of = dict(zip(ds.paths, ds.labels))
    first, out = {}, []
    for p, k in content_keys(ds).items():
        q = first.setdefault(k, p)
        if label_of[p] != label_of[q]:
            out.append((q, p))
    return out


def fingerprint(ds):
    """sha256 of the sorted (class, content hash) pairs of a Dataset: the same images, whatever their names."""
    label_of = dict(zip(ds.paths, ds.labels))
    pairs = sorted(f"{ds.classes[label_of[p]]}/{k}" for p, k in content_keys(ds).items())
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def small_classes(ds, minimum=MIN_CLASS):
    """{class: count} of the classes with fewer than ``minimum`` images."""
    return {c: n for c, n in ds.counts().items() if n < minimum}


def check_partitions(n, percentages, split_text, test_dir):
    """Refuse a split that leaves a partition it asks for empty (it would report "nan%")."""
    sizes = split_sizes(n, percentages)
    for name, share, size in zip(("training", "validation", "test"), percentages, sizes):
        if share > 0 and size == 0 and not (name == "test" and test_dir):
            raise DataError(f"--split {split_text} leaves the {name} partition empty with {n} images; "
                            f"give it a larger share or more images")


def hygiene(datasets):
    """Warnings about each Dataset: identical images in two classes, classes too small to measure on.

    (Images shared between --data, --val-dir and --test-dir: warn_overlaps.)
    """
    out = []
    for d in datasets:
        dups = duplicates_across_classes(d)
        if dups:
            a, b = dups[0]
            out.append(f"{len(dups)} image(s) sit in two class folders with identical content (e.g. {a} and "
                       f"{b}); their labels contradict each other")
        for c, n in small_classes(d).items():
            out.append(f"class {c} in {d.root} has only {n} image(s); a metric on it (sensitivity or "
                       "specificity) means little")
    for w in out:
        warn(w)
    return out


def warn_overlaps(named):
    """Warn when two of the (name, Dataset) pairs share images by content."""
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1:]:
            shared = shared_images(a, b)
            if shared:
                warn(f"{len(shared)} image(s) of {name_b} ({b.root}) are also in {name_a} ({a.root}), by content "
                     f"(e.g. {shared[0][1]} = {shared[0][0]}); figures measured on them are optimistic")
