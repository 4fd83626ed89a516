"""The fused N4 attentions "n4-gqa", "n4-swa" and "n4-mla" against formulas written out here.

Each reference builds the N4 keys with an explicit (T, T) weight matrix W[j, t] = t / j^2 (t <= j),
the attention with explicit boolean masks, and RoPE as complex multiplication, on float64 tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import variants
from n4 import ModelConfig
from n4.attention import N4Attention
from variants.mla import LATENT
from variants.n4_fused import GATE_LOGITS

B, T, C, H, KV = 2, 9, 16, 4, 2  # batch, sequence length, hidden size, heads, key/value heads
D = C // H
WINDOW = 3


def tolerance(position: str) -> float:
    # RoPE rotates with float32 cos and sin tables, which limits float64 results to about 1e-7.
    return 1e-6 if position == "rope" else 1e-10


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
        attention="n4-gqa",
        mlp="swiglu",
        norm="rmsnorm",
        position="none",
        max_seq_len=32,
        kv_heads=KV,
        window=WINDOW,
    )
    values.update(overrides)
    return ModelConfig(**values)


def build_attention(**overrides) -> nn.Module:
    config = make_config(**overrides)
    module = variants.ATTENTION[config.attention](config, **config.attention_options).double().eval()
    # Gate logits of order 1, so that tanh is far from linear and from saturation.
    if hasattr(module, "gate_proj"):
        with torch.no_grad():
            module.gate_proj.weight.normal_(0.0, 0.5)
    return module


def x_input(t: int = T) -> torch.Tensor:
    return torch.randn(B, t, C, dtype=torch.float64)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, heads * width) -> (B, heads, T, width)."""
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def key_weights(t: int) -> torch.Tensor:
    """W (T, T) with W[j, s] = s / j^2 for s <= j and 0 otherwise, 1-based s and j."""
    positions = torch.arange(1, t + 1, dtype=torch.float64)
    return torch.where(positions[None, :] <= positions[:, None], positions[None, :] / positions[:, None] ** 2, 0.0)


def allowed_keys(t: int, window: int | None = None) -> torch.Tensor:
    """(T, T) boolean: query i may attend key j when j <= i, and i - j < window with a window."""
    allowed = torch.zeros(t, t, dtype=torch.bool)
    for i in range(t):
        for j in range(t):
            allowed[i, j] = j <= i and (window is None or i - j < window)
    return allowed


def rope_reference(x: torch.Tensor, offset: int = 0, theta: float = 10000.0) -> torch.Tensor:
    """Rotate channel pairs (j, j + D/2) of x (..., T, D) by (offset + position) * theta^(-2j/D)."""
    t, d = x.shape[-2], x.shape[-1]
    pairs = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    positions = torch.arange(offset, offset + t, dtype=torch.float64)[:, None]
    angles = positions * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((rotated.real, rotated.imag), dim=-1)


