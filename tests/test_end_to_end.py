"""The runner end to end: the smoke grid on a small local corpus, MLflow runs, summary and figures."""

from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from experiments.runner import SUMMARY_COLUMNS, main


def run(workspace, corpus, *extra):
    return main([
        "--preset", "smoke", "--quiet", "--name", "smoke",
        f"data.source={corpus}", f"results_dir={workspace / 'results'}", *extra,
    ])


def test_smoke_grid_end_to_end(workspace, corpus):
    assert run(workspace, corpus, "--grid") == 0
    out = workspace / "results" / "smoke"

    # Summary: one finished row per cell of the 5 x 3 x 3 grid, every column of the contract.
    summary = pd.read_csv(out / "summary.csv")
    assert set(SUMMARY_COLUMNS) <= set(summary.columns)
    assert len(summary) == 45
    assert (summary["status"] == "finished").all()
    assert summary[["attention", "mlp", "norm"]].drop_duplicates().shape[0] == 45
    assert summary["data_fingerprint"].nunique() == 1
    assert (summary["final_val_loss"] < summary["initial_val_loss"]).all()
    assert (summary["params"] > 0).all()

    # Parameters are matched across MLPs: for a fixed attention and norm they differ by at most a
    # few rows of the smallest matrix.
    for _, group in summary.groupby(["attention", "norm"]):
        assert group["params"].max() - group["params"].min() <= 3 * 32

    # MLflow: one experiment, one parent run, one child per cell with params, tags and metrics.
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert len(children) == 45
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    child = children[0]
    assert child.info.status == "FINISHED"
    assert {"model.hidden_size", "train.lr", "data.seed", "seed", "model.attention"} <= set(child.data.params)
    assert {"attention", "mlp", "norm", "position", "seed"} <= set(child.data.tags)
    history = client.get_metric_history(child.info.run_id, "val/loss")
    assert [point.step for point in history] == [0, 3, 6]
    for metric in ("train/loss", "lr", "tokens_per_s"):
        assert client.get_metric_history(child.info.run_id, metric), metric
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"config.yaml", "summary.csv", "figures"} <= artifacts

    # Figures: PNG and PDF, not empty.
    for suffix in ("png", "pdf"):
        figure = out / "figures" / f"loss_curves.{suffix}"
        assert figure.stat().st_size > 10_000, figure

    # Checkpoints: one per run, in results and as an MLflow artifact, usable by n4.generate.
    assert summary["checkpoint"].map(lambda path: (Path(path) / "model.safetensors").is_file()).all()
    child_artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")}
    assert child_artifacts == {"checkpoint/model.safetensors", "checkpoint/config.json", "checkpoint/tokenizer.json"}

    # Rerunning the same command trains nothing new and duplicates nothing.
    assert run(workspace, corpus, "--grid") == 0
    assert len(pd.read_csv(out / "summary.csv")) == 45
    runs_after = client.search_runs([experiment.experiment_id], max_results=1000)
    assert len(runs_after) == 46


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("axes.attention=[n4, flashy]", "unknown attention 'flashy'; valid names:"),
        ("model.kv_heads=3", "kv_heads=3 does not divide heads=2"),
        ("model.hidden_size=33", "hidden_size=33 is not divisible by heads=2"),
        ("model.window=0", "window=0"),
        ("data.source=/nonexistent/corpus.txt", "/nonexistent/corpus.txt"),
        ("train.colour=blue", "train.colour"),
    ],
)
def test_bad_input_fails_before_work(workspace, corpus, capsys, override, message):
    assert run(workspace, corpus, override) == 2
    error = capsys.readouterr().err
    assert message in error
    assert not (workspace / "results" / "smoke").exists()
    assert not (workspace / "cache").exists()


def test_nan_run_fails_grid_continues(workspace, corpus):
    code = run(workspace, corpus, "axes.attention=[n4]", "axes.mlp=[asgg]", "axes.norm=[dyt, rmsnorm]",
               "options.norm.rmsnorm={eps: -1000.0}")
    summary = pd.read_csv(workspace / "results" / "smoke" / "summary.csv").set_index("norm")
    assert code == 1
    assert summary.loc["dyt", "status"] == "finished"
    assert summary.loc["rmsnorm", "status"] == "failed"
    assert "step" in summary.loc["rmsnorm", "failure_reason"]
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'results' / 'mlflow.db'}")
    failed = client.get_run(summary.loc["rmsnorm", "mlflow_run_id"])
    assert failed.info.status == "FAILED"
    assert failed.data.tags["status"] == "failed"


def test_generate_from_grid_checkpoint(workspace, corpus, capsys):
    from n4.generate import main as generate_main

    assert run(workspace, corpus, "axes.attention=[n4]", "axes.mlp=[asgg]", "axes.norm=[dyt]") == 0
    summary = pd.read_csv(workspace / "results" / "smoke" / "summary.csv")
    capsys.readouterr()
    code = generate_main([
        "--checkpoint", summary.loc[0, "checkpoint"], "--prompt", "The king", "--max-new-tokens", "5",
        "--temperature", "0",
    ])
    assert code == 0
    assert capsys.readouterr().out.startswith("The king")
