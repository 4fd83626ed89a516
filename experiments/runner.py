"""The ablation runner behind ``python run_ablation.py``.

One factor at a time (the default): the N4 baseline and, for each axis, the baseline with that
axis changed to each alternative. ``--grid``: the full product of the axes. Every run trains on
the same token sequence in the same order and is evaluated on the same validation windows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from experiments.config import AXES, PRESETS, AblationConfig, parse_seeds, resolve_config
from experiments.data import PreparedData, TrainBatches, prepare_data, val_windows
from experiments.plan import RunSpec, build_plan
from experiments.tracking import ABLATION_TAG, RUN_KEY_TAG, AblationTracker, tracking_uri_for
from experiments.train import RunResult, train_run

logger = logging.getLogger("n4.runner")

SUMMARY_COLUMNS = [
    "run_name", "attention", "mlp", "norm", "position", "seed", "params", "non_embedding_params",
    "inter_size", "final_val_loss", "initial_val_loss", "tokens_per_s", "flops_per_token", "mfu",
    "peak_mem_mb", "wall_s", "steps", "tokens", "data_fingerprint", "status", "failure_reason",
    "failed_step", "is_baseline", "run_key", "mlflow_run_id", "checkpoint",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_ablation.py",
        description=(
            "Train the N4 baseline and its ablation variants on identical data and compare them. "
            "Without --grid, one factor at a time around the baseline; with --grid, the full product "
            "of the axes (by default 5 attentions x 3 MLPs x 3 norms = 45 runs)."
        ),
        epilog="Overrides are KEY=VALUE with dotted keys read as YAML, e.g. train.steps=100 axes.attention=[n4,mha].",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied last")
    parser.add_argument("--grid", action="store_true", help="run the full factorial product of the axes")
    parser.add_argument("--config", metavar="FILE", help="YAML ablation config (see experiments/configs/)")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="model and training size preset (default: tiny, or the config's)"
    )
    parser.add_argument("--seeds", metavar="N|LIST", help="model seeds: a count (3 means 0,1,2) or a list (0,5,7)")
    parser.add_argument("--name", help="ablation name: MLflow experiment and results/NAME (default: the config's)")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and print the planned runs, then exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
        temporary = handle.name
    # NamedTemporaryFile creates the file readable by its owner only; give it the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    os.replace(temporary, path)


class ResultsDir:
    """``results/NAME``: the resolved config, the summary table, the figures and the run state."""

    def __init__(self, config: AblationConfig) -> None:
        self.path = Path(config.results_dir) / config.name
        self.summary_path = self.path / "summary.csv"
        self.state_path = self.path / "state.json"
        self.fingerprint = config.fingerprint()

    def check_compatible(self) -> dict[str, Any]:
        """Return the saved state; raise if this directory contains an ablation with another config.

        Rerunning the same config continues it and skips the finished runs. A different config
        under the same name would mix results, so it is rejected before anything is written.
        """
        if not self.state_path.exists():
            if self.summary_path.exists():
                raise ValueError(
                    f"{self.path} contains results but no state.json; choose another --name or move that directory away"
                )
            return {}
        state = json.loads(self.state_path.read_text())
        if state.get("config_fingerprint") != self.fingerprint:
            raise ValueError(
                f"{self.path} contains an ablation with a different config (fingerprint "
                f"{state.get('config_fingerprint')}, this one {self.fingerprint}); pass another --name, "
                f"or move {self.path} away to start over. Nothing was changed."
            )
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        _write_atomic(self.state_path, json.dumps(state, indent=2) + "\n")

    def load_summary(self) -> pd.DataFrame:
        if self.summary_path.exists():
            return pd.read_csv(self.summary_path, keep_default_na=False, na_values=[""])
        return pd.DataFrame(columns=SUMMARY_COLUMNS)

    def save_summary(self, summary: pd.DataFrame) -> None:
        _write_atomic(self.summary_path, summary.to_csv(index=False))


def _run_params(config: AblationConfig, spec: RunSpec, data: PreparedData, run_key: str) -> dict[str, Any]:
    data_config = config.to_dict()["data"]
    data_config.pop("cache_dir", None)
    return {
        "ablation": config.name,
        "seed": spec.seed,
        "model": spec.model.to_dict(),
        "train": {**config.to_dict()["train"], "tokens_per_step": config.train.tokens_per_step},
        "data": {**data_config, "corpus_fingerprint": data.corpus_fingerprint, "vocab_size_actual": data.vocab_size},
        "match_mlp_params": config.match_mlp_params,
        "run_key": run_key,
    }


def _summary_row(spec: RunSpec, config: AblationConfig, result: RunResult, run_key: str, run_id: str) -> dict[str, Any]:
    return {
        "run_name": spec.run_name,
        **spec.axes,
        "seed": spec.seed,
        "params": result.params,
        "non_embedding_params": result.non_embedding_params,
        "inter_size": spec.model.inter_size,
        "final_val_loss": result.final_val_loss,
        "initial_val_loss": result.initial_val_loss,
        "tokens_per_s": result.tokens_per_s,
        "flops_per_token": result.flops_per_token,
        "mfu": result.mfu,
        "peak_mem_mb": result.peak_mem_mb,
        "wall_s": result.wall_s,
        "steps": result.steps_done,
        "tokens": result.steps_done * config.train.tokens_per_step,
        "data_fingerprint": result.data_fingerprint,
        "status": result.status,
        "failure_reason": result.failure_reason,
        "failed_step": result.failed_step,
        "is_baseline": spec.is_baseline,
        "run_key": run_key,
        "mlflow_run_id": run_id,
        "checkpoint": result.checkpoint,
    }


def _replace_row(summary: pd.DataFrame, row: dict[str, Any]) -> pd.DataFrame:
    kept = summary[summary["run_key"] != row["run_key"]]
    new = pd.DataFrame([row], columns=SUMMARY_COLUMNS)
    return new if kept.empty else pd.concat([kept, new], ignore_index=True)


def save_run_checkpoint(result: RunResult, directory: Path, data: PreparedData, spec: RunSpec, run_key: str) -> Path:
    """Save a finished run's model with its tokenizer; a rerun of the same run replaces it."""
    from n4.checkpoint import save_checkpoint

    extra = {
        "run_name": spec.run_name,
        "run_key": run_key,
        "steps": result.steps_done,
        "final_val_loss": result.final_val_loss,
        "data_fingerprint": result.data_fingerprint,
    }
    return save_checkpoint(result.model, directory, tokenizer_path=data.tokenizer_path, extra=extra, overwrite=True)


