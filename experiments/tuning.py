"""Per-variant learning-rate search with Optuna, tracked as nested MLflow runs.

``tune_variant`` tunes one variant's learning rate. Each trial trains the variant with a learning
rate drawn log-uniformly from ``[tune.lr_min, tune.lr_max]`` by a seeded TPE sampler. A median
pruner stops a trial whose validation loss is above the median of the completed trials at the
same step. The study is kept in Optuna storage, so an interrupted search continues where it stopped.

In MLflow, each variant gets one tuning run under the ablation's parent run, and each trial is a
run nested under that tuning run::

    ablation parent run
    └── attention=n4 ... tune=lr        (tag n4.kind=tuning)
        ├── attention=n4 ... trial=0    (tag n4.kind=trial)
        └── attention=n4 ... trial=1

Only the standard library, Optuna, MLflow, tqdm and experiments.tracking are imported at module level,
so that analysis.runs can import ``TUNING_KIND_TAG`` without loading torch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from experiments.tracking import ABLATION_TAG, PARENT_TAG

if TYPE_CHECKING:
    import torch

    from experiments.config import AblationConfig
    from experiments.plan import RunSpec
    from experiments.tracking import AblationTracker

logger = logging.getLogger("n4.tuning")

TUNING_KIND_TAG = "n4.kind"  # "tuning" on a variant's tuning run, "trial" on each trial run
STUDY_TAG = "n4.tune_study"  # the Optuna study name, on the tuning run and on its trial runs

# User attrs of an Optuna trial.
RUN_ID_ATTR = "mlflow_run_id"  # the trial's MLflow run
DIVERGED_ATTR = "diverged"  # True on a FAIL trial whose loss became NaN or infinite
INTERRUPTED_ATTR = "interrupted"  # True on a FAIL trial whose process stopped before it ended
FAILURE_ATTR = "failure_reason"

EDGE_FRACTION = 0.1  # a best rate this close to an end of the range, as a fraction of its log width, is flagged


@dataclass
class TuneResult:
    """Outcome of one variant's learning-rate search."""

    best_lr: float
    best_val_loss: float
    n_complete: int
    n_pruned: int
    n_failed: int  # trials whose loss diverged, not counting interrupted or crashed trials
    study_name: str
    mlflow_run_id: str  # the variant's tuning run


def variant_slug(spec: RunSpec) -> str:
    """Return the variant's names joined by "-", such as ``n4-asgg-dyt-none`` (the slug without the seed)."""
    return "-".join(name for _, name in spec.variant)


def study_name_for(config: AblationConfig, spec: RunSpec) -> str:
    """Return the Optuna study name of ``spec``'s variant, such as ``default.tune.n4-asgg-dyt-none.<fingerprint>``.

    The name leaves out the seed, so all seeds of a variant share one study. It contains the
    config fingerprint, so a changed config (another lr range or trial count included) starts
    a new study.
    """
    return f"{config.name}.tune.{variant_slug(spec)}.{config.fingerprint()}"


def pruning_warmup_steps(config: AblationConfig) -> int:
    """Return the steps before a trial can be pruned: ``tune.pruning_warmup_steps``, else ``train.steps // 4``."""
    warmup = config.tune.pruning_warmup_steps
    return warmup if warmup is not None else config.train.steps // 4


