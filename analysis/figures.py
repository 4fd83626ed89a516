"""Loss-curve figures for papers: validation loss against training tokens, PNG and PDF."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or assumed

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
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


AXES = ("attention", "mlp", "norm", "position")


def _curves(runs: pd.DataFrame, history: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Join histories with run labels; one row per (label, tokens) with mean, min and max over seeds."""
    points = history[history["metric"] == metric].merge(runs[["run_id", "label", "tokens_per_step"]], on="run_id")
    points["tokens"] = points["step"] * points["tokens_per_step"]
    return points.groupby(["label", "tokens"])["value"].agg(["mean", "min", "max", "count"]).reset_index()


def _variants(runs: pd.DataFrame) -> pd.DataFrame:
    """Return one row per variant (label) with its axis values, in the order the runs were made."""
    return runs.drop_duplicates("label")[["label", *AXES]].reset_index(drop=True)


def _short_label(variant: pd.Series, baseline: pd.Series | None, varying: list[str]) -> str:
    """Name a variant by what distinguishes it: the axes changed from the baseline, or the varying axes."""
    if baseline is not None:
        if variant["label"] == baseline["label"]:
            return "baseline (" + ", ".join(str(baseline[axis]) for axis in AXES) + ")"
        changed = [axis for axis in AXES if variant[axis] != baseline[axis]]
        if len(changed) == 1:
            return f"{changed[0]}={variant[changed[0]]}"
    return ", ".join(f"{axis}={variant[axis]}" for axis in varying) or variant["label"]


def _y_limits(curves: pd.DataFrame) -> tuple[float, float] | None:
    """Limits that show the trained part of the curves; the untrained loss at 0 tokens is cut off."""
    trained = curves[curves["tokens"] > 0]
    if trained.empty:
        return None
    low, high = trained["min"].min(), trained["max"].max()
    margin = 0.05 * max(high - low, 1e-3)
    return low - margin, high + margin


def plot_loss_curves(
    runs: pd.DataFrame,
    history: pd.DataFrame,
    out_dir: str | Path,
    baseline_label: str | None = None,
    metric: str = "val/loss",
    stem: str = "loss_curves",
) -> list[Path]:
    """Plot ``metric`` against training tokens, one line per variant, and save PNG and PDF.

    ``runs`` needs the columns run_id, label (the variant without its seed), the axis columns and
    tokens_per_step; ``history`` is the long format of ``analysis.runs.load_history``. With several
    seeds a variant's line is the mean and the band spans the minimum and maximum.

    Up to MAX_LINES_PER_PANEL variants share one panel. A larger grid gets one panel per value of
    its first varying axis, colour for the second and line style for the third, with one legend.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = _curves(runs, history, metric)
    variants = _variants(runs)
    varying = [axis for axis in AXES if variants[axis].nunique() > 1]
    baseline_rows = variants[variants["label"] == baseline_label]
    baseline = baseline_rows.iloc[0] if not baseline_rows.empty else None
    factorial = len(variants) > MAX_LINES_PER_PANEL and 2 <= len(varying) <= 3

    with plt.rc_context(STYLE):
        if factorial:
            figure = _plot_factorial(curves, variants, varying, baseline)
        else:
            figure = _plot_single(curves, variants, varying, baseline)
        limits = _y_limits(curves)
        if limits:
            for axis in figure.axes:
                axis.set_ylim(*limits)
        paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
        for path in paths:
            figure.savefig(path)
        plt.close(figure)
    return paths


def _style_axis(axis) -> None:
    axis.set_xlabel("training tokens")
    axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_format_tokens))
    axis.grid(True, linewidth=0.3, alpha=0.5)


def _draw(axis, curve: pd.DataFrame, color: str, linestyle: str, linewidth: float, label: str | None) -> None:
    axis.plot(curve["tokens"], curve["mean"], color=color, linestyle=linestyle, linewidth=linewidth, label=label)
    if curve["count"].max() > 1:
        axis.fill_between(curve["tokens"], curve["min"], curve["max"], color=color, alpha=0.15, linewidth=0)


def _plot_single(curves: pd.DataFrame, variants: pd.DataFrame, varying: list[str], baseline) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(TWO_COLUMN_WIDTH_IN * 0.62, 2.8))
    colors = [c for c in PALETTE[1:]]
    index = 0
    for _, variant in variants.iterrows():
        curve = curves[curves["label"] == variant["label"]]
        if curve.empty:
            continue
        label = _short_label(variant, baseline, varying)
        if baseline is not None and variant["label"] == baseline["label"]:
            _draw(axis, curve, PALETTE[0], "-", 1.8, label)
            continue
        color = colors[index % len(colors)]
        linestyle = LINESTYLES[(index // len(colors)) % len(LINESTYLES)]
        _draw(axis, curve, color, linestyle, 1.1, label)
        index += 1
    _style_axis(axis)
    axis.set_ylabel("validation loss (nats/token)")
    axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    figure.tight_layout()
    return figure


def _plot_factorial(curves: pd.DataFrame, variants: pd.DataFrame, varying: list[str], baseline) -> plt.Figure:
    panel_axis, color_axis = varying[0], varying[1]
    style_axis = varying[2] if len(varying) > 2 else None
    panel_values = list(dict.fromkeys(variants[panel_axis]))
    color_of = {value: PALETTE[1 + i % (len(PALETTE) - 1)] for i, value in enumerate(dict.fromkeys(variants[color_axis]))}
    style_of = (
        {value: LINESTYLES[i % len(LINESTYLES)] for i, value in enumerate(dict.fromkeys(variants[style_axis]))}
        if style_axis
        else {}
    )
    columns = min(3, len(panel_values))
    rows = -(-len(panel_values) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(TWO_COLUMN_WIDTH_IN, 2.1 * rows + 0.5), squeeze=False, sharex=True, sharey=True
    )
    baseline_curve = curves[curves["label"] == baseline["label"]] if baseline is not None else None
    for index, value in enumerate(panel_values):
        axis = axes[index // columns][index % columns]
        if baseline_curve is not None and not baseline_curve.empty:
            _draw(axis, baseline_curve, PALETTE[0], "-", 1.6, None)
        for _, variant in variants[variants[panel_axis] == value].iterrows():
            curve = curves[curves["label"] == variant["label"]]
            if curve.empty or (baseline is not None and variant["label"] == baseline["label"]):
                continue
            linestyle = style_of.get(variant[style_axis], "-") if style_axis else "-"
            _draw(axis, curve, color_of[variant[color_axis]], linestyle, 1.0, None)
        axis.set_title(f"{panel_axis}={value}")
        _style_axis(axis)
    for axis_row in axes:
        axis_row[0].set_ylabel("validation loss\n(nats/token)")
    for index in range(len(panel_values), rows * columns):
        axes[index // columns][index % columns].set_visible(False)

    # One legend for the whole figure: colour means one axis, line style the other.
    handles = []
    if baseline is not None:
        handles.append(Line2D([], [], color=PALETTE[0], linewidth=1.6, label="baseline (" + ", ".join(str(baseline[a]) for a in AXES) + ")"))
    handles += [Line2D([], [], color=color, linewidth=1.2, label=f"{color_axis}={value}") for value, color in color_of.items()]
    handles += [Line2D([], [], color="#555555", linestyle=style, linewidth=1.0, label=f"{style_axis}={value}") for value, style in style_of.items()]
    figure.tight_layout(rect=(0, 0.1 if rows > 1 else 0.16, 1, 1))
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), frameon=False)
    return figure