def write_figures_and_tables(tracking_uri: str, experiment: str, parent_id: str, out_dir: Path) -> list[Path]:
    """Write the ablation's figures and tables from its MLflow runs and log them to the parent run.

    A plotting error is logged and does not fail the ablation, whose runs are already recorded;
    ``python -m analysis.report NAME`` writes the same files again.
    """
    from analysis.report import write_report

    try:
        return write_report(tracking_uri, experiment, out_dir, parent_run_id=parent_id)
    except Exception:  # noqa: BLE001 - the runs are saved; a figure must not turn them into a failure
        logger.exception("writing figures and tables failed; rerun `python -m analysis.report %s`", experiment)
        return []


def run_ablation(config: AblationConfig, grid: bool, show_progress: bool = True) -> pd.DataFrame:
    """Run every planned run not yet finished, then write the summary and figures; return the summary."""
    results = ResultsDir(config)
    state = results.check_compatible()

    # Data first: the tokenizer's real vocabulary size sizes the models.
    data = prepare_data(config.data)
    plan = build_plan(config, grid, data.vocab_size)
    batches = TrainBatches(data, config.train.seq_len, config.train.batch_size, seed=config.data.seed)
    validation = val_windows(data, config.train.seq_len, config.train.eval_windows)
    logger.info("%d runs planned (%s), %s", len(plan), "grid" if grid else "one factor at a time", data.description)

    # Tracking: one experiment per ablation name, one parent run, one child per variant and seed.
    tracking_uri = tracking_uri_for(config.tracking_uri, config.results_dir)
    tracker = AblationTracker(tracking_uri, config.name)
    results.path.mkdir(parents=True, exist_ok=True)
    config_path = results.path / "config.yaml"
    _write_atomic(config_path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    parent_id = tracker.start_parent(
        config.name, results.fingerprint, {"ablation": config.to_dict(), "grid": grid}, state.get("parent_run_id")
    )
    results.save_state(
        {"config_fingerprint": results.fingerprint, "parent_run_id": parent_id, "tracking_uri": tracking_uri, "experiment": config.name}
    )
    tracker.log_artifact(parent_id, config_path)
    logger.info("MLflow: %s, experiment %r, parent run %s", tracking_uri, config.name, parent_id)

    summary = results.load_summary()
    finished = set(summary.loc[summary["status"] == "finished", "run_key"])
    outer = tqdm(plan, desc="ablation", unit="run", disable=not show_progress, position=0)
    current_run: str | None = None
    try:
        for spec in outer:
            run_key = spec.key(config, data.corpus_fingerprint)
            if run_key in finished:
                logger.info("skipping %s: finished in an earlier invocation", spec.run_name)
                continue
            outer.set_postfix_str(spec.run_name)

            # Child run with every setting as a param and the axis values as tags.
            tags = {**spec.axes, "seed": str(spec.seed), RUN_KEY_TAG: run_key, ABLATION_TAG: config.name, "is_baseline": str(spec.is_baseline)}
            run_id = tracker.start_child(parent_id, spec.run_name, _run_params(config, spec, data, run_key), tags)
            current_run = run_id
            inner = tqdm(total=config.train.steps, desc="steps", unit="step", leave=False, disable=not show_progress, position=1)

            def on_metrics(step: int, metrics: dict[str, float], run_id: str = run_id) -> None:
                tracker.log_metrics(run_id, step, metrics)

            def on_progress(step: int, loss: float, bar=inner) -> None:
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{loss:.3f}")

            try:
                result = train_run(spec.model, config.train, batches, validation, spec.seed, on_metrics, on_progress)
            except (RuntimeError, ValueError) as error:
                # A crash of one variant (out of memory, a shape error in a new variant) is
                # recorded as a failed run and the grid goes on.
                logger.exception("run %s crashed", spec.run_name)
                result = RunResult(status="failed", failure_reason=f"{type(error).__name__}: {error}")
            finally:
                inner.close()

            if result.status == "finished" and result.model is not None and config.save_checkpoints:
                checkpoint = save_run_checkpoint(result, results.path / "checkpoints" / spec.slug, data, spec, run_key)
                tracker.log_artifacts(run_id, checkpoint, "checkpoint")
                result.checkpoint = str(checkpoint)
            result.model = None

            tracker.log_metrics(run_id, result.steps_done, {
                "final_val_loss": result.final_val_loss,
                "params": result.params,
                "peak_mem_mb": result.peak_mem_mb,
                "flops_per_token": result.flops_per_token,
                "train_tokens_per_s": result.tokens_per_s,
                "wall_s": result.wall_s,
                **({"mfu": result.mfu} if math.isfinite(result.mfu) else {}),
            })
            tracker.set_tags(run_id, {"status": result.status, "data_fingerprint": result.data_fingerprint,
                                      "failure_reason": result.failure_reason[:5000]})
            tracker.end_run(run_id, "FINISHED" if result.status == "finished" else "FAILED")
            current_run = None
            summary = _replace_row(summary, _summary_row(spec, config, result, run_key, run_id))
            results.save_summary(summary)
    except KeyboardInterrupt:
        if current_run:
            tracker.end_run(current_run, "KILLED")
        tracker.end_run(parent_id, "KILLED")
        logger.warning("interrupted; finished runs are kept in %s, rerun the same command to continue", results.summary_path)
        raise
    finally:
        outer.close()

    tracker.log_artifact(parent_id, results.summary_path)
    write_figures_and_tables(tracking_uri, config.name, parent_id, results.path)
    tracker.end_run(parent_id, "FINISHED")
    return summary


def format_summary(summary: pd.DataFrame) -> str:
    columns = ["attention", "mlp", "norm", "position", "seed", "params", "final_val_loss", "tokens_per_s", "status"]
    table = summary[columns].copy()
    table["final_val_loss"] = table["final_val_loss"].map(lambda v: f"{float(v):.4f}")
    table["tokens_per_s"] = table["tokens_per_s"].map(lambda v: f"{float(v):,.0f}")
    return table.to_string(index=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "httpx", "datasets", "fontTools", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    # Everything that can be checked without data is checked here, before any work starts.
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else None
        config = resolve_config(args.config, args.preset, args.overrides, args.name, seeds)
        plan = build_plan(config, args.grid, config.data.vocab_size)
        if not args.dry_run:
            ResultsDir(config).check_compatible()
    except ValueError as error:  # includes UnknownVariantError
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.dry_run:
        for spec in plan:
            print(f"{spec.run_name}  inter_size={spec.model.inter_size}")
        print(f"{len(plan)} runs; results in {Path(config.results_dir) / config.name}")
        return 0

    try:
        with logging_redirect_tqdm():
            summary = run_ablation(config, args.grid, show_progress=not args.quiet)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

    print(format_summary(summary))
    print(f"\nsummary: {Path(config.results_dir) / config.name / 'summary.csv'}")
    print(f"figures: {Path(config.results_dir) / config.name / 'figures'}")
    return 0 if (summary["status"] == "finished").all() else 1
