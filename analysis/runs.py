"""Load the runs of an ablation from MLflow into pandas DataFrames.

Figures and tables read results only through these functions, so they can be rebuilt from any
MLflow store (the default sqlite file or a tracking server) after the training process is gone.

Two frames:

- ``load_runs``: one row per child run (variant and seed) with its ids, name, status, axis values,
  every param as ``param.<key>``, the last value of every metric as ``metric.<key>``, and typed
  copies of the columns that figures and tables use (``final_val_loss``, ``params``, ...).
- ``load_history``: every logged point in long format: run_id, metric, step, tokens, wall_s,
  timestamp, value.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from experiments.tracking import ABLATION_TAG, PARENT_TAG, RUN_KEY_TAG
from experiments.tuning import TUNING_KIND_TAG

# The ablation axes, in the order of experiments.config.AXES (not imported from there, because
# that module imports the data pipeline and torch).
AXES = ("attention", "mlp", "norm", "position")
AXIS_TAGS = (*AXES, "seed")
DEFAULT_METRICS = ("val/loss", "train/loss", "lr", "tokens_per_s")

# Typed copies of the final metrics that the runner logs at a run's last step.
FINAL_METRICS = ("final_val_loss", "params", "flops_per_token", "peak_mem_mb")
HISTORY_COLUMNS = ["run_id", "metric", "step", "tokens", "wall_s", "timestamp", "value"]
RUN_COLUMNS = [
    "run_id", "parent_run_id", "run_name", "label", *AXES, "seed", "is_baseline", "status",
    "failure_reason", "mlflow_status", "run_key", "superseded", "start_time", "end_time",
    "tokens_per_step", *FINAL_METRICS,
]


def default_tracking_uri(results_dir: str | Path = "results") -> str:
    """Return $MLFLOW_TRACKING_URI if set, else the runner's default sqlite store under ``results_dir``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(results_dir) / 'mlflow.db'}"


def _client(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    """Open a client; reject a sqlite URI whose file does not exist, which MLflow would create empty."""
    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.exists():
            raise ValueError(f"MLflow store not found: {path} does not exist; pass the tracking URI of an existing store")
    return MlflowClient(tracking_uri=uri), uri


def _experiment_id(client: MlflowClient, uri: str, experiment_name: str) -> str:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"MLflow experiment {experiment_name!r} not found in {uri}; experiments there: {', '.join(names) or 'none'}")
    return experiment.experiment_id


def _all_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_parent_run(tracking_uri: str | None, experiment_name: str) -> str | None:
    """Return the id of the most recently started ablation parent run in the experiment, or None.

    A parent run is one tagged ``n4.ablation`` without a parent of its own. The runner reuses one
    parent per ablation name, so an experiment normally has exactly one.
    """
    client, uri = _client(tracking_uri)
    experiment_id = _experiment_id(client, uri, experiment_name)
    parents = [
        run for run in _all_runs(client, experiment_id, "")
        if ABLATION_TAG in run.data.tags and PARENT_TAG not in run.data.tags
    ]
    if not parents:
        return None
    return max(parents, key=lambda run: run.info.start_time).info.run_id


def _run_status(tags: Mapping[str, str], mlflow_status: str) -> str:
    """Return the runner's status tag (finished or failed), else MLflow's status in lower case.

    The runner sets the tag when a run ends, so a run without it is still running or was killed.
    """
    return tags.get("status") or mlflow_status.lower()


def variant_label(values: Mapping[str, object]) -> str:
    """Return the variant label without the seed, as the runner names runs: ``attention=n4 mlp=asgg ...``."""
    return " ".join(f"{axis}={values[axis]}" for axis in AXES)


