"""Reports written by rank 0 (atomically): per-class AUROC beside the CheXNet paper's
column (markdown + CSV), a PNG of the 14 ROC curves, per-image predictions CSV."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence

import numpy as np

from chexnet import metrics
from chexnet.labels import CHEXNET_PUBLISHED_AUROC, CLASS_NAMES
from hooks.errors import DataError

AUROC_MD, AUROC_CSV, ROC_PNG, SUMMARY_JSON, PREDICTIONS_CSV = (
    "auroc.md",
    "auroc.csv",
    "roc_curves.png",
    "summary.json",
    "predictions.csv",
)
PROB_PREFIX = "prob_"
# A text cell starting with one of these is a formula to a spreadsheet program (OWASP's CSV
# injection rule); a leading ' makes it text. A leading ' is itself escaped, so reading back
# is exact.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def spreadsheet_safe(text: str) -> str:
    """A text cell (never a number) as a spreadsheet shows it, not as a formula it runs."""
    return "'" + text if text.startswith(FORMULA_START) else text


def spreadsheet_text(cell: str) -> str:
    """The text `spreadsheet_safe` escaped."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_START) else cell


CSV_HEADER = ["class", "auroc", "ci_low", "ci_high", "positives", "chexnet_2017_other_split"]


def _fmt(value: float) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.4f}"
    )


PAPER_CAVEAT = ("CheXNet (2017): Rajpurkar et al.'s published AUROC on THEIR test split "
                "(never released, other patients): context, not a baseline to subtract.")


def _ci(intervals, k: int) -> tuple[float, float]:
    if intervals is None:
        return math.nan, math.nan
    return float(intervals.low[k]), float(intervals.high[k])


def table_rows(result: metrics.AurocResult, intervals=None) -> list[dict]:
    """One row per class: AUROC, its bootstrap interval (NaN without ``intervals``),
    positives, and the CheXNet paper's AUROC on its own, different, test split."""
    rows = []
    for k, (name, value, positives) in enumerate(zip(result.class_names, result.auroc,
                                                     result.positives)):
        low, high = _ci(intervals, k)
        rows.append({"class": name, "auroc": float(value), "ci_low": low, "ci_high": high,
                     "positives": int(positives),
                     "chexnet_2017_other_split": CHEXNET_PUBLISHED_AUROC.get(name)})
    return rows


def _fmt_ci(low: float, high: float) -> str:
    return "n/a" if math.isnan(low) else f"{low:.4f} - {high:.4f}"


def markdown_table(result: metrics.AurocResult, title: str = "",
                   warnings: Sequence[str] = (), intervals=None) -> str:
    published_mean = float(np.mean([CHEXNET_PUBLISHED_AUROC[c] for c in result.class_names]))
    level = f"{intervals.level:.0%} CI" if intervals is not None else "CI"
    lines = [
        f"### Per-class AUROC: {title}" if title else "### Per-class AUROC",
        "",
        *[f"**WARNING**: {w}\n" for w in warnings],
        f"| class | AUROC | {level} | positives | CheXNet (2017), other test split |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in table_rows(result, intervals):
        lines.append(
            f"| {row['class']} | {_fmt(row['auroc'])} | {_fmt_ci(row['ci_low'], row['ci_high'])}"
            f" | {row['positives']} | {_fmt(row['chexnet_2017_other_split'])} |"
        )
    mean_ci = (_fmt_ci(intervals.mean_low, intervals.mean_high) if intervals is not None
               else "n/a")
    lines.append(
        f"| **mean** ({result.num_defined} defined) | **{_fmt(result.mean_auroc)}** | "
        f"{mean_ci} | | {published_mean:.4f} |"
    )
    lines += ["", f"{result.num_images} images."]
    if intervals is not None:
        lines += ["", f"{level}: percentile bootstrap over {intervals.patients} patients "
                  f"(all images of a drawn patient), {intervals.resamples} resamples, seed "
                  f"{intervals.seed}."]
    else:
        lines += ["", "No confidence intervals (--bootstrap_resamples=0)."]
    lines += ["", PAPER_CAVEAT]
    if result.notes:
        lines += [""] + [f"- note: {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def _write_text(text: str):
    def write(path):
        with open(path, "w") as f:
            f.write(text)

    return write


def write_report(
    out_dir: str,
    result: metrics.AurocResult,
    labels: np.ndarray,
    probs: np.ndarray,
    context,
    *,
    title: str = "",
    summary: dict | None = None,
    warnings: Sequence[str] = (),
    intervals=None,
) -> list[str]:
    """auroc.md, auroc.csv, roc_curves.png (+ summary.json) in out_dir, by rank 0 only;
    with ``intervals`` (`chexnet.bootstrap.Intervals`) in all four."""
    from hooks.distributed.horovod_glue import write_atomically

    if not context.is_chief:
        return []
    written = []

    def write_csv(path):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_HEADER)
            for row in table_rows(result, intervals):
                w.writerow([spreadsheet_safe(row["class"]), _fmt(row["auroc"]),
                            _fmt(row["ci_low"]), _fmt(row["ci_high"]), row["positives"],
                            _fmt(row["chexnet_2017_other_split"])])
            mean_ci = ((intervals.mean_low, intervals.mean_high) if intervals is not None
                       else (math.nan, math.nan))
            w.writerow(["mean", _fmt(result.mean_auroc), _fmt(mean_ci[0]), _fmt(mean_ci[1]),
                        "", ""])

    for name, writer in (
        (AUROC_MD, _write_text(markdown_table(result, title, warnings, intervals))),
        (AUROC_CSV, write_csv),
        (ROC_PNG, lambda p: plot_roc_curves(p, labels, probs, result, title, intervals)),
    ):
        path = os.path.join(out_dir, name)
        write_atomically(path, writer, context)
        written.append(path)
    if summary is not None:
        body = dict(
            summary,
            per_class_auroc={
                k: (None if math.isnan(v) else v) for k, v in result.as_dict().items()
            },
            notes=list(result.notes),
            auroc_ci=(intervals.as_dict(result.class_names) if intervals is not None
                      else None),
        )
        body = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in body.items()}
        path = os.path.join(out_dir, SUMMARY_JSON)
        write_atomically(
            path, _write_text(json.dumps(body, indent=1, sort_keys=True, default=float)), context
        )
        written.append(path)
    return written


