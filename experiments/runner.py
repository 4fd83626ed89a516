"""The ablation runner behind ``python run_ablation.py``.

One factor at a time (the default): the N4 baseline and, for each axis, the baseline with that
axis changed to each alternative. ``--grid``: the full product of the axes. Every run trains on
the same token sequence in the same order and is evaluated on the same validation windows.

The runner prepares the data, the MLflow experiment and parent run, and the work queue (an Optuna
study, see ``experiments.coordination``), then runs one worker in this process or ``--workers N``
worker processes. The worker that claims the last unit, the report, writes the tables and figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from filelock import FileLock
from tqdm.contrib.logging import logging_redirect_tqdm

from experiments import distributed
from experiments.config import TUNABLE, AblationConfig, PRESETS, parse_seeds, resolve_config
from experiments.coordination import (
    WorkQueue, check_storage_url, optuna_storage_for, shown_url, store_lock, study_exists,
)
from experiments.data import prepare_data
from experiments.plan import build_plan
from experiments.tracking import AblationTracker, tracking_uri_for
from experiments.train import resolve_device
from experiments.worker import (
    SUMMARY_COLUMNS, Worker, WorkerSettings, default_threads, plan_units, summary_frame, worker_main,
    write_summary_from_queue,
)

logger = logging.getLogger("n4.runner")

__all__ = ["SUMMARY_COLUMNS", "main", "run_ablation"]

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
    parser.add_argument(
        "--tune", choices=TUNABLE, action="append",
        help="tune this hyperparameter per variant with Optuna before the final runs (tune.params)",
    )
    parser.add_argument("--trials", type=int, metavar="N", help="finished Optuna trials per variant (tune.trials, default 8)")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes on this machine (default 1)")
    parser.add_argument(
        "--storage", metavar="URL",
        help="Optuna storage of the work queue and the tuning studies (default: $N4_OPTUNA_STORAGE, else sqlite:///results/optuna.db)",
    )
    parser.add_argument("--retry-failed", action="store_true", help="train again the runs of this ablation that failed")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and print the planned runs, then exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    # Intermixed, so overrides may come before, between or after the options.
    return parser.parse_intermixed_args(argv)


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("alembic", "mlflow", "httpx", "datasets", "fontTools", "matplotlib", "optuna", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_atomic(path: Path, text: str) -> None:
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

    ARCHIVE_PREFIX = "config-"

    def __init__(self, config: AblationConfig) -> None:
        self.path = Path(config.results_dir) / config.name
        self.summary_path = self.path / "summary.csv"
        self.state_path = self.path / "state.json"
        self.fingerprint = config.fingerprint()

    def lock(self) -> FileLock:
        """Return a file lock for changes of this directory by several workers."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path.parent / f".{self.path.name}.lock"))

    def state(self) -> dict[str, Any]:
        """Return the contents of state.json, or an empty dict before the first run."""
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def previous_fingerprint(self) -> str | None:
        """Return the fingerprint of the config whose results the directory contains, if another one."""
        if self.state_path.exists():
            fingerprint = json.loads(self.state_path.read_text()).get("config_fingerprint")
            return fingerprint if fingerprint != self.fingerprint else None
        if self.summary_path.exists():
            return "unknown"
        return None

    def archive_other_config(self) -> Path | None:
        """Move the results of another config into ``config-<fingerprint>/`` inside the directory.

        Rerunning under the same name with a changed config starts new runs. The earlier results
        are kept beside them, so they are neither mixed into the new summary nor deleted.
        """
        previous = self.previous_fingerprint()
        if previous is None:
            return None
        archive = self.path / f"{self.ARCHIVE_PREFIX}{previous}"
        if archive.exists():
            archive = self.path / f"{self.ARCHIVE_PREFIX}{previous}-{time.strftime('%Y%m%d-%H%M%S')}"
        archive.mkdir(parents=True)
        for entry in self.path.iterdir():
            if entry != archive and not entry.name.startswith(self.ARCHIVE_PREFIX):
                shutil.move(str(entry), str(archive / entry.name))
        return archive

    def save_state(self, state: dict[str, Any]) -> None:
        write_atomic(self.state_path, json.dumps(state, indent=2) + "\n")


def write_figures_and_tables(tracking_uri: str, experiment: str, parent_id: str, out_dir: Path, summary: pd.DataFrame) -> list[Path]:
    """Write the ablation's figures and tables and log them to its parent run.

    A plotting error is logged and does not fail the ablation, whose runs are already recorded;
    ``python -m analysis.report NAME`` writes the same files again.
    """
    from analysis.report import write_report
    from analysis.tables import write_seed_statistics
    from mlflow.tracking import MlflowClient

    paths: list[Path] = []
    try:
        statistics = write_seed_statistics(summary, out_dir)
        client = MlflowClient(tracking_uri)
        for path in statistics:
            client.log_artifact(parent_id, str(path), "tables")
        paths += statistics
    except Exception:  # noqa: BLE001 - the runs are saved; a table must not turn them into a failure
        logger.exception("writing the seed statistics failed")
    try:
        paths += write_report(tracking_uri, experiment, out_dir, parent_run_id=parent_id)
    except Exception:  # noqa: BLE001 - the runs are saved; a figure must not turn them into a failure
        logger.exception("writing figures and tables failed; rerun `python -m analysis.report %s`", experiment)
    return paths


