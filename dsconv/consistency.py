"""Score a model on the same labelled X-rays in several forms: does its decision depend on the form?

    python -m dsconv.consistency runs/.../model.h5 ../shared/data/chest_xray/external_full

Each X-ray of FOLDER (one subfolder per class) is scored as given, then in
every form of dsconv.forms.REPORT: the 224 x 224 copy the training folder is
made of, JPEG at quality 95, 75, 50 and 30, PNG, 16-bit DICOM, 5% cropped
away, a 5% black border. For each form: accuracy, sensitivity, specificity
at the model's threshold, AUC, the share of decisions that differ from the
form as given, and of those the confident calls reversed: a score outside the
model's borderline band (the one predict and the page show) in the form as
given and outside it on the other side in this form. A decision that changes
within the band was a borderline call in one of the two forms. The forms'
bottlenecks are cached like any others (each form its own variant), so a
second run computes nothing.
"""
import argparse
import json
from pathlib import Path

import numpy as np

from dsconv import (DsconvError, HelpFormatter, data, dicom, fail, files, forms, interrupted, metrics, note,
                    predict, subtypes)
from dsconv.model import load_model

VERSION = "report-v1"  # in each form's cache key: change it when a form's code changes


def form_of(name):
    """The Form that applies REPORT[name] to a file's bytes."""
    apply = forms.REPORT[name]
    return forms.Form(name, f"{VERSION}: {name}", lambda data_, key: apply(data_))


def score(model, ds, names, compare=None, progress=True):
    """{form: scores of ds's images} for "as given", each form named, and the same files in folder ``compare``.

    An image unreadable in any form is an error.
    """
    out = {}
    for name in ["as given"] + list(names) + ([compare] if compare else []):
        paths = ds.paths if name != compare else [Path(compare) / p.relative_to(ds.root) for p in ds.paths]
        _, p, failed = model.scored(paths, progress=progress, form=form_of(name) if name in forms.REPORT else None)
        if failed:
            raise DsconvError(f"{len(failed)} image(s) could not be read as {name}, such as "
                              f"{next(iter(failed.values()))}; remove them and run again")
        out[name] = model.head.positive_of(p)
    return out


def rows(y, scores, threshold, band):
    """One dict per form: accuracy, sensitivity, specificity, AUC, changed (share of decisions unlike "as given"),
    reversed (share of confident calls reversed: beyond ``band`` = (low, high) on one side as given, on the other
    side in this form), each share also as a count (``_images``)."""
    given = scores["as given"] >= threshold
    call = lambda s: np.where(s > band[1], 1, np.where(s < band[0], -1, 0))  # 0: borderline, as predict says
    out = []
    for name, s in scores.items():
        e = metrics.evaluate(y, s, threshold)
        changed, flipped = (s >= threshold) != given, call(s) * call(scores["as given"]) == -1
        out.append({"form": name, **{k: e[k] for k in ("accuracy", "sensitivity", "specificity", "auc")},
                    "changed": float(np.mean(changed)), "changed_images": int(np.sum(changed)),
                    "reversed": float(np.mean(flipped)), "reversed_images": int(np.sum(flipped))})
    return out


def table(results):
    """The printed table; a form's name (a --compare folder's path) is shown whole, the column as wide as the longest."""
    width = max([14] + [len(r["form"]) for r in results])
    head = (f"{'form':{width}s} {'accuracy':>8s} {'sensitivity':>11s} {'specificity':>11s} {'AUC':>6s}  changed"
            "     confident call reversed")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['form']:{width}s} {metrics.pct(r['accuracy']):>8s} {metrics.pct(r['sensitivity']):>11s} "
                     f"{metrics.pct(r['specificity']):>11s} {r['auc']:6.3f}  {metrics.pct(r['changed'], 1, 5)}% "
                     f"{'(' + str(r['changed_images']) + ')':5s} {metrics.pct(r['reversed'], 1, 5)}% "
                     f"({r['reversed_images']})")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dsconv.consistency", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("model", help="model file written by `python -m dsconv.train` (model.h5)")
    p.add_argument("folder", help="labelled X-rays, one subfolder per class (the model's classes; for a model with subtypes the "
                        "pneumonia folder, its file names saying bacteria or virus)")
    p.add_argument("--forms", default=",".join(forms.REPORT), help="the forms to score, separated by commas")
    p.add_argument("--compare", metavar="FOLDER",
                   help="the same X-rays in another form, with the same subfolders and file names (such as "
                        "external beside external_full): scored as one more row")
    p.add_argument("--threshold", type=float, help="decision threshold (default: the model's)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    p.add_argument("--cache", help="bottleneck cache folder (default: the training cache)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.forms.split(",") if n.strip()]
    unknown = [n for n in names if n not in forms.REPORT]
    if unknown:
        p.error(f"unknown form(s) {', '.join(unknown)}; choose among: {', '.join(forms.REPORT)}")
    if "16-bit DICOM" in names and not dicom.available():
        if args.forms != p.get_default("forms"):
            p.error(f"the 16-bit DICOM form needs pydicom: {dicom.INSTALL}, or leave it out of --forms")
        names.remove("16-bit DICOM")
        note(f"the 16-bit DICOM form is left out: it needs pydicom ({dicom.INSTALL})")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        p.error("--threshold must be between 0 and 1")
    try:
        model = load_model(args.model, args.threshold, args.cache)
        ds = subtypes.scan(args.folder, model.classes, model.subtypes) if model.subtypes \
            else data.scan(args.folder, model.classes)
        given = forms.words(forms.summary([forms.describe(q) for q in ds.paths]))
        y = np.isin(ds.labels, model.head.positives())
        band = predict.borderline_band(model)
        results = rows(y, score(model, ds, names, args.compare), model.threshold, (band["low"], band["high"]))
        if args.json:
            files.write_text(args.json, json.dumps({"model": str(args.model), "folder": str(args.folder),
                                                    "as_given": given, "threshold": model.threshold,
                                                    "borderline": band,
                                                    "forms": results}, indent=2) + "\n")
    except (DsconvError, OSError) as e:
        fail(e)
    except KeyboardInterrupt:
        interrupted("the bottlenecks computed so far are cached")
    print(f"{args.folder} as given: {given}; MobileNet {model.variant}, threshold {model.threshold:.3f}, "
          f"borderline {band['low']:.3f}-{band['high']:.3f}")
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
