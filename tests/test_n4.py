"""N4 attention, ASGG, DyT, the decoder block and CausalLM against formulas written out here.

The references follow the published maths directly, in float64 on tiny tensors and with T x T
key-weight matrices and masks as the published code builds them, independently of the layers
under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import variants
from n4 import CausalLM, ModelConfig
from n4 import attention as n4_attention
from n4.attention import N4Attention, n4_modified_keys, split_head_grouped_qkvh
from n4.mlp import ASGG
from n4.model import DecoderBlock
from n4.norm import DyT

VOCAB, HIDDEN, INTER, HEADS, LAYERS = 29, 16, 24, 4, 2
HEAD_DIM = HIDDEN // HEADS


def make_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=VOCAB, hidden_size=HIDDEN, inter_size=INTER, heads=HEADS, layers=LAYERS)
    values.update(overrides)
    return ModelConfig(**values)


def key_weights(seq_len: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return W (T, T) with W[j, t] = t / j^2 for t <= j and 0 otherwise (1-based t and j)."""
    positions = torch.arange(1, seq_len + 1, dtype=dtype)
    t, j = positions[None, :], positions[:, None]
    return torch.where(t <= j, t / j**2, torch.zeros((), dtype=dtype))


def direct_n4_attention(x, qkvh_weight, qkvh_bias, out_weight, out_bias, heads, scale, position=None):
    """Compute N4 attention as published, with T x T matrices and a head-grouped projection."""
    batch, seq_len, hidden = x.shape
    head_dim = hidden // heads
    projected = F.linear(x, qkvh_weight, qkvh_bias)  # (B, T, 3C + H)

    qs, modified_keys, vs = [], [], []
    for h in range(heads):
        # Rows of head h: q, k, v (head_dim each) inside the first 3C, gate at 3C + h.
        start = 3 * head_dim * h
        q = projected[..., start : start + head_dim]
        k = projected[..., start + head_dim : start + 2 * head_dim]
        v = projected[..., start + 2 * head_dim : start + 3 * head_dim]
        gate = torch.tanh(projected[..., 3 * hidden + h])  # (B, T)
        qs.append(q)
        modified_keys.append(key_weights(seq_len, x.dtype) @ (gate[..., None] * k))
        vs.append(v)
    q, k, v = (torch.stack(parts, dim=1) for parts in (qs, modified_keys, vs))  # (B, H, T, D)
    if position is not None:
        q, k = position(q, k)

    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    probabilities = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    heads_out = probabilities @ v  # (B, H, T, D)
    concatenated = heads_out.transpose(1, 2).reshape(batch, seq_len, hidden)
    return F.linear(concatenated, out_weight, out_bias)


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter with distinct random values, so that swapped modules change results."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(1.0 + 0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


# --- N4 attention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", ["head_dim", "hidden_size"])
def test_n4_attention_matches_direct_formulation(scale, bias):
    torch.manual_seed(0)
    attention = N4Attention(make_config(bias=bias), scale=scale).double()
    x = torch.randn(2, 11, HIDDEN, dtype=torch.float64)

    expected_scale = 1 / math.sqrt(HEAD_DIM if scale == "head_dim" else HIDDEN)
    assert attention.softmax_scale == pytest.approx(expected_scale)
    expected = direct_n4_attention(
        x,
        attention.qkvh_linear.weight,
        attention.qkvh_linear.bias,
        attention.out_linear.weight,
        attention.out_linear.bias,
        HEADS,
        expected_scale,
    )
    torch.testing.assert_close(attention(x), expected, rtol=1e-10, atol=1e-10)


def test_rope_is_applied_to_queries_and_modified_keys():
    torch.manual_seed(1)
    attention = N4Attention(make_config(position="rope", max_seq_len=32)).double()
    x = torch.randn(2, 9, HIDDEN, dtype=torch.float64)
    expected = direct_n4_attention(
        x,
        attention.qkvh_linear.weight,
        None,
        attention.out_linear.weight,
        None,
        HEADS,
        1 / math.sqrt(HEAD_DIM),
        position=attention.position,
    )
    torch.testing.assert_close(attention(x), expected, rtol=1e-10, atol=1e-10)


