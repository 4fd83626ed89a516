"""A worker: claims units of an ablation from the shared work queue and runs them until none is left.

``python run_ablation.py`` runs one worker in its own process, and ``--workers N`` starts N worker
processes. Workers on other machines join when they use the same MLflow tracking server and
Optuna storage. Under ``torchrun`` the ranks of one worker train each run together: rank 0 claims
the units, logs to MLflow and writes the summary, and the other ranks follow it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from experiments import distributed
from experiments.config import AblationConfig
from experiments.coordination import ALL_UNITS, GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, Unit, WorkQueue, file_lock
from experiments.data import PreparedData, TrainBatches, prepare_data, val_windows
from experiments.plan import RunSpec, build_plan
from experiments.tracking import ABLATION_TAG, RUN_KEY_TAG, AblationTracker
from experiments.train import RunResult, train_run

logger = logging.getLogger("n4.worker")

SUMMARY_COLUMNS = [
    "run_name", "attention", "mlp", "norm", "position", "seed", "params", "non_embedding_params",
    "inter_size", "lr", "final_val_loss", "initial_val_loss", "tokens_per_s", "flops_per_token", "mfu",
    "peak_mem_mb", "wall_s", "steps", "tokens", "data_fingerprint", "status", "failure_reason",
    "failed_step", "is_baseline", "run_key", "mlflow_run_id", "checkpoint",
]

RESUME_FILE = "resume.pt"  # an unfinished run's training state, in its checkpoint directory


def variant_slug(spec: RunSpec) -> str:
    return "-".join(name for _, name in spec.variant)


def tune_unit_key(spec: RunSpec) -> str:
    return f"tune:{variant_slug(spec)}"


def train_unit_key(spec: RunSpec) -> str:
    return f"train:{spec.slug}"


REPORT_UNIT = "report"


def plan_units(config: AblationConfig, plan: list[RunSpec]) -> list[dict[str, Any]]:
    """Return the queue's units: with tuning, one per variant first, then one per run, then the report.

    A run waits for its variant's tuning unit, whose best learning rate it trains with. The report
    (summary, tables and figures) waits for every other unit, so exactly one worker writes it.
    """
    tuning = bool(config.tune.params)
    units: list[dict[str, Any]] = []
    if tuning:
        for spec in plan:
            if spec.seed == config.seeds[0]:
                units.append({"unit_key": tune_unit_key(spec), "kind": "tune", "index": len(units), "needs": None})
    for spec in plan:
        needs = tune_unit_key(spec) if tuning else None
        units.append({"unit_key": train_unit_key(spec), "kind": "train", "index": len(units), "needs": needs})
    units.append({"unit_key": REPORT_UNIT, "kind": "report", "index": len(units), "needs": ALL_UNITS})
    return units


def summary_row(spec: RunSpec, config: AblationConfig, result: RunResult, run_key: str, run_id: str, lr: float) -> dict[str, Any]:
    return {
        "run_name": spec.run_name,
        **spec.axes,
        "seed": spec.seed,
        "params": result.params,
        "non_embedding_params": result.non_embedding_params,
        "inter_size": spec.model.inter_size,
        "lr": lr,
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


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """Replace NaN and infinities by None, which JSON (and so an Optuna user attribute) can hold."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def summary_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def run_params(config: AblationConfig, spec: RunSpec, train: dict, data: PreparedData, run_key: str) -> dict[str, Any]:
    data_config = config.to_dict()["data"]
    data_config.pop("cache_dir", None)
    return {
        "ablation": config.name,
        "seed": spec.seed,
        "model": spec.model.to_dict(),
        "train": {**train, "tokens_per_step": config.train.tokens_per_step},
        "data": {**data_config, "corpus_fingerprint": data.corpus_fingerprint, "vocab_size_actual": data.vocab_size},
        "match_mlp_params": config.match_mlp_params,
        "tuned": ",".join(config.tune.params),
        "run_key": run_key,
    }


@dataclass
class WorkerSettings:
    """Settings a worker process needs to join an ablation, picklable for a new process."""

    config: AblationConfig
    grid: bool
    tracking_uri: str
    storage_url: str
    study_name: str
    parent_id: str
    results_path: str
    show_progress: bool
    threads: int | None = None  # torch threads per worker; None keeps the default
    heartbeat_interval: int = HEARTBEAT_INTERVAL_S
    grace_period: int = GRACE_PERIOD_S


