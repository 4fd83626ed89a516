"""The work queue on its own: claims, takeovers and retries, without training anything."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
from optuna.trial import TrialState

from experiments.coordination import ALL_UNITS, ATTEMPT, OWNER, UNIT_KEY, WorkQueue

STUDY = "queue-test.work.0"


def units(count: int, report: bool = False) -> list[dict]:
    plan = [{"unit_key": f"train:{index}", "kind": "train", "index": index, "needs": None} for index in range(count)]
    if report:
        plan.append({"unit_key": "report", "kind": "report", "index": count, "needs": ALL_UNITS})
    return plan


def new_queue(url: str, plan: list[dict] | None = None, **timing) -> WorkQueue:
    queue = WorkQueue(url, STUDY, **timing)
    queue.create_or_join(plan or [], dict)
    return queue


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def keys(trials) -> list[str]:
    return sorted(trial.user_attrs[UNIT_KEY] for trial in trials)


def test_claims_follow_plan_order(url):
    queue = new_queue(url, units(3))
    claimed = []
    while (unit := queue.claim(poll_s=0.01)) is not None:
        claimed.append((unit.key, unit.attempt))
        queue.complete(unit, {"loss": unit.index})
    assert claimed == [("train:0", 1), ("train:1", 1), ("train:2", 1)]
    assert queue.results() == {f"train:{index}": {"loss": index} for index in range(3)}
    assert queue.unfinished() == []


def test_second_create_does_not_enqueue_again(url):
    new_queue(url, units(3))
    second = new_queue(url, units(3))
    assert len(second.trials()) == 3


def test_claim_skips_unit_finished_meanwhile(url, monkeypatch):
    # A worker lists the waiting units; before it claims the first, another worker claims and
    # finishes it. The claim must move on to the next unit instead of failing.
    slow, fast = new_queue(url, units(2)), new_queue(url)
    stale = slow.trials((TrialState.WAITING,))
    unit = fast.claim(poll_s=0.01)
    fast.complete(unit, {})
    listed = slow.trials

    def stale_waiting_list(states=None):
        if states == (TrialState.WAITING,):
            return stale
        return listed(states)

    monkeypatch.setattr(slow, "trials", stale_waiting_list)
    assert slow.claim(poll_s=0.01).key == "train:1"


def test_report_waits_for_every_other_unit(url):
    queue = new_queue(url, units(1, report=True))
    first = queue.claim(poll_s=0.01)
    assert first.key == "train:0"
    # The report is the only waiting unit, but train:0 is still running: nothing is claimable.
    assert not queue._ready(queue.trials((TrialState.WAITING,))[0], complete=set())
    queue.complete(first, {})
    assert queue.claim(poll_s=0.01).key == "report"


def claim_all(url: str, start: multiprocessing.Event, results: multiprocessing.Queue) -> None:
    queue = WorkQueue(url, STUDY)
    queue.join()
    start.wait()
    while (unit := queue.claim(poll_s=0.05)) is not None:
        queue.complete(unit, {"pid": os.getpid()})
        results.put(unit.key)
    results.put(None)


def test_four_processes_claim_each_unit_once(url):
    new_queue(url, units(24))
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    processes = [context.Process(target=claim_all, args=(url, start, results)) for _ in range(4)]
    for process in processes:
        process.start()
    start.set()
    claimed, done = [], 0
    while done < 4:
        key = results.get(timeout=60)
        if key is None:
            done += 1
        else:
            claimed.append(key)
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert sorted(claimed) == sorted(f"train:{index}" for index in range(24))
    queue = WorkQueue(url, STUDY)
    queue.join()
    trials = queue.trials()
    assert len(trials) == 24
    assert {trial.state for trial in trials} == {TrialState.COMPLETE}


def test_unit_of_exited_process_taken_over(url):
    queue = new_queue(url, units(2))
    unit = queue.claim(poll_s=0.01)
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    queue.set_attr(unit, OWNER, f"{socket.gethostname()}:{exited.stdout.strip()}")

    other = new_queue(url)
    assert other.take_over_dead_units() == 1
    assert other.take_over_dead_units() == 0
    failed = other.trials((TrialState.FAIL,))
    assert keys(failed) == [unit.key]
    again = other.claim(poll_s=0.01)
    assert again.key == unit.key
    assert again.attempt == 2


def test_other_host_unit_kept(url):
    queue = new_queue(url, units(1))
    unit = queue.claim(poll_s=0.01)
    queue.set_attr(unit, OWNER, "some-other-host:1")
    assert new_queue(url).take_over_dead_units() == 0
    assert keys(queue.trials((TrialState.RUNNING,))) == [unit.key]


def test_unit_without_heartbeat_taken_over(url):
    queue = new_queue(url, units(1), heartbeat_interval=1, grace_period=2)
    unit = queue.claim(poll_s=0.01)  # claimed with one heartbeat, then none
    other = new_queue(url, heartbeat_interval=1, grace_period=2)
    assert other.take_over_dead_units() == 0
    time.sleep(3.5)  # sqlite keeps heartbeats to the second, so the gap must exceed the grace period by 1 s
    assert other.take_over_dead_units() == 1
    assert other.claim(poll_s=0.01).attempt == 2
    assert unit.attempt == 1


def test_heartbeat_keeps_unit(url):
    queue = new_queue(url, units(1), heartbeat_interval=1, grace_period=2)
    unit = queue.claim(poll_s=0.01)
    with queue.heartbeat(unit):
        time.sleep(3.5)
        assert new_queue(url, heartbeat_interval=1, grace_period=2).take_over_dead_units() == 0


def test_released_unit_claimed_again(url):
    queue = new_queue(url, units(1))
    unit = queue.claim(poll_s=0.01)
    queue.release(unit, "interrupted")
    again = queue.claim(poll_s=0.01)
    assert again.key == "train:0"
    assert again.attempt == 2
    assert queue.storage.get_trial(unit.trial_id).user_attrs["failure_reason"] == "interrupted"


def test_lost_unit_enqueued_again_on_join(url):
    # A worker that failed a unit but died before enqueueing its copy leaves it with no live trial.
    queue = new_queue(url, units(2))
    unit = queue.claim(poll_s=0.01)
    queue.storage.set_trial_state_values(unit.trial_id, TrialState.FAIL)
    assert keys(queue.trials((TrialState.WAITING,))) == ["train:1"]
    new_queue(url)
    assert keys(queue.trials((TrialState.WAITING,))) == ["train:0", "train:1"]
    retried = [trial for trial in queue.trials((TrialState.WAITING,)) if trial.user_attrs[UNIT_KEY] == "train:0"]
    assert [trial.user_attrs[ATTEMPT] for trial in retried] == [2]


def test_retry_enqueues_failed_and_report(url):
    queue = new_queue(url, units(2, report=True))
    for status in ("failed", "finished"):
        queue.complete(queue.claim(poll_s=0.01), {"status": status})
    queue.complete(queue.claim(poll_s=0.01), {})
    assert queue.retry_failed_runs(lambda result: result.get("status") == "failed") == 1
    assert keys(queue.trials((TrialState.WAITING,))) == ["report", "train:0"]
    assert queue.retry_failed_runs(lambda result: result.get("status") == "failed") == 0