def test_split_follows_head_grouped_layout():
    # Channel c of the projection contains the value c, so each output shows which channels it read.
    width = 3 * HIDDEN + HEADS
    qkvh = torch.arange(width, dtype=torch.float32).expand(1, 5, width)
    q, k, v, gate_logits = split_head_grouped_qkvh(qkvh, HEADS)

    offsets = torch.arange(HEAD_DIM, dtype=torch.float32)
    for h in range(HEADS):
        start = 3 * HEAD_DIM * h
        torch.testing.assert_close(q[0, h, 3], start + offsets, rtol=0, atol=0)
        torch.testing.assert_close(k[0, h, 3], start + HEAD_DIM + offsets, rtol=0, atol=0)
        torch.testing.assert_close(v[0, h, 3], start + 2 * HEAD_DIM + offsets, rtol=0, atol=0)
        assert gate_logits[0, h, 3].item() == 3 * HIDDEN + h


def test_gate_logits_use_last_rows():
    # With the last H rows zeroed, every gate is tanh(0) = 0, so k' = 0, every score is 0 and each
    # query averages the values of its causal prefix uniformly, whatever q and k are.
    torch.manual_seed(2)
    attention = N4Attention(make_config()).double()
    with torch.no_grad():
        attention.qkvh_linear.weight[3 * HIDDEN :] = 0.0
    x = torch.randn(2, 7, HIDDEN, dtype=torch.float64)

    projected = x @ attention.qkvh_linear.weight.T
    values = torch.cat(
        [projected[..., 3 * HEAD_DIM * h + 2 * HEAD_DIM : 3 * HEAD_DIM * (h + 1)] for h in range(HEADS)], dim=-1
    )  # (B, T, C), heads concatenated
    prefix_means = values.cumsum(dim=1) / torch.arange(1, 8, dtype=torch.float64)[:, None]
    expected = prefix_means @ attention.out_linear.weight.T
    torch.testing.assert_close(attention(x), expected, rtol=1e-10, atol=1e-10)

    # Non-zero gate rows change the result, so the gates really come from those rows.
    with torch.no_grad():
        attention.qkvh_linear.weight[3 * HIDDEN :] = torch.randn(HEADS, HIDDEN, dtype=torch.float64)
    assert not torch.allclose(attention(x), expected)


def test_modified_keys_match_their_definition():
    torch.manual_seed(3)
    k = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    gate_logits = torch.randn(2, 3, 6, dtype=torch.float64)

    expected = torch.empty_like(k)
    for j in range(1, 7):
        total = sum(t * torch.tanh(gate_logits[:, :, t - 1, None]) * k[:, :, t - 1] for t in range(1, j + 1))
        expected[:, :, j - 1] = total / j**2

    result = n4_modified_keys(k, gate_logits)
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


def test_modified_keys_accumulate_in_float32_for_bfloat16():
    # Positive keys and gates make the running sum grow like j^2 (about 10^6 at T = 2048), where
    # the spacing of bfloat16 numbers exceeds the terms being added.
    torch.manual_seed(4)
    seq_len, head_dim = 2048, 8
    k = (torch.randn(1, 1, seq_len, head_dim).abs() + 0.1).bfloat16()
    gate_logits = (torch.randn(1, 1, seq_len).abs() + 0.5).bfloat16()

    positions = torch.arange(1, seq_len + 1, dtype=torch.float64)
    weights = positions * torch.tanh(gate_logits.double())  # (1, 1, T)
    reference = (weights[..., None] * k.double()).cumsum(dim=2) / positions.square()[:, None]

    result = n4_modified_keys(k, gate_logits)
    assert result.dtype == torch.bfloat16
    error = ((result.double() - reference).abs() / reference).max().item()

    # A running sum kept in bfloat16 (each partial sum rounded), for comparison.
    weighted = (positions.bfloat16() * torch.tanh(gate_logits))[..., None] * k
    partial = torch.zeros(1, 1, head_dim, dtype=torch.bfloat16)
    partials = []
    for t in range(seq_len):
        partial = partial + weighted[:, :, t]
        partials.append(partial)
    naive = torch.stack(partials, dim=2) / positions.bfloat16().square()[:, None]
    naive_error = ((naive.double() - reference).abs() / reference).max().item()

    # bfloat16 rounds to a relative 2^-9 (0.2%); the output rounding alone accounts for ours.
    assert error < 1e-2
    assert naive_error > 10 * error


