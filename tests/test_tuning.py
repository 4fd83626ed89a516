"""Per-variant learning-rate tuning: Optuna study, pruning, MLflow nesting, reruns and recovery."""

from __future__ import annotations

import math
from types import SimpleNamespace

import optuna
import pytest
import torch
from optuna.trial import TrialState

from analysis.runs import load_runs
from experiments.config import TuneConfig, resolve_config
from experiments.plan import RunSpec, model_config_for
from experiments.tracking import PARENT_TAG, AblationTracker
from experiments.tuning import STUDY_TAG, TUNING_KIND_TAG, edge_of_range, study_name_for, tune_variant

VOCAB = 64
EXPERIMENT = "tune-test"
GOOD_LR = 1e-2
TERRIBLE_LR = 1e-7
CELL = {"attention": "mha", "mlp": "swiglu", "norm": "rmsnorm", "position": "none"}


class FixedBatches:
    """Micro-batches of ``size`` windows taken in order from one tensor (N, T + 1)."""

    def __init__(self, windows: torch.Tensor, size: int) -> None:
        self.windows = windows
        self.size = size

    def batch(self, index: int) -> torch.Tensor:
        start = (index * self.size) % (self.windows.shape[0] - self.size + 1)
        return self.windows[start : start + self.size]


@pytest.fixture(scope="session")
def stores(tmp_path_factory) -> SimpleNamespace:
    """An MLflow sqlite store and an Optuna sqlite storage shared by all tests.

    Opening a new MLflow sqlite store takes seconds, because MLflow loads its migration scripts,
    so the tests share one store and each test uses its own experiment and study names.
    """
    directory = tmp_path_factory.mktemp("stores")
    return SimpleNamespace(tracking_uri=f"sqlite:///{directory}/mlflow.db", storage=f"sqlite:///{directory}/optuna.db")


def make_setup(stores: SimpleNamespace, name: str, **tune) -> SimpleNamespace:
    """Build a smoke-sized config named ``name``, one variant, learnable data and an MLflow parent run.

    ``name`` is the MLflow experiment and the start of the study name, so tests that use
    different names do not see each other's runs and trials. Each window counts up by one modulo VOCAB from a random start, so a good learning rate
    lowers the validation loss within a few steps and 1e-7 leaves it where it started.
    """
    config = resolve_config(
        preset="smoke",
        name=name,
        overrides=["train.device=cpu", "train.peak_flops=1000000000000.0", "train.steps=8", "train.eval_interval=2"],
    )
    config.tune = TuneConfig(params=["lr"], **{"lr_min": 1e-8, "lr_max": 1e-1, "startup_trials": 1, **tune})
    variant = tuple(CELL.items())
    spec = RunSpec(variant=variant, seed=0, model=model_config_for(config, CELL, VOCAB), is_baseline=True)

    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, VOCAB, (64, 1), generator=generator)
    windows = (starts + torch.arange(config.train.seq_len + 1)) % VOCAB

    tracker = AblationTracker(stores.tracking_uri, name)
    parent_id = tracker.start_parent(name, config.fingerprint(), {}, None)
    return SimpleNamespace(
        config=config,
        spec=spec,
        batches=FixedBatches(windows, config.train.batch_size),
        validation=windows[: config.train.eval_windows],
        tracking_uri=stores.tracking_uri,
        tracker=tracker,
        parent_id=parent_id,
        storage=stores.storage,
    )


def run_tuning(setup: SimpleNamespace, storage=None, show_progress: bool = False):
    return tune_variant(
        setup.spec, setup.config, setup.batches, setup.validation,
        storage or setup.storage, setup.tracker, setup.parent_id, show_progress=show_progress,
    )


def load_study(setup: SimpleNamespace) -> optuna.Study:
    return optuna.load_study(study_name=study_name_for(setup.config, setup.spec), storage=setup.storage)


def create_study(setup: SimpleNamespace) -> optuna.Study:
    return optuna.create_study(study_name=study_name_for(setup.config, setup.spec), storage=setup.storage, direction="minimize")


def trial_runs(setup: SimpleNamespace) -> list:
    filter_string = f"tags.`{TUNING_KIND_TAG}` = 'trial'"
    return list(setup.tracker.client.search_runs([setup.tracker.experiment_id], filter_string=filter_string))


def all_runs(setup: SimpleNamespace) -> list:
    return list(setup.tracker.client.search_runs([setup.tracker.experiment_id]))


@pytest.fixture(scope="module")
def enqueued(stores):
    """One search of two enqueued trials, a good and a terrible lr, beside one ordinary training run."""
    setup = make_setup(stores, EXPERIMENT, trials=2)
    study = create_study(setup)
    study.enqueue_trial({"lr": GOOD_LR})
    study.enqueue_trial({"lr": TERRIBLE_LR})
    setup.training_run_id = setup.tracker.start_child(setup.parent_id, "ordinary run", {}, {**CELL, "seed": "0"})
    setup.tracker.end_run(setup.training_run_id, "FINISHED")
    setup.result = run_tuning(setup)
    setup.trials = {trial.params["lr"]: trial for trial in load_study(setup).trials}
    return setup


