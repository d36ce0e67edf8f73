"""Bacterial or viral: the positive class split into its subtypes by file name, and the decision in two steps.

The pneumonia X-rays of the data set name their cause (``person23_bacteria_87.jpeg``,
``person1_virus_6.jpeg``). ``split`` turns a data set of NORMAL and PNEUMONIA into
one of NORMAL, BACTERIAL and VIRAL; the head is then an ordinary three-class
softmax (dsconv.classifier), and

    P(pneumonia) = P(bacterial) + P(viral)                  (the binary score)
    P(bacterial | pneumonia) = P(bacterial) / P(pneumonia)  (the subtype score)

The decision (``decide``) takes two steps: pneumonia where P(pneumonia) reaches
the binary threshold, exactly as a binary model decides; then bacterial where
P(bacterial | pneumonia) reaches the subtype threshold, else viral. The subtype
threshold is chosen on the validation pneumonia X-rays (out-of-fold with
--val-dir) to balance the two recalls (Youden's J: the largest sum of the
bacterial and the viral recall): the head's own argmax calls too many viral
X-rays bacterial, as bacterial X-rays are twice as many in training.
"""
import re

import numpy as np

from dsconv import data, metrics
from dsconv.metrics import pct

NAMES = {"BACTERIAL": re.compile(r"_bacteria_", re.IGNORECASE), "VIRAL": re.compile(r"_virus_", re.IGNORECASE)}
CLASSES = ("BACTERIAL", "VIRAL")  # their order in the head, after the negative class(es)
RULE = "youden"


def label_of(path):
    """BACTERIAL or VIRAL from a pneumonia X-ray's file name; DataError naming the file if it says neither."""
    name = getattr(path, "name", str(path))
    found = [c for c, pattern in NAMES.items() if pattern.search(name)]
    if len(found) != 1:
        raise data.DataError(f"{path}: the file name says {'both' if found else 'neither'} '_bacteria_' "
                             f"{'and' if found else 'nor'} '_virus_'; --subtypes needs one of them in the name "
                             "of every image of the positive class: rename it or move it out of the folder")
    return found[0]


def split(ds, positive):
    """(Dataset with the positive class replaced by BACTERIAL and VIRAL, their class indices [b, v]).

    The other classes keep their order; the subtypes come last.
    """
    others = [c for k, c in enumerate(ds.classes) if k != positive]
    classes = others + list(CLASSES)
    labels = np.array([classes.index(label_of(p)) if y == positive else others.index(ds.classes[y])
                       for p, y in zip(ds.paths, ds.labels)], np.int64)
    return data.Dataset(ds.root, classes, ds.paths, labels), [classes.index(c) for c in CLASSES]


def scan(root, classes, record):
    """The labelled folder ``root`` (class subfolders, the positive class one of them) in the classes of a model
    with subtypes: ``classes`` its head's, ``record`` its info["subtypes"]."""
    others = [c for c in classes if c not in record["classes"]]
    ds = data.scan(root, others + [record["positive"]])
    return split(ds, len(others))[0]


def subtype_scores(p, group):
    """P(bacterial | pneumonia) of probabilities p (N, C); group: the indices [bacterial, viral]."""
    p = np.asarray(p, np.float64)
    return p[:, group[0]] / np.maximum(p[:, group].sum(axis=1), 1e-300)


def choose_threshold(is_bacterial, scores):
    """(subtype threshold, rule) on validation pneumonia X-rays; 0.5 without both subtypes."""
    y = np.asarray(is_bacterial, bool)
    if not (y.any() and (~y).any()):
        return 0.5, "0.5 (the validation pneumonia X-rays lack a subtype)"
    t, rule = metrics.choose_threshold(y, scores, RULE)
    return t, f"{rule} on the validation pneumonia X-rays (bacterial against viral)"


def decide(p, classes, group, threshold, subtype_threshold):
    """The class name of one image's probabilities p (C,): the two-step decision of the module docstring."""
    p = np.asarray(p, np.float64)
    if p[group].sum() >= threshold:
        return classes[group[0]] if subtype_threshold <= subtype_scores(p[None], group)[0] else classes[group[1]]
    others = [k for k in range(len(classes)) if k not in group]
    return classes[max(others, key=lambda k: p[k])]


def assess(labels, p, group, threshold, subtype_threshold, classes, paths, intervals=True):
    """results.json's subtypes record of a labelled set: bacterial against viral on its pneumonia X-rays (at the
    subtype threshold, bacterial positive, with patient-bootstrap 95% intervals unless not ``intervals``: ci95
    None) and the classes' accuracy and confusion matrix (rows: true, columns: decided) of the two-step
    decision."""
    labels = np.asarray(labels)
    pneumonia = np.isin(labels, group)
    y, s = labels[pneumonia] == group[0], subtype_scores(p[pneumonia], group)
    decided = np.array([classes.index(decide(row, classes, group, threshold, subtype_threshold)) for row in p])
    matrix = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(matrix, (labels, decided), 1)
    pneumonia_paths = [q for q, m in zip(paths, pneumonia) if m]
    groups = [data.patient_id(q) for q in pneumonia_paths]
    return {"bacterial_vs_viral": dict(metrics.evaluate(y, s, subtype_threshold), images=int(pneumonia.sum()),
                                       ci95=metrics.bootstrap(y, s, subtype_threshold, groups)
                                       if intervals and len(y) else None),
            "accuracy": float(np.mean(decided == labels)) if len(labels) else float("nan"),
            "confusion": {"classes": list(classes), "rows": "true class", "columns": "decided class",
                          "matrix": matrix.tolist()}}


def describe(record, threshold):
    """"bacterial against viral: accuracy 91.0% [..], ...; 3 classes: accuracy 88.0%" from an assess() dict."""
    e, ci = record["bacterial_vs_viral"], record["bacterial_vs_viral"]["ci95"]
    parts = [f"{k} {pct(e[k])}% [{pct(ci[k][0])}-{pct(ci[k][1])}]" for k in ("accuracy", "sensitivity", "specificity")]
    m = record["confusion"]
    return (f"bacterial against viral ({e['images']} pneumonia X-rays, bacterial positive): " + ", ".join(parts)
            + f", AUC {e['auc']:.3f} [{ci['auc'][0]:.3f}-{ci['auc'][1]:.3f}] at subtype threshold {threshold:.3f}; "
            f"{len(m['classes'])} classes: accuracy {pct(record['accuracy'])}%, confusion {m['matrix']} "
            f"(rows true, columns decided: {', '.join(m['classes'])})")