def test_attention_uses_the_causal_kernel_without_a_mask(monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def record(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(n4_attention.F, "scaled_dot_product_attention", record)
    attention = N4Attention(make_config(dropout=0.25))
    x = torch.randn(1, 6, HIDDEN)
    attention.eval()(x)
    attention.train()(x)

    assert [call.get("attn_mask") for call in calls] == [None, None]
    assert all(call["is_causal"] for call in calls)
    assert [call["dropout_p"] for call in calls] == [0.0, 0.25]


def test_invalid_scale_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"'sqrt_d'.*head_dim.*hidden_size"):
        N4Attention(make_config(), scale="sqrt_d")
    with pytest.raises(ValueError, match=r"'bogus'"):
        CausalLM(make_config(attention_options={"scale": "bogus"}))


def test_registry_names():
    assert variants.ATTENTION["n4"] is N4Attention
    assert variants.MLP["asgg"] is ASGG
    assert variants.NORM["dyt"] is DyT


# --- ASGG -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_asgg_matches_formula(bias):
    torch.manual_seed(5)
    mlp = ASGG(HIDDEN, INTER, bias=bias).double()
    if bias:
        with torch.no_grad():
            mlp.up_proj.bias.normal_()
            mlp.down_proj.bias.normal_()
    x = torch.randn(2, 5, HIDDEN, dtype=torch.float64)

    up_weight, up_bias = mlp.up_proj.weight, mlp.up_proj.bias
    rows = lambda i: slice(i * INTER, (i + 1) * INTER)  # noqa: E731
    gate, reference, value = (
        F.linear(x, up_weight[rows(i)], None if up_bias is None else up_bias[rows(i)]) for i in range(3)
    )
    exact_gelu = 0.5 * reference * (1 + torch.erf(reference / math.sqrt(2)))
    expected = F.linear(exact_gelu * torch.sigmoid(gate) * value, mlp.down_proj.weight, mlp.down_proj.bias)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)


def test_asgg_kaiming_initialisation():
    torch.manual_seed(6)
    hidden_size, inter_size = 256, 256
    mlp = ASGG(hidden_size, inter_size, bias=True)
    gain = math.sqrt(2 / (1 + 0.5))  # leaky-ReLU gain for negative slope sqrt(0.5)
    assert mlp.up_proj.weight.std().item() == pytest.approx(gain / math.sqrt(hidden_size), rel=0.03)
    assert mlp.down_proj.weight.std().item() == pytest.approx(gain / math.sqrt(inter_size), rel=0.03)
    assert not mlp.up_proj.bias.any()
    assert not mlp.down_proj.bias.any()


# --- DyT ------------------------------------------------------------------------------------------


def test_dyt_full_form():
    torch.manual_seed(7)
    norm = DyT(HIDDEN, alpha_init=0.7).double()
    assert {name for name, _ in norm.named_parameters()} == {"alpha", "weight", "bias"}
    assert norm.alpha.item() == pytest.approx(0.7)
    assert torch.equal(norm.weight, torch.ones(HIDDEN, dtype=torch.float64))
    assert torch.equal(norm.bias, torch.zeros(HIDDEN, dtype=torch.float64))

    randomize_(norm, torch.Generator().manual_seed(0))
    x = 3 * torch.randn(2, 5, HIDDEN, dtype=torch.float64)
    expected = norm.weight * torch.tanh(norm.alpha * x) + norm.bias
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


