"""Per-variant result tables: statistics over seeds, differences to the baseline, Markdown, LaTeX and CSV.

``variant_table`` turns the runs frame of ``analysis.runs.load_runs`` (and optionally the history
frame, for throughput) into one row per variant. Intervals are two-sided t-intervals over seeds
at ``confidence`` (95% by default); a statistic over one seed has no interval (NaN). Failed runs
stay in the table: a variant whose runs all failed is a row with status ``failed`` and the reason.

``seed_statistics`` computes per-variant statistics over seeds from the runner's ``summary.csv``
instead, with no MLflow store, and ``write_seed_statistics`` writes them next to that file.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.runs import AXES, variant_label

CONFIDENCE = 0.95

# Columns compared for the best value, with the direction that is better.
BEST_DIRECTIONS = {
    "final_val_loss": "min",
    "perplexity": "min",
    "delta_val_loss": "min",
    "params": "min",
    "flops_per_token": "min",
    "tokens_per_s": "max",
    "peak_mem_mb": "min",
}

# Columns of the CSV table; *_ci columns are interval half-widths.
TABLE_COLUMNS = [
    "variant", "label", *AXES, "is_baseline", "seeds", "n_runs", "n_finished",
    "final_val_loss", "final_val_loss_ci", "perplexity", "perplexity_ci",
    "delta_val_loss", "delta_val_loss_ci", "delta_paired",
    "params", "flops_per_token", "tokens_per_s", "peak_mem_mb", "status", "failure_reason",
]


# Statistics.

def t_half_width(values, confidence: float = CONFIDENCE) -> float:
    """Return the half-width of the two-sided t-interval of the mean of ``values``; NaN for fewer than 2."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))


def welch_half_width(a, b, confidence: float = CONFIDENCE) -> float:
    """Return the half-width of Welch's t-interval of mean(a) - mean(b); NaN if either has fewer than 2 values."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    standard_error = math.sqrt(var_a + var_b)
    if standard_error == 0:
        return 0.0
    # Welch-Satterthwaite degrees of freedom.
    dof = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return float(stats.t.ppf(0.5 + confidence / 2, dof) * standard_error)


def run_throughput(history: pd.DataFrame, tokens_per_step: Mapping[str, float]) -> pd.Series:
    """Return each run's training throughput in tokens per second, indexed by run id.

    The runner logs ``tokens_per_s`` per logging window (the steps since the previous point), so
    the run's throughput is the window tokens' total divided by the windows' total time: the
    token-weighted harmonic mean of the logged values.
    """
    points = history[history["metric"] == "tokens_per_s"].sort_values(["run_id", "step"])
    result = {}
    for run_id, group in points.groupby("run_id", sort=False):
        steps = group["step"].to_numpy(dtype=float)
        window_tokens = np.diff(steps, prepend=0.0) * float(tokens_per_step[run_id])
        window_seconds = window_tokens / group["value"].to_numpy(dtype=float)
        result[run_id] = float(window_tokens.sum() / window_seconds.sum())
    return pd.Series(result, dtype=float)


# Variants.

def active_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Return the runs that count: every run except attempts superseded by a retry of the same run key."""
    return runs[~runs["superseded"].astype(bool)].reset_index(drop=True)


def variants_of(runs: pd.DataFrame) -> pd.DataFrame:
    """Return one row per variant (label, axis values, is_baseline): the baseline first, then in run order."""
    variants = runs.drop_duplicates("label")[["label", *AXES]].copy()
    baseline_labels = set(runs.loc[runs["is_baseline"].astype(bool), "label"])
    variants["is_baseline"] = variants["label"].isin(baseline_labels)
    return variants.sort_values("is_baseline", ascending=False, kind="stable").reset_index(drop=True)


def varying_axes(variants: pd.DataFrame) -> list[str]:
    """Return the axes whose value changes between variants.

    The position is left out when the attention decides it (position "auto": each attention
    always with the same encoding), since it was then never varied on its own.
    """
    varying = [axis for axis in AXES if variants[axis].nunique() > 1]
    if "attention" in varying and "position" in varying and variants.groupby("attention")["position"].nunique().max() == 1:
        varying.remove("position")
    return varying