def softmax_attention(q, k, v, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v


def n4_self_attention_reference(module, x, kv_heads, window, scale, rotate) -> torch.Tensor:
    """N4 keys per key/value head over the whole prefix, then GQA with an optional window."""
    t = x.shape[1]
    q = split_heads(linear(module.q_proj, x), H)
    k = split_heads(linear(module.k_proj, x), kv_heads)
    v = split_heads(linear(module.v_proj, x), kv_heads)
    gates = torch.tanh(linear(module.gate_proj, x))  # (B, T, H_kv)

    outputs = []
    for i in range(H):
        m = i // (H // kv_heads)  # the key/value head of query head i
        modified_keys = key_weights(t) @ (gates[..., m, None] * k[:, m])  # (B, T, D)
        q_i = q[:, i]
        if rotate:
            q_i, modified_keys = rope_reference(q_i), rope_reference(modified_keys)
        outputs.append(softmax_attention(q_i, modified_keys, v[:, m], allowed_keys(t, window), scale))
    return linear(module.o_proj, torch.cat(outputs, dim=-1))


# --- n4-gqa and n4-swa ------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("position", ["none", "rope"])
@pytest.mark.parametrize("scale", ["head_dim", "hidden_size"])
def test_n4_gqa_matches_direct_formula(scale, position, bias):
    module = build_attention(attention="n4-gqa", position=position, bias=bias, attention_options={"scale": scale})
    x = x_input()
    expected_scale = 1 / math.sqrt(D if scale == "head_dim" else C)

    expected = n4_self_attention_reference(module, x, KV, None, expected_scale, rotate=position == "rope")

    assert module.gate_proj.weight.shape == (KV, C)
    torch.testing.assert_close(module(x), expected, atol=tolerance(position), rtol=0)


@pytest.mark.parametrize("position", ["none", "rope"])
@pytest.mark.parametrize("scale", ["head_dim", "hidden_size"])
def test_n4_swa_matches_direct_formula(scale, position):
    module = build_attention(attention="n4-swa", position=position, attention_options={"scale": scale})
    x = x_input()
    expected_scale = 1 / math.sqrt(D if scale == "head_dim" else C)

    # Every query head has its own key/value head; the keys average the whole prefix.
    expected = n4_self_attention_reference(module, x, H, WINDOW, expected_scale, rotate=position == "rope")

    assert module.gate_proj.weight.shape == (H, C)
    torch.testing.assert_close(module(x), expected, atol=tolerance(position), rtol=0)


def copy_n4_weights(n4: N4Attention, fused: nn.Module) -> None:
    """Copy N4's head-grouped fused projection into separate q, k, v and gate projections."""
    with torch.no_grad():
        rows = n4.qkvh_linear.weight[: 3 * C].view(H, 3, D, C)  # per head: q, k, v rows
        fused.q_proj.weight.copy_(rows[:, 0].reshape(C, C))
        fused.k_proj.weight.copy_(rows[:, 1].reshape(C, C))
        fused.v_proj.weight.copy_(rows[:, 2].reshape(C, C))
        fused.gate_proj.weight.copy_(n4.qkvh_linear.weight[3 * C :])
        fused.o_proj.weight.copy_(n4.out_linear.weight)


@pytest.mark.parametrize("position", ["none", "rope"])
@pytest.mark.parametrize("scale", ["head_dim", "hidden_size"])
@pytest.mark.parametrize("name, overrides", [("n4-gqa", {"kv_heads": H}), ("n4-swa", {"window": T})])
def test_fused_equals_n4_when_nothing_is_shared(name, overrides, scale, position):
    # H_kv = H (no sharing) or W = T (no window): the same function as "n4", given the same weights.
    fused = build_attention(attention=name, position=position, attention_options={"scale": scale}, **overrides)
    n4 = build_attention(attention="n4", position=position, attention_options={"scale": scale})
    copy_n4_weights(n4, fused)
    x = x_input()

    torch.testing.assert_close(fused(x), n4(x), atol=1e-12, rtol=0)


def test_n4_swa_sees_old_tokens_only_through_keys():
    # With a window of 2, query 6 attends keys 5 and 6. Plain SWA ignores token 0 there, but N4's
    # keys at 5 and 6 average every earlier token, token 0 included.
    n4_swa = build_attention(attention="n4-swa", window=2)
    swa = variants.ATTENTION["swa"](make_config(attention="swa", window=2)).double().eval()
    swa.load_state_dict({k: v for k, v in n4_swa.state_dict().items() if not k.startswith("gate_proj")})
    x = x_input()
    changed = x.clone()
    changed[:, 0] += 1.0

    assert torch.allclose(swa(changed)[:, 6], swa(x)[:, 6], atol=1e-12, rtol=0)
    assert not torch.allclose(n4_swa(changed)[:, 6], n4_swa(x)[:, 6])


def test_n4_gqa_gates_read_their_own_kv_head():
    # Zero gates on key/value head 0 only: its keys become 0, so query heads 0 and 1 average their
    # values uniformly, while heads 2 and 3 still depend on the queries.
    module = build_attention(attention="n4-gqa")
    with torch.no_grad():
        module.gate_proj.weight[0] = 0.0
        module.o_proj.weight.copy_(torch.eye(C))
    x = x_input()
    v = split_heads(linear(module.v_proj, x), KV)
    prefix_means = v.cumsum(dim=2) / torch.arange(1, T + 1, dtype=torch.float64)[:, None]  # (B, H_kv, T, D)

    out = split_heads(module(x), H)  # o_proj is the identity
    torch.testing.assert_close(out[:, 0], prefix_means[:, 0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out[:, 1], prefix_means[:, 0], atol=1e-12, rtol=0)
    assert not torch.allclose(out[:, 2], prefix_means[:, 1])


# --- n4-mla -----------------------------------------------------------------------------------------


def n4_mla_reference(module, x: torch.Tensor, rotate: bool) -> torch.Tensor:
    """MLA (DeepSeek-V2 equations 9 to 19) with content keys from the N4 mean of the latent."""
    n, r, v_dim = module.nope_dim, module.rope_dim, module.v_head_dim
    t = x.shape[1]
    rope = rope_reference if rotate else (lambda y: y)

    c_kv = linear(module.kv_down, x)  # (B, T, Lkv)
    gate = torch.tanh(linear(module.gate_proj, x))  # (B, T, 1): one gate per token
    c_mean = key_weights(t) @ (gate * c_kv)  # c'_j = sum_{s<=j} s tanh(g_s) c_s / j^2
    c_q = linear(module.q_down, x) if module.q_lora_rank > 0 else x
    k_rope = rope(linear(module.k_rope_proj, x))  # not averaged

    outputs = []
    for i in range(module.heads):
        k_c = c_mean @ module.k_up.weight[i * n : (i + 1) * n].T
        v_c = c_kv @ module.v_up.weight[i * v_dim : (i + 1) * v_dim].T  # values from the raw latent
        if module.k_up.bias is not None:
            k_c = k_c + module.k_up.bias[i * n : (i + 1) * n]
            v_c = v_c + module.v_up.bias[i * v_dim : (i + 1) * v_dim]
        q_c = linear(module.q_proj, c_q)[..., i * n : (i + 1) * n]
        q_r = rope(linear(module.q_rope_proj, c_q)[..., i * r : (i + 1) * r])
        q = torch.cat((q_c, q_r), dim=-1)
        k = torch.cat((k_c, k_rope), dim=-1)
        outputs.append(softmax_attention(q, k, v_c, allowed_keys(t), 1 / math.sqrt(n + r)))
    return linear(module.o_proj, torch.cat(outputs, dim=-1))


MLA_SIZES = dict(kv_lora_rank=10, qk_nope_head_dim=3, qk_rope_head_dim=4, v_head_dim=5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("q_lora_rank", [0, 6])
@pytest.mark.parametrize("position", ["none", "rope"])
def test_n4_mla_matches_direct_formula(position, q_lora_rank, bias):
    module = build_attention(attention="n4-mla", position=position, q_lora_rank=q_lora_rank, bias=bias, **MLA_SIZES)
    x = x_input()

    expected = n4_mla_reference(module, x, rotate=position == "rope")

    assert module.gate_proj.weight.shape == (1, C)
    torch.testing.assert_close(module(x), expected, atol=tolerance(position), rtol=0)


def test_n4_mla_keys_average_decompressed_keys():
    # Without a bias, W^UK c'_j equals the N4 mean of the decompressed keys W^UK c_t, by linearity.
    module = build_attention(attention="n4-mla", **MLA_SIZES)
    x = x_input()
    c_kv = linear(module.kv_down, x)
    gate = torch.tanh(linear(module.gate_proj, x))
    entries = {LATENT: c_kv, GATE_LOGITS: linear(module.gate_proj, x)}

    keys_from_mean_latent = module.k_up(module.key_latents(entries))
    mean_of_keys = key_weights(T) @ (gate * module.k_up(c_kv))

    torch.testing.assert_close(keys_from_mean_latent, mean_of_keys, atol=1e-12, rtol=0)


def test_n4_mla_rope_keys_are_not_averaged():
    # Zeroing every gate zeroes the content keys but leaves the RoPE scores, so the output still
    # depends on the RoPE key projection.
    module = build_attention(attention="n4-mla", position="rope", **MLA_SIZES)
    with torch.no_grad():
        module.gate_proj.weight.zero_()
    x = x_input()
    before = module(x)
    with torch.no_grad():
        module.k_rope_proj.weight.mul_(2.0)

    assert not torch.allclose(module(x), before)


# --- Every fused variant ---------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["none", "rope"])
@pytest.mark.parametrize("name", ["n4-gqa", "n4-swa", "n4-mla"])
def test_fused_attention_is_causal(name, position):
    module = build_attention(attention=name, position=position)
    x = x_input()
    out = module(x)

    for t in (0, 4, T - 1):
        changed = x.clone()
        changed[:, t] += torch.randn(B, C, dtype=torch.float64)
        out_changed = module(changed)

        torch.testing.assert_close(out_changed[:, :t], out[:, :t], atol=1e-12, rtol=0)
        assert not torch.allclose(out_changed[:, t], out[:, t])


def test_fused_options():
    assert variants.ATTENTION.option_names("n4-gqa") == {"config", "scale"}
    assert variants.ATTENTION.option_names("n4-swa") == {"config", "scale"}
    assert variants.ATTENTION.option_names("n4-mla") == {"config"}
    with pytest.raises(ValueError, match=r"scale='sqrt_d' is invalid.*head_dim, hidden_size"):
        variants.ATTENTION["n4-gqa"](make_config(), scale="sqrt_d")
    with pytest.raises(ValueError, match=r"unknown option\(s\) scale for attention 'n4-mla'"):
        make_config(attention="n4-mla", attention_options={"scale": "head_dim"})
