"""Baseline variants against their textbook formulas, on tiny float64 tensors.

Every reference below is written out in the test itself (explicit masks, loops over the window,
RoPE as complex multiplication) so that a shared bug in the module and the reference is unlikely.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import variants
from n4 import ModelConfig
from variants.attention import CausalSelfAttention
from variants.registry import Registry, UnknownVariantError

B, T, C, H = 2, 7, 16, 4  # batch, sequence length, hidden size, heads
D = C // H


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_config(**overrides) -> ModelConfig:
    values = dict(
        vocab_size=11,
        hidden_size=C,
        inter_size=24,
        heads=H,
        layers=1,
        attention="mha",
        mlp="swiglu",
        norm="rmsnorm",
        position="none",
        max_seq_len=32,
    )
    values.update(overrides)
    return ModelConfig(**values)


def build_attention(**overrides) -> nn.Module:
    config = make_config(**overrides)
    module = variants.ATTENTION[config.attention](config, **config.attention_options)
    return module.double().eval()


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, heads * width) -> (B, heads, T, width)."""
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, width) -> (B, T, heads * width)."""
    b, h, t, w = x.shape
    return x.transpose(1, 2).reshape(b, t, h * w)


def masked_softmax_attention(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) with disallowed scores at -inf) v, for one boolean (T, T) mask."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def causal_mask(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


def rope_reference(x: torch.Tensor, offset: int = 0, theta: float = 10000.0) -> torch.Tensor:
    """RoPE as complex multiplication: pair (j, j + D/2) is z_j, rotated by e^{i m theta^(-2j/D)}."""
    t, d = x.shape[-2], x.shape[-1]
    half = d // 2
    z = torch.complex(x[..., :half], x[..., half:])
    positions = torch.arange(offset, offset + t, dtype=torch.float64)
    freqs = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    angles = torch.outer(positions, freqs)  # (t, half)
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1)


def x_input(t: int = T) -> torch.Tensor:
    return torch.randn(B, t, C, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Multi-head attention


@pytest.mark.parametrize("position", ["none", "rope"])
def test_mha_matches_textbook_formula(position):
    module = build_attention(attention="mha", position=position, bias=True)
    x = x_input()

    q = split_heads(linear(module.q_proj, x), H)
    k = split_heads(linear(module.k_proj, x), H)
    v = split_heads(linear(module.v_proj, x), H)
    if position == "rope":
        q, k = rope_reference(q), rope_reference(k)
    expected = linear(module.o_proj, merge_heads(masked_softmax_attention(q, k, v, causal_mask(T))))

    torch.testing.assert_close(module(x), expected, atol=1e-6 if position == "rope" else 1e-12, rtol=0)


def test_mha_matches_torch_multihead_attention():
    module = build_attention(attention="mha", bias=True)
    reference = nn.MultiheadAttention(C, H, bias=True, batch_first=True).double().eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([module.q_proj.weight, module.k_proj.weight, module.v_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([module.q_proj.bias, module.k_proj.bias, module.v_proj.bias]))
        reference.out_proj.weight.copy_(module.o_proj.weight)
        reference.out_proj.bias.copy_(module.o_proj.bias)
    x = x_input()

    # nn.MultiheadAttention's boolean mask is True where attention is NOT allowed.
    expected, _ = reference(x, x, x, attn_mask=~causal_mask(T), need_weights=False)

    torch.testing.assert_close(module(x), expected, atol=1e-12, rtol=0)


def test_attention_dropout_only_in_training():
    module = build_attention(attention="mha", dropout=0.5)
    plain = build_attention(attention="mha")
    plain.load_state_dict(module.state_dict())
    x = x_input()

    torch.testing.assert_close(module(x), plain(x), atol=1e-12, rtol=0)
    module.train()
    assert not torch.allclose(module(x), plain(x))


# ----------------------------------------------------------------------------------------------
# Grouped-query attention


def test_gqa_equals_mha_duplicated_kv():
    gqa = build_attention(attention="gqa", kv_heads=2, position="rope")
    mha = build_attention(attention="mha", position="rope")
    group = H // 2
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            # Key/value head j serves query heads j * group .. (j + 1) * group - 1.
            weight = getattr(gqa, name).weight.view(2, D, C).repeat_interleave(group, dim=0)
            getattr(mha, name).weight.copy_(weight.reshape(C, C))
    x = x_input()

    torch.testing.assert_close(gqa(x), mha(x), atol=1e-12, rtol=0)


def test_gqa_groups_query_heads_contiguously():
    # 6 heads over 3 key/value heads: contiguous groups give [0, 0, 1, 1, 2, 2], while an
    # interleaved mapping would give [0, 1, 2, 0, 1, 2].
    heads, kv_heads = 6, 3
    module = build_attention(attention="gqa", hidden_size=12, heads=heads, kv_heads=kv_heads, bias=True)
    head_dim = 12 // heads
    with torch.no_grad():
        # Value head j is the constant j everywhere, and o_proj passes the heads through unchanged.
        module.v_proj.weight.zero_()
        module.v_proj.bias.copy_(torch.arange(kv_heads, dtype=torch.float64).repeat_interleave(head_dim))
        module.o_proj.weight.copy_(torch.eye(12))
        module.o_proj.bias.zero_()
    x = torch.randn(B, T, 12, dtype=torch.float64)

    per_head = module(x).view(B, T, heads, head_dim)  # attention weights sum to 1, so out = j

    for i in range(heads):
        expected = torch.full_like(per_head[:, :, i], float(i // (heads // kv_heads)))
        torch.testing.assert_close(per_head[:, :, i], expected, atol=1e-12, rtol=0)


def test_gqa_full_kv_heads_equals_mha():
    gqa = build_attention(attention="gqa", kv_heads=H, position="rope", bias=True)
    mha = build_attention(attention="mha", position="rope", bias=True)
    mha.load_state_dict(gqa.state_dict())
    x = x_input()

    torch.testing.assert_close(gqa(x), mha(x), atol=1e-12, rtol=0)


def test_gqa_rejects_nondividing_kv_heads():
    with pytest.raises(ValueError, match=r"kv_heads=3 does not divide heads=4.*\[1, 2, 4\]"):
        CausalSelfAttention(make_config(), num_kv_heads=3)


# ----------------------------------------------------------------------------------------------
# Sliding-window attention


@pytest.mark.parametrize("position", ["none", "rope"])
def test_swa_matches_explicit_window_loop(position):
    window = 3
    module = build_attention(attention="swa", window=window, position=position)

    # Two lengths in turn, so a cached mask of the wrong size would show.
    for t in (7, 5, 7):
        x = x_input(t)
        q = split_heads(linear(module.q_proj, x), H)
        k = split_heads(linear(module.k_proj, x), H)
        v = split_heads(linear(module.v_proj, x), H)
        if position == "rope":
            q, k = rope_reference(q), rope_reference(k)

        out = torch.zeros_like(q)
        for i in range(t):
            keys = range(max(0, i - window + 1), i + 1)  # W keys, including i itself
            assert len(keys) == min(window, i + 1)
            scores = torch.stack([(q[:, :, i] * k[:, :, j]).sum(-1) for j in keys], dim=-1) / math.sqrt(D)
            weights = torch.softmax(scores, dim=-1)  # (B, H, len(keys))
            out[:, :, i] = sum(weights[..., n, None] * v[:, :, j] for n, j in enumerate(keys))
        expected = linear(module.o_proj, merge_heads(out))

        torch.testing.assert_close(module(x), expected, atol=1e-6 if position == "rope" else 1e-12, rtol=0)


@pytest.mark.parametrize("window", [T, T + 5])
def test_swa_full_window_equals_mha(window):
    swa = build_attention(attention="swa", window=window, position="rope")
    mha = build_attention(attention="mha", position="rope")
    mha.load_state_dict(swa.state_dict())
    x = x_input()

    torch.testing.assert_close(swa(x), mha(x), atol=1e-12, rtol=0)


def test_swa_window_one_attends_self():
    module = build_attention(attention="swa", window=1, bias=True)
    x = x_input()

    # One key per query: the softmax weight is 1, so each output is o_proj(v_i).
    expected = linear(module.o_proj, linear(module.v_proj, x))

    torch.testing.assert_close(module(x), expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------
# Multi-head latent attention


def mla_reference(module, x: torch.Tensor, rotate: bool) -> torch.Tensor:
    """DeepSeek-V2 equations 9 to 19, head by head, from the module's weights."""
    n, r, v_dim = module.nope_dim, module.rope_dim, module.v_head_dim
    t = x.shape[1]
    rope = rope_reference if rotate else (lambda y: y)

    c_kv = linear(module.kv_down, x)  # c^KV = W^DKV h
    c_q = linear(module.q_down, x) if module.q_lora_rank > 0 else x  # c^Q = W^DQ h, or h
    k_rope = rope(linear(module.k_rope_proj, x))  # k^R = RoPE(W^KR h), shared by all heads

    heads = []
    for i in range(module.heads):
        k_c = c_kv @ module.k_up.weight[i * n : (i + 1) * n].T  # k^C_i = W^UK_i c^KV
        v_c = c_kv @ module.v_up.weight[i * v_dim : (i + 1) * v_dim].T  # v^C_i = W^UV_i c^KV
        q_c = c_q @ module.q_proj.weight[i * n : (i + 1) * n].T  # q^C_i = W^UQ_i c^Q
        q_r = rope(c_q @ module.q_rope_proj.weight[i * r : (i + 1) * r].T)  # q^R_i = RoPE(W^QR_i c^Q)
        q = torch.cat((q_c, q_r), dim=-1)
        k = torch.cat((k_c, k_rope), dim=-1)
        heads.append(masked_softmax_attention(q, k, v_c, causal_mask(t)))  # scale 1/sqrt(n + r)
    return torch.cat(heads, dim=-1) @ module.o_proj.weight.T  # u = W^O [o_1; ...; o_H]