def test_enqueued_trials_used(enqueued):
    assert sorted(enqueued.trials) == [TERRIBLE_LR, GOOD_LR]
    assert len(load_study(enqueued).trials) == 2


def test_terrible_lr_pruned(enqueued):
    trial = enqueued.trials[TERRIBLE_LR]
    assert trial.state == TrialState.PRUNED
    run = enqueued.tracker.client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["status"] == "pruned"
    assert run.info.status == "FINISHED"
    assert enqueued.result.n_pruned == 1


def test_good_lr_completes(enqueued):
    trial = enqueued.trials[GOOD_LR]
    assert trial.state == TrialState.COMPLETE
    run = enqueued.tracker.client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["status"] == "finished"
    assert run.info.status == "FINISHED"
    assert enqueued.result.n_complete == 1
    assert enqueued.result.n_failed == 0


def test_best_lr_is_argmin(enqueued):
    completed = [trial for trial in load_study(enqueued).trials if trial.state == TrialState.COMPLETE]
    best = min(completed, key=lambda trial: trial.value)
    assert enqueued.result.best_lr == GOOD_LR
    assert enqueued.result.best_lr == best.params["lr"]
    assert enqueued.result.best_val_loss == best.value
    assert best.value < math.log(VOCAB) / 2


def test_trial_metrics_have_steps(enqueued):
    client = enqueued.tracker.client
    good = enqueued.trials[GOOD_LR].user_attrs["mlflow_run_id"]
    terrible = enqueued.trials[TERRIBLE_LR].user_attrs["mlflow_run_id"]
    assert [point.step for point in client.get_metric_history(good, "val/loss")] == [0, 2, 4, 6, 8]
    assert [point.step for point in client.get_metric_history(terrible, "val/loss")] == [0, 2]
    assert client.get_metric_history(good, "val/loss")[-1].value == enqueued.result.best_val_loss
    assert client.get_metric_history(good, "train/loss")
    assert client.get_run(good).data.params["lr"] == str(GOOD_LR)


def test_mlflow_nesting(enqueued):
    client = enqueued.tracker.client
    tuning = client.get_run(enqueued.result.mlflow_run_id)
    assert tuning.data.tags[PARENT_TAG] == enqueued.parent_id
    assert tuning.data.tags[TUNING_KIND_TAG] == "tuning"
    assert tuning.data.tags[STUDY_TAG] == enqueued.result.study_name
    assert tuning.data.tags["attention"] == "mha"
    assert tuning.info.run_name == "attention=mha mlp=swiglu norm=rmsnorm position=none tune=lr"
    assert tuning.info.status == "FINISHED"
    runs = trial_runs(enqueued)
    assert len(runs) == 2
    assert {run.data.tags[PARENT_TAG] for run in runs} == {tuning.info.run_id}
    assert {run.info.run_id for run in runs} == {trial.user_attrs["mlflow_run_id"] for trial in enqueued.trials.values()}


def test_tuning_run_summary(enqueued):
    tuning = enqueued.tracker.client.get_run(enqueued.result.mlflow_run_id)
    assert float(tuning.data.params["best_lr"]) == GOOD_LR
    assert tuning.data.params["tune.trials"] == "2"
    assert tuning.data.metrics["best_val_loss"] == enqueued.result.best_val_loss
    assert tuning.data.metrics["n_complete"] == 1
    assert tuning.data.metrics["n_pruned"] == 1


@pytest.mark.parametrize(
    ("lr", "edge"),
    # The range 1e-4..1e-1 is three decades wide on a log scale; a tenth of it is 0.3 decades.
    [(1e-1, "upper"), (10 ** -1.29, "upper"), (10 ** -1.31, None), (1e-2, None), (10 ** -3.69, None),
     (10 ** -3.71, "lower"), (1e-4, "lower")],
)
def test_edge_of_range(lr, edge):
    assert edge_of_range(lr, 1e-4, 1e-1) == edge


def test_best_lr_inside_range_not_flagged(enqueued):
    assert edge_of_range(GOOD_LR, 1e-8, 1e-1) is None
    tuning = enqueued.tracker.client.get_run(enqueued.result.mlflow_run_id)
    assert "best_lr_at_edge" not in tuning.data.tags


def test_best_lr_at_top_flagged(stores, caplog):
    setup = make_setup(stores, "edge", trials=1, lr_max=1.2e-2)
    create_study(setup).enqueue_trial({"lr": GOOD_LR})
    result = run_tuning(setup)
    assert result.best_lr == GOOD_LR
    tuning = setup.tracker.client.get_run(result.mlflow_run_id)
    assert tuning.data.tags["best_lr_at_edge"] == "upper"
    assert "lies at the upper end of the searched range [1e-08, 0.012]" in caplog.text
    assert "tune.lr_max" in caplog.text


