"""Reports of python -m dsconv.train: what a test set says about a model, and the training curves.

A test set: one line of figures with intervals, ROC and reliability
figures. Training curves: curves.csv and curves.png; the experiments'
Figure 4 (dsconv.reproduction) uses the same plot. The figures need
matplotlib (the ``plot`` extra); without it they are skipped with a note.
"""
import io

from dsconv import metrics, note
from dsconv.metrics import pct


def describe(rep, threshold):
    """"accuracy 93.1% [90.2-95.8], ..." from a repeats.assess() dict."""
    e, ci = rep["at_threshold"], rep["ci95_at_threshold"]
    parts = [f"{k} {pct(e[k])}% [{pct(ci[k][0])}-{pct(ci[k][1])}]"
             for k in ("accuracy", "sensitivity", "specificity")]
    spec = rep["specificity_at_sensitivity"]
    return (", ".join(parts) + f", AUC {e['auc']:.3f} [{ci['auc'][0]:.3f}-{ci['auc'][1]:.3f}] at threshold "
            f"{threshold:.3f}; specificity {pct(spec['specificity'])}% at sensitivity {spec['target']:g} "
            f"(95% intervals over patients, {rep['patients']} patients)")


def pyplot(skipped="figures"):
    """matplotlib.pyplot on the Agg backend, or None with a note naming what is ``skipped``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note(f"matplotlib is not installed, so no {skipped} (pip install matplotlib, or the extra: "
             "pip install -e .[plot])")
        return None
    return plt


def test_figures(rep, y, scores, threshold, title):
    """{"roc-reliability.png": bytes}: ROC curve with the operating point and reliability curve of one
    test set ({} without matplotlib)."""
    if y is None or len(y) == 0 or y.all() or not y.any():
        return {}
    plt = pyplot("roc-reliability.png")
    if plt is None:
        return {}
    fig, (roc, rel) = plt.subplots(1, 2, figsize=(11, 4.6))
    fpr, tpr = metrics.roc(y, scores)
    e = rep["at_threshold"]
    roc.plot(fpr, tpr, color="tab:blue", lw=1.5, label=f"ROC, AUC {e['auc']:.3f}")
    roc.plot([1 - e["specificity"]], [e["sensitivity"]], "o", color="tab:red",
             label=f"threshold {threshold:.3f}: sens {pct(e['sensitivity'])}%, spec {pct(e['specificity'])}%")
    roc.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    roc.set_xlabel("1 - specificity")
    roc.set_ylabel("sensitivity")
    roc.legend(loc="lower right", fontsize=8)
    rows = metrics.reliability(y, scores)
    rel.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--", label="perfectly calibrated")
    rel.plot([r[0] for r in rows], [r[1] for r in rows], "o-", color="tab:blue", label="observed")
    for mean, frac, n in rows:
        rel.annotate(str(n), (mean, frac), textcoords="offset points", xytext=(4, -10), fontsize=7)
    rel.axvline(threshold, color="tab:red", lw=0.8, label=f"threshold {threshold:.3f}")
    rel.set_xlabel("predicted probability (bins of 0.1; images per bin marked)")
    rel.set_ylabel("fraction positive")
    rel.legend(loc="upper left", fontsize=8)
    for ax in (roc, rel):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return {"roc-reliability.png": png(fig)}


def png(fig, dpi=110):
    """The PNG bytes of a pyplot figure, which is then closed."""
    import matplotlib.pyplot as plt
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=dpi)
    plt.close(fig)
    return out.getvalue()


def plot_curves(ax, curves, key, train_label):
    """Training (batch, orange) and validation (blue) ``key`` over steps, a pair of lines per (seed, curves)."""
    for seed, c in curves:
        ax.plot(c["step"], c[f"train_{key}"], lw=0.7, color="tab:orange", alpha=0.8,
                label=train_label if seed == curves[0][0] else None)
        ax.plot(c["step"], c[f"val_{key}"], lw=1.2, color="tab:blue",
                label="validation" if seed == curves[0][0] else None)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()


def curve_files(all_curves, title):
    """{"curves.csv": bytes, "curves.png": bytes (with matplotlib)} of the training curves."""
    keys = ("step", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
    lines = ["seed," + ",".join(keys)]
    for seed, c in all_curves:
        for row in zip(*(c[k] for k in keys)):
            lines.append(f"{seed}," + ",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
    out = {"curves.csv": ("\n".join(lines) + "\n").encode()}
    plt = pyplot("curves.png")
    if plt is None:
        return out
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("accuracy", "loss"), ("accuracy", "cross-entropy")):
        plot_curves(ax, all_curves, key, "train (batch)")
        ax.set_ylabel(label)
    fig.suptitle(title)
    fig.tight_layout()
    out["curves.png"] = png(fig, dpi=120)
    return out