def load_runs(tracking_uri: str | None = None, experiment_name: str = "default", parent_run_id: str | None = None) -> pd.DataFrame:
    """Return one row per child run of the experiment (or of one parent run), ordered by start time.

    Columns: ``RUN_COLUMNS`` (ids, run name, label, axis values, seed, is_baseline, status
    ``finished``/``failed``/``running``/``killed``, failure_reason, start and end time in UTC,
    tokens_per_step and the final metrics), then every param as ``param.<key>`` (strings, as
    MLflow stores them) and the last value of every metric as ``metric.<key>``.

    Failed and killed runs are included. Learning-rate tuning and trial runs (tagged ``n4.kind``)
    are left out. The runner retries a run that did not finish under the same ``n4.run_key`` tag,
    so an older attempt of a key that has a later attempt is marked ``superseded``. Figures and
    tables leave superseded rows out.
    """
    client, uri = _client(tracking_uri)
    experiment_id = _experiment_id(client, uri, experiment_name)
    filter_string = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else ""
    rows = []
    for run in _all_runs(client, experiment_id, filter_string):
        tags = run.data.tags
        if PARENT_TAG not in tags:
            continue  # an ablation's parent run, not a training run
        if TUNING_KIND_TAG in tags:
            continue  # a learning-rate tuning run or one of its trials
        metrics = run.data.metrics
        row = {
            "run_id": run.info.run_id,
            "parent_run_id": tags[PARENT_TAG],
            "run_name": run.info.run_name,
            **{axis: tags.get(axis) for axis in AXIS_TAGS},
            "is_baseline": tags.get("is_baseline") == "True",
            "status": _run_status(tags, run.info.status),
            "failure_reason": tags.get("failure_reason", ""),
            "mlflow_status": run.info.status,
            "run_key": tags.get(RUN_KEY_TAG),
            "start_time": run.info.start_time,
            "end_time": run.info.end_time,
            "tokens_per_step": run.data.params.get("train.tokens_per_step"),
            **{name: metrics.get(name) for name in FINAL_METRICS},
        }
        row.update({f"param.{key}": value for key, value in run.data.params.items()})
        row.update({f"metric.{key}": value for key, value in metrics.items()})
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=RUN_COLUMNS)

    frame = pd.DataFrame(rows)
    frame["label"] = [variant_label(row) for _, row in frame.iterrows()]
    frame["seed"] = pd.to_numeric(frame["seed"], errors="coerce").astype("Int64")
    for column in ("tokens_per_step", *FINAL_METRICS):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    for column in ("start_time", "end_time"):
        frame[column] = pd.to_datetime(frame[column], unit="ms", utc=True)
    frame = frame.sort_values(["start_time", "run_name"], kind="stable").reset_index(drop=True)

    # An attempt is superseded when a later run carries the same run key.
    keyed = frame["run_key"].notna()
    latest = frame[keyed].groupby("run_key")["start_time"].transform("max")
    frame["superseded"] = False
    frame.loc[keyed, "superseded"] = frame.loc[keyed, "start_time"] < latest

    extra = sorted(column for column in frame.columns if column not in RUN_COLUMNS)
    return frame[RUN_COLUMNS + extra]


def load_history(
    tracking_uri: str | None,
    run_ids: Iterable[str],
    metrics: Iterable[str] = DEFAULT_METRICS,
    tokens_per_step: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Return the metric histories in long format, sorted by run, metric and step.

    Columns: run_id, metric, step, tokens (step times the run's ``train.tokens_per_step``),
    wall_s (seconds since the run's earliest point among the loaded metrics), timestamp
    (milliseconds since the epoch, as MLflow stores it) and value. ``tokens_per_step`` maps run
    ids to tokens per optimizer step; runs missing from it are looked up in MLflow.
    """
    client, _ = _client(tracking_uri)
    run_ids = list(run_ids)
    metrics = tuple(metrics)
    known = dict(tokens_per_step or {})
    rows = []
    for run_id in run_ids:
        if run_id not in known or pd.isna(known[run_id]):
            known[run_id] = float(client.get_run(run_id).data.params.get("train.tokens_per_step", "nan"))
        for metric in metrics:
            for point in client.get_metric_history(run_id, metric):
                rows.append({"run_id": run_id, "metric": metric, "step": point.step, "timestamp": point.timestamp, "value": point.value})
    frame = pd.DataFrame(rows, columns=["run_id", "metric", "step", "timestamp", "value"])
    frame["step"] = frame["step"].astype("int64")
    frame["timestamp"] = frame["timestamp"].astype("int64")
    frame["value"] = frame["value"].astype(float)
    frame["tokens"] = frame["step"] * frame["run_id"].map(known).astype(float)
    first = frame.groupby("run_id")["timestamp"].transform("min")
    frame["wall_s"] = (frame["timestamp"] - first) / 1000.0
    return frame.sort_values(["run_id", "metric", "step", "timestamp"], kind="stable").reset_index(drop=True)[HISTORY_COLUMNS]
