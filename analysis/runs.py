"""Load the runs of an ablation from MLflow into pandas DataFrames.

Figures and tables read results only through these functions, so they can be rebuilt from any
MLflow store (the default sqlite file or a tracking server) after the training process is gone.
"""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from experiments.tracking import PARENT_TAG

AXIS_TAGS = ("attention", "mlp", "norm", "position", "seed")


def _all_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def load_runs(tracking_uri: str, experiment_name: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """Return one row per child run: ids, name, MLflow status, axis values, params and final metrics.

    Params appear as ``param.<key>`` columns and the last logged value of each metric as
    ``metric.<key>`` columns. With ``parent_run_id``, only that ablation's children are returned.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"MLflow experiment {experiment_name!r} not found in {tracking_uri}")
    filter_string = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else ""
    rows = []
    for run in _all_runs(client, experiment.experiment_id, filter_string):
        if PARENT_TAG not in run.data.tags:
            continue  # an ablation's parent run, not a training run
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "mlflow_status": run.info.status,
            "start_time": run.info.start_time,
        }
        for axis in AXIS_TAGS:
            row[axis] = run.data.tags.get(axis)
        row.update({f"param.{key}": value for key, value in run.data.params.items()})
        row.update({f"metric.{key}": value for key, value in run.data.metrics.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["seed"] = pd.to_numeric(frame["seed"], errors="coerce")
        frame = frame.sort_values(["start_time", "run_name"]).reset_index(drop=True)
    return frame


def load_history(tracking_uri: str, run_ids: list[str], metrics: tuple[str, ...] = ("val/loss", "train/loss")) -> pd.DataFrame:
    """Return the metric histories in long format: run_id, metric, step, timestamp (ms), value."""
    client = MlflowClient(tracking_uri=tracking_uri)
    rows = []
    for run_id in run_ids:
        for metric in metrics:
            for point in client.get_metric_history(run_id, metric):
                rows.append(
                    {"run_id": run_id, "metric": metric, "step": point.step, "timestamp": point.timestamp, "value": point.value}
                )
    frame = pd.DataFrame(rows, columns=["run_id", "metric", "step", "timestamp", "value"])
    return frame.sort_values(["run_id", "metric", "step"]).reset_index(drop=True)
