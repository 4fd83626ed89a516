"""Loss-curve figures for papers: validation loss against training tokens, PNG and PDF."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or assumed

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

# Okabe and Ito's colour-blind-safe palette (Color Universal Design, 2008), black first.
PALETTE = ["#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442", "#999999"]
LINESTYLES = ["-", "--", ":", "-."]
TWO_COLUMN_WIDTH_IN = 7.0
MAX_LINES_PER_PANEL = 10

STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 6.5,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,  # embed TrueType fonts, which publishers' checks accept
    "savefig.bbox": "tight",
    "savefig.dpi": 200,
}


def _format_tokens(value: float, _position: int) -> str:
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= divisor:
            return f"{value / divisor:g}{suffix}"
    return f"{value:g}"


def _curves(runs: pd.DataFrame, history: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Join histories with run labels; one row per (label, step) with mean, min and max over seeds."""
    points = history[history["metric"] == metric].merge(runs[["run_id", "label", "tokens_per_step"]], on="run_id")
    points["tokens"] = points["step"] * points["tokens_per_step"]
    return (
        points.groupby(["label", "tokens"])["value"].agg(["mean", "min", "max", "count"]).reset_index()
    )


def _panels(runs: pd.DataFrame, baseline_label: str | None) -> list[tuple[str, list[str]]]:
    """Split the variants into panels: one panel when few, else one per attention value."""
    labels = list(dict.fromkeys(runs["label"]))
    if len(labels) <= MAX_LINES_PER_PANEL:
        return [("", labels)]
    panels = []
    for attention in dict.fromkeys(runs["attention"]):
        panel_labels = list(dict.fromkeys(runs.loc[runs["attention"] == attention, "label"]))
        if baseline_label and baseline_label not in panel_labels:
            panel_labels.insert(0, baseline_label)
        panels.append((f"attention={attention}", panel_labels))
    return panels


def _short_label(label: str, panel_title: str) -> str:
    """Drop the axis shared by a panel (named in its title) from each legend entry."""
    if panel_title and panel_title in label.split(" "):
        return " ".join(part for part in label.split(" ") if part != panel_title)
    return label


def plot_loss_curves(
    runs: pd.DataFrame,
    history: pd.DataFrame,
    out_dir: str | Path,
    baseline_label: str | None = None,
    metric: str = "val/loss",
    stem: str = "loss_curves",
) -> list[Path]:
    """Plot ``metric`` against training tokens, one line per variant, and save PNG and PDF.

    ``runs`` needs the columns run_id, label (the variant without its seed), attention and
    tokens_per_step; ``history`` is the long format of ``analysis.runs.load_history``. With several
    seeds a variant's line is the mean and the band spans the minimum and maximum.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = _curves(runs, history, metric)
    panels = _panels(runs, baseline_label)
    columns = 1 if len(panels) == 1 else min(3, len(panels))
    rows = -(-len(panels) // columns)
    width = TWO_COLUMN_WIDTH_IN if columns > 1 else 4.5
    height = 2.6 * rows

    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False, sharey=True)
        for index, (title, labels) in enumerate(panels):
            axis = axes[index // columns][index % columns]
            for line_index, label in enumerate(labels):
                curve = curves[curves["label"] == label]
                if curve.empty:
                    continue
                is_baseline = label == baseline_label
                color = PALETTE[0] if is_baseline else PALETTE[1 + (line_index - 1) % (len(PALETTE) - 1)]
                style = "-" if is_baseline else LINESTYLES[(line_index // (len(PALETTE) - 1)) % len(LINESTYLES)]
                axis.plot(
                    curve["tokens"], curve["mean"], color=color, linestyle=style,
                    linewidth=1.8 if is_baseline else 1.1,
                    label=_short_label(label, title) + (" (baseline)" if is_baseline else ""),
                )
                if curve["count"].max() > 1:
                    axis.fill_between(curve["tokens"], curve["min"], curve["max"], color=color, alpha=0.15, linewidth=0)
            axis.set_title(title)
            axis.set_xlabel("training tokens")
            axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_format_tokens))
            axis.grid(True, linewidth=0.3, alpha=0.5)
            axis.legend(loc="upper right", frameon=False)
        for axis_row in axes:
            axis_row[0].set_ylabel("validation loss (nats/token)")
        for index in range(len(panels), rows * columns):
            axes[index // columns][index % columns].set_visible(False)
        figure.tight_layout()
        paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
        for path in paths:
            figure.savefig(path)
        plt.close(figure)
    return paths
