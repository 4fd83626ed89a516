"""The training loop: schedule, token-averaged accumulation, evaluation and non-finite losses."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from experiments.config import TrainConfig
from experiments.train import IGNORE_INDEX, build_optimizer, evaluate, lr_factor, train_run
from n4.config import ModelConfig
from n4.model import CausalLM

VOCAB = 50


class FixedBatches:
    """Micro-batches taken in order from one tensor (N, T + 1), split into chunks of ``size``."""

    def __init__(self, windows: torch.Tensor, size: int) -> None:
        self.windows = windows
        self.size = size

    def batch(self, index: int) -> torch.Tensor:
        start = (index * self.size) % self.windows.shape[0]
        return self.windows[start : start + self.size]


def tiny_model_config(**changes) -> ModelConfig:
    values = dict(vocab_size=VOCAB, hidden_size=16, inter_size=24, heads=2, layers=1, attention="mha", mlp="swiglu", norm="rmsnorm")
    values.update(changes)
    return ModelConfig(**values)


def tiny_train_config(**changes) -> TrainConfig:
    values = dict(steps=1, batch_size=4, grad_accum=1, seq_len=8, lr=1e-2, warmup_steps=0, eval_interval=1,
                  eval_windows=4, eval_batch_size=2, log_interval=1, grad_clip=0.0, device="cpu")
    values.update(changes)
    return TrainConfig(**values)


def test_lr_warmup_then_cosine():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    midpoint = 10 + 45
    assert lr_factor(midpoint, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(150, 10, 100, 0.1) == pytest.approx(0.1)


def test_optimizer_decays_matrices_only():
    model = CausalLM(tiny_model_config(norm="layernorm"))
    optimizer = build_optimizer(model, tiny_train_config(weight_decay=0.3))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.3
    assert plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def _trained_weights(windows, train, seed=0):
    batches = FixedBatches(windows, train.batch_size)
    captured = {}
    original = CausalLM.__init__

    def capture(self, *args, **kwargs):
        original(self, *args, **kwargs)
        captured["model"] = self

    CausalLM.__init__ = capture
    try:
        result = train_run(tiny_model_config(), train, batches, windows[:2], seed)
    finally:
        CausalLM.__init__ = original
    return result, {k: v.detach().clone() for k, v in captured["model"].state_dict().items()}


def test_accumulation_averages_over_tokens():
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, VOCAB, (8, 9), generator=generator)
    # Micro-batches with very different numbers of counted targets: a token mean over the step
    # and a mean of micro-batch means give different gradients here.
    windows[:4, 2:] = IGNORE_INDEX
    one_batch, weights_one = _trained_weights(windows, tiny_train_config(batch_size=8, grad_accum=1))
    accumulated, weights_acc = _trained_weights(windows, tiny_train_config(batch_size=4, grad_accum=2))
    assert one_batch.status == accumulated.status == "finished"
    for key in weights_one:
        torch.testing.assert_close(weights_acc[key], weights_one[key], rtol=1e-5, atol=1e-6)


def test_accumulated_loss_is_token_mean():
    torch.manual_seed(0)
    model = CausalLM(tiny_model_config())
    windows = torch.randint(0, VOCAB, (6, 9))
    windows[0, 3:] = IGNORE_INDEX
    loss = evaluate(model, windows, batch_size=4, device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False))
    logits = model(windows[:, :-1].clamp(min=0))
    expected = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_training_reduces_loss_on_repeated_batch():
    torch.manual_seed(1)
    windows = torch.randint(0, VOCAB, (4, 9))
    train = tiny_train_config(steps=30, lr=3e-2, eval_interval=10, log_interval=5)
    result = train_run(tiny_model_config(), train, FixedBatches(windows, 4), windows, seed=0)
    assert result.status == "finished"
    assert [step for step, _ in result.val_history] == [0, 10, 20, 30]
    assert result.final_val_loss < 0.5 * result.initial_val_loss
    assert result.final_val_loss == result.val_history[-1][1]


def test_metrics_logged_with_steps():
    windows = torch.randint(0, VOCAB, (4, 9))
    logged = []
    train = tiny_train_config(steps=6, eval_interval=3, log_interval=2)
    train_run(tiny_model_config(), train, FixedBatches(windows, 4), windows, 0, on_metrics=lambda s, m: logged.append((s, dict(m))))
    train_steps = [step for step, metrics in logged if "train/loss" in metrics]
    val_steps = [step for step, metrics in logged if "val/loss" in metrics]
    assert train_steps == [1, 2, 3, 4, 6]
    assert val_steps == [0, 3, 6]
    for step, metrics in logged:
        if "train/loss" in metrics:
            assert set(metrics) == {"train/loss", "lr", "tokens_per_s", "mfu"}
            assert 0 < metrics["mfu"] < 10
            assert metrics["tokens_per_s"] > 0


def test_nonfinite_loss_fails_with_step():
    windows = torch.randint(0, VOCAB, (4, 9))
    # A learning rate this large overflows the weights within a few steps.
    train = tiny_train_config(steps=50, lr=1e30, log_interval=4, eval_interval=100)
    result = train_run(tiny_model_config(), train, FixedBatches(windows, 4), windows, seed=0)
    assert result.status == "failed"
    assert result.failed_step is not None and 1 <= result.failed_step <= 50
    assert f"at step {result.failed_step}" in result.failure_reason
    assert math.isnan(result.final_val_loss)


def test_seed_changes_init_not_data():
    windows = torch.randint(0, VOCAB, (8, 9))
    train = tiny_train_config(steps=2)
    first = train_run(tiny_model_config(), train, FixedBatches(windows, 4), windows[:2], seed=0)
    second = train_run(tiny_model_config(), copy.deepcopy(train), FixedBatches(windows, 4), windows[:2], seed=1)
    assert first.data_fingerprint == second.data_fingerprint
    assert first.initial_val_loss != second.initial_val_loss


def test_bfloat16_autocast_trains_and_logs_float32_loss():
    torch.manual_seed(2)
    windows = torch.randint(0, VOCAB, (4, 9))
    train = tiny_train_config(steps=20, lr=3e-2, dtype="bfloat16", eval_interval=10)
    result = train_run(tiny_model_config(attention="n4", mlp="asgg", norm="dyt"), train, FixedBatches(windows, 4), windows, seed=0)
    assert result.status == "finished"
    assert result.final_val_loss < 0.7 * result.initial_val_loss


def test_evaluation_turns_dropout_off():
    torch.manual_seed(3)
    model = CausalLM(tiny_model_config(dropout=0.5))
    windows = torch.randint(0, VOCAB, (4, 9))
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    first = evaluate(model, windows, 2, torch.device("cpu"), no_autocast)
    second = evaluate(model, windows, 2, torch.device("cpu"), no_autocast)
    assert first == second
    assert model.training


@pytest.mark.slow
def test_compiled_training_matches_eager():
    torch.manual_seed(4)
    windows = torch.randint(0, VOCAB, (4, 9))
    train = tiny_train_config(steps=3, eval_interval=3)
    eager = train_run(tiny_model_config(), train, FixedBatches(windows, 4), windows, seed=0)
    compiled = train_run(tiny_model_config(), tiny_train_config(steps=3, eval_interval=3, compile=True), FixedBatches(windows, 4), windows, seed=0)
    assert compiled.status == "finished"
    assert compiled.final_val_loss == pytest.approx(eager.final_val_loss, rel=1e-4)


class Interrupted(Exception):
    pass


def test_resumed_run_matches_uninterrupted(tmp_path):
    windows = torch.randint(0, VOCAB, (16, 9))
    # Dropout makes the random number generator part of the state to restore.
    model = tiny_model_config(dropout=0.1)
    train = tiny_train_config(steps=12, eval_interval=3, log_interval=2, checkpoint_interval=4, warmup_steps=2, grad_clip=1.0)
    reference = train_run(model, train, FixedBatches(windows, 4), windows[:4], seed=0)

    path = tmp_path / "resume.pt"

    def crash_at_step_9(step, val_loss):
        if step == 9:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_run(model, train, FixedBatches(windows, 4), windows[:4], 0, on_eval=crash_at_step_9, resume_path=path, resume_key="k")
    assert torch.load(path, weights_only=True)["step"] == 8

    logged = []
    resumed = train_run(model, train, FixedBatches(windows, 4), windows[:4], 0, on_metrics=lambda s, m: logged.append(s),
                        resume_path=path, resume_key="k")
    assert resumed.status == "finished"
    assert resumed.steps_done == 12
    assert min(logged) == 9
    assert resumed.final_val_loss == pytest.approx(reference.final_val_loss, abs=1e-4)
    assert [step for step, _ in resumed.val_history] == [step for step, _ in reference.val_history]
    for (_, got), (_, expected) in zip(resumed.val_history, reference.val_history):
        assert got == pytest.approx(expected, abs=1e-4)
    assert resumed.data_fingerprint == reference.data_fingerprint
    for name, weight in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], weight, atol=1e-5, rtol=0)


def test_resume_state_of_other_run_ignored(tmp_path):
    windows = torch.randint(0, VOCAB, (8, 9))
    train = tiny_train_config(steps=4, eval_interval=2, checkpoint_interval=2)
    path = tmp_path / "resume.pt"
    first = train_run(tiny_model_config(), train, FixedBatches(windows, 4), windows[:2], 0, resume_path=path, resume_key="a")
    assert torch.load(path, weights_only=True)["step"] == 2
    logged = []
    other = train_run(tiny_model_config(), train, FixedBatches(windows, 4), windows[:2], 0, on_metrics=lambda s, m: logged.append(s),
                      resume_path=path, resume_key="b")
    assert min(logged) == 0
    assert other.final_val_loss == pytest.approx(first.final_val_loss, abs=1e-6)
