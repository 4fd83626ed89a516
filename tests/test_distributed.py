"""Data-parallel training: the process-group helpers, and two gloo ranks against one process."""

import os
import subprocess
import sys
from pathlib import Path

import ddp_train_script
import pytest
import torch
import torch.distributed as dist
from test_train import tiny_model_config

from experiments import distributed

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(ddp_train_script.__file__)

# In float32 on CPU, two ranks sum the gradient in a different order than one process. After six
# steps this moved the losses and weights by less than 1e-6 in the runs measured.
TOLERANCE = 1e-5


def test_init_without_torchrun_is_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = distributed.init_from_env("cpu")
    assert context == distributed.DistributedContext(rank=0, world_size=1, local_rank=0)
    assert context.is_main
    assert not context.is_distributed
    assert not dist.is_initialized()


def test_init_world_size_one_initialises_nothing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    context = distributed.init_from_env("cpu")
    assert context.world_size == 1
    assert not dist.is_initialized()


def test_helpers_without_group_return_input():
    payload = {"step": 3}
    tensor = torch.tensor([1.0, 2.0])
    assert distributed.current_context() == distributed.DistributedContext()
    assert distributed.broadcast_object(payload) is payload
    assert distributed.all_gather_object(payload) == [payload]
    assert distributed.all_reduce_sum(tensor) is tensor
    assert tensor.tolist() == [1.0, 2.0]
    distributed.barrier()
    distributed.destroy()


def test_helpers_with_one_rank_group(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    # A HashStore keeps the rendezvous in this process, so no server is opened for it.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert distributed.init_from_env("cpu") == distributed.DistributedContext(rank=0, world_size=1, local_rank=0)
        assert distributed.broadcast_object({"step": 3}) == {"step": 3}
        assert distributed.all_gather_object(7) == [7]
        assert distributed.all_reduce_sum(torch.tensor([1.0, 2.0])).tolist() == [1.0, 2.0]
        distributed.barrier()
    finally:
        distributed.destroy()
    assert not dist.is_initialized()


def test_local_rows_split_global_batch():
    batch = torch.arange(12).reshape(6, 2)
    assert torch.equal(distributed.local_rows(batch, 0, 2), batch[:3])
    assert torch.equal(distributed.local_rows(batch, 1, 2), batch[3:])
    assert torch.equal(distributed.local_rows(batch, 2, 3), batch[4:])
    assert torch.equal(distributed.local_rows(batch, 0, 1), batch)


def test_local_rows_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="batch_size=3 is not divisible by the world size 2"):
        distributed.local_rows(torch.zeros(3, 9), 0, 2)


def launch_ranks(out_dir: Path, *options: str, timeout: float = 120) -> list[dict]:
    """Run ddp_train_script.py on two gloo ranks and return their results in rank order."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for _ in range(2):
        completed = subprocess.run(
            [sys.executable, str(SCRIPT), str(out_dir), *options],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )
        # NOTE: on a 2-core machine about one launch in 30 ends with both gloo ranks aborting
        # ("terminate called without an active exception", SIGABRT) and no Python error. The
        # cause is not known. Such a launch is retried once; any other failure fails the test.
        if completed.returncode == 0 or "terminate called without an active exception" not in completed.stderr:
            break
    assert completed.returncode == 0, f"stdout:\n{completed.stdout[-4000:]}\nstderr:\n{completed.stderr[-4000:]}"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(ddp_train_script.WORLD_SIZE)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch_ranks(tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def single_process():
    return ddp_train_script.run(tiny_model_config(), ddp_train_script.train_config())


def train_losses(run: dict) -> dict[int, float]:
    return {step: metrics["train/loss"] for step, metrics in run["logged"] if "train/loss" in metrics}


def test_ddp_losses_match_single_process(ranks, single_process):
    run = ranks[0]["plain"]
    assert ranks[0]["world_size"] == 2
    assert run["status"] == "finished"
    expected = train_losses(single_process)
    got = train_losses(run)
    assert list(got) == list(expected) == [1, 2, 3, 4, 5, 6]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=TOLERANCE), f"step {step}"


def test_ddp_validation_matches_single_process(ranks, single_process):
    history = ranks[0]["plain"]["val_history"]
    assert [step for step, _ in history] == [step for step, _ in single_process["val_history"]]
    for (step, got), (_, expected) in zip(history, single_process["val_history"]):
        assert got == pytest.approx(expected, abs=TOLERANCE), f"step {step}"


def test_ddp_weights_match_single_process(ranks, single_process):
    for name, expected in single_process["weights"].items():
        torch.testing.assert_close(ranks[0]["plain"]["weights"][name], expected, atol=TOLERANCE, rtol=0)


def test_ddp_fingerprint_matches_single_process(ranks, single_process):
    assert ranks[0]["plain"]["fingerprint"] == single_process["fingerprint"]


def test_ddp_ranks_agree(ranks):
    first, second = ranks[0]["plain"], ranks[1]["plain"]
    assert second["status"] == first["status"]
    assert second["val_history"] == first["val_history"]
    assert second["fingerprint"] == first["fingerprint"]
    for name, weight in first["weights"].items():
        assert torch.equal(second["weights"][name], weight), name


def test_ddp_callbacks_on_rank_0_only(ranks):
    assert ranks[1]["plain"]["logged"] == []
    logged = ranks[0]["plain"]["logged"]
    assert [step for step, metrics in logged if "val/loss" in metrics] == [0, 2, 4, 6]
    for _, metrics in logged:
        if "train/loss" in metrics:
            assert metrics["tokens_per_s"] > 0


def test_ddp_resume_matches_uninterrupted(ranks):
    # With dropout, each rank must restore its own random number generator state.
    for rank in ranks:
        uninterrupted, resumed = rank["dropout"], rank["resumed"]
        assert resumed["status"] == "finished"
        assert resumed["val_history"] == uninterrupted["val_history"]
        for name, weight in uninterrupted["weights"].items():
            torch.testing.assert_close(resumed["weights"][name], weight, atol=1e-6, rtol=0)
    assert min(step for step, _ in ranks[0]["resumed"]["logged"]) == 5


def test_ddp_ranks_draw_different_random_numbers(ranks):
    assert not torch.equal(ranks[0]["random_after_run"], ranks[1]["random_after_run"])


def test_ddp_rejects_indivisible_batch(ranks):
    for rank in ranks:
        assert "batch_size=3 is not divisible by the world size 2" in rank["indivisible_error"]


@pytest.mark.slow
def test_ddp_compiled_matches_single_process(tmp_path, single_process):
    compiled = [rank["compiled"] for rank in launch_ranks(tmp_path, "--compile", timeout=600)]
    assert train_losses(compiled[0]) == pytest.approx(train_losses(single_process), abs=TOLERANCE)
    assert [step for step, _ in compiled[0]["val_history"]] == [step for step, _ in single_process["val_history"]]
    for (_, got), (_, expected) in zip(compiled[0]["val_history"], single_process["val_history"]):
        assert got == pytest.approx(expected, abs=TOLERANCE)
    for name, expected in single_process["weights"].items():
        torch.testing.assert_close(compiled[0]["weights"][name], expected, atol=TOLERANCE, rtol=0)
        assert torch.equal(compiled[1]["weights"][name], compiled[0]["weights"][name]), name
