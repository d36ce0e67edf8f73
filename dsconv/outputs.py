"""What python -m dsconv.train writes: the printed tables, results.json, the model files and the figures.

``Results`` is what a training produced (the data, the bottlenecks' parts,
each repeat's result and model); ``outputs_of`` turns it, with the Settings
(dsconv.settings), into the bytes of every output file, filling in each
model file's info (the network, the forms, the evaluation, the decision).
"""
import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsconv import __version__, forms, images, metrics, repeats, report, subtypes


@dataclass(frozen=True)
class Results:
    """What a training produced, for outputs_of."""
    nets: list          # the frozen MobileNets, in the order their bottlenecks are concatenated
    ds: object          # the data.Dataset of --data's readable images
    val_ds: object      # of --val-dir, or None
    test_ds: object     # of --test-dir, or None
    val: object         # the repeats.Part of --val-dir, or None
    test: object        # of --test-dir, or None
    site: object        # the bottlenecks of --site-dir, or None
    width: int          # the bottleneck width
    positive: object    # the positive class's index, or its subtypes' indices (dsconv.subtypes)
    skipped: dict       # {file: why it was skipped}
    warnings: list      # data.hygiene's
    runs: list          # repeats.run_repeat's result per repeat
    models: list        # and its Classifier
    curves: list        # [(seed, training curves)]
    test_scores: list   # [(test labels, scores)]
    times: dict         # {step_s: seconds}; outputs_of adds total_s
    started: float      # time.perf_counter() at the start, for total_s


def clean(x):
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def versions():
    import h5py
    import numba
    import PIL
    return {"dsconv": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "h5py": h5py.__version__, "pillow": PIL.__version__,
            "platform": platform.platform()}


def network_info(nets, settings, width):
    """The model file's description of the frozen side: scalars for one network, lists for an ensemble."""
    one = lambda values: values[0] if len(values) == 1 else values
    info = {"alpha": one([n.alpha for n in nets]), "resolution": settings.resolution,
            "trained_resolution": one([n.trained_resolution for n in nets]),
            "weights_file": one([Path(n.weights_path).name for n in nets]),
            "weights_sha256": one([n.weights_sha256 for n in nets]),
            "bottleneck": settings.bottleneck, "features": int(width),
            "preprocessing": images.preprocessing(settings.blur), "dsconv": __version__}
    if settings.tta != "none":
        info["tta"] = settings.tta
    if settings.blur:
        info["blur"] = settings.blur
    if settings.form_tta:
        info["form_tta"] = settings.form_tta
        info["form_tta_description"] = forms.TEST_FORMS
    return info


def decision_info(settings, r, val_ds):
    """What the page says of the decision: the borderline band and, with --val-dir, the site sample's figures.

    The site sample's figures are those of the validation scores the
    threshold was chosen on (out-of-fold with --site-weight), at that
    threshold, with patient-bootstrap 95% intervals.
    """
    out = {}
    if r["borderline"] is not None:
        out["borderline"] = r["borderline"]
    rep = r["validation_report"]
    if settings.val_dir and rep:
        out["site_evaluation"] = dict(
            {k: rep["at_threshold"][k] for k in ("accuracy", "sensitivity", "specificity", "auc")},
            dir=str(val_ds.root), images=r["sizes"]["val"], patients=rep["patients"],
            ci95=rep["ci95_at_threshold"], threshold=r["threshold"],
            scores=r["choice"]["validation_scores"],
            confusion=rep["at_threshold"]["confusion"])
    return out


def subtype_summary(runs, best):
    """results.json's summary.subtypes: the test figures of the model kept, and their mean and std over repeats."""
    tests = [r["subtypes"]["test"] for r in runs]
    return dict(runs[best]["subtypes"]["test"], threshold=runs[best]["subtypes"]["threshold"],
                threshold_rule=runs[best]["subtypes"]["threshold_rule"],
                over_repeats=dict(metrics.summary([t["bacterial_vs_viral"] for t in tests],
                                                  ("accuracy", "sensitivity", "specificity", "auc")),
                                  classes_accuracy=metrics.summary([t for t in tests], ("accuracy",))["accuracy"]),
                sensitivity="recall of BACTERIAL (bacterial positive)", specificity="recall of VIRAL")


