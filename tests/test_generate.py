"""KV-cache decoding for every registered attention, and the sampling rules of generation.

Cached decoding is checked against the full forward pass over the whole sequence, which every
attention's own tests check against its formula. Sampling is checked against its definitions
written out here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import variants
from n4 import CausalLM, ModelConfig
from n4.attention import RUNNING_SUM
from n4.cache import LayerCache, ModelCache, causal_attention, causal_mask
from n4.generate import next_token_probabilities, sample_next_token

VOCAB, C, H, KV, LAYERS, WINDOW = 23, 16, 4, 2, 2, 3
D = C // H
LATENT, ROPE = C // 2, max(2, D // 2)  # MLA defaults: kv_lora_rank and qk_rope_head_dim


def make_model(attention: str = "n4", position: str = "none", **overrides) -> CausalLM:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=C,
        inter_size=24,
        heads=H,
        layers=LAYERS,
        attention=attention,
        position=position,
        kv_heads=KV,
        window=WINDOW,
        max_seq_len=32,
    )
    values.update(overrides)
    return CausalLM(ModelConfig(**values)).eval()


def prompt(batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- Cached forward passes --------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["none", "rope"])
@pytest.mark.parametrize("name", sorted(variants.ATTENTION))
def test_cached_logits_match_full_forward(name, position):
    model = make_model(name, position)
    input_ids = prompt(length=11)
    full = model(input_ids)

    # A 4-token prompt (longer than the window), a 3-token chunk, then one token at a time.
    cache = model.new_cache()
    pieces = [model(input_ids[:, :4], cache=cache), model(input_ids[:, 4:7], cache=cache)]
    pieces += [model(input_ids[:, t : t + 1], cache=cache) for t in range(7, 11)]
    cached = torch.cat(pieces, dim=1)

    assert cache.length == 11
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(variants.ATTENTION))
def test_cached_logits_with_biases(name):
    # With biases, MLA's latent-space decoding drops the key bias and adds the value bias.
    model = make_model(name, "rope", bias=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.3)
    input_ids = prompt(length=8)
    full = model(input_ids)

    cache = model.new_cache()
    pieces = [model(input_ids[:, :3], cache=cache)] + [model(input_ids[:, t : t + 1], cache=cache) for t in range(3, 8)]

    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["swa", "n4-swa"])
def test_window_cache_keeps_last_window(name):
    model = make_model(name)
    cache = model.new_cache()
    model(prompt(length=8), cache=cache)

    for layer in cache.layers:
        assert layer.entry("keys").shape[-2] == WINDOW
        assert layer.entry("values").shape[-2] == WINDOW


# Per layer: numbers cached per token, and fixed-size state per sequence.
EXPECTED_CACHE_SIZES = {
    "mha": (2 * H * D, 0),
    "gqa": (2 * KV * D, 0),
    "swa": (2 * H * D, 0),
    "mla": (LATENT + ROPE, 0),
    "n4": (2 * H * D, H * D),
    "n4-gqa": (2 * KV * D, KV * D),
    "n4-swa": (2 * H * D, H * D),
    "n4-mla": (LATENT + 1 + ROPE, 0),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CACHE_SIZES))
def test_cache_size_per_token(name):
    model = make_model(name)
    cache = model.new_cache()
    model(prompt(batch=3, length=7), cache=cache)
    per_token, state = EXPECTED_CACHE_SIZES[name]
    held_tokens = min(7, WINDOW) if name.endswith("swa") else 7

    for layer in cache.layers:
        assert layer.numbers_per_token == per_token
        assert layer.state_numbers == state
        assert layer.numbers() == per_token * held_tokens + state
    assert cache.numbers_per_token == LAYERS * per_token


def test_every_registered_attention_has_expected_size():
    assert set(EXPECTED_CACHE_SIZES) == set(variants.ATTENTION)


def test_running_sum_stays_float32_in_bfloat16():
    model = make_model("n4").to(torch.bfloat16)
    cache = model.new_cache()
    model(prompt(), cache=cache)

    assert cache[0].state[RUNNING_SUM].dtype == torch.float32
    assert cache[0].entry("keys").dtype == torch.bfloat16


def test_cache_with_wrong_layer_count_raises():
    model = make_model()
    with pytest.raises(ValueError, match="the cache has 3 layers but the model has 2"):
        model(prompt(), cache=ModelCache(3))


# --- The cache container and bottom-right causal attention -----------------------------------------


def test_layer_cache_appends_and_trims():
    cache = LayerCache()
    history = torch.randn(2, 3, 40, 5)

    # Unwindowed: returns all tokens so far, across several buffer growths.
    for start, stop in [(0, 1), (1, 4), (4, 20), (20, 21), (21, 40)]:
        (returned,) = cache.update({"keys": history[:, :, start:stop]})
        assert torch.equal(returned, history[:, :, :stop])
        assert cache.length == stop
    assert torch.equal(cache.entry("keys"), history)

    # Windowed: returns the old window plus the new tokens, keeps only the last W.
    windowed = LayerCache()
    windowed.update({"keys": history[:, :, :5]}, keep=3)
    (returned,) = windowed.update({"keys": history[:, :, 5:7]}, keep=3)
    assert torch.equal(returned, history[:, :, 2:7])
    assert torch.equal(windowed.entry("keys"), history[:, :, 4:7])
    assert windowed.length == 7


def test_layer_cache_rejects_mismatched_entries():
    cache = LayerCache()
    with pytest.raises(ValueError, match="disagree on the number of new tokens"):
        cache.update({"keys": torch.zeros(1, 2, 3, 4), "values": torch.zeros(1, 2, 2, 4)})
    cache.update({"keys": torch.zeros(1, 2, 3, 4)})
    with pytest.raises(ValueError, match="the batch size or width changed"):
        cache.update({"keys": torch.zeros(2, 2, 1, 4)})


def test_causal_mask_aligns_bottom_right():
    # 3 queries at key positions 4, 5, 6 of 7 keys.
    mask = causal_mask(3, 7)
    windowed = causal_mask(3, 7, window=2)

    for i in range(3):
        for j in range(7):
            assert mask[i, j] == (j <= i + 4)
            assert windowed[i, j] == (i + 4 - 2 < j <= i + 4)


@pytest.mark.parametrize("window", [None, 1, 3, 10])
@pytest.mark.parametrize("query_len, key_len", [(1, 1), (1, 6), (3, 6), (6, 6)])
def test_causal_attention_matches_explicit_softmax(query_len, key_len, window):
    q = torch.randn(2, 4, query_len, 5, dtype=torch.float64)
    k = torch.randn(2, 2, key_len, 5, dtype=torch.float64)
    v = torch.randn(2, 2, key_len, 3, dtype=torch.float64)
    scale = 0.7

    expected = torch.empty(2, 4, query_len, 3, dtype=torch.float64)
    for h in range(4):
        for i in range(query_len):
            position = key_len - query_len + i
            keys = [j for j in range(key_len) if j <= position and (window is None or position - j < window)]
            scores = torch.stack([(q[:, h, i] * k[:, h // 2, j]).sum(-1) * scale for j in keys], dim=-1)
            weights = scores.softmax(dim=-1)
            expected[:, h, i] = sum(weights[:, n, None] * v[:, h // 2, j] for n, j in enumerate(keys))

    result = causal_attention(q, k, v, scale=scale, window=window, enable_gqa=True)
    torch.testing.assert_close(result, expected, atol=1e-12, rtol=0)


# --- Generation ---------------------------------------------------------------------------------------


def greedy_reference(model: CausalLM, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Argmax of the full forward pass, one token at a time."""
    sequence = input_ids
    with torch.no_grad():
        for _ in range(steps):
            next_tokens = model(sequence)[:, -1].argmax(dim=-1)
            sequence = torch.cat((sequence, next_tokens[:, None]), dim=1)
    return sequence


