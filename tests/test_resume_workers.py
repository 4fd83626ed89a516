"""Interrupted ablations, several workers, tuning and torchrun, through the runner.

The runs use the smoke preset on a small generated corpus. Worker processes are started as a user
would start them, through ``run_ablation.py``.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments.coordination import check_storage_url, shown_url
from experiments.runner import main

ROOT = Path(__file__).resolve().parents[1]
CELL = ["axes.attention=[n4]", "axes.mlp=[asgg]", "axes.norm=[dyt]"]
# Long enough to be killed in the middle, with a resume state every 5 steps.
LONG_RUN = ["train.steps=60", "train.eval_interval=5", "train.checkpoint_interval=5"]


def arguments(workspace, corpus, name, *extra):
    return ["--preset", "smoke", "--quiet", "--name", name, f"data.source={corpus}", f"results_dir={workspace / 'results'}", *extra]


def start(workspace, corpus, name, *extra) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "N4_CACHE_DIR": str(workspace / "cache")}
    log = open(workspace / f"{name}-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_ablation.py"), *arguments(workspace, corpus, name, *extra)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def mlflow_client(workspace) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workspace / 'results' / 'mlflow.db'}")


def queue_trials(workspace, study_prefix):
    storage = f"sqlite:///{workspace / 'results' / 'optuna.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = [s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.startswith(study_prefix)]
        assert len(names) == 1, names
        return optuna.load_study(study_name=names[0], storage=storage).trials


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--workers", "0"], "--workers 0 is invalid"),
        (["--trials", "0", "--tune", "lr"], "--trials 0 is invalid"),
        (["--trials", "3"], "--trials 3 needs something to tune"),
        (["--storage", "notadb://x"], "invalid Optuna storage 'notadb://x'"),
        (["--tune", "lr", "tune.lr_min=0.1", "tune.lr_max=0.01"], "tune.lr_min=0.1 and tune.lr_max=0.01 are invalid"),
        (["grace_period=5", "heartbeat_interval=10"], "grace_period=5 must be longer than heartbeat_interval=10"),
        (["train.checkpoint_interval=0"], "train.checkpoint_interval=0 is invalid"),
    ],
)
def test_bad_scale_options_fail_before_work(workspace, corpus, capsys, options, message):
    assert main(arguments(workspace, corpus, "bad", *options)) == 2
    assert message in capsys.readouterr().err
    assert not (workspace / "results").exists()
    assert not (workspace / "cache").exists()


def test_storage_without_driver_rejected(workspace, corpus, capsys):
    if importlib.util.find_spec("pg8000") is not None:
        pytest.skip("pg8000 is installed, so this URL has its driver")
    url = "postgresql+pg8000://user:password@127.0.0.1:1/n4"
    assert main(arguments(workspace, corpus, "bad", "--storage", url)) == 2
    error = capsys.readouterr().err
    assert "the Optuna storage 'postgresql+pg8000://user:***@127.0.0.1:1/n4' needs the postgresql+pg8000 database driver" in error
    assert not (workspace / "results").exists()


def test_unreachable_storage_server_rejected(workspace, corpus, capsys):
    pytest.importorskip("psycopg", reason="needs the PostgreSQL driver: pip install -e '.[postgres]'")
    url = "postgresql://user:password@127.0.0.1:1/n4"  # port 1: nothing listens there
    assert main(arguments(workspace, corpus, "bad", "--storage", url)) == 2
    error = capsys.readouterr().err
    assert "cannot connect to the Optuna storage 'postgresql://user:***@127.0.0.1:1/n4'" in error
    assert "password" not in error
    assert not (workspace / "results").exists()


def test_storage_under_file_rejected(workspace, corpus, capsys):
    url = f"sqlite:///{ROOT / 'README.md'}/optuna.db"
    assert main(arguments(workspace, corpus, "bad", "--storage", url)) == 2
    assert f"{ROOT / 'README.md'} is a file" in capsys.readouterr().err
    assert not (workspace / "results").exists()


def test_other_storage_rejected_after_runs(workspace, corpus, capsys):
    assert main(arguments(workspace, corpus, "kept", *CELL)) == 0
    out = workspace / "results" / "kept"
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}

    # A storage without this config's queue would train every run again over the finished ones.
    other = f"sqlite:///{workspace / 'elsewhere' / 'optuna.db'}"
    assert main(arguments(workspace, corpus, "kept", *CELL, "--storage", other)) == 2
    error = capsys.readouterr().err
    assert f"but {out} contains runs of this config recorded in the queue in" in error
    assert f"sqlite:///{workspace / 'results' / 'optuna.db'}" in error
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before

    # The storage that contains the queue still continues the ablation, with nothing to train.
    assert main(arguments(workspace, corpus, "kept", *CELL)) == 0
    assert (out / "summary.csv").read_bytes() == before[out / "summary.csv"]


def test_password_hidden_in_messages():
    assert shown_url("postgresql://alice:s3cret@db:5432/n4?password=other&sslmode=require") == (
        "postgresql://alice:***@db:5432/n4?password=***&sslmode=require"
    )
    assert shown_url("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"


def test_sqlite_storage_in_missing_folder_warns(tmp_path, caplog):
    check_storage_url(f"sqlite:///{tmp_path}/typo/optuna.db")
    assert f"the folder of the Optuna storage sqlite:///{tmp_path}/typo/optuna.db does not exist" in caplog.text
    caplog.clear()
    check_storage_url(f"sqlite:///{tmp_path}/optuna.db")
    assert caplog.text == ""


def test_sigkill_then_resume_matches_uninterrupted(workspace, corpus):
    assert main(arguments(workspace, corpus, "reference", *CELL, *LONG_RUN)) == 0
    reference = pd.read_csv(workspace / "results" / "reference" / "summary.csv")

    # Kill the run with SIGKILL once it has saved a resume state after step 10.
    process = start(workspace, corpus, "killed", *CELL, *LONG_RUN)
    resume = workspace / "results" / "killed" / "checkpoints" / "n4-asgg-dyt-none-seed0" / "resume.pt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if resume.exists() and torch.load(resume, weights_only=True)["step"] >= 10:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(resume, weights_only=True)["step"]
    assert 10 <= killed_at < 60

    # The same command again continues the run from its resume state.
    assert main(arguments(workspace, corpus, "killed", *CELL, *LONG_RUN)) == 0
    resumed = pd.read_csv(workspace / "results" / "killed" / "summary.csv")
    assert len(resumed) == 1
    assert resumed.loc[0, "status"] == "finished"
    assert resumed.loc[0, "final_val_loss"] == pytest.approx(reference.loc[0, "final_val_loss"], abs=1e-4)
    assert resumed.loc[0, "data_fingerprint"] == reference.loc[0, "data_fingerprint"]
    assert not resume.exists()

    # MLflow: one child run, continued rather than duplicated, with each step logged once.
    client = mlflow_client(workspace)
    experiment = client.get_experiment_by_name("killed")
    runs = client.search_runs([experiment.experiment_id])
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(runs) == 2
    assert len(children) == 1
    assert children[0].info.status == "FINISHED"
    val_steps = [point.step for point in client.get_metric_history(children[0].info.run_id, "val/loss")]
    assert sorted(val_steps) == list(range(0, 61, 5))
    train_steps = [point.step for point in client.get_metric_history(children[0].info.run_id, "train/loss")]
    assert len(train_steps) == len(set(train_steps))

    # The queue: the killed attempt failed and was taken over by the second one.
    units = [(trial.user_attrs["unit_key"], trial.state.name, trial.user_attrs["attempt"]) for trial in queue_trials(workspace, "killed.")]
    assert units == [
        ("train:n4-asgg-dyt-none-seed0", "FAIL", 1),
        ("report", "COMPLETE", 1),
        ("train:n4-asgg-dyt-none-seed0", "COMPLETE", 2),
    ]


def slugs(summary: pd.DataFrame) -> list[str]:
    return [f"{r.attention}-{r.mlp}-{r.norm}-{r.position}-seed{r.seed}" for r in summary.itertuples()]


def test_four_workers_on_fresh_store(workspace, corpus):
    # Two invocations of two workers each start at the same moment on an empty results folder,
    # as two machines sharing one store would.
    extra = ["--workers", "2", "--seeds", "2", "axes.attention=[n4, mha, gqa]", "axes.mlp=[asgg, gelu]", "axes.norm=[dyt]"]
    processes = [start(workspace, corpus, "shared", *extra) for _ in range(2)]
    codes = [process.wait(timeout=540) for process in processes]
    assert codes == [0, 0], [path.read_text()[-3000:] for path in workspace.glob("shared-*.log")]

    # Four variants (n4 baseline, mha, gqa, gelu) x 2 seeds: every cell ran exactly once.
    summary = pd.read_csv(workspace / "results" / "shared" / "summary.csv")
    assert len(summary) == 8
    assert summary["run_key"].nunique() == 8
    assert (summary["status"] == "finished").all()

    client = mlflow_client(workspace)
    experiments = [e.name for e in client.search_experiments()]
    assert sorted(experiments) == ["Default", "shared"]  # MLflow creates "Default" in every store
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id], max_results=100)
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(parents) == 1
    assert len(children) == 8
    assert {run.data.tags["n4.run_key"] for run in children} == set(summary["run_key"])
    assert {run.info.status for run in children} == {"FINISHED"}

    trials = queue_trials(workspace, "shared.")
    assert sorted(trial.user_attrs["unit_key"] for trial in trials) == sorted(["report", *(f"train:{slug}" for slug in slugs(summary))])
    assert {trial.state.name for trial in trials} == {"COMPLETE"}
    owners = {trial.user_attrs["owner"] for trial in trials}
    assert len(owners) >= 2

    # The report was written once the queue was empty.
    assert (workspace / "results" / "shared" / "figures" / "loss_curves.png").is_file()
    assert (workspace / "results" / "shared" / "seed_statistics.csv").is_file()


def test_changed_config_starts_new_runs(workspace, corpus):
    cells = ["axes.attention=[n4]", "axes.mlp=[asgg]", "axes.norm=[dyt, rmsnorm]"]
    assert main(arguments(workspace, corpus, "smoke", *cells)) == 0
    out = workspace / "results" / "smoke"
    before = pd.read_csv(out / "summary.csv")

    assert main(arguments(workspace, corpus, "smoke", *cells, "train.lr=0.01")) == 0
    after = pd.read_csv(out / "summary.csv")
    assert len(after) == 2
    assert set(after["lr"]) == {0.01}
    assert not set(after["run_key"]) & set(before["run_key"])

    # The first config's files are kept, apart from the new ones.
    archives = [path for path in out.iterdir() if path.name.startswith("config-")]
    assert len(archives) == 1
    pd.testing.assert_frame_equal(pd.read_csv(archives[0] / "summary.csv"), before)

    # MLflow: a parent run per config, with the new runs under the second one.
    client = mlflow_client(workspace)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 2
    assert len(runs) == 6


def test_tune_lr_with_seeds(workspace, corpus):
    cells = ["axes.attention=[n4, mha]", "axes.mlp=[asgg]", "axes.norm=[dyt]", "tune.startup_trials=1"]
    assert main(arguments(workspace, corpus, "tuned", "--tune", "lr", "--trials", "3", "--seeds", "2", *cells)) == 0
    out = workspace / "results" / "tuned"
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4
    assert (summary["status"] == "finished").all()

    # Each variant trains both seeds at the best learning rate of its own study.
    client = mlflow_client(workspace)
    runs = client.search_runs([client.get_experiment_by_name("tuned").experiment_id], max_results=100)
    tuning = {run.data.tags["attention"]: run for run in runs if run.data.tags.get("n4.kind") == "tuning"}
    trials = [run for run in runs if run.data.tags.get("n4.kind") == "trial"]
    assert set(tuning) == {"n4", "mha"}
    assert len(trials) == 6
    for attention, run in tuning.items():
        best_lr = float(run.data.params["best_lr"])
        assert 1e-4 <= best_lr <= 3e-2  # the default tune.lr_min and tune.lr_max
        assert summary.loc[summary["attention"] == attention, "lr"].tolist() == pytest.approx([best_lr, best_lr])
        nested = [trial for trial in trials if trial.data.tags["mlflow.parentRunId"] == run.info.run_id]
        assert len(nested) == 3
        completed = [trial for trial in nested if trial.data.tags["status"] == "finished"]
        assert completed
        # A trial run's latest val/loss is its final validation loss.
        assert run.data.metrics["best_val_loss"] == pytest.approx(min(trial.data.metrics["val/loss"] for trial in completed))

    # The seed statistics table: two seeds per variant, paired difference for mha.
    statistics = pd.read_csv(out / "seed_statistics.csv").set_index("attention")
    assert statistics.loc["n4", "n_finished"] == 2
    assert statistics.loc["mha", "n_pairs"] == 2
    differences = (summary[summary["attention"] == "mha"].set_index("seed")["final_val_loss"]
                   - summary[summary["attention"] == "n4"].set_index("seed")["final_val_loss"])
    assert statistics.loc["mha", "delta_vs_baseline"] == pytest.approx(differences.mean())
    parent = next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)
    logged = {artifact.path for artifact in client.list_artifacts(parent.info.run_id, "tables")}
    assert {"tables/seed_statistics.csv", "tables/seed_statistics.md"} <= logged

    # The report lists the final runs only, not the tuning and trial runs.
    from analysis.runs import load_runs
    assert len(load_runs(f"sqlite:///{workspace / 'results' / 'mlflow.db'}", "tuned")) == 4


def test_runner_under_torchrun_matches_one_process(workspace, corpus):
    cell = [*CELL, "train.steps=12", "train.batch_size=4", "train.eval_interval=4"]
    assert main(arguments(workspace, corpus, "single", *cell)) == 0
    single = pd.read_csv(workspace / "results" / "single" / "summary.csv")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "N4_CACHE_DIR": str(workspace / "cache")}
    command = [sys.executable, str(ROOT / "tests" / "torchrun_loopback.py"), "2", str(ROOT / "run_ablation.py"),
               *arguments(workspace, corpus, "ranks", *cell)]
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]

    # Two ranks with half the rows each train what one process trains, within float32 rounding.
    ranks = pd.read_csv(workspace / "results" / "ranks" / "summary.csv")
    assert len(ranks) == 1
    assert ranks.loc[0, "final_val_loss"] == pytest.approx(single.loc[0, "final_val_loss"], abs=1e-4)
    assert ranks.loc[0, "data_fingerprint"] == single.loc[0, "data_fingerprint"]

    # Only rank 0 logged: one parent run and one child run.
    client = mlflow_client(workspace)
    runs = client.search_runs([client.get_experiment_by_name("ranks").experiment_id])
    assert len(runs) == 2
    child = next(run for run in runs if "mlflow.parentRunId" in run.data.tags)
    val_steps = [point.step for point in client.get_metric_history(child.info.run_id, "val/loss")]
    assert val_steps == [0, 4, 8, 12]
