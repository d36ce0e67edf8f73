"""The experiments' tables and figures, beside the paper's numbers (dsconv.paper).

table1.md, table3.md, table4.md and summary.md, tradeoff.png and
figure4.png of python -m dsconv.experiments; the figures need matplotlib
(dsconv.report.pyplot).
"""
import math
from collections import defaultdict
from typing import NamedTuple

import numpy as np

from dsconv import files, mobilenet, paper, runlog, weights
from dsconv.metrics import pct
from dsconv.report import plot_curves, png

PROTOCOLS = {"image": "split by image (the paper's protocol)",
             "patient": "split by patient (no patient on both sides)"}
SELECTION_NOTE = ("Learning rate and step count chosen per cell by the best mean validation accuracy over "
                  "the shuffles (ties: lower validation loss); the test partition played no part in the "
                  "choice. Cells: our test accuracy % mean ± sample std (the paper's) · chosen lr/steps.")


class Cell(NamedTuple):
    """A cell of the experiments' tables: a variant with a bottleneck, split by image or patient with a scheme."""
    alpha: float
    resolution: int
    bottleneck: str
    group_by: str
    split: str

    @property
    def variant(self):
        return self.alpha, self.resolution


# ---- selection without peeking: per cell, the setting with the best mean validation accuracy


def cell_key(row):
    return Cell(float(row["alpha"]), int(row["resolution"]), row["bottleneck"], row["group_by"], row["split"])


def select(rows):
    """Per (alpha, resolution, bottleneck, group_by, split): the lr and step count chosen on validation.

    The setting with the highest mean validation accuracy over the seeds wins;
    ties go to the lower mean validation loss, then fewer steps, then the
    higher rate. Test accuracy is only read for the chosen setting.
    Returns {Cell: {"lr", "steps", "val", "test", "test_std", "sensitivity",
    "specificity", "n", "trained_resolution", "subtypes"}} (accuracies as
    fractions); "subtypes": the chosen setting's bacterial against viral
    figures (mean_std of each runlog.SUBTYPES figure), NaN where a run lacks them.
    """
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[cell_key(r)][(float(r["lr"]), int(r["steps"]))].append(r)
    out = {}
    for cell, settings in by.items():
        def score(item):
            (lr, steps), rs = item
            # rounded: equal accuracy sums must tie whatever the order of the float additions
            return (-round(np.mean([r["val_accuracy"] for r in rs]), 9),
                    round(np.mean([r["val_loss"] for r in rs]), 9), steps, -lr)
        (lr, steps), rs = min(settings.items(), key=score)
        test = [r["test_accuracy"] for r in rs]
        out[cell] = {"lr": lr, "steps": steps, "val": float(np.mean([r["val_accuracy"] for r in rs])),
                     "test": float(np.mean(test)), "test_std": float(np.std(test, ddof=1)) if len(test) > 1
                     else math.nan, "sensitivity": float(np.mean([r["test_sensitivity"] for r in rs])),
                     "specificity": float(np.mean([r["test_specificity"] for r in rs])), "n": len(rs),
                     "trained_resolution": int(rs[0]["trained_resolution"]),
                     "subtypes": {k: mean_std([r.get(k, math.nan) for r in rs]) for k in runlog.SUBTYPES}}
    return out


def mean_std(values):
    """(mean, sample std) of the shuffles' figures; std NaN for one."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def paper_setting(rows):
    """The paper's best cell at its own lr and step count (not chosen on validation), as select() gives; or None."""
    cell, (lr, steps) = Cell(*paper.BEST_CELL), paper.BEST_SETTING
    rs = [r for r in rows if cell_key(r) == cell and float(r["lr"]) == lr and int(r["steps"]) == steps]
    return (cell, select(rs)[cell]) if rs else None


def best_cell(selected, scheme):
    """The cell with the best validation accuracy at the paper's protocol and ``scheme``: (cell, selection)."""
    cells = [(s["val"], -s["lr"], c) for c, s in selected.items() if c.group_by == "image" and c.split == scheme]
    if not cells:
        cells = [(s["val"], -s["lr"], c) for c, s in selected.items()]
    cell = max(cells)[2]
    return cell, selected[cell]