def tune_variant(
    spec: RunSpec,
    config: AblationConfig,
    batches,
    validation: torch.Tensor,
    storage: str | optuna.storages.BaseStorage,
    tracker: AblationTracker,
    parent_run_id: str,
    show_progress: bool = False,
) -> TuneResult:
    """Tune the learning rate of ``spec``'s variant until its study contains ``tune.trials`` finished trials.

    Finished trials are the completed, pruned and diverged ones. Trials train ``spec.model`` from
    ``spec.seed`` one after another on ``batches`` and ``validation``, with ``config.train`` except
    for the learning rate. ``storage`` is an Optuna storage URL or storage object.

    The caller must ensure that only one process tunes a given variant at a time, because a trial
    that is still RUNNING when this starts is taken to be from a process that died. Such a trial
    is set to FAIL with the user attr ``interrupted=True``, and its MLflow run to KILLED.

    A second call on a finished study runs no trial and returns the same result. Raises
    ValueError when no trial completed, which happens when every trial diverged.

    NOTE: trials are not meant for a torchrun process group. Only rank 0 calls the pruning
    callback, so the other ranks would wait for a pruned trial forever.
    """
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return _tune(spec, config, batches, validation, storage, tracker, parent_run_id, show_progress)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _tune(spec, config, batches, validation, storage, tracker, parent_run_id, show_progress) -> TuneResult:
    tune = config.tune
    study_name = study_name_for(config, spec)
    # A URL is opened as optuna.create_study would open it (RDBStorage), but kept here, so the
    # states of interrupted trials can be set through the storage's public methods.
    if isinstance(storage, str):
        storage = optuna.storages.RDBStorage(storage)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="minimize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(n_startup_trials=tune.startup_trials, seed=tune.sampler_seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=tune.startup_trials, n_warmup_steps=pruning_warmup_steps(config)
        ),
    )
    tuning_run = _find_or_start_tuning_run(spec, config, tracker, parent_run_id, study_name)
    tuning_run_id = tuning_run.info.run_id
    _fail_interrupted_trials(study, storage, tracker)

    counts = _count_finished(study)
    new_trials = 0
    bar = tqdm(total=tune.trials, initial=min(sum(counts), tune.trials), desc=f"tune {variant_slug(spec)}",
               unit="trial", leave=False, disable=not show_progress, position=1)
    try:
        while sum(counts) < tune.trials:
            if new_trials == 0 and tuning_run.info.status != "RUNNING":
                tracker.client.update_run(tuning_run_id, status="RUNNING")
            _run_trial(study, spec, config, batches, validation, tracker, tuning_run_id, bar)
            new_trials += 1
            counts = _count_finished(study)
            bar.update(1)
    except BaseException as error:
        # The next call continues the search in the same tuning run.
        _end_run_logging_errors(tracker, tuning_run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        bar.close()

    n_complete, n_pruned, n_failed = counts
    if new_trials == 0 and tuning_run.info.status == "FINISHED":
        # A finished search: the tuning run already contains the result.
        best = study.best_trial
        return TuneResult(best.params["lr"], best.value, n_complete, n_pruned, n_failed, study_name, tuning_run_id)

    tracker.log_metrics(tuning_run_id, 0, {"n_complete": n_complete, "n_pruned": n_pruned, "n_failed": n_failed})
    if n_complete == 0:
        message = (
            f"no learning-rate trial of {spec.label} completed: {n_failed} of {sum(counts)} trials diverged "
            f"(non-finite loss) with lr drawn from [{tune.lr_min:g}, {tune.lr_max:g}]. Lower tune.lr_max."
        )
        tracker.set_tags(tuning_run_id, {"status": "failed", "failure_reason": message})
        tracker.end_run(tuning_run_id, "FAILED")
        raise ValueError(message)

    best = study.best_trial
    result = TuneResult(best.params["lr"], best.value, n_complete, n_pruned, n_failed, study_name, tuning_run_id)
    tracker.log_params(tuning_run_id, {"best_lr": result.best_lr, "best_trial": best.number})
    tracker.log_metrics(tuning_run_id, 0, {"best_val_loss": result.best_val_loss})
    tracker.set_tags(tuning_run_id, {"status": "finished"})
    tracker.end_run(tuning_run_id, "FINISHED")
    logger.info("%s: best lr %.3g, validation loss %.4f (trial %d)", spec.label, result.best_lr, result.best_val_loss, best.number)
    edge = edge_of_range(result.best_lr, tune.lr_min, tune.lr_max)
    if edge is not None:
        tracker.set_tags(tuning_run_id, {"best_lr_at_edge": edge})
        logger.warning(
            "%s: the best lr %.3g lies at the %s end of the searched range [%g, %g], so a better rate may "
            "lie beyond it; widen the range with tune.%s",
            spec.label, result.best_lr, edge, tune.lr_min, tune.lr_max, "lr_max" if edge == "upper" else "lr_min",
        )
    return result


def edge_of_range(lr: float, lr_min: float, lr_max: float) -> str | None:
    """Return "upper" or "lower" when ``lr`` is within EDGE_FRACTION of that end of the log range, else None."""
    width = math.log(lr_max / lr_min)
    if math.log(lr_max / lr) <= EDGE_FRACTION * width:
        return "upper"
    if math.log(lr / lr_min) <= EDGE_FRACTION * width:
        return "lower"
    return None


def _count_finished(study: optuna.Study) -> tuple[int, int, int]:
    """Return the numbers of completed, pruned and diverged trials of ``study``."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    complete = sum(trial.state == TrialState.COMPLETE for trial in trials)
    pruned = sum(trial.state == TrialState.PRUNED for trial in trials)
    diverged = sum(trial.state == TrialState.FAIL and bool(trial.user_attrs.get(DIVERGED_ATTR)) for trial in trials)
    return complete, pruned, diverged


def _study_runs(tracker: AblationTracker, study_name: str, kind: str, extra_filter: str = "") -> list:
    """Return the runs of kind ``kind`` (tuning or trial) of the study, oldest first.

    The study name is compared here rather than in the filter string, because an ablation name
    may contain a quote, which would end the filter's string literal.
    """
    filter_string = f"tags.`{TUNING_KIND_TAG}` = '{kind}'" + (f" and {extra_filter}" if extra_filter else "")
    runs, token = [], None
    while True:
        page = tracker.client.search_runs(
            [tracker.experiment_id], filter_string=filter_string, order_by=["attributes.start_time ASC"],
            max_results=1000, page_token=token,
        )
        runs.extend(run for run in page if run.data.tags.get(STUDY_TAG) == study_name)
        token = page.token
        if not token:
            return runs


def _find_or_start_tuning_run(spec, config, tracker, parent_run_id: str, study_name: str):
    """Return the variant's tuning run, creating it under ``parent_run_id`` if the experiment has none."""
    runs = _study_runs(tracker, study_name, "tuning")
    if runs:
        run = runs[0]
        if run.data.tags.get(PARENT_TAG) != parent_run_id:
            # The ablation got a new parent run, so the tuning run and its trials move under it.
            logger.info("moving tuning run %s of %s under parent run %s", run.info.run_id, spec.label, parent_run_id)
            tracker.set_tags(run.info.run_id, {PARENT_TAG: parent_run_id})
        return run

    tune = config.tune
    params = {
        "tune.param": "lr",
        "tune.lr_min": tune.lr_min,
        "tune.lr_max": tune.lr_max,
        "tune.lr_scale": "log",
        "tune.trials": tune.trials,
        "tune.sampler": "TPESampler",
        "tune.sampler_seed": tune.sampler_seed,
        "tune.pruner": "MedianPruner",
        "tune.startup_trials": tune.startup_trials,
        "tune.pruning_warmup_steps": pruning_warmup_steps(config),
        "seed": spec.seed,
    }
    tags = {**spec.axes, TUNING_KIND_TAG: "tuning", STUDY_TAG: study_name, ABLATION_TAG: config.name}
    run_id = tracker.start_child(parent_run_id, f"{spec.label} tune=lr", params, tags)
    return tracker.client.get_run(run_id)


def _end_run_logging_errors(tracker: AblationTracker, run_id: str, status: str) -> None:
    """End an MLflow run, logging an MLflow error instead of raising it, so it cannot hide the error being handled."""
    try:
        tracker.end_run(run_id, status)
    except MlflowException as error:
        logger.warning("cannot mark MLflow run %s as %s: %s", run_id, status, error)


def _fail_interrupted_trials(study: optuna.Study, storage: optuna.storages.BaseStorage, tracker: AblationTracker) -> None:
    """Set every RUNNING trial of ``study`` to FAIL with ``interrupted=True`` and its MLflow run to KILLED."""
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, INTERRUPTED_ATTR, True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        logger.warning("trial %d of study %s was interrupted, so it is marked FAIL (MLflow run %s)", trial.number, study.study_name, run_id)
        if run_id:
            _end_run_logging_errors(tracker, run_id, "KILLED")

    # A process that died between creating a trial run and storing its id in the study left a
    # RUNNING trial run that no trial points to.
    for run in _study_runs(tracker, study.study_name, "trial", "attributes.status = 'RUNNING'"):
        logger.warning("MLflow trial run %s of study %s was interrupted, so it is marked KILLED", run.info.run_id, study.study_name)
        _end_run_logging_errors(tracker, run.info.run_id, "KILLED")


def _end_trial_run(tracker: AblationTracker, run_id: str, status: str, failure_reason: str = "") -> None:
    """Tag the trial run with ``status`` (finished, pruned or failed) and end it in MLflow."""
    tags: dict[str, Any] = {"status": status}
    if failure_reason:
        tags[FAILURE_ATTR] = failure_reason[:5000]
    tracker.set_tags(run_id, tags)
    tracker.end_run(run_id, "FAILED" if status == "failed" else "FINISHED")


def _run_trial(study, spec, config, batches, validation, tracker, tuning_run_id: str, bar) -> FrozenTrial:
    """Train one trial and record it in the study and as a run under the tuning run. Return the finished trial."""
    from experiments.train import train_run  # imported here, so that importing this module skips torch

    trial = study.ask()
    lr = trial.suggest_float("lr", config.tune.lr_min, config.tune.lr_max, log=True)
    tags = {**spec.axes, TUNING_KIND_TAG: "trial", STUDY_TAG: study.study_name}
    run_id = tracker.start_child(tuning_run_id, f"{spec.label} trial={trial.number}", {"lr": lr, "trial": trial.number}, tags)
    trial.set_user_attr(RUN_ID_ATTR, run_id)
    bar.set_postfix_str(f"trial {trial.number}, lr {lr:.3g}")

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics(run_id, step, metrics)

    def on_eval(step: int, val_loss: float) -> None:
        trial.report(val_loss, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation loss {val_loss:.4f} at step {step} is above the median")

    try:
        result = train_run(
            spec.model, dataclasses.replace(config.train, lr=lr), batches, validation, spec.seed,
            on_metrics=on_metrics, on_eval=on_eval,
        )
    except optuna.TrialPruned as pruned:
        frozen = study.tell(trial, state=TrialState.PRUNED)
        _end_trial_run(tracker, run_id, "pruned")
        logger.info("%s trial %d: lr %.3g pruned: %s", spec.label, trial.number, lr, pruned)
        return frozen
    except KeyboardInterrupt:
        trial.set_user_attr(INTERRUPTED_ATTR, True)
        study.tell(trial, state=TrialState.FAIL)
        _end_run_logging_errors(tracker, run_id, "KILLED")
        raise
    except Exception as error:
        # A crash, such as running out of memory, is not a result of the learning rate. The trial
        # is not counted, so the next call runs another trial in its place.
        reason = f"{type(error).__name__}: {error}"
        trial.set_user_attr(FAILURE_ATTR, reason[:5000])
        study.tell(trial, state=TrialState.FAIL)
        _end_trial_run(tracker, run_id, "failed", reason)
        raise
    result.model = None

    if result.status == "failed":
        trial.set_user_attr(DIVERGED_ATTR, True)
        trial.set_user_attr(FAILURE_ATTR, result.failure_reason)
        frozen = study.tell(trial, state=TrialState.FAIL)
        _end_trial_run(tracker, run_id, "failed", result.failure_reason)
        logger.info("%s trial %d: lr %.3g diverged: %s", spec.label, trial.number, lr, result.failure_reason)
        return frozen

    frozen = study.tell(trial, result.final_val_loss)
    _end_trial_run(tracker, run_id, "finished")
    logger.info("%s trial %d: lr %.3g, validation loss %.4f", spec.label, trial.number, lr, result.final_val_loss)
    return frozen