def test_dyt_reduced_published_form():
    torch.manual_seed(8)
    norm = DyT(HIDDEN, alpha_init=None, bias=False).double()
    assert [name for name, _ in norm.named_parameters()] == ["weight"]
    assert list(norm.state_dict()) == ["weight"]

    randomize_(norm, torch.Generator().manual_seed(1))
    x = 3 * torch.randn(2, 5, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(norm(x), norm.weight * torch.tanh(x), rtol=1e-12, atol=1e-12)


# --- Decoder block and CausalLM -------------------------------------------------------------------


def test_decoder_block_follows_sandwich_equations():
    torch.manual_seed(9)
    block = DecoderBlock(make_config(dropout=0.3)).double()
    # Distinct norm parameters, so that a swapped or skipped norm changes the output.
    generator = torch.Generator().manual_seed(2)
    for norm in (block.pre_attn_norm, block.post_attn_norm, block.pre_mlp_norm, block.post_mlp_norm):
        randomize_(norm, generator)
    block.eval()  # no residual dropout
    x = torch.randn(2, 6, HIDDEN, dtype=torch.float64)

    h = x + block.post_attn_norm(block.attention(block.pre_attn_norm(x)))
    expected = h + block.post_mlp_norm(block.mlp(block.pre_mlp_norm(h)))
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)

    # In training mode residual dropout is active.
    assert not torch.allclose(block.train()(x), expected)


def test_causal_lm_loss_is_shifted_cross_entropy():
    torch.manual_seed(10)
    model = CausalLM(make_config())
    input_ids = torch.randint(0, VOCAB, (3, 8))
    labels = input_ids.clone()
    labels[0, 4] = -100
    labels[2, 1:3] = -100

    logits, loss = model(input_ids, labels=labels)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, model(input_ids))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)

    # The same loss by hand: mean negative log-likelihood of the kept next tokens.
    log_probs = logits.log_softmax(dim=-1)
    terms = [
        -log_probs[b, t, labels[b, t + 1]] for b in range(3) for t in range(7) if labels[b, t + 1] != -100
    ]
    assert len(terms) == 3 * 7 - 3
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_causal_lm_is_causal():
    torch.manual_seed(11)
    model = CausalLM(make_config()).double().eval()
    input_ids = torch.randint(0, VOCAB, (2, 10))
    changed = input_ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % VOCAB

    before, after = model(input_ids), model(changed)
    torch.testing.assert_close(after[:, :6], before[:, :6], rtol=0, atol=0)
    assert not torch.allclose(after[:, 6:], before[:, 6:])


def test_causal_lm_logits_are_float32_for_bfloat16_weights():
    model = CausalLM(make_config()).to(torch.bfloat16)
    assert model(torch.randint(0, VOCAB, (1, 4))).dtype == torch.float32


def test_every_parameter_gets_a_gradient():
    model = CausalLM(make_config())
    input_ids = torch.randint(0, VOCAB, (2, 6))
    _, loss = model(input_ids, labels=input_ids)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_parameter_count_and_flops():
    config = make_config()
    model = CausalLM(config)
    per_block_matmuls = HIDDEN * (3 * HIDDEN + HEADS) + HIDDEN * HIDDEN + HIDDEN * 3 * INTER + INTER * HIDDEN
    per_block_norms = 4 * (2 * HIDDEN + 1)  # DyT defaults: weight, bias and alpha
    without_embeddings = LAYERS * (per_block_matmuls + per_block_norms)
    assert model.num_parameters(exclude_embeddings=True) == without_embeddings
    assert model.num_parameters() == without_embeddings + 2 * VOCAB * HIDDEN

    seq_len = 128
    matmuls = LAYERS * per_block_matmuls + HIDDEN * VOCAB  # lm_head counted, embedding not
    assert model.flops_per_token(seq_len) == 6 * matmuls + 12 * LAYERS * seq_len * HIDDEN


def test_bad_inputs_raise():
    model = CausalLM(make_config())
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels shape"):
        model(torch.zeros(2, 5, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long))
