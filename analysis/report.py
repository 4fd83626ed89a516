"""Write an ablation's figures and tables from its MLflow runs.

    python -m analysis.report NAME [--tracking-uri URI] [--results-dir results] [--smooth EMA_ALPHA]
                                   [--heatmap AXIS1,AXIS2] [--parent-run-id ID] [--no-log-artifacts]

reads the MLflow experiment NAME and writes ``results/NAME/figures/`` and ``results/NAME/tables/``
(see ``write_report`` for the files). The runner calls ``write_report`` when an ablation ends; the
command rebuilds the same files later, from any store, with other options.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from analysis.figures import plot_final_loss_bars, plot_heatmap, plot_loss_by_axis, plot_loss_curves
from analysis.runs import AXES, default_tracking_uri, find_parent_run, load_history, load_runs
from analysis.tables import CONFIDENCE, ablation_kind, active_runs, variant_table, variants_of, varying_axes, write_tables

logger = logging.getLogger("n4.report")

FIGURES_DIR = "figures"
TABLES_DIR = "tables"
DEFAULT_HEATMAP_AXES = ("attention", "mlp")
HISTORY_METRICS = ("val/loss", "train/loss", "tokens_per_s")


def _heatmap_axes(requested: tuple[str, str] | None, varying: list[str]) -> tuple[str, str]:
    """Return the requested axes, else attention x mlp if both vary, else the first two varying axes."""
    if requested is not None:
        return requested
    if all(axis in varying for axis in DEFAULT_HEATMAP_AXES):
        return DEFAULT_HEATMAP_AXES
    first_two = (varying + [axis for axis in AXES if axis not in varying])[:2]
    return first_two[0], first_two[1]


def write_report(
    tracking_uri: str | None,
    experiment: str,
    out_dir: str | Path,
    parent_run_id: str | None = None,
    *,
    smooth: float | None = None,
    heatmap_axes: tuple[str, str] | None = None,
    confidence: float = CONFIDENCE,
    log_artifacts: bool = True,
) -> list[Path]:
    """Write the figures and tables of one ablation into ``out_dir``, log them to its parent run; return the paths.

    Reads the child runs of ``parent_run_id`` (default: the experiment's latest ablation parent
    run) from the MLflow experiment ``experiment``. Writes, each figure as ``<stem>.pdf``,
    ``<stem>.png``, ``<stem>_1col.pdf`` and ``<stem>_1col.png``:

    - ``figures/loss_curves``: validation loss against training tokens;
    - ``figures/loss_curves_time``: against wall-clock seconds;
    - ``figures/loss_curves_flops``: against training FLOPs (tokens times FLOPs per token);
    - ``figures/train_loss_curves``: training loss against training tokens;
    - ``figures/loss_by_axis``: one panel per varying axis;
    - ``figures/final_val_loss_bars``: final validation loss with t-intervals over seeds;
    - ``figures/final_val_loss_heatmap``: for a grid only, over ``heatmap_axes`` (default
      attention x mlp when both vary, else the first two varying axes);
    - ``tables/final_results.md``, ``.tex`` and ``.csv``.

    ``smooth`` is an EMA weight in (0, 1] for the loss curves. With ``log_artifacts`` every file
    is also logged to the parent run under the artifact paths ``figures/`` and ``tables/``.
    Returns an empty list, with a warning, when the ablation has no runs.
    """
    uri = tracking_uri or default_tracking_uri()
    out_dir = Path(out_dir)
    if smooth is not None and not 0 < smooth <= 1:
        raise ValueError(f"smooth={smooth} is invalid; the EMA weight of the newest point must be in (0, 1]")
    if heatmap_axes is not None:
        heatmap_axes = tuple(heatmap_axes)
        if len(heatmap_axes) != 2 or any(axis not in AXES for axis in heatmap_axes) or heatmap_axes[0] == heatmap_axes[1]:
            raise ValueError(f"heatmap axes {','.join(heatmap_axes)} are invalid; give two different axes of: {', '.join(AXES)}")
    if parent_run_id is None:
        parent_run_id = find_parent_run(uri, experiment)
    runs = active_runs(load_runs(uri, experiment, parent_run_id))
    if runs.empty:
        logger.warning("no runs in experiment %r (parent run %s) of %s; nothing written", experiment, parent_run_id, uri)
        return []
    history = load_history(uri, runs["run_id"], HISTORY_METRICS, dict(zip(runs["run_id"], runs["tokens_per_step"])))
    table = variant_table(runs, history, confidence)
    variants = variants_of(runs)

    # Figures.
    figures = out_dir / FIGURES_DIR
    figure_paths = plot_loss_curves(runs, history, figures, smooth=smooth)
    figure_paths += plot_loss_curves(runs, history, figures, stem="loss_curves_time", x="wall_s", smooth=smooth)
    figure_paths += plot_loss_curves(runs, history, figures, stem="loss_curves_flops", x="flops", smooth=smooth)
    figure_paths += plot_loss_curves(runs, history, figures, metric="train/loss", stem="train_loss_curves", smooth=smooth)
    figure_paths += plot_loss_by_axis(runs, history, figures, smooth=smooth)
    figure_paths += plot_final_loss_bars(table, figures)
    if ablation_kind(variants) == "grid":
        figure_paths += plot_heatmap(runs, figures, _heatmap_axes(heatmap_axes, varying_axes(variants)))
    elif heatmap_axes is not None:
        logger.warning("no heatmap: %r is one factor at a time, so most cells of %s x %s have no run", experiment, *heatmap_axes)

    # Tables.
    table_paths = write_tables(table, out_dir / TABLES_DIR, confidence=confidence)

    if log_artifacts and parent_run_id:
        client = MlflowClient(tracking_uri=uri)
        for path in figure_paths:
            client.log_artifact(parent_run_id, str(path), FIGURES_DIR)
        for path in table_paths:
            client.log_artifact(parent_run_id, str(path), TABLES_DIR)
    elif log_artifacts:
        logger.warning("experiment %r has no ablation parent run; figures and tables were not logged to MLflow", experiment)
    return figure_paths + table_paths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Write the figures (results/NAME/figures/) and tables (results/NAME/tables/) of the ablation NAME from its MLflow runs.",
    )
    parser.add_argument("name", help="ablation name: the MLflow experiment and the directory under --results-dir")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///RESULTS_DIR/mlflow.db)")
    parser.add_argument("--results-dir", default="results", help="directory that contains NAME/ (default: results)")
    parser.add_argument("--smooth", type=float, metavar="EMA_ALPHA", help="smooth loss curves with an EMA; the weight of the newest point, in (0, 1]")
    parser.add_argument("--heatmap", metavar="AXIS1,AXIS2", help=f"axes of the grid heatmap (default: attention,mlp); axes: {', '.join(AXES)}")
    parser.add_argument("--parent-run-id", help="report the children of this parent run (default: the experiment's latest ablation parent run)")
    parser.add_argument("--no-log-artifacts", action="store_true", help="do not log the files to the parent run in MLflow")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "matplotlib", "fontTools"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    tracking_uri = args.tracking_uri or default_tracking_uri(args.results_dir)
    heatmap = tuple(part.strip() for part in args.heatmap.split(",")) if args.heatmap else None
    try:
        paths = write_report(
            tracking_uri, args.name, Path(args.results_dir) / args.name, args.parent_run_id,
            smooth=args.smooth, heatmap_axes=heatmap, log_artifacts=not args.no_log_artifacts,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not paths:
        print(f"error: no runs of {args.name!r} in {tracking_uri}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
