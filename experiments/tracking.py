"""MLflow tracking for an ablation: one experiment, a parent run, one child run per variant and seed.

Uses ``MlflowClient`` rather than the fluent API, so no global active-run state is shared between
the parent run and its children.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

logger = logging.getLogger(__name__)

ABLATION_TAG = "n4.ablation"
CONFIG_TAG = "n4.config_fingerprint"
RUN_KEY_TAG = "n4.run_key"
PARENT_TAG = "mlflow.parentRunId"


def tracking_uri_for(configured: str | None, results_dir: str | Path) -> str:
    """Return the tracking URI: the configured one, else $MLFLOW_TRACKING_URI, else a sqlite file."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(results_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def artifact_location_for(tracking_uri: str, experiment_name: str) -> str | None:
    """Return an artifact folder beside a sqlite store, or None to let MLflow or the server decide.

    Without this, MLflow puts the artifacts of a sqlite store in ./mlruns of the current directory,
    away from the database file.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = Path(tracking_uri[len(prefix) :])
    return (database.parent / "mlartifacts" / experiment_name).resolve().as_uri()


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _param_key(key: str) -> str:
    """Replace the characters MLflow rejects in names (such as the "*" of position_defaults) by "_"."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key)


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class AblationTracker:
    """Creates and fills the MLflow runs of one ablation."""

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(
                    experiment_name, artifact_location=artifact_location_for(tracking_uri, experiment_name)
                )
            except MlflowException:
                # Another worker created it between the lookup and the creation; use that one.
                experiment = self.client.get_experiment_by_name(experiment_name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            if experiment.lifecycle_stage == "deleted":
                raise ValueError(
                    f"MLflow experiment {experiment_name!r} is deleted in {tracking_uri}; restore it "
                    f"(mlflow experiments restore) or choose another --name"
                )
            experiment_id = experiment.experiment_id
        self.experiment_id = experiment_id
        self._pending: dict[str, list[Metric]] = {}
        self._operations: list[Any] = []
        # For runs continued after an interruption: the (metric, step) points already logged,
        # which are not logged again.
        self._logged: dict[str, set[tuple[str, int]]] = {}

    def start_parent(self, name: str, config_fingerprint: str, params: Mapping[str, Any], existing_id: str | None) -> str:
        """Return the parent run id, reusing ``existing_id`` when it is still in this experiment."""
        if existing_id:
            try:
                run = self.client.get_run(existing_id)
                if run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active":
                    self.client.update_run(existing_id, status="RUNNING")
                    return existing_id
            except Exception as error:  # noqa: BLE001 - any lookup failure means "start a new parent"
                logger.warning("parent run %s not found (%s); starting a new one", existing_id, error)
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={ABLATION_TAG: name, CONFIG_TAG: config_fingerprint},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_child(self, parent_id: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name,
            tags={PARENT_TAG: parent_id, **tags},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def find_child(self, parent_id: str, run_key: str) -> str | None:
        """Return the id of the parent's child run with this run key, the latest if there are several."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{RUN_KEY_TAG}` = '{run_key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def continue_run(self, run_id: str) -> None:
        """Mark an interrupted run RUNNING again; metric points it already has are not logged twice."""
        run = self.client.get_run(run_id)
        logged = set()
        for key in run.data.metrics:
            logged.update((key, point.step) for point in self.client.get_metric_history(run_id, key))
        self._logged[run_id] = logged
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(_param_key(key), str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in flatten(params).items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(key, str(value)) for key, value in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)

    def log_metrics(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        """Queue metrics with an explicit step; they are sent in batches by ``flush``."""
        timestamp = int(time.time() * 1000)
        logged = self._logged.get(run_id, ())
        queue = self._pending.setdefault(run_id, [])
        queue.extend(
            Metric(key, float(value), timestamp, step) for key, value in metrics.items() if (key, step) not in logged
        )
        if len(queue) >= MAX_METRICS_PER_BATCH // 2:
            self.flush(run_id, synchronous=False)

    def flush(self, run_id: str, synchronous: bool = True) -> None:
        queue = self._pending.pop(run_id, [])
        for chunk in _chunks(queue, MAX_METRICS_PER_BATCH):
            operation = self.client.log_batch(run_id, metrics=chunk, synchronous=synchronous)
            if operation is not None:
                self._operations.append(operation)
        if synchronous:
            for operation in self._operations:
                operation.wait()
            self._operations.clear()

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_artifacts(self, run_id: str, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(directory), artifact_path)

    def end_run(self, run_id: str, status: str) -> None:
        """Flush pending metrics and mark the run FINISHED or FAILED."""
        self.flush(run_id)
        self.client.set_terminated(run_id, status=status)