class Worker:
    """Runs claimed units: tuning a variant's learning rate, or training one run."""

    def __init__(self, settings: WorkerSettings, context: distributed.DistributedContext,
                 data: PreparedData | None = None) -> None:
        self.settings = settings
        self.config = settings.config
        self.context = context
        self.results_path = Path(settings.results_path)
        # A worker in the runner's own process reuses its data; a new process loads it from the cache.
        self.data = data if data is not None else prepare_data(self.config.data)
        self.plan = build_plan(self.config, settings.grid, self.data.vocab_size)
        self.specs = {train_unit_key(spec): spec for spec in self.plan}
        self.variants = {tune_unit_key(spec): spec for spec in self.plan if spec.seed == self.config.seeds[0]}
        self.batches = TrainBatches(self.data, self.config.train.seq_len, self.config.train.batch_size, seed=self.config.data.seed)
        self.validation = val_windows(self.data, self.config.train.seq_len, self.config.train.eval_windows)
        self.queue: WorkQueue | None = None
        self.tracker: AblationTracker | None = None
        if context.is_main:
            self.queue = WorkQueue(settings.storage_url, settings.study_name, settings.heartbeat_interval, settings.grace_period)
            self.queue.join()
            self.tracker = AblationTracker(settings.tracking_uri, self.config.name)

    def run(self) -> int:
        """Run units until the queue has none left; return how many this worker ran."""
        count = 0
        while True:
            unit = self.queue.claim() if self.context.is_main else None
            # Rank 0 claims; every rank then runs the same unit with the same learning rate.
            key, lr = distributed.broadcast_object((unit.key, self._learning_rate(unit)) if unit else (None, None))
            if key is None:
                return count
            count += 1
            if unit is None:  # a rank other than 0: only training needs every rank
                if key in self.specs:
                    self._train(self.specs[key], lr, None)
                continue
            try:
                with self.queue.heartbeat(unit):
                    if unit.kind == "tune":
                        result = self._tune(self.variants[unit.key])
                    elif unit.kind == "report":
                        result = self._report()
                    else:
                        result = self._train(self.specs[unit.key], lr, unit)
            except KeyboardInterrupt:
                self.queue.release(unit, "interrupted (KeyboardInterrupt)")
                raise
            self.queue.complete(unit, _json_safe(result))

    def _report(self) -> dict[str, Any]:
        """Write summary.csv from the queue, then the tables and figures, and end the parent run."""
        from experiments.runner import write_figures_and_tables

        summary_path = self.results_path / "summary.csv"
        summary = write_summary_from_queue(self.queue, plan_units(self.config, self.plan), summary_path)
        self.tracker.log_artifact(self.settings.parent_id, summary_path)
        paths = write_figures_and_tables(
            self.settings.tracking_uri, self.config.name, self.settings.parent_id, self.results_path, summary
        )
        self.tracker.end_run(self.settings.parent_id, "FINISHED")
        logger.info("wrote the summary and %d tables and figures to %s", len(paths), self.results_path)
        return {"status": "finished", "files": len(paths)}

    def _learning_rate(self, unit: Unit | None) -> float | None:
        """Return the learning rate of a training unit: its variant's tuned rate, else train.lr."""
        if unit is None or unit.kind != "train":
            return None
        if not unit.needs:
            return float(self.config.train.lr)
        tuned = self.queue.results().get(unit.needs, {})
        return tuned.get("best_lr") if tuned.get("status") == "finished" else None

    def _tune(self, spec: RunSpec) -> dict[str, Any]:
        from experiments.tuning import tune_variant

        logger.info("tuning the learning rate of %s", spec.label)
        try:
            result = tune_variant(
                spec, self.config, self.batches, self.validation, self.settings.storage_url, self.tracker,
                self.settings.parent_id, show_progress=self.settings.show_progress,
            )
        except (RuntimeError, ValueError) as error:
            logger.exception("tuning %s failed", spec.label)
            return {"status": "failed", "failure_reason": f"{type(error).__name__}: {error}"}
        logger.info("best learning rate of %s: %.3g (validation loss %.4f)", spec.label, result.best_lr, result.best_val_loss)
        return {"status": "finished", **dataclasses.asdict(result)}

    def _train(self, spec: RunSpec, lr: float | None, unit: Unit | None) -> dict[str, Any]:
        """Train one run, continuing from its resume state if an earlier attempt left one."""
        config = self.config
        if lr is None:
            # The variant's tuning failed, so there is no learning rate to train with.
            reason = "learning-rate tuning of this variant failed; see its tuning run"
            result = RunResult(status="failed", failure_reason=reason)
            lr = math.nan
            train = config.train
        else:
            train = dataclasses.replace(config.train, lr=lr)
        tuned_config = dataclasses.replace(config, train=train)
        run_key = spec.key(tuned_config, self.data.corpus_fingerprint)
        checkpoint_dir = self.results_path / "checkpoints" / spec.slug
        resume_path = checkpoint_dir / RESUME_FILE
        main = self.context.is_main

        run_id = ""
        if main:
            run_id = self._start_mlflow_run(spec, tuned_config, run_key)
        if math.isnan(lr):
            return self._finish(spec, result, run_key, run_id, lr) if main else {}

        show = main and self.settings.show_progress
        bar = tqdm(total=train.steps, desc=spec.slug, unit="step", leave=False, disable=not show)

        def on_metrics(step: int, metrics: dict[str, float]) -> None:
            self.tracker.log_metrics(run_id, step, metrics)

        def on_progress(step: int, loss: float) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.3f}")

        if main:
            attempt = f", attempt {unit.attempt}" if unit and unit.attempt > 1 else ""
            logger.info("training %s at lr %.3g%s", spec.run_name, lr, attempt)
        try:
            result = train_run(
                spec.model, train, self.batches, self.validation, spec.seed,
                on_metrics if main else None, on_progress if main else None,
                resume_path=resume_path, resume_key=run_key,
                before_checkpoint=(lambda: self.tracker.flush(run_id)) if main else None,
            )
        except (RuntimeError, ValueError) as error:
            # A crash of one variant (out of memory, a shape error in a new variant) is recorded
            # as a failed run and the ablation goes on.
            logger.exception("run %s crashed", spec.run_name)
            result = RunResult(status="failed", failure_reason=f"{type(error).__name__}: {error}")
        except KeyboardInterrupt:
            if main:
                self.tracker.end_run(run_id, "KILLED")
            raise
        finally:
            bar.close()
        if not main:
            return {}
        if result.status == "finished" and result.model is not None and config.save_checkpoints:
            checkpoint = save_run_checkpoint(result, checkpoint_dir, self.data, spec, run_key)
            for file in sorted(checkpoint.iterdir()):
                if file.name != resume_path.name:  # the resume state is deleted below, not an output
                    self.tracker.log_artifact(run_id, file, "checkpoint")
            result.checkpoint = str(checkpoint)
        result.model = None
        row = self._finish(spec, result, run_key, run_id, lr)
        resume_path.unlink(missing_ok=True)
        return row

    def _start_mlflow_run(self, spec: RunSpec, config: AblationConfig, run_key: str) -> str:
        """Return the run's MLflow id: the run an interrupted attempt left, or a new child run."""
        existing = self.tracker.find_child(self.settings.parent_id, run_key)
        if existing:
            self.tracker.continue_run(existing)
            return existing
        tags = {
            **spec.axes, "seed": str(spec.seed), RUN_KEY_TAG: run_key, ABLATION_TAG: config.name,
            "is_baseline": str(spec.is_baseline),
        }
        params = run_params(config, spec, config.to_dict()["train"], self.data, run_key)
        return self.tracker.start_child(self.settings.parent_id, spec.run_name, params, tags)

    def _finish(self, spec: RunSpec, result: RunResult, run_key: str, run_id: str, lr: float) -> dict[str, Any]:
        """Log the run's final values, end its MLflow run and add its row to summary.csv."""
        self.tracker.log_metrics(run_id, result.steps_done, {
            "final_val_loss": result.final_val_loss,
            "params": result.params,
            "peak_mem_mb": result.peak_mem_mb,
            "flops_per_token": result.flops_per_token,
            "train_tokens_per_s": result.tokens_per_s,
            "wall_s": result.wall_s,
            **({"mfu": result.mfu} if math.isfinite(result.mfu) else {}),
        })
        self.tracker.set_tags(run_id, {"status": result.status, "data_fingerprint": result.data_fingerprint,
                                       "failure_reason": result.failure_reason[:5000]})
        self.tracker.end_run(run_id, "FINISHED" if result.status == "finished" else "FAILED")
        row = summary_row(spec, self.config, result, run_key, run_id, lr)
        update_summary(self.results_path / "summary.csv", [row])
        logger.info("%s: %s, final validation loss %.4f", spec.run_name, result.status, result.final_val_loss)
        return row


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