def ablation_kind(variants: pd.DataFrame) -> str:
    """Return ``one-factor`` when each variant changes one factor of the baseline, else ``grid``.

    A factor is an axis, except that a change of attention may bring its own position encoding
    (position "auto": N4 without one, MHA with RoPE). Two variants changing the same factor to the
    same value, such as MHA with and without RoPE, make a grid.
    """
    baseline = variants[variants["is_baseline"]]
    if baseline.empty:
        return "grid"
    reference = baseline.iloc[0]
    factors = []
    for _, row in variants.iterrows():
        changed = _changed_factors(row, reference)
        if len(changed) > 1:
            return "grid"
        factors += [(axis, row[axis]) for axis in changed]
    return "one-factor" if len(factors) == len(set(factors)) else "grid"


def _changed_factors(variant: Mapping, baseline: Mapping) -> list[str]:
    """Return the axes in which ``variant`` differs from ``baseline``, a position change that
    comes with an attention change counted under attention."""
    changed = [axis for axis in AXES if variant[axis] != baseline[axis]]
    if "attention" in changed and "position" in changed:
        changed.remove("position")
    return changed


def changed_axis(variant: Mapping, baseline: Mapping | None) -> str | None:
    """Return the one factor (see ``ablation_kind``) in which ``variant`` differs from ``baseline``, or None."""
    if baseline is None:
        return None
    changed = _changed_factors(variant, baseline)
    return changed[0] if len(changed) == 1 else None


def changed_name(variant: Mapping, baseline: Mapping) -> str:
    """Return ``axis=value`` for each axis in which ``variant`` differs from ``baseline``."""
    return " ".join(f"{axis}={variant[axis]}" for axis in AXES if variant[axis] != baseline[axis])


def variant_names(variants: pd.DataFrame) -> dict[str, str]:
    """Return a short display name per variant label.

    One factor at a time: ``baseline (n4, asgg, dyt, none)`` and ``attention=mha``. A grid: the
    values of the varying axes, ``mha + swiglu + rmsnorm``, with `` (baseline)`` after the baseline.
    """
    varying = varying_axes(variants) or list(AXES)
    baseline_rows = variants[variants["is_baseline"]]
    baseline = baseline_rows.iloc[0] if not baseline_rows.empty else None
    one_factor = ablation_kind(variants) == "one-factor"
    names = {}
    for _, variant in variants.iterrows():
        if one_factor and variant["is_baseline"]:
            names[variant["label"]] = "baseline (" + ", ".join(str(variant[axis]) for axis in AXES) + ")"
        elif one_factor and changed_axis(variant, baseline):
            names[variant["label"]] = changed_name(variant, baseline)
        else:
            name = " + ".join(str(variant[axis]) for axis in varying)
            names[variant["label"]] = name + (" (baseline)" if variant["is_baseline"] else "")
    return names


# The table.

def _variant_status(group: pd.DataFrame) -> tuple[str, str]:
    """Return (status, failure reason) of a variant's runs."""
    unfinished = group[group["status"] != "finished"]
    if unfinished.empty:
        return "finished", ""
    statuses = "/".join(sorted(set(unfinished["status"])))
    status = statuses if len(unfinished) == len(group) else f"{len(unfinished)} of {len(group)} {statuses}"
    reasons = [
        f"seed {row['seed']}: {row['failure_reason'] or row['status']}" for _, row in unfinished.iterrows()
    ]
    return status, "; ".join(reasons)


def _first_positive(values: pd.Series) -> float:
    """Return the first positive value; params and FLOPs do not depend on training, so a failed run's count."""
    positive = values[values > 0]
    return float(positive.iloc[0]) if not positive.empty else math.nan


