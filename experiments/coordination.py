"""Share an ablation's work between processes and machines through an Optuna storage.

Each unit of work (tuning one variant's learning rate, or training one run) is a trial of one
Optuna study, ``<name>.work.<config fingerprint>``, enqueued in the WAITING state. A worker claims
a unit by moving its trial from WAITING to RUNNING, which succeeds for one worker only, and keeps
a heartbeat while it works. A unit whose worker died is marked FAIL and enqueued again, so another
worker takes it over and the run resumes from its last resume state. A worker counts as dead when
its heartbeat is older than the grace period, or when its process is gone from this host. A finished unit is COMPLETE and
keeps its results in its user attributes, so any machine can rebuild the summary.

The storage is a sqlite file beside the results by default, which ``optuna-dashboard`` opens, or
any database URL that every worker can reach (PostgreSQL for several machines).

NOTE: Optuna's RDBStorage reads a trial with SELECT ... FOR UPDATE before changing its state. That
locks the row on PostgreSQL and MySQL, but sqlite ignores it, so two processes could both claim
one trial. Every claim and every change of the queue on a sqlite storage therefore runs under a
file lock beside the database, which works because a sqlite file is only shared on one machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import optuna
from filelock import FileLock
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

logger = logging.getLogger("n4.coordination")

HEARTBEAT_INTERVAL_S = 30
GRACE_PERIOD_S = 120  # a RUNNING unit without a heartbeat for this long is taken over
READY_TIMEOUT_S = 300  # how long a worker waits for another process to finish enqueueing the units

# User attributes of a unit's trial.
UNIT_KEY = "unit_key"  # "tune:<variant slug>" or "train:<run slug>", unique within the study
UNIT_KIND = "kind"  # "tune", "train" or "report"
UNIT_INDEX = "index"  # position in the plan; units are claimed in this order
UNIT_NEEDS = "needs"  # key of the unit that must be COMPLETE first, ALL_UNITS, or None
ALL_UNITS = "*"  # the value of UNIT_NEEDS of a unit that waits for every other unit
UNIT_ATTRS = (UNIT_KEY, UNIT_KIND, UNIT_INDEX, UNIT_NEEDS)
OWNER = "owner"  # "<host>:<pid>" of the worker that claimed the unit
RESULT = "result"  # the unit's result, a JSON-compatible dict
ATTEMPT = "attempt"  # 1 for the first claim of a unit, 2 after one takeover, and so on

READY_ATTR = "ready"  # study attribute set once every unit is enqueued


def optuna_storage_for(configured: str | None, results_dir: str | os.PathLike) -> str:
    """Return the storage URL: the configured one, else $N4_OPTUNA_STORAGE, else results/optuna.db."""
    if configured:
        return configured
    if os.environ.get("N4_OPTUNA_STORAGE"):
        return os.environ["N4_OPTUNA_STORAGE"]
    path = os.path.abspath(os.path.join(results_dir, "optuna.db"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return f"sqlite:///{path}"


def check_storage_url(url: str) -> None:
    """Raise ValueError unless ``url`` is a database URL that SQLAlchemy, and so Optuna, can open.

    Also checks that the database driver is installed, and warns when a sqlite file would be
    created in a folder that does not exist yet (a mistyped path starts an empty queue there).
    """
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except Exception as error:  # noqa: BLE001 - ArgumentError or NoSuchModuleError, reported the same way
        raise ValueError(
            f"invalid Optuna storage {shown_url(url)!r} ({error}); expected a database URL such as "
            f"sqlite:///results/optuna.db or postgresql://user:password@host/db"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        raise ValueError(
            f"the Optuna storage {shown_url(url)!r} needs the {parsed.drivername} database driver, which is not "
            f"installed ({error}); for PostgreSQL run pip install -e \".[postgres]\""
        ) from None
    path = sqlite_path(url)
    if path is None:
        _check_server_reachable(url)
    else:
        folder = os.path.dirname(os.path.abspath(path))
        existing = folder
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ValueError(f"invalid Optuna storage {url!r}: {existing} is a file, so the folder {folder} cannot exist")
        if existing != folder:
            logger.warning("the folder of the Optuna storage %s does not exist and will be created", url)


def shown_url(url: str) -> str:
    """Return ``url`` with its password, if any, replaced by ***, for messages and logs."""
    url = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url, flags=re.IGNORECASE)


def study_exists(url: str, study_name: str) -> bool:
    """Return True when the storage at ``url`` contains a study named ``study_name``."""
    path = sqlite_path(url)
    if path is not None and not os.path.exists(path):
        return False
    try:
        open_storage(url).get_study_id_from_name(study_name)
    except KeyError:
        return False
    return True


def _check_server_reachable(url: str) -> None:
    """Raise ValueError when the database server of ``url`` refuses a connection."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise ValueError(f"cannot connect to the Optuna storage {shown_url(url)!r}: {reason}") from None
    finally:
        engine.dispose()