def print_by_form(figures):
    """The figures of each form of a set that mixes them (repeats.by_form), one line each."""
    for kind, e in (figures or {}).items():
        print(f"    of which {e['images']} {kind}: accuracy {metrics.pct(e['accuracy'])}%, sensitivity "
              f"{metrics.pct(e['sensitivity'])}%, specificity {metrics.pct(e['specificity'])}%, AUC {e['auc']:.3f}")


def outputs_of(settings, options, res):
    """Print the tables; return {file name: bytes} of every output, results.json first.

    ``settings``: the Settings trained by; ``options``: the run's other
    flags ({name: value}), recorded beside them; ``res``: the Results.
    """
    info = network_info(res.nets, settings, res.width)
    described = {name: forms.summary([forms.describe(p) for p in d.paths]) if d else None
                 for name, d in (("training", res.ds), ("site", res.val_ds), ("test", res.test_ds or res.ds))}
    info["forms"] = forms.contract(described["training"], described["site"], described["test"], settings.forms,
                                   settings.invariance, info["preprocessing"] + (
                                       f"; each image scored as given and in {settings.form_tta} test-time forms, "
                                       "averaged" if settings.form_tta else ""))
    runs = res.runs
    best = min(range(len(runs)), key=lambda k: (np.nan_to_num(runs[k]["validation_loss"], nan=np.inf), k))
    test_name = str(res.test_ds.root) if res.test_ds else "test partition of --data"
    model_files = model_files_of(settings, res, info, test_name, best)
    summary, title = print_tables(settings, res, info, test_name, best)
    r = runs[best]
    figures = report.curve_files(res.curves, title)
    figures.update(report.test_figures(r["test_report"], *res.test_scores[best], r["threshold"],
                                       f"{title}\n{test_name}"))
    res.times["total_s"] = time.perf_counter() - res.started
    ds, val_ds, test_ds, site = res.ds, res.val_ds, res.test_ds, res.site
    results = {
        "settings": dict(dataclasses.asdict(settings), **options), "network": info,
        "data": {"root": str(ds.root), "classes": ds.classes,
                 "positive": settings.positive if settings.subtypes else ds.classes[res.positive],
                 "images": ds.counts(), "test_dir": str(test_ds.root) if test_ds else None,
                 "test_images": test_ds.counts() if test_ds else None,
                 "val_dir": str(val_ds.root) if val_ds else None,
                 "val_images": val_ds.counts() if val_ds else None,
                 "site_dir": str(settings.site_dir) if settings.site_dir else None,
                 "site_images": int(len(site)) if site is not None else None,
                 "skipped": len(res.skipped), "skipped_files": res.skipped, "warnings": res.warnings},
        "repeats": runs, "summary": dict(summary, form=info["forms"]["evaluation"]),
        "std": "sample standard deviation (ddof=1) over repeats",
        "ci95": "2.5th and 97.5th percentiles over 2000 resamples of whole patients",
        "model": "model.h5", "model_seed": runs[best]["seed"],
        "model_choice": "the repeat with the lowest final validation loss",
        "versions": versions(), "times": res.times,
    }
    return {"results.json": (json.dumps(clean(results), indent=2) + "\n").encode(), **model_files, **figures}