@pytest.mark.parametrize("position", ["none", "rope"])
@pytest.mark.parametrize("name", sorted(variants.ATTENTION))
def test_greedy_same_with_and_without_cache(name, position):
    model = make_model(name, position)
    input_ids = prompt()

    cached = model.generate(input_ids, 9, temperature=0, use_cache=True)
    uncached = model.generate(input_ids, 9, temperature=0, use_cache=False)

    assert cached.shape == (2, 5 + 9)
    assert torch.equal(cached[:, :5], input_ids)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy_reference(model, input_ids, 9))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_one_is_greedy(temperature):
    model = make_model()
    input_ids = prompt()
    generator = torch.Generator().manual_seed(3)

    sampled = model.generate(input_ids, 8, temperature=temperature, top_k=1, generator=generator)

    assert torch.equal(sampled, greedy_reference(model, input_ids, 8))


def test_tiny_top_p_is_greedy():
    model = make_model("gqa", "rope")
    input_ids = prompt()
    generator = torch.Generator().manual_seed(4)

    sampled = model.generate(input_ids, 8, temperature=2.0, top_p=1e-6, generator=generator)

    assert torch.equal(sampled, greedy_reference(model, input_ids, 8))


def test_same_seed_same_sample():
    model = make_model()
    input_ids = prompt()

    first = model.generate(input_ids, 10, generator=torch.Generator().manual_seed(5))
    second = model.generate(input_ids, 10, generator=torch.Generator().manual_seed(5))
    uncached = model.generate(input_ids, 10, use_cache=False, generator=torch.Generator().manual_seed(5))

    assert torch.equal(first, second)
    assert torch.equal(first, uncached)


