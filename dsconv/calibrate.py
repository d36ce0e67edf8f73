"""Adapt a trained model to a new site without retraining.

    python -m dsconv.calibrate runs/.../model.h5 --site-dir SITE/ --val-dir SITE_LABELLED/ --out site.h5

A model trained on one clinic's X-rays ranks another clinic's well but
decides them badly: its bottlenecks are shifted, so its probabilities and
its threshold no longer mean what they did. Two repairs, each optional:

- ``--site-dir``: a sample of the site's images, labels not needed (class
  subfolders or not). Their bottlenecks' mean and standard deviation replace
  the training set's (dsconv.classifier: site adaptation).
- ``--val-dir``: labelled images of the site (one subfolder per class). The
  decision threshold is chosen on them: the highest accuracy (as train's
  default), Youden's J, or the highest threshold reaching
  ``--target-sensitivity``. A model with subtypes (train --subtypes) also
  has its subtype threshold chosen again on the site's pneumonia X-rays
  (dsconv.subtypes).

With --site-dir the X-ray check (dsconv.xraycheck) is widened to the site:
its threshold, the largest distance of an X-ray held out of its fit, becomes
the largest of the site's images if that is larger (they were not in the
fit either); how many lay beyond the old one is printed and recorded.

Both are stored in the new model file with where they came from
(info["calibration"]); predict and dsconv.load_model apply them. Figures
measured on --val-dir after choosing the threshold on it are optimistic.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from dsconv import (DsconvError, HelpFormatter, classifier, data, fail, files, forms, images, interrupted, metrics,
                    repeats, subtypes)
from dsconv.model import load_model


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dsconv.calibrate", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("model", help="model file written by `python -m dsconv.train` (model.h5)")
    p.add_argument("--site-dir", help="the site's images, unlabelled: re-estimate the feature statistics")
    p.add_argument("--val-dir", help="the site's labelled images (one subfolder per class): choose the threshold")
    p.add_argument("--threshold-rule", default="accuracy", choices=metrics.THRESHOLD_RULES,
                   help="choose the threshold maximising accuracy or Youden's J on --val-dir")
    p.add_argument("--target-sensitivity", type=float,
                   help="choose the highest threshold reaching this sensitivity on --val-dir instead")
    p.add_argument("--out", required=True, help="the adapted model file to write")
    p.add_argument("--cache", help="bottleneck cache folder (default: the training cache)")
    images.add_max_pixels(p)
    args = p.parse_args(argv)
    if args.max_pixels < 1:
        p.error("--max-pixels must be positive")
    images.set_max_pixels(args.max_pixels)
    if not (args.site_dir or args.val_dir):
        p.error("give --site-dir (feature statistics), --val-dir (threshold) or both")
    if args.target_sensitivity is not None and not 0 < args.target_sensitivity <= 1:
        p.error("--target-sensitivity must be in (0, 1], such as 0.95")
    if args.target_sensitivity is not None and not args.val_dir:
        p.error("--target-sensitivity chooses a threshold on --val-dir; give --val-dir")
    if Path(args.out).resolve() == Path(args.model).resolve():
        p.error("--out must name a new file; the trained model is kept as it is")
    return args


def calibrate(model, site_paths=None, val=None, target_sensitivity=None, rule="accuracy"):
    """Adapt ``model`` (a dsconv.model.Model) in place; returns its new calibration record.

    ``val``: a data.Dataset of labelled site images with the model's classes.
    """
    head, record = model.head, {}
    if site_paths is not None:
        x, failed = model.bottlenecks(site_paths, progress=True)
        if head.train_std is not None:  # else adapt refuses the model
            classifier.check_site(x, head.train_std, "--site-dir")
        head.adapt(x)
        record.update(site_images=int(len(x)), site_skipped=len(failed))
        check = model.xray_check
        if check is not None:
            far = check.distances(x)
            record["xray_check"] = {"site_images_beyond": int((far > check.threshold).sum()),
                                    "threshold_before": check.threshold}
            check.threshold = max(check.threshold, float(far.max()))
            check.info["widened_to_site"] = record["xray_check"]
            check.store(head)
    if val is not None:
        x, proba, failed = model.scored(val.paths, progress=True)
        labels = val.labels[[p not in failed for p in val.paths]]
        y, s = np.isin(labels, head.positives()), head.positive_of(proba)
        if not (y.any() and (~y).any()):
            raise data.DataError(f"{val.root}: the readable images hold a single class; choosing a "
                                 "threshold needs both")
        rule_name = rule
        head.threshold, rule = metrics.choose_threshold(y, s, rule, target_sensitivity)
        rule += " on the site's labelled images"
        model.threshold = head.threshold
        head.info["threshold_rule"] = rule
        record.update(threshold_images=int(len(y)), threshold_rule=rule, target_sensitivity=target_sensitivity,
                      on_threshold_dir=metrics.evaluate(y, s, head.threshold))
        # the training run's band and site figures were of another threshold: the band again, on these images
        head.info.pop("site_evaluation", None)
        kept = [p for p in val.paths if p not in failed]
        head.info["borderline"] = repeats.borderline(
            lambda yy, ss: metrics.choose_threshold(yy, ss, rule_name, target_sensitivity)[0], rule, y, s, kept,
            head.threshold)
        record["by_form"] = repeats.by_form(kept, y, s, head.threshold)
        if model.subtypes:
            record["subtypes"] = choose_subtype_threshold(model, labels, proba, kept)
    if val is not None or site_paths is not None:  # the forms its threshold and statistics now come from
        site = forms.summary([forms.describe(p) for p in (val.paths if val is not None else site_paths)])
        old = head.info.get("forms") or {}
        head.info["forms"] = forms.contract((old.get("summaries") or {}).get("training"), site, site,
                                            old.get("draws", 0), old.get("invariance", 0), old.get("input", ""))
    return record


def choose_subtype_threshold(model, labels, p, paths):
    """Choose a model's subtype threshold again on the site's labelled X-rays (probabilities p); its figures there."""
    group, record = model.head.positives(), model.subtypes
    pneumonia = np.isin(labels, group)
    record["threshold"], rule = subtypes.choose_threshold(labels[pneumonia] == group[0],
                                                          subtypes.subtype_scores(p[pneumonia], group))
    record["threshold_rule"] = rule.replace("validation", "site's labelled")
    return dict(subtypes.assess(labels, p, group, model.threshold, record["threshold"], model.classes, paths),
                threshold=record["threshold"], threshold_rule=record["threshold_rule"])


def main(argv=None):
    args = parse_args(argv)
    try:
        files.check_writable(Path(args.out).parent, "give another --out")
        model = load_model(args.model, cache_dir=args.cache)
        before = model.threshold
        val = None if not args.val_dir else subtypes.scan(args.val_dir, model.classes, model.subtypes) \
            if model.subtypes else data.scan(args.val_dir, model.classes)
        site = data.image_files(args.site_dir) if args.site_dir else None
        rec = calibrate(model, site, val, args.target_sensitivity, args.threshold_rule)
        model.head.info["calibration"] = dict(
            rec, site_dir=str(Path(args.site_dir).resolve()) if site else None,
            threshold_dir=str(Path(args.val_dir).resolve()) if val else None,
            from_model=str(Path(args.model).resolve()), date=time.strftime("%Y-%m-%d %H:%M"))
        model.head.info = json.loads(json.dumps(model.head.info, default=float))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        files.remove_strays(out.parent)
        model.head.save(out)
    except (DsconvError, OSError) as e:
        fail(e)
    except KeyboardInterrupt:
        interrupted("nothing written; bottlenecks computed so far are cached")
    if site:
        print(f"feature statistics from {rec['site_images']} images of {args.site_dir}")
        if "xray_check" in rec:
            print(f"X-ray check: {rec['xray_check']['site_images_beyond']} of the site's images lay beyond its "
                  f"threshold {rec['xray_check']['threshold_before']:.1f}; now {model.xray_check.threshold:.1f}")
    print(f"threshold {before:.3f} -> {model.threshold:.3f}"
          + (f" ({rec['threshold_rule']})" if val else " (unchanged: no --val-dir)"))
    if val:
        e = rec["on_threshold_dir"]
        print(f"on {args.val_dir} [{model.head.info['forms']['site']}] (optimistic: the threshold was chosen there): "
              f"accuracy {metrics.pct(e['accuracy'])}%, sensitivity {metrics.pct(e['sensitivity'])}%, "
              f"specificity {metrics.pct(e['specificity'])}%, AUC {e['auc']:.3f}")
        for kind, f in (rec["by_form"] or {}).items():
            print(f"    of which {f['images']} {kind}: accuracy {metrics.pct(f['accuracy'])}%, sensitivity "
                  f"{metrics.pct(f['sensitivity'])}%, specificity {metrics.pct(f['specificity'])}%, AUC {f['auc']:.3f}")
        if "subtypes" in rec:
            sub = rec["subtypes"]
            print("subtypes there (optimistic too): " + subtypes.describe(sub, sub["threshold"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