def launched_by_torchrun() -> bool:
    """Return True in a process that torchrun started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def queue_name(config: AblationConfig) -> str:
    """Return the work queue's study name: one queue per ablation name and config."""
    return f"{config.name}.work.{config.fingerprint()}"


def run_ablation(
    config: AblationConfig, grid: bool, show_progress: bool = True, workers: int = 1, retry_failed: bool = False,
) -> pd.DataFrame:
    """Run every unit of the ablation not yet done, then write the summary and figures; return the summary."""
    context = distributed.init_from_env(resolve_device(config.train.device).type)
    results = ResultsDir(config)

    storage_url = optuna_storage_for(config.optuna_storage, config.results_dir)
    if context.is_main:
        _check_queue_is_reachable(results, storage_url, queue_name(config))

    # Data first: the tokenizer's real vocabulary size sizes the models.
    data = prepare_data(config.data)
    plan = build_plan(config, grid, data.vocab_size)
    units = plan_units(config, plan)
    tracking_uri = tracking_uri_for(config.tracking_uri, config.results_dir)
    settings = WorkerSettings(
        config=config, grid=grid, tracking_uri=tracking_uri, storage_url=storage_url, study_name=queue_name(config),
        parent_id="", results_path=str(results.path), show_progress=show_progress and workers == 1,
        threads=config.train.threads or (default_threads(workers) if workers > 1 else None),
        heartbeat_interval=config.heartbeat_interval, grace_period=config.grace_period,
    )

    queue = tracker = None
    if context.is_main:
        logger.info("%d runs planned (%s), %s", len(plan), "grid" if grid else "one factor at a time", data.description)
        tracker, queue = _set_up(config, grid, results, units, settings)
        if retry_failed:
            count = queue.retry_failed_runs(lambda result: result.get("status") != "finished")
            logger.info("%d failed units queued again", count)
    settings.parent_id = distributed.broadcast_object(settings.parent_id)

    try:
        if workers == 1:
            Worker(settings, context, data).run()
        else:
            _run_worker_processes(settings, workers)
    except KeyboardInterrupt:
        if context.is_main:
            tracker.end_run(settings.parent_id, "KILLED")
            logger.warning("interrupted; finished runs are kept, rerun the same command to continue")
        raise
    if not context.is_main:
        return summary_frame([])
    return _finish(results, queue, units)


def _check_queue_is_reachable(results: ResultsDir, storage_url: str, study_name: str) -> None:
    """Raise ValueError when ``results`` contains runs of this config but ``storage_url`` lacks their work queue.

    The queue records which runs finished. Without it, every run would train again and overwrite
    the files of the finished ones, as after a changed --storage or a deleted optuna.db.
    """
    state = results.state()
    if state.get("config_fingerprint") != results.fingerprint or not results.summary_path.exists():
        return
    if study_exists(storage_url, study_name):
        return
    raise ValueError(
        f"work queue {study_name!r} not found in {shown_url(storage_url)}, but {results.path} contains "
        f"runs of this config recorded in the queue in {state.get('optuna_storage')}. Rerun with that "
        f"storage (--storage or $N4_OPTUNA_STORAGE) to continue them, use another --name, or move "
        f"{results.path} away to start again"
    )


def _set_up(config, grid, results, units, settings) -> tuple[AblationTracker, WorkQueue]:
    """Create or join the MLflow experiment, the parent run and the work queue (rank 0 only)."""
    with results.lock():
        archive = results.archive_other_config()
        if archive is not None:
            logger.warning("%s contained results of another config; moved them to %s", results.path, archive)
        results.path.mkdir(parents=True, exist_ok=True)
        config_path = results.path / "config.yaml"
        # The storage URL may hold a database password, which config.yaml and MLflow must not.
        shown_config = config.to_dict()
        if shown_config.get("optuna_storage"):
            shown_config["optuna_storage"] = shown_url(shown_config["optuna_storage"])
        write_atomic(config_path, yaml.safe_dump(shown_config, sort_keys=False))

    # A fresh sqlite store creates its tables on first use, which races between processes.
    with store_lock(settings.tracking_uri):
        tracker = AblationTracker(settings.tracking_uri, config.name)

    def new_parent() -> dict[str, Any]:
        parent_id = tracker.start_parent(config.name, results.fingerprint, {"ablation": shown_config, "grid": grid}, None)
        tracker.log_artifact(parent_id, config_path)
        return {"mlflow_parent_run_id": parent_id, "mlflow_experiment": config.name}

    queue = WorkQueue(settings.storage_url, settings.study_name, settings.heartbeat_interval, settings.grace_period)
    attrs = queue.create_or_join(units, new_parent)
    settings.parent_id = attrs["mlflow_parent_run_id"]
    tracker.client.update_run(settings.parent_id, status="RUNNING")
    with results.lock():
        results.save_state({
            "config_fingerprint": results.fingerprint, "parent_run_id": settings.parent_id,
            "tracking_uri": settings.tracking_uri, "experiment": config.name,
            "optuna_storage": shown_url(settings.storage_url), "work_queue": settings.study_name,
        })
    logger.info("MLflow: %s, experiment %r, parent run %s", settings.tracking_uri, config.name, settings.parent_id)
    logger.info("work queue: study %r in %s", settings.study_name, shown_url(settings.storage_url))
    return tracker, queue