def test_stream_yields_generated_tokens():
    model = make_model("mla", "rope")
    input_ids = prompt()

    steps = list(model.stream(input_ids, 6, temperature=0))
    generated = model.generate(input_ids, 6, temperature=0)

    assert len(steps) == 6
    assert all(step.shape == (2,) for step in steps)
    assert torch.equal(torch.stack(steps, dim=1), generated[:, 5:])


def first_eos_padded(row: list[int], eos: int) -> list[int]:
    """The row up to and including its first eos, then eos to the same length."""
    if eos not in row:
        return row
    end = row.index(eos) + 1
    return row[:end] + [eos] * (len(row) - end)


def test_eos_stops_generation():
    model = make_model()
    input_ids = prompt(batch=1)
    free = model.generate(input_ids, 8, temperature=0)[0, 5:].tolist()
    eos = free[2]
    stop = free.index(eos) + 1  # eos may already appear earlier in the row

    stopped = model.generate(input_ids, 8, temperature=0, eos_token_id=eos)

    assert stopped.shape == (1, 5 + stop)
    assert stopped[0, 5:].tolist() == free[:stop]


def test_eos_pads_finished_rows():
    model = make_model("gqa")
    input_ids = prompt(batch=2, seed=7)
    free = model.generate(input_ids, 8, temperature=0)[:, 5:].tolist()
    eos = free[0][1]
    rows = [first_eos_padded(row, eos) for row in free]
    if all(eos in row for row in free):
        # Generation ends once the last row has emitted eos.
        length = max(row.index(eos) + 1 for row in free)
        rows = [row[:length] for row in rows]

    stopped = model.generate(input_ids, 8, temperature=0, eos_token_id=eos)

    assert stopped[:, 5:].tolist() == rows


def test_generation_beyond_max_seq_len_raises():
    model = make_model("mha", "rope", max_seq_len=8)
    with pytest.raises(ValueError, match="beyond max_seq_len=8"):
        model.generate(prompt(), 6, temperature=0)


def test_generation_runs_in_eval_mode_and_restores_mode():
    model = make_model(dropout=0.5).train()
    input_ids = prompt()

    first = model.generate(input_ids, 6, temperature=0)
    second = model.generate(input_ids, 6, temperature=0)

    assert model.training
    assert torch.equal(first, second)
    assert torch.equal(first, greedy_reference(model.eval(), input_ids, 6))


def test_zero_new_tokens_returns_prompt():
    model = make_model()
    input_ids = prompt()

    assert torch.equal(model.generate(input_ids, 0), input_ids)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens=-1 is invalid"),
        (dict(temperature=-0.5), "temperature=-0.5 is invalid"),
        (dict(top_k=0), "top_k=0 is invalid"),
        (dict(top_p=0.0), r"top_p=0.0 is invalid.*\(0, 1\]"),
        (dict(top_p=1.5), "top_p=1.5 is invalid"),
        (dict(eos_token_id=VOCAB), f"eos_token_id={VOCAB} is outside the vocabulary"),
    ],
)
def test_invalid_generation_arguments_raise(arguments, message):
    model = make_model()
    values = dict(max_new_tokens=3)
    values.update(arguments)
    with pytest.raises(ValueError, match=message):
        model.generate(prompt(), **values)