def name(variant):
    """"0.75-224", "1.0-224": the paper's spelling of (alpha, resolution)."""
    return f"{variant[0]:.2f}-{variant[1]}".replace("1.00", "1.0")


def pm(mean, std, digits=2):
    """"96.1 ± 0.41": mean ± std."""
    return f"{mean:.1f} ± {'n/a' if math.isnan(std) else f'{std:.{digits}f}'}"


def table4(selected, grid, alphas):
    """table4.md: one table per protocol and bottleneck of the grid, the paper's rows, ours beside the paper's.

    ``selected``: {Cell: selection}; ``alphas``: the widths with weights; other rows say "no weights".
    """
    schemes = grid.schemes
    protocols = [g for g in grid.group_bys if any(c.group_by == g for c in selected)]
    kinds = [k for k in grid.bottlenecks if any(c.bottleneck == k for c in selected)]
    lines = ["# Table 4: test accuracy of every variant and split scheme", "", SELECTION_NOTE, ""]
    marked = False
    for g in protocols:
        for kind in kinds:
            lines += [f"## {PROTOCOLS[g].capitalize()}, {kind} bottleneck", "",
                      "| Model | " + " | ".join(schemes) + " |", "|---|" + "---|" * len(schemes)]
            variants = list(paper.VARIANTS) + sorted({c.variant for c in selected} - set(paper.VARIANTS))
            for v in variants:
                alpha, resolution = v
                theirs = paper.TABLE4.get(v)
                cells, label = [], name(v)
                for scheme in schemes:
                    p = theirs[paper.SCHEMES.index(scheme)] if theirs and scheme in paper.SCHEMES else None
                    ref = f"({p[0]:.1f} ± {p[1]:.2f})" if p else "(not in the paper)"
                    s = selected.get(Cell(*v, kind, g, scheme))
                    if s is None:
                        ours = "no weights" if alpha not in alphas else "not in this grid"
                        cells.append(f"{ours} {ref}")
                        if alpha not in alphas:
                            label = (f"{name(v)} (no weights: `python -m dsconv.weights convert "
                                     f"PATH/{weights.keras_file_name(alpha, 224)}`)")
                        continue
                    if s["trained_resolution"] != resolution:
                        label, marked = f"{name(v)} †", True
                    cells.append(f"{pm(100 * s['test'], 100 * s['test_std'])} {ref} · {s['lr']:g}/{s['steps']}")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
    if marked:
        lines += ["† run on the weights trained at 224 (the only ones available), the paper used weights "
                  "trained at this resolution.", ""]
    lines += ["The paper writes 1.0-244, 0.75-244, ... for the 224 variants. Variants without weights: "
              "Keras' file for that alpha is not available here; with it (from "
              "`keras.applications.MobileNet(alpha=...)`, in ~/.keras/models) converted as the row says, "
              "the grid runs them too.", ""]
    return "\n".join(lines)


def table1(rows, schemes):
    """table1.md: partition sizes per scheme, the paper's, ours by image and by patient."""
    sizes = defaultdict(set)
    for r in rows:
        sizes[r["group_by"], r["split"]].add((int(r["n_train"]), int(r["n_val"]), int(r["n_test"])))
    lines = ["# Table 1: split sizes (train | validation | test)", "",
             "| Scheme | paper | ours, by image | ours, by patient (range over shuffles) |", "|---|---|---|---|"]

    def show(found):
        if not found:
            return "not run"
        lo, hi = np.min(list(found), axis=0), np.max(list(found), axis=0)
        return " \\| ".join(str(a) if a == b else f"{a}–{b}" for a, b in zip(lo, hi))
    for scheme in schemes:
        theirs = " \\| ".join(map(str, paper.TABLE1[scheme])) if scheme in paper.TABLE1 else "—"
        lines.append(f"| {scheme} | {theirs} | {show(sizes['image', scheme])} | {show(sizes['patient', scheme])} |")
    lines += ["", "By image the sizes are exact (data.split); by patient whole patients are dealt out, so "
              "the sizes come close to the targets.", ""]
    return "\n".join(lines)