def plot_roc_curves(
    path: str, labels: np.ndarray, probs: np.ndarray, result: metrics.AurocResult,
    title: str = "", intervals=None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 5, figsize=(17, 10.5), sharex=True, sharey=True)
    for k, ax in enumerate(axes.ravel()):
        if k >= len(result.class_names):
            ax.axis("off")
            continue
        name = result.class_names[k]
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        if not math.isnan(result.auroc[k]):
            fpr, tpr = metrics.roc_curve(labels[:, k], probs[:, k])
            ax.plot(fpr, tpr, lw=1.5)
        ci = "" if intervals is None else f" [{_fmt_ci(*_ci(intervals, k))}]"
        ax.set_title(
            f"{name}\nAUROC {_fmt(result.auroc[k])}{ci}\n(paper, other split: "
            f"{CHEXNET_PUBLISHED_AUROC[name]:.3f})",
            fontsize=8,
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    for ax in axes[-1]:
        ax.set_xlabel("false positive rate")
    for ax in axes[:, 0]:
        ax.set_ylabel("true positive rate")
    mean_ci = ("" if intervals is None else
               f" [{_fmt_ci(intervals.mean_low, intervals.mean_high)}, "
               f"{intervals.level:.0%} CI, patient bootstrap]")
    fig.suptitle(f"{title} - mean AUROC {_fmt(result.mean_auroc)}{mean_ci}", fontsize=11)
    # Fixed margins: tight_layout measures every text box and costs most of the plot's time.
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.06, top=0.88, wspace=0.08, hspace=0.5)
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)


def write_predictions_csv(path: str, names: Sequence[str], probs: np.ndarray, context) -> bool:
    """Per-image probabilities: ``Image Index`` + ``prob_<Class>`` (public CheXNet format)."""
    from hooks.distributed.horovod_glue import write_atomically

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Image Index"] + [PROB_PREFIX + c for c in CLASS_NAMES])
            for name, row in zip(names, probs):
                w.writerow([spreadsheet_safe(name)] + [f"{float(p):.6f}" for p in row])

    return write_atomically(path, write, context)


def read_predictions_csv(path: str) -> tuple[list[str], np.ndarray]:
    """Read a predictions file; DataError for missing columns, bad numbers, duplicates,
    bytes that are not UTF-8."""
    from chexnet.splits import open_text

    with open_text(path) as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if "Image Index" not in header:
            raise DataError(f"{path}: no 'Image Index' column")
        missing = [c for c in CLASS_NAMES if PROB_PREFIX + c not in header]
        if missing:
            raise DataError(
                f"{path}: missing columns {', '.join(PROB_PREFIX + c for c in missing)}"
            )
        i_name = header.index("Image Index")
        cols = [header.index(PROB_PREFIX + c) for c in CLASS_NAMES]
        names, rows, seen = [], [], set()
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            name = spreadsheet_text(row[i_name].strip())
            if name in seen:
                raise DataError(f"{path}:{line_no}: image {name} listed twice")
            seen.add(name)
            try:
                values = [float(row[c]) for c in cols]
            except (ValueError, IndexError):
                raise DataError(f"{path}:{line_no}: probabilities must be numbers") from None
            if not all(math.isfinite(v) for v in values):
                raise DataError(f"{path}:{line_no}: non-finite probability")
            names.append(name)
            rows.append(values)
    if not names:
        raise DataError(f"{path}: no predictions")
    return names, np.asarray(rows, np.float64)