def _run_worker_processes(settings: WorkerSettings, workers: int) -> None:
    """Start ``workers`` worker processes and wait for them; raise if one exits with an error."""
    # "spawn" starts clean interpreters: forking a process that has started torch's thread pools
    # or an MLflow client is unsafe.
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker_main, args=(settings,), name=f"worker-{i}") for i in range(workers)]
    for process in processes:
        process.start()
    logger.info("started %d workers (%s), %d torch threads each", workers, ", ".join(str(p.pid) for p in processes), settings.threads)
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        # Ctrl-C reached every worker too; each gives its unit back to the queue before exiting.
        for process in processes:
            process.join(timeout=60)
        raise
    failed = [f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"worker process failed: {', '.join(failed)}; rerun the same command to continue")


def _finish(results: ResultsDir, queue: WorkQueue, units: list[dict[str, Any]]) -> pd.DataFrame:
    """Write summary.csv from the queue, which contains the runs of every worker, and return it."""
    summary = write_summary_from_queue(queue, units, results.summary_path)
    unfinished = queue.unfinished()
    if unfinished:
        logger.info("%d units are still running on other workers; the last one writes the report", len(unfinished))
    return summary


def format_summary(summary: pd.DataFrame) -> str:
    columns = ["attention", "mlp", "norm", "position", "seed", "params", "lr", "final_val_loss", "tokens_per_s", "status"]
    table = summary[columns].copy()
    table["lr"] = table["lr"].map(lambda v: f"{float(v):.3g}")
    table["final_val_loss"] = table["final_val_loss"].map(lambda v: f"{float(v):.4f}")
    table["tokens_per_s"] = table["tokens_per_s"].map(lambda v: f"{float(v):,.0f}")
    return table.to_string(index=False)


def _resolve(args: argparse.Namespace) -> AblationConfig:
    """Build and check the config from the command line; raise ValueError for any invalid value."""
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers} is invalid: expected a positive number of processes")
    if args.trials is not None and args.trials < 1:
        raise ValueError(f"--trials {args.trials} is invalid: expected a positive number of trials per variant")
    overrides = list(args.overrides)
    if args.tune:
        overrides.append(f"tune.params=[{', '.join(dict.fromkeys(args.tune))}]")
    if args.trials is not None:
        overrides.append(f"tune.trials={args.trials}")
    seeds = parse_seeds(args.seeds) if args.seeds else None
    config = resolve_config(args.config, args.preset, overrides, args.name, seeds)
    if args.storage:
        config.optuna_storage = args.storage
    storage = config.optuna_storage or os.environ.get("N4_OPTUNA_STORAGE")
    if storage:
        check_storage_url(storage)
    if args.trials is not None and not config.tune.params:
        raise ValueError(f"--trials {args.trials} needs something to tune: add --tune lr")
    if launched_by_torchrun():
        if args.workers > 1:
            raise ValueError("--workers cannot be combined with torchrun: torchrun's processes train one run together")
        if config.tune.params:
            raise ValueError("--tune cannot run under torchrun; tune on one process, then train under torchrun")
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()

    # Everything that can be checked without data is checked here, before any work starts.
    try:
        config = _resolve(args)
        plan = build_plan(config, args.grid, config.data.vocab_size)
    except ValueError as error:  # includes UnknownVariantError
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.dry_run:
        for unit in plan_units(config, plan):
            print(unit["unit_key"] + (f"  (after {unit['needs']})" if unit["needs"] else ""))
        for spec in plan:
            print(f"{spec.run_name}  inter_size={spec.model.inter_size}")
        print(f"{len(plan)} runs; results in {Path(config.results_dir) / config.name}")
        return 0

    try:
        with logging_redirect_tqdm():
            summary = run_ablation(config, args.grid, show_progress=not args.quiet, workers=args.workers,
                                   retry_failed=args.retry_failed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        distributed.destroy()

    if not is_rank_zero():
        return 0
    if summary.empty:
        print("no run finished yet; rerun the same command to continue")
        return 1
    print(format_summary(summary))
    print(f"\nsummary: {Path(config.results_dir) / config.name / 'summary.csv'}")
    print(f"figures: {Path(config.results_dir) / config.name / 'figures'}")
    return 0 if (summary["status"] == "finished").all() else 1