def table3():
    """table3.md: million mult-adds and parameters, counted and the paper's, errata flagged."""
    lines = ["# Table 3: million mult-adds and parameters (1000-class ImageNet network)", "",
             "| Model | mult-adds, ours | mult-adds, paper | parameters, ours | parameters, paper |",
             "|---|---|---|---|---|",
             f"| Full convolution (1.0-224) | — | {paper.FULL_CONV[0]} | — | {paper.FULL_CONV[1]} |"]
    for v in paper.VARIANTS:
        madds, params = mobilenet.count(*v)
        pm_, pp = paper.TABLE3[v]
        flag = " *" if v in paper.TABLE3_ERRATA else ""
        lines.append(f"| {name(v)} | {madds / 1e6:.0f}{flag} | {pm_} | {params / 1e6:.2f} | {pp:.2f} |")
    lines += ["", "* The paper copies TF-slim's table, whose mult-adds for these rows are off; counting the "
              "layers (dsconv.mobilenet.count) gives ours, and Howard et al.'s own Table 6 agrees (325 M for "
              "0.75-224, 149 M for 0.5-224).", ""]
    return "\n".join(lines)


def tradeoff(path, selected, grid, scheme, plt):
    """Test accuracy against million mult-adds, by image and by patient, one panel per bottleneck."""
    kinds = [k for k in grid.bottlenecks if any(c.bottleneck == k and c.split == scheme for c in selected)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        xs = [mobilenet.count(*v)[0] / 1e6 for v in paper.VARIANTS]
        ax.scatter(xs, [paper.TABLE4[v][paper.SCHEMES.index(scheme)][0] for v in paper.VARIANTS], marker="x",
                   color="gray", label="paper (by image)")
        for g, color in (("image", "tab:blue"), ("patient", "tab:red")):
            pts = sorted((mobilenet.count(*c.variant)[0] / 1e6, s, c) for c, s in selected.items()
                         if c.bottleneck == kind and c.group_by == g and c.split == scheme)
            if not pts:
                continue
            for alpha in sorted({c.alpha for _, _, c in pts}):
                line = [(x, s) for x, s, c in pts if c.alpha == alpha]
                ax.errorbar([x for x, _ in line], [100 * s["test"] for _, s in line],
                            yerr=[100 * np.nan_to_num(s["test_std"]) for _, s in line], color=color,
                            marker="o", capsize=3, label=f"ours, by {g}" if alpha == pts[0][2].alpha else None)
            for x, s, c in pts if g == "image" else ():
                ax.annotate(name(c.variant), (x, 100 * s["test"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xticks([10, 20, 50, 100, 200, 500])
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
        ax.set_xlabel("million mult-adds (counted)")
        ax.set_title(f"{kind} bottleneck, split {scheme}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test accuracy % (mean ± std over shuffles)")
    fig.suptitle("Accuracy against cost: lr and steps chosen on validation", fontsize=10)
    fig.tight_layout()
    files.write_bytes(path, png(fig))


def figure4(path, curves, cell, sel, paper_setting, plt):
    """The paper's Figure 4 for a cell at its selected setting: train (batch) and validation accuracy over steps."""
    fig, ax = plt.subplots(figsize=(7, 4))
    plot_curves(ax, curves, "accuracy", "train (batch of 100)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.7, 1.0)
    ax.set_title(f"MobileNet {name(cell.variant)} {cell.bottleneck}, split by {cell.group_by} {cell.split}, "
                 f"lr {sel['lr']:g}, {sel['steps']} steps, {len(curves)} shuffles"
                 + ("\nthe paper's Figure 4 setting" if paper_setting else "\nbest by validation"), fontsize=9)
    fig.tight_layout()
    files.write_bytes(path, png(fig))


def clock(seconds):
    """"12:05": minutes and seconds."""
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def headline(schemes):
    """The scheme of the summary's headline and the figures: the paper's first, 80/10/10, where run."""
    return paper.SCHEMES[0] if paper.SCHEMES[0] in schemes else schemes[0]


def summary(selected, rows, trainings, grid, alphas, invocations, facts, figure_cell, paper_cell):
    """summary.md: headline numbers, leakage, cost, and what differs from the paper."""
    have = sorted(alphas, reverse=True)
    missing = [a for a in mobilenet.ALPHAS if a not in alphas]
    lines = ["# Reproducing the paper: summary", ""]
    head = headline(grid.schemes)
    best = f"{pm(*paper.BEST_RESULT[:2])}, {paper.BEST_RESULT[2]:.1f}%, {paper.BEST_RESULT[3]:.1f}%"
    paper_variant = name(Cell(*paper.BEST_CELL).variant)
    extra = " bacterial vs viral, by image | by patient |" if grid.subtypes else ""
    lines += [f"## Headline: split {head}", "", SELECTION_NOTE.split(" Cells:")[0], "",
              "| Model | bottleneck | by image | by patient | paper (by image) | chosen lr/steps (image; patient) |"
              + extra, "|---|---|---|---|---|---|" + "---|---|" * grid.subtypes]
    for v in grid.variants:
        for kind in grid.bottlenecks:
            si, sp = selected.get(Cell(*v, kind, "image", head)), selected.get(Cell(*v, kind, "patient", head))
            if not si and not sp:
                continue
            theirs = paper.TABLE4.get(v)
            p = theirs[paper.SCHEMES.index(head)] if theirs and head in paper.SCHEMES else None

            def show(s):
                return pm(100 * s["test"], 100 * s["test_std"]) if s else "not run"

            def setting(s):
                return f"{s['lr']:g}/{s['steps']}" if s else "—"
            lines.append(f"| {name(v)}{' †' if si and si['trained_resolution'] != v[1] else ''} | {kind} | "
                         f"{show(si)} | {show(sp)} | {pm(*p) if p else '—'} | {setting(si)}; {setting(sp)} |"
                         + (f" {subtype_cell(si)} | {subtype_cell(sp)} |" if grid.subtypes else ""))
    lines += ["", "Test accuracy % at threshold 0.5, mean ± sample std over the shuffles. "
              "† 224-trained weights run at a smaller resolution.", ""]
    if grid.subtypes:
        lines += [SUBTYPES_NOTE + subtype_cost(rows), ""]
    if figure_cell:
        c, s = figure_cell
        lines += [f"Best by validation, split by {c.group_by} {c.split}: {name(c.variant)} {c.bottleneck}, lr "
                  f"{s['lr']:g}, {s['steps']} steps: test accuracy {pm(100 * s['test'], 100 * s['test_std'])}, "
                  f"sensitivity {pct(s['sensitivity'])}%, specificity {pct(s['specificity'])}% (paper, "
                  f"{paper_variant}: {best}).", ""]
    if paper_cell:
        c, s = paper_cell
        lines += [f"The paper's best cell at its own setting ({name(c.variant)} {c.bottleneck}, split by "
                  f"{c.group_by} {c.split}, lr {s['lr']:g}, {s['steps']} steps, not chosen on validation): test "
                  f"accuracy {pm(100 * s['test'], 100 * s['test_std'])}, sensitivity {pct(s['sensitivity'])}%, "
                  f"specificity {pct(s['specificity'])}% (paper: {best}). Its curves, the paper's Figure 4: "
                  "figure4.png.", ""]
    gaps = [selected[c._replace(group_by="image")]["test"] - s["test"] for c, s in selected.items()
            if c.group_by == "patient" and c._replace(group_by="image") in selected]
    if gaps:
        lines += [f"Split by image minus split by patient, over the {len(gaps)} variant/bottleneck/scheme "
                  f"cells run both ways: {100 * np.mean(gaps):+.1f} points on average (from "
                  f"{100 * min(gaps):+.1f} to {100 * max(gaps):+.1f}).", ""]
    lines += cost(rows, trainings, grid, invocations)
    lines += ["## What differs from the paper, and why", "",
              leak_text(facts, head),
              "- **Bottleneck.** retrain.py used TF-slim's 1001 logits (a background class first); Keras' "
              "weights give 1000 logits (the `logits` tables). The pooled 1024·alpha vector is shown too.",
              f"- **Weights.** The paper used TF-slim checkpoints trained at each resolution; here only "
              f"224-trained Keras weights are available, for alpha {' and '.join(map(str, have))}, and "
              f"they also run at 192, 160 and 128 (marked †)."
              + (f" Alpha {' and '.join(map(str, missing))} {'has' if len(missing) == 1 else 'have'} no weights "
                 "(listed as such)." if missing
                 else ""),
              "- **Selection.** The paper does not say how a cell's lr and steps were chosen; here they are "
              "chosen on validation, and only the chosen setting's test accuracy is reported.",
              "- **Images.** The shared copies are resized to 224 x 224 JPEG; the paper read the originals. "
              "retrain.py measured validation on 100 random samples, we on the whole partition.",
              "- **Mult-adds.** Table 3's counts are ours beside the paper's, whose TF-slim errata are flagged "
              "in table3.md; tradeoff.png uses ours.", ""]
    return "\n".join(lines)


SUBTYPES_NOTE = ("Bacterial vs viral (--subtypes): the three-class head (NORMAL, BACTERIAL, VIRAL) trained beside "
                 "each binary one on the same partition, seed, rate and steps, at the setting chosen on the binary "
                 "validation accuracy; on the test partition's pneumonia X-rays, its accuracy % and AUC, mean ± "
                 "sample std over the shuffles, with bacterial / viral recall %, at the subtype threshold chosen on "
                 "the validation partition's pneumonia X-rays (Youden's J). ")


def subtype_cell(s):
    """"86.0 ± 2.10, AUC 0.912 ± 0.020 (91.2 / 78.3)": bacterial against viral of a selection, or "not run"."""
    if not s:
        return "not run"
    f = s["subtypes"]
    auc, auc_std = f["subtype_test_auc"]
    return (f"{pm(*(100 * v for v in f['subtype_test_accuracy']))}, AUC {auc:.3f} ± "
            f"{'n/a' if math.isnan(auc_std) else f'{auc_std:.3f}'} ({pct(f['subtype_test_sensitivity'][0])} / "
            f"{pct(f['subtype_test_specificity'][0])})")


def subtype_cost(rows):
    """What the three-class heads cost: their training seconds beside the binary heads'."""
    three = sum(r["subtype_train_s"] for r in rows if not math.isnan(r["subtype_train_s"]))
    binary = sum(r["train_s"] for r in rows if not math.isnan(r["subtype_train_s"]))
    return (f"Their trainings took {three:.0f} s against {binary:.0f} s for the binary heads of the same runs "
            "(each training's own wall time, summed; two run at a time).")


def cost(rows, trainings, grid, invocations):
    """The Cost section: every invocation that wrote to this runs.csv with this grid, and the bottleneck rates."""
    lines = ["## Cost", "",
             f"runs.csv holds {len(rows)} runs from {trainings} trainings, each to {max(grid.steps)} steps with "
             f"snapshots at {', '.join(map(str, sorted(grid.steps)))}. Wall time per invocation of the command "
             "(a resumed grid has several):", "",
             "| started | wall time (min:s) | trainings | training, wall (s) | bottlenecks computed | images/s |",
             "|---|---|---|---|---|---|"]
    for inv in invocations:
        images = sum(e["images"] for e in inv["extract"])
        secs = sum(e["group_wall_s"] for e in inv["extract"] if e["images"])
        lines.append(f"| {inv['started']} | {clock(inv['wall_s'])} | {inv['trainings']} | {inv['train_s']:.0f} | "
                     f"{images} | {f'{images / secs:.0f}' if images else '—'} |")
    lines += ["", "Bottlenecks (logits and pooled from one forward pass; the resolutions of an alpha share each "
              "image's decoding), images/s of the forward pass per variant where computed: "
              + ", ".join(f"{e['variant']} {e['images'] / e['seconds']:.0f}" for inv in invocations
                          for e in inv["extract"] if e["images"]) + ". The images/s column above counts the "
              "whole extraction (file hashes, decoding, cache writes).",
              "Single measurements on two cores shared with other work: noisy.", ""]
    return lines


def leak_text(facts, scheme):
    """The patient leakage item of the summary, from experiments.leakage's facts."""
    dup = facts["duplicate_groups"]
    text = (f"- **Patient leakage.** The paper splits by image. {facts['images']} images come from "
            f"{facts['patients']} patients; at {scheme} by image, "
            f"{pct(facts['test_with_patient_in_train'], 0)}% of test images (mean over the shuffles) have "
            f"their patient in the training partition too. ")
    if dup:
        text += (f"{dup} groups of byte-identical files exist ({facts['duplicates_within_patient']} within "
                 "one patient), so a split by image can put the very same image on both sides. ")
    return text + "The split by patient shows the accuracy without that help."