def read_summary(path: Path) -> pd.DataFrame:
    if path.exists():
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    return summary_frame([])


def update_summary(path: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Replace or add ``rows`` (by run key) in summary.csv, under a file lock shared by the workers."""
    from experiments.runner import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        summary = read_summary(path)
        keys = {row["run_key"] for row in rows}
        unchanged = summary[~summary["run_key"].isin(keys)]
        new = summary_frame(rows)
        summary = new if unchanged.empty else pd.concat([unchanged, new], ignore_index=True)
        write_atomic(path, summary.to_csv(index=False))
    return summary


def write_summary_from_queue(queue: WorkQueue, units: list[dict[str, Any]], path: Path) -> pd.DataFrame:
    """Write summary.csv with one row per finished training unit of the queue, in plan order."""
    from experiments.runner import write_atomic

    done = queue.results()
    rows = [done[unit["unit_key"]] for unit in units if unit["kind"] == "train" and unit["unit_key"] in done]
    summary = summary_frame(rows)
    with file_lock(path):
        write_atomic(path, summary.to_csv(index=False))
    return read_summary(path)


def worker_main(settings: WorkerSettings) -> int:
    """Entry point of a worker process started by ``--workers N``; return how many units it ran."""
    import torch

    from experiments.runner import configure_logging

    configure_logging()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    context = distributed.DistributedContext()
    try:
        return Worker(settings, context).run()
    except KeyboardInterrupt:
        return 0


def default_threads(workers: int) -> int:
    """Return torch threads per worker: the cores shared out, at least one each."""
    return max(1, (os.cpu_count() or 1) // workers)