@pytest.mark.parametrize("position", ["rope", "none"])
@pytest.mark.parametrize("q_lora_rank", [0, 6])
def test_mla_matches_deepseek_equations(q_lora_rank, position):
    module = build_attention(
        attention="mla",
        position=position,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=10,
        qk_nope_head_dim=3,
        qk_rope_head_dim=4,
        v_head_dim=5,
    )
    x = x_input()

    assert module.scale == pytest.approx(1 / math.sqrt(3 + 4))
    torch.testing.assert_close(module(x), mla_reference(module, x, rotate=position == "rope"), atol=1e-6, rtol=0)


def test_mla_parameter_shapes_follow_config():
    module = build_attention(attention="mla", q_lora_rank=6, kv_lora_rank=10, qk_nope_head_dim=3, v_head_dim=5)
    rope_dim = max(2, D // 2)

    assert module.kv_down.weight.shape == (10, C)
    assert module.k_rope_proj.weight.shape == (rope_dim, C)
    assert module.q_down.weight.shape == (6, C)
    assert module.q_rope_proj.weight.shape == (H * rope_dim, 6)
    assert module.v_up.weight.shape == (H * 5, 10)
    assert module.o_proj.weight.shape == (C, H * 5)


# ----------------------------------------------------------------------------------------------
# Position encodings


@pytest.mark.parametrize("offset", [0, 5])
def test_rope_matches_complex_definition(offset):
    rope = variants.POSITION["rope"](8, 32, 500.0).double()
    q = torch.randn(B, 3, T, 8, dtype=torch.float64)
    k = torch.randn(B, 1, T, 8, dtype=torch.float64)  # fewer key heads, as in GQA and MLA

    q_rot, k_rot = rope(q, k, offset=offset)

    torch.testing.assert_close(q_rot, rope_reference(q, offset, theta=500.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(k_rot, rope_reference(k, offset, theta=500.0), atol=1e-6, rtol=0)


def test_rope_score_relative_only():
    rope = variants.POSITION["rope"](8, 64, 10000.0).double()
    q = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        q_m, _ = rope(q, q, offset=m)
        k_n, _ = rope(k, k, offset=n)
        return (q_m * k_n).sum().item()

    for m, n in [(3, 0), (10, 7), (40, 37)]:
        assert score(m, n) == pytest.approx(score(3, 0), abs=1e-6)
    assert score(0, 3) == pytest.approx(score(20, 23), abs=1e-6)
    assert score(5, 0) != pytest.approx(score(3, 0), abs=1e-3)


def test_rope_rejects_position_beyond_max():
    rope = variants.POSITION["rope"](4, 8, 10000.0)
    x = torch.randn(1, 1, 3, 4)

    rope(x, x, offset=5)  # positions 5..7 fit
    with pytest.raises(ValueError, match=r"position 8 .*max_seq_len=8"):
        rope(x, x, offset=6)


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="head_dim=5"):
        variants.POSITION["rope"](5, 8, 10000.0)


def test_rope_float32_tables_after_bf16_cast():
    rope = variants.POSITION["rope"](8, 64, 10000.0)
    reference = variants.POSITION["rope"](8, 64, 10000.0)
    x = torch.randn(1, 2, 64, 8).to(torch.bfloat16)

    rope.to(torch.bfloat16)
    q_rot, _ = rope(x, x)

    assert rope.cos.dtype == torch.float32
    expected, _ = reference(x.float(), x.float())
    assert torch.equal(q_rot, expected.to(torch.bfloat16))


def test_no_position_is_identity():
    none = variants.POSITION["none"](4, 8, 10000.0)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)

    q_out, k_out = none(q, k, offset=100)

    assert q_out is q
    assert k_out is k


# ----------------------------------------------------------------------------------------------
# MLPs and norms


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_matches_formula(bias):
    module = variants.MLP["swiglu"](C, 24, bias=bias).double()
    x = x_input()

    gate = linear(module.gate_proj, x)
    silu = gate / (1 + torch.exp(-gate))
    expected = linear(module.down_proj, silu * linear(module.up_proj, x))

    torch.testing.assert_close(module(x), expected, atol=1e-12, rtol=0)
    assert (module.up_proj.bias is not None) == bias


@pytest.mark.parametrize("bias", [False, True])
def test_gelu_matches_erf_formula(bias):
    module = variants.MLP["gelu"](C, 24, bias=bias).double()
    x = x_input() * 3  # spread the inputs so the tanh approximation would differ visibly

    up = linear(module.up_proj, x)
    gelu = 0.5 * up * (1 + torch.erf(up / math.sqrt(2)))
    expected = linear(module.down_proj, gelu)

    torch.testing.assert_close(module(x), expected, atol=1e-12, rtol=0)


def test_layernorm_matches_formula():
    module = variants.NORM["layernorm"](C).double()
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    x = x_input() * 5 + 2

    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance
    expected = (x - mean) / torch.sqrt(variance + 1e-5) * module.weight + module.bias

    assert module.eps == 1e-5
    torch.testing.assert_close(module(x), expected, atol=1e-12, rtol=0)


def test_layernorm_without_bias():
    module = variants.NORM["layernorm"](C, bias=False)

    assert module.bias is None


def test_rmsnorm_matches_formula():
    module = variants.NORM["rmsnorm"](C).double()
    with torch.no_grad():
        module.weight.normal_()
    x = x_input() * 1e-3  # small inputs, so eps = 1e-6 matters

    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * module.weight

    assert module.eps == 1e-6
    torch.testing.assert_close(module(x), expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------
# Registries


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownVariantError) as info:
        variants.ATTENTION["flash"]

    for name in ("mha", "gqa", "swa", "mla"):
        assert name in str(info.value)


def test_config_rejects_unknown_variant():
    with pytest.raises(ValueError, match=r"unknown mlp 'relu'.*gelu.*swiglu"):
        make_config(mlp="relu")


def test_registry_duplicate_name_raises():
    registry = Registry("test")
    registry.register("a")(nn.Identity)

    with pytest.raises(ValueError, match="'a' is already registered"):
        registry.register("a")(nn.Identity)
    with pytest.raises(ValueError, match="'mha' is already registered"):
        variants.ATTENTION.register("mha")(nn.Identity)
    assert variants.ATTENTION["mha"].__name__ == "MultiHeadAttention"


def test_unknown_option_raises_naming_it():
    with pytest.raises(ValueError, match=r"unknown option\(s\) bias for norm 'rmsnorm'.*valid options: eps"):
        make_config(norm="rmsnorm", norm_options={"bias": False})
    with pytest.raises(ValueError, match=r"unknown option\(s\) window for attention 'mha'"):
        make_config(attention="mha", attention_options={"window": 4})
    with pytest.raises(TypeError, match="window"):
        variants.ATTENTION["mha"](make_config(), window=4)


# ----------------------------------------------------------------------------------------------
# Causality of every registered attention variant


@pytest.mark.parametrize("position", ["none", "rope"])
@pytest.mark.parametrize("name", sorted(variants.ATTENTION))
def test_attention_is_causal(name, position):
    module = build_attention(attention=name, position=position, kv_heads=2, window=3)
    x = x_input(8)
    out = module(x)

    for t in (0, 3, 7):
        changed = x.clone()
        changed[:, t] += torch.randn(B, C, dtype=torch.float64)

        out_changed = module(changed)

        torch.testing.assert_close(out_changed[:, :t], out[:, :t], atol=1e-12, rtol=0)
        assert not torch.allclose(out_changed[:, t], out[:, t]), "position t should see its own input"