def sqlite_path(url: str) -> str | None:
    """Return the database file of a ``sqlite:///`` URL, or None for another kind of store."""
    prefix = "sqlite:///"
    return url[len(prefix) :] if url.startswith(prefix) else None


@contextlib.contextmanager
def store_lock(url: str) -> Iterator[None]:
    """Hold a file lock beside a sqlite database; do nothing for a database server.

    Serialises the steps that sqlite would otherwise race on: creating the tables of a new file,
    creating an experiment or study, and claiming a unit.
    """
    path = sqlite_path(url)
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with file_lock(path):
        yield


def file_lock(path: str | os.PathLike) -> FileLock:
    """Return the lock of ``path``: a hidden file ``.NAME.lock`` beside it, left in place afterwards."""
    folder, name = os.path.split(os.path.abspath(path))
    return FileLock(os.path.join(folder, f".{name}.lock"))


def open_storage(url: str, heartbeat_interval: int = HEARTBEAT_INTERVAL_S, grace_period: int = GRACE_PERIOD_S):
    """Return an RDBStorage with heartbeats, creating its tables under the store lock."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite_path(url) else {}
    with store_lock(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval, grace_period=grace_period
        )


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_is_dead(owner: str | None) -> bool:
    """Return True when ``owner`` names a process on this host that no longer exists."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # the process exists but belongs to another user
        return False
    return False


@dataclass(frozen=True)
class Unit:
    """A claimed unit of work."""

    trial_id: int
    number: int
    key: str
    kind: str
    index: int
    needs: str | None
    attempt: int


