"""Paper figures of an ablation: loss curves, per-axis panels, final-loss bars and a grid heatmap.

Every function writes its figure at the two widths of ``analysis.style`` as PDF and PNG
(``<stem>.pdf``, ``<stem>.png``, ``<stem>_1col.pdf``, ``<stem>_1col.png``) and returns the paths.
Inputs are the frames of ``analysis.runs`` (runs and long-format history) and, for the bars, the
table of ``analysis.tables.variant_table``. Runs superseded by a retry are left out.

Loss curves plot a variant's mean over seeds; with several seeds a band spans the seeds' minimum
and maximum. With ``smooth`` (an EMA weight in (0, 1]) each run's series after step 0 is smoothed
before the mean: s[i] = smooth * v[i] + (1 - smooth) * s[i - 1], so 1 means no smoothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from analysis.runs import AXES
from analysis.style import (
    BASELINE_COLOR,
    BASELINE_LINEWIDTH,
    FINAL_LOSS_LABEL,
    LOSS_LABELS,
    TWO_COLUMN_IN,
    WIDTHS,
    X_AXES,
    legend_location,
    new_figure,
    paper_style,
    save_figure,
    variant_style,
)
from analysis.tables import active_runs, ablation_kind, changed_axis, variant_names, variants_of, varying_axes

MAX_LINES_PER_PANEL = 10
BAND_ALPHA = 0.18
NEUTRAL_COLOR = "#555555"  # legend entries that show a line style only


# Data.

def _check_smooth(smooth: float | None) -> None:
    if smooth is not None and not 0 < smooth <= 1:
        raise ValueError(f"smooth={smooth} is invalid; the EMA weight of the newest point must be in (0, 1]")


def curve_points(
    runs: pd.DataFrame, history: pd.DataFrame, metric: str = "val/loss", x: str = "tokens", smooth: float | None = None
) -> pd.DataFrame:
    """Return one row per (label, step): the mean x and the mean, min, max and count of ``metric`` over runs.

    ``x`` is ``tokens``, ``wall_s`` or ``flops`` (tokens times the run's ``flops_per_token``);
    wall-clock times differ between seeds, so a step's x is their mean.
    """
    if x not in X_AXES:
        raise ValueError(f"x={x!r} is invalid; valid x axes: {', '.join(X_AXES)}")
    _check_smooth(smooth)
    columns = ["run_id", "label"] + [c for c in ("tokens_per_step", "flops_per_token") if c in runs.columns]
    points = history[history["metric"] == metric].merge(runs[columns], on="run_id")
    if "tokens" not in points.columns:  # a history frame without tokens, from an older caller
        points["tokens"] = points["step"] * points["tokens_per_step"]
    if x == "flops":
        points["flops"] = points["tokens"] * points["flops_per_token"]
    points = points.sort_values(["run_id", "step"])
    if smooth is not None:
        # The untrained loss at step 0 is left out of the average, so it does not hold the curve up.
        trained = points["step"] > 0
        points.loc[trained, "value"] = (
            points[trained].groupby("run_id")["value"].transform(lambda v: v.ewm(alpha=smooth, adjust=False).mean())
        )
    grouped = points.groupby(["label", "step"], sort=False)
    curves = grouped.agg(x=(x, "mean"), mean=("value", "mean"), min=("value", "min"), max=("value", "max"), count=("value", "count"))
    return curves.reset_index().sort_values(["label", "step"]).reset_index(drop=True)


def _prepare(runs: pd.DataFrame, baseline_label: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the active runs and their variants, with ``baseline_label`` (if given) as the baseline."""
    runs = active_runs(runs) if "superseded" in runs.columns else runs.reset_index(drop=True)
    runs = runs.copy()
    if baseline_label is not None:
        runs["is_baseline"] = runs["label"] == baseline_label
    elif "is_baseline" not in runs.columns:
        runs["is_baseline"] = False
    return runs, variants_of(runs)


def _y_limits(curves: pd.DataFrame) -> tuple[float, float] | None:
    """Return limits that show the trained part of the curves; the untrained loss at step 0 is cut off."""
    trained = curves[curves["step"] > 0]
    if trained.empty:
        return None
    low, high = trained["min"].min(), trained["max"].max()
    margin = 0.05 * max(high - low, 1e-3)
    return low - margin, high + margin


def _failed_labels(runs: pd.DataFrame) -> set[str]:
    """Return the labels of variants none of whose runs finished."""
    finished = set(runs.loc[runs["status"] == "finished", "label"]) if "status" in runs.columns else set(runs["label"])
    return set(runs["label"]) - finished


# Drawing helpers.

def _draw(axis, curve: pd.DataFrame, color: str, linestyle: str, linewidth: float, label: str | None, band: bool = True) -> None:
    axis.plot(curve["x"], curve["mean"], color=color, linestyle=linestyle, linewidth=linewidth, label=label)
    if band and curve["count"].max() > 1:
        axis.fill_between(curve["x"], curve["min"], curve["max"], color=color, alpha=BAND_ALPHA, linewidth=0)


def _hide_unused(axes, used: int, columns: int) -> None:
    """Hide the panels after the first ``used`` and show x tick labels on the panels above them."""
    rows = len(axes)
    for index in range(used, rows * columns):
        axes[index // columns][index % columns].set_visible(False)
        if index - columns >= 0:
            axes[(index - columns) // columns][index % columns].xaxis.set_tick_params(labelbottom=True)


def _label_axes(axis, x: str, metric: str, smooth: float | None, y_label: bool = True, x_label: bool = True) -> None:
    """Label the axes with their units and format the x ticks; panels that share an axis label it once."""
    label, format_tick = X_AXES[x]
    if x_label:
        axis.set_xlabel(label)
    if format_tick is not None:
        axis.xaxis.set_major_formatter(FuncFormatter(format_tick))
    if y_label:
        text = LOSS_LABELS.get(metric, metric)
        axis.set_ylabel(text + (f"\n(EMA α={smooth:g})" if smooth is not None else ""))


def _line_style(variant: pd.Series, baseline: pd.Series | None, color_axis: str | None, style_axis: str | None) -> tuple[str, str, float]:
    """Return (colour, line style, width) of a variant's line.

    The baseline is black, solid and thicker. A variant that changes one axis from the baseline
    takes that axis value's style; otherwise colour comes from ``color_axis`` and line style from
    ``style_axis``.
    """
    if variant["is_baseline"]:
        return BASELINE_COLOR, "-", BASELINE_LINEWIDTH
    axis = changed_axis(variant, baseline)
    if axis is not None and color_axis is None:
        style = variant_style(str(variant[axis]))
        return style.color, style.linestyle, 1.2
    color = variant_style(str(variant[color_axis])).color if color_axis else variant_style(variant["label"]).color
    linestyle = variant_style(str(variant[style_axis])).linestyle if style_axis else "-"
    return color, linestyle, 1.2


def _height(width: float, rows: int = 1, legend_entries: int = 0) -> float:
    """Return a figure height: panels of 2.2 in (1.9 in at one column) plus room for a legend below."""
    if width >= TWO_COLUMN_IN:
        return 2.2 * rows + 0.3
    return 1.9 * rows + 0.3 + 0.16 * math.ceil(legend_entries / 2)


# Loss curves.

def plot_loss_curves(
    runs: pd.DataFrame,
    history: pd.DataFrame,
    out_dir: str | Path,
    baseline_label: str | None = None,
    metric: str = "val/loss",
    stem: str = "loss_curves",
    x: str = "tokens",
    smooth: float | None = None,
) -> list[Path]:
    """Plot ``metric`` against ``x`` (tokens, wall_s or flops), one line per variant; return the files.

    ``runs`` needs run_id, label, the axis columns and tokens_per_step (plus flops_per_token for
    ``x="flops"``); ``is_baseline`` or ``baseline_label`` names the baseline. Up to
    MAX_LINES_PER_PANEL variants over at most two varying axes, and every one-factor-at-a-time
    ablation, share one panel. Otherwise each combination of the leading varying axes gets a
    panel, the second-to-last varying axis sets the colour and the last the line style, with one
    legend for the figure.
    """
    runs, variants = _prepare(runs, baseline_label)
    curves = curve_points(runs, history, metric, x, smooth)
    varying = varying_axes(variants)
    one_factor = ablation_kind(variants) == "one-factor"
    single = one_factor or (len(variants) <= MAX_LINES_PER_PANEL and len(varying) <= 2)
    paths = []
    for suffix, width in WIDTHS.items():
        with paper_style():
            if single:
                figure = _plot_single(curves, runs, variants, varying, width, x, metric, smooth)
            else:
                figure = _plot_panels(curves, variants, varying, width, x, metric, smooth)
            paths += save_figure(figure, out_dir, stem + suffix)
    return paths


def _plot_single(curves, runs, variants, varying, width, x, metric, smooth):
    names = variant_names(variants)
    failed = _failed_labels(runs)
    baseline = variants[variants["is_baseline"]].iloc[0] if variants["is_baseline"].any() else None
    one_factor = ablation_kind(variants) == "one-factor"
    color_axis, style_axis = None, None
    if not one_factor and varying:
        color_axis = varying[0]
    if not one_factor and len(varying) > 1:
        style_axis = varying[1]
    figure, axes = new_figure(width, _height(width, legend_entries=len(variants)))
    axis = axes[0][0]
    for _, variant in variants.iterrows():
        curve = curves[curves["label"] == variant["label"]]
        if curve.empty:
            continue
        color, linestyle, linewidth = _line_style(variant, baseline, color_axis, style_axis)
        label = names[variant["label"]] + (" (failed)" if variant["label"] in failed else "")
        _draw(axis, curve, color, linestyle, linewidth, label)
    _label_axes(axis, x, metric, smooth)
    limits = _y_limits(curves)
    if limits:
        axis.set_ylim(*limits)
    handles, labels = axis.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, **legend_location(width, labels))
    return figure


def _plot_panels(curves, variants, varying, width, x, metric, smooth):
    if len(varying) == 2:
        panel_axes, color_axis, style_axis = varying[:1], varying[1], None
    else:
        panel_axes, color_axis, style_axis = varying[:-2], varying[-2], varying[-1]
    panel_keys = list(dict.fromkeys(tuple(row[a] for a in panel_axes) for _, row in variants.iterrows()))
    columns = min(len(panel_keys), 3 if width >= TWO_COLUMN_IN else 2)
    rows = math.ceil(len(panel_keys) / columns)
    color_values = list(dict.fromkeys(variants[color_axis]))
    style_values = list(dict.fromkeys(variants[style_axis])) if style_axis else []
    legend_entries = len(color_values) + len(style_values)
    figure, axes = new_figure(width, _height(width, rows, legend_entries), rows, columns, sharex=True, sharey=True)
    for index, key in enumerate(panel_keys):
        axis = axes[index // columns][index % columns]
        in_panel = variants[[tuple(row[a] for a in panel_axes) == key for _, row in variants.iterrows()]]
        for _, variant in in_panel.iterrows():
            curve = curves[curves["label"] == variant["label"]]
            if curve.empty:
                continue
            color = variant_style(str(variant[color_axis])).color
            linestyle = variant_style(str(variant[style_axis])).linestyle if style_axis else "-"
            _draw(axis, curve, color, linestyle, 1.1, None)
        axis.set_title(", ".join(f"{a}={v}" for a, v in zip(panel_axes, key)))
        _label_axes(axis, x, metric, smooth, y_label=index % columns == 0, x_label=index + columns >= len(panel_keys))
    _hide_unused(axes, len(panel_keys), columns)
    limits = _y_limits(curves)
    if limits:
        axes[0][0].set_ylim(*limits)

    # One legend for the figure: colour means one axis, line style another.
    handles = [Line2D([], [], color=variant_style(str(v)).color, label=f"{color_axis}={v}") for v in color_values]
    handles += [
        Line2D([], [], color=NEUTRAL_COLOR, linestyle=variant_style(str(v)).linestyle, label=f"{style_axis}={v}")
        for v in style_values
    ]
    figure.legend(handles=handles, **legend_location(width, [handle.get_label() for handle in handles]))
    return figure


def plot_loss_by_axis(
    runs: pd.DataFrame,
    history: pd.DataFrame,
    out_dir: str | Path,
    metric: str = "val/loss",
    stem: str = "loss_by_axis",
    x: str = "tokens",
    smooth: float | None = None,
) -> list[Path]:
    """Plot one panel per axis that varies: that axis's values against the baseline; return the files.

    One factor at a time, a panel shows the baseline and the variants that change that axis. In a
    grid, a panel shows one line per value of the axis: the mean over every run with that value,
    so over the other axes and the seeds, as the figure's title states.
    """
    runs, variants = _prepare(runs, None)
    _check_smooth(smooth)
    one_factor = ablation_kind(variants) == "one-factor"
    baseline = variants[variants["is_baseline"]].iloc[0] if variants["is_baseline"].any() else None
    panels = varying_axes(variants)
    if not panels:
        return []

    # Lines per panel: (axis value, labels averaged into the line).
    lines: dict[str, list[tuple[str, list[str]]]] = {}
    for axis_name in panels:
        if one_factor:
            members = variants[[row["is_baseline"] or changed_axis(row, baseline) == axis_name for _, row in variants.iterrows()]]
            if len(members) > 1:  # a panel with the baseline alone, such as position "auto", is left out
                lines[axis_name] = [(str(row[axis_name]), [row["label"]]) for _, row in members.iterrows()]
        else:
            lines[axis_name] = [
                (str(value), list(variants.loc[variants[axis_name] == value, "label"]))
                for value in dict.fromkeys(variants[axis_name])
            ]
    if not lines:
        return []

    paths = []
    for suffix, width in WIDTHS.items():
        with paper_style():
            figure = _by_axis_figure(runs, history, lines, baseline, one_factor, width, metric, x, smooth)
            paths += save_figure(figure, out_dir, stem + suffix)
    return paths


def _by_axis_figure(runs, history, lines, baseline, one_factor, width, metric, x, smooth):
    panels = list(lines)
    columns = min(len(panels), 4 if width >= TWO_COLUMN_IN else 2)
    rows = math.ceil(len(panels) / columns)
    entries = sum(len(v) for v in lines.values())
    figure, axes = new_figure(width, _height(width, rows, entries), rows, columns, sharey=True)

    handles: dict[str, Line2D] = {}
    all_curves = []
    for index, axis_name in enumerate(panels):
        axis = axes[index // columns][index % columns]
        for value, labels in lines[axis_name]:
            # A grid line averages several variants, so each run is relabelled with its line first.
            members = runs[runs["label"].isin(labels)].assign(label=value)
            curve = curve_points(members, history, metric, x, smooth)
            if curve.empty:
                continue
            all_curves.append(curve)
            is_base = baseline is not None and value == str(baseline[axis_name])
            style = variant_style(value)
            color, linestyle = (BASELINE_COLOR, "-") if is_base else (style.color, style.linestyle)
            linewidth = BASELINE_LINEWIDTH if is_base else 1.2
            # A grid line is a mean over other variants, whose spread is not a seed band.
            _draw(axis, curve, color, linestyle, linewidth, None, band=one_factor)
            name = value
            if is_base:
                # In a grid this line is the mean over every run with the baseline's value on this
                # axis, not the baseline run, so the legend names the value instead.
                name = "baseline (" + ", ".join(str(baseline[a]) for a in AXES) + ")" if one_factor else f"{value} (baseline's {axis_name})"
            handles.setdefault(name, Line2D([], [], color=color, linestyle=linestyle, linewidth=linewidth, label=name))
        axis.set_title(axis_name)
        _label_axes(axis, x, metric, smooth, y_label=index % columns == 0)

    _hide_unused(axes, len(panels), columns)
    if not one_factor:
        figure.suptitle("each line: mean over the other axes")
    limits = _y_limits(pd.concat(all_curves)) if all_curves else None
    if limits:
        axes[0][0].set_ylim(*limits)
    figure.legend(handles=list(handles.values()), **legend_location(width, list(handles)))
    return figure


# Final validation loss.

def plot_final_loss_bars(table: pd.DataFrame, out_dir: str | Path, stem: str = "final_val_loss_bars") -> list[Path]:
    """Plot each variant's final validation loss as a horizontal bar with its t-interval; return the files.

    ``table`` is ``analysis.tables.variant_table``'s output, in its order (baseline on top).
    Variants with one seed have no interval. Variants with no finished run are labelled
    ``failed`` in place of a bar. The value axis starts just below the smallest interval, not at
    zero, so that differences of a few hundredths of a nat stay visible. A dashed line marks the
    baseline's mean.
    """
    if table.empty:
        return []
    variants = table[["label", *AXES, "is_baseline"]]
    one_factor = ablation_kind(variants) == "one-factor"
    varying = varying_axes(variants)
    baseline = variants[variants["is_baseline"]].iloc[0] if variants["is_baseline"].any() else None
    means = table["final_val_loss"].to_numpy(dtype=float)
    errors = np.nan_to_num(table["final_val_loss_ci"].to_numpy(dtype=float), nan=0.0)
    present = ~np.isnan(means)
    if present.any():
        low, high = float((means - errors)[present].min()), float((means + errors)[present].max())
    else:
        low, high = 0.0, 1.0
    margin = 0.08 * max(high - low, 1e-2)
    limits = (low - margin, high + margin)
    color_axis = varying[0] if varying and not one_factor else None
    colors = [_line_style(variant, baseline, color_axis, None)[0] for _, variant in variants.iterrows()]

    paths = []
    for suffix, width in WIDTHS.items():
        with paper_style():
            figure = _bars_figure(table, means, errors, colors, limits, width)
            paths += save_figure(figure, out_dir, stem + suffix)
    return paths


def _bars_figure(table, means, errors, colors, limits, width):
    left = limits[0]
    figure, axes = new_figure(width, 0.6 + 0.2 * len(table))
    axis = axes[0][0]
    for position, (_, row) in enumerate(table.iterrows()):
        if np.isnan(means[position]):
            axis.text(left, position, f"  {row['status']}", va="center", ha="left", fontsize=7, color=NEUTRAL_COLOR)
            continue
        has_interval = not pd.isna(row["final_val_loss_ci"])
        axis.barh(position, means[position] - left, left=left, height=0.7, color=colors[position],
                  xerr=errors[position] if has_interval else None,
                  error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#000000"})
    if bool(table.iloc[0]["is_baseline"]) and not np.isnan(means[0]):
        axis.axvline(means[0], color=BASELINE_COLOR, linestyle="--", linewidth=0.8)
    axis.set_yticks(range(len(table)), table["variant"])
    axis.set_ylim(len(table) - 0.5, -0.5)  # first row on top, no empty margin
    axis.set_xlim(*limits)
    axis.set_xlabel(FINAL_LOSS_LABEL)
    axis.grid(axis="y", visible=False)
    return figure


def plot_heatmap(
    runs: pd.DataFrame, out_dir: str | Path, axes: tuple[str, str] = ("attention", "mlp"), stem: str = "final_val_loss_heatmap"
) -> list[Path]:
    """Plot the final validation loss over two axes of a grid, averaging the rest; return the files.

    A cell is the mean over its finished runs: seeds and the values of the other axes. The title
    names what was averaged. A cell with no finished run reads ``failed``; a cell where some runs
    failed is marked with an asterisk, explained under the figure.
    """
    row_axis, column_axis = axes
    for name in axes:
        if name not in AXES:
            raise ValueError(f"heatmap axis {name!r} is invalid; valid axes: {', '.join(AXES)}")
    if row_axis == column_axis:
        raise ValueError(f"heatmap axes must differ; got {row_axis!r} twice")
    runs, variants = _prepare(runs, None)
    row_values = list(dict.fromkeys(variants[row_axis]))
    column_values = list(dict.fromkeys(variants[column_axis]))
    finished = runs[runs["status"] == "finished"]
    means = finished.groupby([row_axis, column_axis])["final_val_loss"].mean()
    unfinished = runs[runs["status"] != "finished"].groupby([row_axis, column_axis]).size()
    grid = np.full((len(row_values), len(column_values)), np.nan)
    for i, row_value in enumerate(row_values):
        for j, column_value in enumerate(column_values):
            grid[i, j] = means.get((row_value, column_value), np.nan)

    title = heatmap_title(runs, variants, axes)
    paths = []
    for suffix, width in WIDTHS.items():
        with paper_style():
            figure = _heatmap_figure(grid, unfinished, row_values, column_values, axes, title, width)
            paths += save_figure(figure, out_dir, stem + suffix)
    return paths


def heatmap_title(runs: pd.DataFrame, variants: pd.DataFrame, axes: tuple[str, str]) -> str:
    """Return the heatmap's title, naming the varying axes and the seeds that each cell averages."""
    averaged = [axis for axis in varying_axes(variants) if axis not in axes]
    if runs.groupby("label")["seed"].nunique().max() > 1:
        averaged.append("seeds")
    title = "final validation loss (nats/token)"
    if len(averaged) > 1:
        title += "\nmean over " + ", ".join(averaged[:-1]) + " and " + averaged[-1]
    elif averaged:
        title += "\nmean over " + averaged[0]
    return title


def _heatmap_figure(grid, unfinished, row_values, column_values, axes, title, width):
    row_axis, column_axis = axes
    cell = 0.55 if width >= TWO_COLUMN_IN else 0.4
    figure, axes_array = new_figure(width, 1.2 + cell * len(row_values))
    axis = axes_array[0][0]
    axis.grid(False)
    image = axis.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    colorbar = figure.colorbar(image, ax=axis)
    colorbar.set_label("nats/token")
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    any_partial = False
    for i, row_value in enumerate(row_values):
        for j, column_value in enumerate(column_values):
            partial = unfinished.get((row_value, column_value), 0) > 0
            if math.isnan(grid[i, j]):
                text, color = ("failed" if partial else "n/a"), NEUTRAL_COLOR
            else:
                text = f"{grid[i, j]:.3f}" + ("*" if partial else "")
                # viridis is dark at low values: white text there, black on the light end.
                color = "white" if grid[i, j] < middle else "black"
                any_partial |= partial
            axis.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    axis.set_xticks(range(len(column_values)), column_values)
    axis.set_yticks(range(len(row_values)), row_values)
    note = "\n* some runs of the cell failed; the mean is over the finished ones" if any_partial else ""
    axis.set_xlabel(column_axis + note)
    axis.set_ylabel(row_axis)
    axis.set_title(title)
    return figure