def test_load_runs_ignores_tuning(enqueued):
    runs = load_runs(enqueued.tracking_uri, EXPERIMENT)
    assert list(runs["run_id"]) == [enqueued.training_run_id]


def test_sampled_trials_counted(stores):
    setup = make_setup(stores, "sampled", trials=3)
    result = run_tuning(setup, show_progress=True)
    trials = load_study(setup).trials
    assert len(trials) == 3
    assert all(trial.state.is_finished() for trial in trials)
    assert result.n_complete + result.n_pruned + result.n_failed == 3
    assert all(1e-8 <= trial.params["lr"] <= 1e-1 for trial in trials)
    assert len(trial_runs(setup)) == 3


def test_rerun_returns_same_result(stores):
    setup = make_setup(stores, "rerun", trials=2)
    first = run_tuning(setup)
    runs_before = len(all_runs(setup))
    second = run_tuning(setup)
    assert second == first
    assert len(load_study(setup).trials) == 2
    assert len(all_runs(setup)) == runs_before


def test_interrupted_trial_not_counted(stores):
    setup = make_setup(stores, "interrupted", trials=1)
    study = create_study(setup)
    stale = study.ask()
    stale_run_id = setup.tracker.start_child(setup.parent_id, "stale trial", {}, {})
    stale.set_user_attr("mlflow_run_id", stale_run_id)
    # A trial run whose id never reached the study, as when a process dies right after creating it.
    orphan_tags = {TUNING_KIND_TAG: "trial", STUDY_TAG: study.study_name}
    orphan_run_id = setup.tracker.start_child(setup.parent_id, "orphan trial", {}, orphan_tags)

    result = run_tuning(setup, storage=optuna.storages.RDBStorage(setup.storage))

    trials = load_study(setup).trials
    assert len(trials) == 2
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["interrupted"] is True
    assert trials[1].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert setup.tracker.client.get_run(stale_run_id).info.status == "KILLED"
    assert setup.tracker.client.get_run(orphan_run_id).info.status == "KILLED"
    assert result.n_complete == 1
    assert result.n_failed == 0


class CrashingBatches:
    """Batches whose every read raises RuntimeError, as a crash inside training would."""

    def batch(self, index: int) -> torch.Tensor:
        raise RuntimeError("simulated crash")


def test_crashed_trial_not_counted(stores):
    setup = make_setup(stores, "crashed", trials=1)
    good_batches = setup.batches
    setup.batches = CrashingBatches()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tuning(setup)
    crashed = load_study(setup).trials[0]
    client = setup.tracker.client
    assert crashed.state == TrialState.FAIL
    assert "diverged" not in crashed.user_attrs
    assert client.get_run(crashed.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    tuning_runs = client.search_runs([setup.tracker.experiment_id], filter_string=f"tags.`{TUNING_KIND_TAG}` = 'tuning'")
    assert [run.info.status for run in tuning_runs] == ["FAILED"]

    setup.batches = good_batches
    result = run_tuning(setup)
    trials = load_study(setup).trials
    assert len(trials) == 2
    assert trials[1].state == TrialState.COMPLETE
    assert result.n_complete == 1
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"


def test_quoted_name_reuses_tuning_run(stores):
    setup = make_setup(stores, "quoted's", trials=1)
    first = run_tuning(setup)
    second = run_tuning(setup)
    tuning_runs = setup.tracker.client.search_runs(
        [setup.tracker.experiment_id], filter_string=f"tags.`{TUNING_KIND_TAG}` = 'tuning'"
    )
    assert second == first
    assert len(tuning_runs) == 1


def test_all_diverged_raises(stores):
    setup = make_setup(stores, "diverged", trials=2, lr_min=1e20, lr_max=1e21)
    with pytest.raises(ValueError, match="Lower tune.lr_max") as error:
        run_tuning(setup)
    assert "attention=mha mlp=swiglu norm=rmsnorm position=none" in str(error.value)
    trials = load_study(setup).trials
    assert len(trials) == 2
    assert all(trial.state == TrialState.FAIL for trial in trials)
    assert all(trial.user_attrs["diverged"] is True for trial in trials)
    assert {run.data.tags["status"] for run in trial_runs(setup)} == {"failed"}
    assert {run.info.status for run in trial_runs(setup)} == {"FAILED"}


def test_study_name_leaves_out_seed(stores):
    setup = make_setup(stores, "study-name")
    other_seed = RunSpec(variant=setup.spec.variant, seed=3, model=setup.spec.model, is_baseline=True)
    name = study_name_for(setup.config, setup.spec)
    assert name == f"study-name.tune.mha-swiglu-rmsnorm-none.{setup.config.fingerprint()}"
    assert study_name_for(setup.config, other_seed) == name