class WorkQueue:
    """The units of one ablation config, shared by every worker through an Optuna storage."""

    def __init__(self, url: str, study_name: str, heartbeat_interval: int = HEARTBEAT_INTERVAL_S,
                 grace_period: int = GRACE_PERIOD_S) -> None:
        self.url = url
        self.study_name = study_name
        self.storage = open_storage(url, heartbeat_interval, grace_period)
        self.heartbeat_interval = heartbeat_interval
        self._study_id: int | None = None

    # Set-up.

    def create_or_join(self, units: list[dict[str, Any]], study_attrs: Any) -> dict[str, Any]:
        """Create the study and enqueue ``units`` once; return the study's user attributes.

        The process whose ``create_new_study`` succeeds enqueues the units, sets the attributes
        that ``study_attrs()`` returns (such as the MLflow parent run), then marks the study
        ready. Every other process waits for that mark. Each unit is a dict with the keys of
        ``UNIT_ATTRS``.
        """
        with store_lock(self.url):
            try:
                self._study_id = self.storage.create_new_study([StudyDirection.MINIMIZE], self.study_name)
                created = True
            except DuplicatedStudyError:
                self._study_id = self.storage.get_study_id_from_name(self.study_name)
                created = False
            if created:
                study = self._study()
                for unit in units:
                    study.enqueue_trial({}, user_attrs={**unit, ATTEMPT: 1})
                for key, value in study_attrs().items():
                    self.storage.set_study_user_attr(self._study_id, key, value)
                self.storage.set_study_user_attr(self._study_id, READY_ATTR, True)
                logger.info("created work queue %r with %d units in %s", self.study_name, len(units), shown_url(self.url))

        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            attrs = self.storage.get_study_user_attrs(self._study_id)
            if attrs.get(READY_ATTR):
                # NOTE: on a database server, without the file lock, this can race with a worker
                # that is giving a unit back, and the unit then runs twice. sqlite is exact.
                with store_lock(self.url):
                    self._enqueue_lost_units()
                return attrs
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the work queue {self.study_name!r} in {shown_url(self.url)} was created but its units were never "
                    f"enqueued (its creator probably died); delete it with `optuna delete-study --study-name "
                    f"{self.study_name} --storage {shown_url(self.url)}` and rerun"
                )
            time.sleep(1.0)

    def join(self) -> None:
        """Attach to a queue that ``create_or_join`` made, in a worker started after the set-up."""
        self._study_id = self.storage.get_study_id_from_name(self.study_name)

    def _study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.study_name, storage=self.storage)

    def trials(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self._study_id, deepcopy=False, states=states)

    # Claiming and finishing units.

    def take_over_dead_units(self) -> int:
        """Mark RUNNING units of dead workers FAIL and enqueue each again; return how many."""
        taken_over = 0
        with store_lock(self.url):
            stale = set(self.storage._get_stale_trial_ids(self._study_id))  # noqa: SLF001 - Optuna's heartbeat check
            for trial in self.trials((TrialState.RUNNING,)):
                if trial._trial_id in stale or _owner_is_dead(trial.user_attrs.get(OWNER)):
                    taken_over += self._requeue(trial, "its worker stopped sending heartbeats or exited")
        return taken_over

    def _requeue(self, trial: FrozenTrial, reason: str) -> int:
        """Fail ``trial`` and enqueue a copy; return 1, or 0 if another process did it first."""
        try:
            # The reason first: a finished trial accepts no attribute.
            self.storage.set_trial_user_attr(trial._trial_id, "failure_reason", reason)
            if not self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                return 0
        except UpdateFinishedTrialError:
            return 0
        self._enqueue_again(trial)
        logger.warning("unit %s of %s is queued again: %s", trial.user_attrs.get(UNIT_KEY), trial.user_attrs.get(OWNER), reason)
        return 1

    def _enqueue_again(self, trial: FrozenTrial) -> None:
        unit = {key: trial.user_attrs.get(key) for key in UNIT_ATTRS}
        self._study().enqueue_trial({}, user_attrs={**unit, ATTEMPT: int(trial.user_attrs.get(ATTEMPT, 1)) + 1})

    def _enqueue_lost_units(self) -> int:
        """Enqueue again each unit whose every trial failed, such as after a crash inside ``_requeue``."""
        latest: dict[str, FrozenTrial] = {}
        live: set[str] = set()
        for trial in self.trials():
            key = trial.user_attrs.get(UNIT_KEY)
            latest[key] = trial
            if trial.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE):
                live.add(key)
        lost = [trial for key, trial in latest.items() if key not in live]
        for trial in lost:
            self._enqueue_again(trial)
            logger.warning("unit %s had no live trial; queued again", trial.user_attrs.get(UNIT_KEY))
        return len(lost)

    def claim(self, poll_s: float = 2.0) -> Unit | None:
        """Claim the first waiting unit whose prerequisite is complete; None when no unit is left.

        Waits while every waiting unit depends on one that another worker is still running.
        """
        while True:
            self.take_over_dead_units()
            complete = {t.user_attrs.get(UNIT_KEY) for t in self.trials((TrialState.COMPLETE,))}
            waiting = sorted(self.trials((TrialState.WAITING,)), key=lambda t: (t.user_attrs.get(UNIT_INDEX, 0), t.number))
            if not waiting:
                # Units still running elsewhere may yet be given back by a dead worker.
                if not self.trials((TrialState.RUNNING,)):
                    return None
                time.sleep(poll_s)
                continue
            for trial in waiting:
                if not self._ready(trial, complete):
                    continue
                with store_lock(self.url):
                    try:
                        claimed = self.storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING)
                    except UpdateFinishedTrialError:
                        # Another worker claimed and finished this unit since the list was read.
                        claimed = False
                    if claimed:
                        self.storage.record_heartbeat(trial._trial_id)
                        self.storage.set_trial_user_attr(trial._trial_id, OWNER, owner_id())
                if claimed:
                    attrs = trial.user_attrs
                    return Unit(trial._trial_id, trial.number, attrs[UNIT_KEY], attrs[UNIT_KIND],
                                int(attrs.get(UNIT_INDEX, 0)), attrs.get(UNIT_NEEDS), int(attrs.get(ATTEMPT, 1)))
            if not self._prerequisites_can_finish(waiting, complete):
                blocked = ", ".join(sorted({t.user_attrs.get(UNIT_NEEDS) for t in waiting}))
                raise RuntimeError(f"units wait for {blocked}, which failed for good; see the summary's failure reasons")
            time.sleep(poll_s)

    def _ready(self, trial: FrozenTrial, complete: set[str]) -> bool:
        """Return True when the unit of a waiting trial has what it needs."""
        needs = trial.user_attrs.get(UNIT_NEEDS)
        if needs == ALL_UNITS:
            key = trial.user_attrs.get(UNIT_KEY)
            others = {t.user_attrs.get(UNIT_KEY) for t in self.trials((TrialState.WAITING, TrialState.RUNNING))} - {key}
            return not others
        return not needs or needs in complete

    def _prerequisites_can_finish(self, waiting: list[FrozenTrial], complete: set[str]) -> bool:
        """Return False when some waiting unit needs a unit that no worker is running or will run."""
        pending = {t.user_attrs.get(UNIT_KEY) for t in self.trials((TrialState.RUNNING, TrialState.WAITING))}
        for trial in waiting:
            needs = trial.user_attrs.get(UNIT_NEEDS)
            if needs and needs != ALL_UNITS and needs not in complete and needs not in pending:
                return False
        return True

    @contextlib.contextmanager
    def heartbeat(self, unit: Unit) -> Iterator[None]:
        """Record the unit's heartbeat every ``heartbeat_interval`` seconds while the block runs."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_interval):
                try:
                    self.storage.record_heartbeat(unit.trial_id)
                except Exception as error:  # noqa: BLE001 - one missed beat is not fatal; the grace period covers it
                    logger.warning("heartbeat of unit %s failed: %s", unit.key, error)

        thread = threading.Thread(target=beat, name=f"heartbeat-{unit.key}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def set_attr(self, unit: Unit, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(unit.trial_id, key, value)

    def complete(self, unit: Unit, result: dict[str, Any], value: float = 0.0) -> None:
        """Store the unit's result and mark it COMPLETE."""
        self.storage.set_trial_user_attr(unit.trial_id, RESULT, result)
        with store_lock(self.url):
            self.storage.set_trial_state_values(unit.trial_id, TrialState.COMPLETE, [value])

    def release(self, unit: Unit, reason: str) -> None:
        """Give an unfinished unit back to the queue (after Ctrl-C, for example)."""
        with store_lock(self.url):
            trial = self.storage.get_trial(unit.trial_id)
            self._requeue(trial, reason)

    # Reading the results.

    def results(self) -> dict[str, dict[str, Any]]:
        """Return the result of every COMPLETE unit by unit key."""
        return {t.user_attrs[UNIT_KEY]: t.user_attrs.get(RESULT, {}) for t in self.trials((TrialState.COMPLETE,))}

    def unfinished(self) -> list[str]:
        """Return the keys of the units still waiting or running."""
        return sorted(t.user_attrs.get(UNIT_KEY) for t in self.trials((TrialState.WAITING, TrialState.RUNNING)))

    def retry_failed_runs(self, is_failed) -> int:
        """Enqueue again each COMPLETE unit whose result ``is_failed(result)``; return how many.

        Units that wait for every other unit, such as the report, are enqueued again as well.
        """
        with store_lock(self.url):
            live = {t.user_attrs.get(UNIT_KEY) for t in self.trials((TrialState.WAITING, TrialState.RUNNING))}
            done = {t.user_attrs.get(UNIT_KEY): t for t in self.trials((TrialState.COMPLETE,))}
            failed = [
                trial for key, trial in done.items()
                if key not in live and trial.user_attrs.get(UNIT_NEEDS) != ALL_UNITS
                and is_failed(trial.user_attrs.get(RESULT, {}))
            ]
            if failed:
                failed += [t for key, t in done.items() if key not in live and t.user_attrs.get(UNIT_NEEDS) == ALL_UNITS]
            for trial in failed:
                self._enqueue_again(trial)
        count = len([t for t in failed if t.user_attrs.get(UNIT_NEEDS) != ALL_UNITS])
        return count