def variant_table(runs: pd.DataFrame, history: pd.DataFrame | None = None, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Return one row per variant with the columns ``TABLE_COLUMNS``, the baseline first.

    Loss, perplexity, throughput and memory are means over the variant's finished runs. Each
    ``*_ci`` column is the half-width of the t-interval at ``confidence`` (NaN with one seed).
    Perplexity is exp(final validation loss) per run, then averaged. ``delta_val_loss`` is the
    variant's loss minus the baseline's: paired by seed (``delta_paired``) when both finished the
    same seeds, else the difference of the means with Welch's interval. It is NaN for the
    baseline itself. ``tokens_per_s`` needs ``history`` with the ``tokens_per_s`` metric.
    """
    runs = active_runs(runs)
    if runs.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    variants = variants_of(runs)
    names = variant_names(variants)
    throughput = pd.Series(dtype=float)
    if history is not None and not history.empty:
        throughput = run_throughput(history, dict(zip(runs["run_id"], runs["tokens_per_step"])))

    finished = runs[runs["status"] == "finished"]
    baseline_labels = variants.loc[variants["is_baseline"], "label"]
    baseline_losses = (
        finished[finished["label"] == baseline_labels.iloc[0]].set_index("seed")["final_val_loss"]
        if not baseline_labels.empty else pd.Series(dtype=float)
    )

    rows = []
    for _, variant in variants.iterrows():
        group = runs[runs["label"] == variant["label"]]
        done = finished[finished["label"] == variant["label"]]
        losses = done.set_index("seed")["final_val_loss"]
        perplexities = np.exp(losses.to_numpy(dtype=float))
        status, reason = _variant_status(group)
        row = {
            "variant": names[variant["label"]],
            "label": variant["label"],
            **{axis: variant[axis] for axis in AXES},
            "is_baseline": bool(variant["is_baseline"]),
            "seeds": ",".join(str(seed) for seed in sorted(group["seed"].dropna())),
            "n_runs": len(group),
            "n_finished": len(done),
            "final_val_loss": losses.mean() if len(losses) else math.nan,
            "final_val_loss_ci": t_half_width(losses, confidence),
            "perplexity": perplexities.mean() if len(perplexities) else math.nan,
            "perplexity_ci": t_half_width(perplexities, confidence),
            "params": _first_positive(group["params"]),
            "flops_per_token": _first_positive(group["flops_per_token"]),
            "tokens_per_s": throughput.reindex(done["run_id"]).mean() if len(done) else math.nan,
            "peak_mem_mb": done["peak_mem_mb"].mean() if len(done) else math.nan,
            "status": status,
            "failure_reason": reason,
        }
        row.update(_delta(losses, baseline_losses, variant["is_baseline"], confidence))
        rows.append(row)
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _delta(losses: pd.Series, baseline: pd.Series, is_baseline: bool, confidence: float) -> dict:
    if is_baseline or losses.empty or baseline.empty:
        return {"delta_val_loss": math.nan, "delta_val_loss_ci": math.nan, "delta_paired": False}
    if set(losses.index) == set(baseline.index):
        differences = losses.sort_index() - baseline.sort_index()
        return {
            "delta_val_loss": float(differences.mean()),
            "delta_val_loss_ci": t_half_width(differences, confidence),
            "delta_paired": True,
        }
    return {
        "delta_val_loss": float(losses.mean() - baseline.mean()),
        "delta_val_loss_ci": welch_half_width(losses, baseline, confidence),
        "delta_paired": False,
    }


# Formatting.

def _si(value: float) -> str:
    """Format with three significant digits and an SI prefix: 3.40M, 6.00k, 512."""
    for divisor, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= divisor:
            return f"{value / divisor:#.3g}".rstrip(".") + suffix
    return f"{value:#.3g}".rstrip(".")


# Column -> how its mean is printed in Markdown and LaTeX.
_FORMATS = {
    "final_val_loss": lambda v: f"{v:.3f}",
    "perplexity": lambda v: f"{v:.2f}",
    "delta_val_loss": lambda v: f"{v:+.3f}",
    "params": lambda v: f"{v:,.0f}",
    "flops_per_token": _si,
    "tokens_per_s": lambda v: f"{v:,.0f}",
    "peak_mem_mb": lambda v: f"{v:,.1f}",
}
_CI_FORMATS = {"final_val_loss": "{:.3f}", "perplexity": "{:.2f}", "delta_val_loss": "{:.3f}"}

# Displayed columns: (table column, Markdown header, LaTeX header).
DISPLAY_COLUMNS = [
    ("variant", "variant", "variant"),
    ("final_val_loss", "val loss (nats/token) ↓", r"val loss (nats/token) $\downarrow$"),
    ("perplexity", "perplexity ↓", r"perplexity $\downarrow$"),
    ("delta_val_loss", "Δ loss vs baseline ↓", r"$\Delta$ loss vs baseline $\downarrow$"),
    ("params", "params ↓", r"params $\downarrow$"),
    ("flops_per_token", "training FLOPs/token ↓", r"training FLOPs/token $\downarrow$"),
    ("tokens_per_s", "tokens/s ↑", r"tokens/s $\uparrow$"),
    ("peak_mem_mb", "peak memory (MiB) ↓", r"peak memory (MiB) $\downarrow$"),
    ("seeds", "seeds", "seeds"),
    ("status", "status", "status"),
    ("failure_reason", "failure reason", "failure reason"),
]


# Column -> the mean rounded as it is printed; best values are compared on these, as a reader does.
_ROUNDING = {
    "final_val_loss": lambda v: round(v, 3),
    "perplexity": lambda v: round(v, 2),
    "delta_val_loss": lambda v: round(v, 3),
    "params": round,
    "flops_per_token": lambda v: float(f"{v:.3g}"),
    "tokens_per_s": round,
    "peak_mem_mb": lambda v: round(v, 1),
}
MAX_REASON_CHARS = 100  # failure reasons are cut to this length in Markdown and LaTeX, not in CSV


def best_rows(table: pd.DataFrame) -> dict[str, list[int]]:
    """Return, per column of ``BEST_DIRECTIONS``, the row positions that hold its best printed value.

    A column is left out when fewer than two rows have a value or all printed values are equal,
    since nothing is best there.
    """
    table = table.reset_index(drop=True)
    marks = {}
    for column, direction in BEST_DIRECTIONS.items():
        values = table[column].astype(float)
        present = values.dropna()
        if len(present) < 2:
            continue
        printed = present.map(_ROUNDING[column])
        if printed.nunique() == 1:
            continue
        best = printed.min() if direction == "min" else printed.max()
        marks[column] = [int(position) for position in printed.index[printed == best]]
    return marks


def _cell(row: pd.Series, column: str, plus_minus: str) -> str:
    if column not in _FORMATS:
        text = "" if pd.isna(row[column]) else str(row[column])
        return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
    value = row[column]
    if pd.isna(value):
        return "—"
    text = _FORMATS[column](float(value))
    half_width = row.get(f"{column}_ci")
    if column in _CI_FORMATS and half_width is not None and not pd.isna(half_width):
        text += f" {plus_minus} " + _CI_FORMATS[column].format(half_width)
    return text


def _display_rows(table: pd.DataFrame, plus_minus: str, bold, escape, dagger: str) -> list[list[str]]:
    marks = best_rows(table)
    show_reason = bool(table["failure_reason"].astype(str).str.len().gt(0).any())
    rows = []
    for position, (_, row) in enumerate(table.reset_index(drop=True).iterrows()):
        cells = []
        for column, _, _ in DISPLAY_COLUMNS:
            if column == "failure_reason" and not show_reason:
                continue
            text = escape(_cell(row, column, plus_minus))
            if column == "delta_val_loss" and not pd.isna(row[column]) and not bool(row["delta_paired"]):
                text += dagger
            if position in marks.get(column, []):
                text = bold(text)
            cells.append(text)
        rows.append(cells)
    return rows


def _headers(table: pd.DataFrame, index: int) -> list[str]:
    show_reason = bool(table["failure_reason"].astype(str).str.len().gt(0).any())
    return [names[index] for names in DISPLAY_COLUMNS if names[0] != "failure_reason" or show_reason]


def _notes(table: pd.DataFrame, confidence: float, dagger: str) -> list[str]:
    notes = [
        f"Means over seeds; ± is the half-width of the {confidence:.0%} t-interval (none with one seed). "
        "Perplexity is exp(loss) per run. Bold marks the best value of a column."
    ]
    unpaired = ~table["delta_paired"].astype(bool) & table["delta_val_loss"].notna()
    if unpaired.any():
        notes.append(f"Δ is paired by seed, except {dagger.strip()}: seeds differ from the baseline's, so the difference of means with Welch's interval.")
    else:
        notes.append("Δ is paired by seed.")
    return notes


def to_markdown(table: pd.DataFrame, confidence: float = CONFIDENCE) -> str:
    """Return the table as GitHub Markdown with best values in bold and a note on the statistics."""
    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    headers = _headers(table, 1)
    rows = _display_rows(table, "±", lambda text: f"**{text}**", escape, " †")
    alignment = ["---" if column in ("variant", "seeds", "status", "failure reason") else "---:" for column in headers]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(alignment) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n\n" + "\n".join(_notes(table, confidence, " †")) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(character, character) for character in text).replace("—", "---")


def _latex_cell(text: str) -> str:
    """Escape a cell for LaTeX and typeset a leading minus sign as a minus, not a hyphen."""
    text = latex_escape(text)
    return "$-$" + text[1:] if text[:1] == "-" and text[1:2].isdigit() else text


def to_latex(table: pd.DataFrame, confidence: float = CONFIDENCE) -> str:
    """Return the table as a LaTeX ``tabular`` with booktabs rules and best values in bold."""
    headers = _headers(table, 2)
    rows = _display_rows(table, "PLUSMINUS", lambda text: rf"\textbf{{{text}}}", _latex_cell, "DAGGER")
    alignment = "".join("l" if header in ("variant", "seeds", "status", "failure reason") else "r" for header in headers)
    lines = [
        "% Requires \\usepackage{booktabs}. " + " ".join(_notes(table, confidence, "†")).replace("±", "+/-"),
        rf"\begin{{tabular}}{{{alignment}}}",
        r"\toprule",
        " & ".join(headers) + r" \\",
        r"\midrule",
    ]
    for cells in rows:
        line = " & ".join(cells).replace("PLUSMINUS", r"$\pm$").replace("DAGGER", r"$^\dagger$")
        lines.append(line + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    """Return the table as CSV with unrounded values and a ``best_in`` column naming the columns a row is best in."""
    marks = best_rows(table)
    frame = table.copy()
    frame["best_in"] = [
        ";".join(column for column, positions in marks.items() if position in positions) for position in range(len(frame))
    ]
    return frame.to_csv(index=False)


def write_tables(table: pd.DataFrame, out_dir: str | Path, stem: str = "final_results", confidence: float = CONFIDENCE) -> list[Path]:
    """Write ``<stem>.md``, ``<stem>.tex`` and ``<stem>.csv`` into ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"md": to_markdown(table, confidence), "tex": to_latex(table, confidence), "csv": to_csv(table)}
    paths = []
    for extension, text in outputs.items():
        path = out_dir / f"{stem}.{extension}"
        path.write_text(text)
        paths.append(path)
    return paths