def model_files_of(settings, res, info, test_name, best):
    """{"model-seedK.h5": bytes per repeat, "model.h5": the ``best`` one's}, each model's info filled in."""
    training = dataclasses.asdict(settings)
    model_files = {}
    for model, r in zip(res.models, res.runs):
        rep = r["test_report"]
        model.info = dict(info, **model.info, threshold_rule=r["threshold_rule"],  # model.info: the X-ray check
                          training=dict(training, seed=r["seed"], sizes=r["sizes"]),
                          evaluation={test_name: dict(
                              {k: rep["at_threshold"][k] for k in ("accuracy", "sensitivity", "specificity", "auc")},
                              images=r["sizes"]["test"], patients=rep["patients"], ci95=rep["ci95_at_threshold"],
                              threshold=r["threshold"], form=info["forms"]["evaluation"])})
        if res.site is not None or res.val_ds is not None:
            model.info["calibration"] = {
                "site_dir": str(settings.site_dir) if res.site is not None else None,
                "site_images": int(len(res.site)) if res.site is not None else 0,
                "threshold_dir": str(res.val_ds.root) if res.val_ds else None,
                "threshold_images": int(len(res.val.labels)) if res.val_ds else 0,
                "threshold_rule": r["threshold_rule"], "target_sensitivity": settings.target_sensitivity}
        model.info.update(decision_info(settings, r, res.val_ds))
        if "site_evaluation" in model.info:
            model.info["site_evaluation"]["form"] = info["forms"]["site"]
        model.info = clean(model.info)
        model_files[f"model-seed{r['seed']}.h5"] = model.to_bytes()
    model_files["model.h5"] = model_files[f"model-seed{res.runs[best]['seed']}.h5"]
    return model_files


def print_tables(settings, res, info, test_name, best):
    """Print the repeats' table and the figures of the ``best`` one's model; return (summary, title)."""
    runs = res.runs
    summary = {"test": metrics.summary([r["test"] for r in runs]),
               "test_at_threshold": metrics.summary([r["test_at_threshold"] for r in runs])}
    alphas = "+".join(f"{a:g}" for a in settings.alpha)
    where = (f"trained on all of --data, threshold on {settings.val_dir}" if settings.val_dir and settings.test_dir
             else f"split {settings.split} by {settings.group_by}")
    title = (f"MobileNet {alphas}-{settings.resolution} {settings.bottleneck}"
             + (f" {settings.tta}" if settings.tta != "none" else "")
             + (", site-adapted" if res.site is not None else "")
             + f", {where}, lr {settings.lr:g}, steps {','.join(map(str, settings.steps))}, weight decay "
               f"{','.join(f'{w:g}' for w in settings.weight_decay)}")
    lines = repeats.table(runs, summary)
    print(f"\n{title}; test metrics in %, at 0.5 and at the validation-chosen threshold")
    print("\n".join(lines))
    s = summary["test"]
    percent = {k: metrics.pct(s[k]["mean"], 2) for k in ("accuracy", "sensitivity", "specificity")}
    missing = "n/a" in percent["sensitivity"] + percent["specificity"]
    print(f"\ntest accuracy {percent['accuracy']}% ± {metrics.pct(np.nan_to_num(s['accuracy']['std']), 2)}, "
          f"sensitivity {percent['sensitivity']}%, specificity {percent['specificity']}% "
          f"(mean ± sample std over {len(runs)} repeat(s), threshold 0.5"
          + ("; n/a: a test partition lacks that class)" if missing else ")"))
    r = runs[best]
    if r["validation_report"] and settings.val_dir:
        print(f"model.h5 (seed {r['seed']}) on --val-dir {settings.val_dir} [{info['forms']['site']}], "
              f"{r['choice']['validation_scores']} scores, threshold chosen on them (optimistic): "
              + report.describe(r["validation_report"], r["threshold"]))
        print_by_form(r["validation_by_form"])
    print(f"model.h5 (seed {r['seed']}) on {test_name} [{info['forms']['evaluation']}]: "
          + report.describe(r["test_report"], r["threshold"]))
    print_by_form(r["test_by_form"])
    if settings.subtypes:
        summary["subtypes"] = subtype_summary(runs, best)
        if settings.val_dir:
            print(f"  subtypes on --val-dir ({r['choice']['validation_scores']} scores, threshold chosen on them): "
                  + subtypes.describe(r["subtypes"]["validation"], r["subtypes"]["threshold"]))
        print(f"  subtypes on {test_name}: " + subtypes.describe(r["subtypes"]["test"], r["subtypes"]["threshold"]))
    return summary, title