def test_invalid_prompts_raise():
    model = make_model()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(torch.tensor([[1, VOCAB]]), 2)
    with pytest.raises(ValueError, match="seq >= 1"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 2)


class AttentionWithoutCache(nn.Module):
    """An attention whose forward takes no cache argument, as a user variant might."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_attention_without_cache_support():
    model = make_model("mha")
    input_ids = prompt()
    expected = model.generate(input_ids, 5, temperature=0)
    for block in model.blocks:
        block.attention = AttentionWithoutCache(block.attention)

    with pytest.raises(TypeError, match="attention 'mha' does not support a KV cache.*use_cache=False"):
        model.generate(input_ids, 5, temperature=0)
    assert torch.equal(model.generate(input_ids, 5, temperature=0, use_cache=False), expected)


# --- Sampling rules -----------------------------------------------------------------------------------

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])


def softmax_by_hand(logits: list[float], kept: set[int]) -> list[float]:
    weights = [math.exp(value) if index in kept else 0.0 for index, value in enumerate(logits)]
    return [weight / sum(weights) for weight in weights]


def test_temperature_divides_logits():
    expected = softmax_by_hand([value / 2.0 for value in LOGITS[0].tolist()], set(range(5)))

    probabilities = next_token_probabilities(LOGITS, temperature=2.0)

    torch.testing.assert_close(probabilities[0], torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("top_k, kept", [(1, {0}), (2, {0, 1}), (4, {0, 1, 2, 4}), (5, {0, 1, 2, 3, 4}), (9, {0, 1, 2, 3, 4})])
def test_top_k_keeps_k_largest(top_k, kept):
    probabilities = next_token_probabilities(LOGITS, top_k=top_k)

    torch.testing.assert_close(probabilities[0], torch.tensor(softmax_by_hand(LOGITS[0].tolist(), kept)), atol=1e-6, rtol=0)


# Probabilities of LOGITS, largest first: 0.563 (token 0), 0.207 (1), 0.126 (2), 0.076 (4), 0.028 (3).
@pytest.mark.parametrize(
    "top_p, kept", [(0.5, {0}), (0.6, {0, 1}), (0.8, {0, 1, 2}), (0.9, {0, 1, 2, 4}), (1.0, {0, 1, 2, 3, 4})]
)
def test_top_p_keeps_smallest_nucleus(top_p, kept):
    probabilities = next_token_probabilities(LOGITS, top_p=top_p)

    torch.testing.assert_close(probabilities[0], torch.tensor(softmax_by_hand(LOGITS[0].tolist(), kept)), atol=1e-6, rtol=0)


def test_top_k_applies_before_top_p():
    # After top_k=3 the renormalised probabilities are 0.628, 0.231, 0.140, so top_p=0.85 drops
    # token 2. Applied to all five tokens first, top_p=0.85 would keep token 2.
    probabilities = next_token_probabilities(LOGITS, top_k=3, top_p=0.85)

    torch.testing.assert_close(probabilities[0], torch.tensor(softmax_by_hand(LOGITS[0].tolist(), {0, 1})), atol=1e-6, rtol=0)


def test_sample_frequencies_match_probabilities():
    draws = 20000
    generator = torch.Generator().manual_seed(6)
    expected = torch.tensor(softmax_by_hand(LOGITS[0].tolist(), {0, 1, 2, 3, 4}))

    samples = sample_next_token(LOGITS.expand(draws, 5), temperature=1.0, generator=generator)
    frequencies = torch.bincount(samples, minlength=5).float() / draws

    # The standard error of each frequency is below sqrt(0.25 / 20000) = 0.0035.
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)
    top_two = sample_next_token(LOGITS.expand(draws, 5), temperature=1.0, top_k=2, generator=generator)
    assert set(top_two.tolist()) == {0, 1}


def test_greedy_ignores_filters():
    assert sample_next_token(LOGITS, temperature=0, top_k=3, top_p=0.5).tolist() == [0]