# Seed statistics from the runner's summary table.

# Columns of seed_statistics.csv. The interval columns belong to the two-sided t-interval at the
# chosen confidence, and the delta_* columns to the paired difference to the baseline.
SEED_STATISTICS_COLUMNS = [
    "label", *AXES, "is_baseline", "n_seeds", "n_finished",
    "mean_val_loss", "std_val_loss", "ci_low", "ci_high", "ci_half_width",
    "delta_vs_baseline", "delta_ci_low", "delta_ci_high", "delta_ci_half_width", "n_pairs",
]
SUMMARY_REQUIRED_COLUMNS = (*AXES, "seed", "final_val_loss", "status", "is_baseline")


def _parse_flag(value: object) -> bool:
    """Parse an ``is_baseline`` cell: a bool, the text ``True`` or ``False`` of a CSV read back, or empty (False)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return False
    raise ValueError(f"invalid is_baseline value {value!r} in the summary. Expected True or False.")


def _mean_interval(values: np.ndarray, confidence: float) -> tuple[float, float, float, float]:
    """Return (mean, interval low, interval high, half-width); the interval is NaN for fewer than 2 values."""
    mean = float(values.mean()) if len(values) else math.nan
    half_width = t_half_width(values, confidence)
    return mean, mean - half_width, mean + half_width, half_width


def _paired_delta(losses: pd.Series, baseline: pd.Series, confidence: float) -> dict:
    """Return the delta_* columns and n_pairs for losses and baseline losses indexed by seed."""
    seeds = sorted(set(losses.index) & set(baseline.index))
    differences = (losses[seeds] - baseline[seeds]).to_numpy(dtype=float)
    mean, low, high, half_width = _mean_interval(differences, confidence)
    return {
        "delta_vs_baseline": mean,
        "delta_ci_low": low,
        "delta_ci_high": high,
        "delta_ci_half_width": half_width,
        "n_pairs": len(seeds),
    }


def seed_statistics(summary: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Compute statistics of the final validation loss over seeds, one row per variant.

    ``summary`` is the runner's summary table (``results/NAME/summary.csv``). A variant is one
    combination of the axes, and the result has the columns ``SEED_STATISTICS_COLUMNS``. The
    baseline (the variant of the rows with ``is_baseline`` true) comes first, then the variants in
    order of first appearance.

    Only runs with status ``finished`` and a finite loss count. A variant without such runs keeps
    its row, with ``n_finished`` 0 and NaN statistics. If a seed of a variant has several rows, the
    last one counts. The standard deviation is the sample one (ddof=1), and intervals are two-sided
    t-intervals at ``confidence``. Both are NaN with fewer than two finished seeds. The delta_*
    columns are paired by seed: the variant's loss minus the baseline's over the seeds that both
    finished, averaged, with the t-interval of that mean. They are NaN for the baseline itself and
    without pairs, and ``n_pairs`` is then 0.

    Raises ValueError if a column is missing, ``confidence`` is not between 0 and 1, an
    ``is_baseline`` value is not a boolean, or rows of more than one variant are marked baseline.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence!r}")
    missing = [column for column in SUMMARY_REQUIRED_COLUMNS if column not in summary.columns]
    if missing:
        raise ValueError(f"summary is missing the columns {', '.join(missing)}. Pass the runner's summary.csv.")
    if summary.empty:
        return pd.DataFrame(columns=SEED_STATISTICS_COLUMNS)

    runs = summary[list(SUMMARY_REQUIRED_COLUMNS)].reset_index(drop=True)
    runs["is_baseline"] = runs["is_baseline"].map(_parse_flag).astype(bool)
    runs["final_val_loss"] = pd.to_numeric(runs["final_val_loss"], errors="coerce").astype(float)
    runs["label"] = [variant_label(row) for _, row in runs.iterrows()]

    baseline_labels = list(dict.fromkeys(runs.loc[runs["is_baseline"], "label"]))
    if len(baseline_labels) > 1:
        raise ValueError(f"rows of several variants are marked is_baseline ({'; '.join(baseline_labels)}). Expected one baseline.")
    labels = list(dict.fromkeys(runs["label"]))
    # The sort is stable, so the baseline moves first and the other variants keep plan order.
    labels.sort(key=lambda label: label not in baseline_labels)

    runs = runs.drop_duplicates(["label", "seed"], keep="last")
    finished = runs[(runs["status"] == "finished") & np.isfinite(runs["final_val_loss"])]
    baseline_losses = (
        finished[finished["label"] == baseline_labels[0]].set_index("seed")["final_val_loss"]
        if baseline_labels else None
    )

    rows = []
    for label in labels:
        group = runs[runs["label"] == label]
        losses = finished[finished["label"] == label].set_index("seed")["final_val_loss"]
        values = losses.to_numpy(dtype=float)
        is_baseline = label in baseline_labels
        mean, low, high, half_width = _mean_interval(values, confidence)
        row = {
            "label": label,
            **{axis: group.iloc[0][axis] for axis in AXES},
            "is_baseline": is_baseline,
            "n_seeds": len(group),
            "n_finished": len(values),
            "mean_val_loss": mean,
            "std_val_loss": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
            "ci_low": low,
            "ci_high": high,
            "ci_half_width": half_width,
        }
        if is_baseline or baseline_losses is None:
            row.update(_paired_delta(pd.Series(dtype=float), pd.Series(dtype=float), confidence))
        else:
            row.update(_paired_delta(losses, baseline_losses, confidence))
        rows.append(row)
    return pd.DataFrame(rows, columns=SEED_STATISTICS_COLUMNS)




def _number(value: float, template: str) -> str:
    return "—" if pd.isna(value) else template.format(value)


def seed_statistics_markdown(table: pd.DataFrame, confidence: float = CONFIDENCE) -> str:
    """Return the ``seed_statistics`` table as GitHub Markdown with a note on the statistics."""
    percent = f"{confidence:.0%}"
    headers = [
        "variant", "seeds finished", f"val loss ± {percent} CI", "std", f"{percent} CI",
        f"Δ vs baseline ± {percent} CI", "pairs",
    ]
    # The names of the final-results table, so that both tables of one ablation read alike.
    names = variant_names(table.assign(is_baseline=table["is_baseline"].astype(bool)))

    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    for _, row in table.iterrows():
        mean = _number(row["mean_val_loss"], "{:.4f}")
        if not pd.isna(row["mean_val_loss"]) and not pd.isna(row["ci_half_width"]):
            mean += f" ± {row['ci_half_width']:.4f}"
        interval = "—" if pd.isna(row["ci_low"]) else f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
        delta = _number(row["delta_vs_baseline"], "{:+.4f}")
        if not pd.isna(row["delta_vs_baseline"]) and not pd.isna(row["delta_ci_half_width"]):
            delta += f" ± {row['delta_ci_half_width']:.4f}"
        cells = [
            names[row["label"]].replace("|", "\\|"),
            f"{row['n_finished']}/{row['n_seeds']}",
            mean,
            _number(row["std_val_loss"], "{:.4f}"),
            interval,
            delta,
            str(row["n_pairs"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")

    notes = [
        f"Final validation loss (nats/token) over the finished seeds. ± is the half-width of the {percent} "
        "two-sided t-interval and std the sample standard deviation (ddof=1). Both need two finished seeds.",
        "Δ is the variant's loss minus the baseline's, paired by seed over the seeds that both finished "
        "(pairs), with the t-interval of its mean.",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, so readers never see half a file."""
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    temporary = Path(handle.name)
    try:
        with handle:
            handle.write(text)
        # NamedTemporaryFile creates the file readable by its owner only; give it the usual mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_seed_statistics(summary: pd.DataFrame, out_dir: str | Path, confidence: float = CONFIDENCE) -> list[Path]:
    """Write ``seed_statistics.csv`` and ``seed_statistics.md`` of ``summary`` into ``out_dir``; return their paths.

    Each file is replaced atomically. The CSV contains the unrounded ``seed_statistics`` table.
    """
    table = seed_statistics(summary, confidence)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"csv": table.to_csv(index=False), "md": seed_statistics_markdown(table, confidence)}
    paths = []
    for extension, text in outputs.items():
        path = out_dir / f"seed_statistics.{extension}"
        _write_atomic(path, text)
        paths.append(path)
    return paths
