"""N4C against a hand-built checkpoint in the published layout and a reference forward pass.

The state dict is built by hand with the keys and shapes of the published checkpoint, and the
reference forward pass reads those tensors directly, so the reference does not depend on N4C's key
mapping.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from n4 import N4C, CausalLM, ModelConfig
from n4.published import published_to_causal_lm_state_dict

VOCAB, HIDDEN, INTER, HEADS, LAYERS = 37, 16, 20, 4, 2
HEAD_DIM = HIDDEN // HEADS


def published_shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a published N4 checkpoint, in the order the published model saves them."""
    shapes = {"n4b.embedding.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        block = f"n4b.n4d.{i}."
        shapes[block + "n4.qkvh_linear.weight"] = (3 * HIDDEN + HEADS, HIDDEN)
        shapes[block + "n4.out_linear.weight"] = (HIDDEN, HIDDEN)
        shapes[block + "n4.norm.weight"] = (HEAD_DIM,)
        shapes[block + "mlp.up_proj.weight"] = (3 * INTER, HIDDEN)
        shapes[block + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        for norm in ("pre_n4_norm", "post_n4_norm", "pre_mlp_norm", "post_mlp_norm"):
            shapes[block + norm + ".weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


@pytest.fixture
def published_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for key, shape in published_shapes().items():
        values = torch.randn(shape, generator=generator, dtype=torch.float64)
        if len(shape) == 1:  # DyT gammas around 1
            values = 1.0 + 0.2 * values
        elif "embedding" not in key:  # keep activations of order 1
            values = values / math.sqrt(shape[1])
        state_dict[key] = values
    return state_dict


def reference_forward(state_dict: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """Compute the published N4 model's logits with T x T key-weight and attention matrices."""
    seq_len = input_ids.shape[1]
    positions = torch.arange(1, seq_len + 1, dtype=torch.float64)
    # Key weights W[j, t] = t / j^2 for t <= j.
    key_weights = torch.tril(positions[None, :] / positions[:, None] ** 2)
    future = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(diagonal=1)

    def dyt(name: str, x: torch.Tensor) -> torch.Tensor:  # reduced DyT: gamma * tanh(x)
        return state_dict[name + ".weight"] * torch.tanh(x)

    def attention(block: str, x: torch.Tensor) -> torch.Tensor:
        projected = x @ state_dict[block + "n4.qkvh_linear.weight"].T  # (B, T, 3C + H)
        heads = []
        for h in range(HEADS):
            q, k, v = projected[..., 3 * HEAD_DIM * h : 3 * HEAD_DIM * (h + 1)].split(HEAD_DIM, dim=-1)
            gate = torch.tanh(projected[..., 3 * HIDDEN + h])  # (B, T)
            modified_k = key_weights @ (gate[..., None] * k)
            scores = (q @ modified_k.transpose(-1, -2)) / math.sqrt(HIDDEN)  # published scale: sqrt(C)
            heads.append(scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v)
        return torch.cat(heads, dim=-1) @ state_dict[block + "n4.out_linear.weight"].T

    def asgg(block: str, x: torch.Tensor) -> torch.Tensor:
        gate, reference, value = (x @ state_dict[block + "mlp.up_proj.weight"].T).split(INTER, dim=-1)
        hidden = F.gelu(reference) * torch.sigmoid(gate) * value
        return hidden @ state_dict[block + "mlp.down_proj.weight"].T

    x = state_dict["n4b.embedding.weight"][input_ids]
    for i in range(LAYERS):
        block = f"n4b.n4d.{i}."
        h = x + dyt(block + "post_n4_norm", attention(block, dyt(block + "pre_n4_norm", x)))
        x = h + dyt(block + "post_mlp_norm", asgg(block, dyt(block + "pre_mlp_norm", h)))
    return x @ state_dict["lm_head.weight"].T


def make_model() -> N4C:
    return N4C(VOCAB, HIDDEN, INTER, HEADS, LAYERS).double()


def test_loaded_checkpoint_matches_reference_forward(published_state_dict):
    model = make_model()
    model.load_state_dict(published_state_dict, strict=True)
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))

    logits = model(input_ids)
    assert logits.dtype == torch.float32
    assert logits.shape == (2, 9, VOCAB)
    expected = reference_forward(published_state_dict, input_ids)
    torch.testing.assert_close(logits, expected.float(), rtol=1e-5, atol=1e-5)


def test_labels_return_logits_and_next_token_loss(published_state_dict):
    model = make_model()
    model.load_state_dict(published_state_dict)
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))

    logits, loss = model(input_ids, labels=input_ids)
    torch.testing.assert_close(logits, model(input_ids))
    expected_logits = reference_forward(published_state_dict, input_ids)
    expected = F.cross_entropy(expected_logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_config_is_the_published_one():
    config = make_model().config
    assert (config.attention, config.mlp, config.norm, config.position) == ("n4", "asgg", "dyt", "none")
    assert config.attention_options == {"scale": "hidden_size"}
    assert config.norm_options == {"alpha_init": None, "bias": False}
    assert not config.bias


def test_strict_loading_rejects_a_missing_key(published_state_dict):
    missing = "n4b.n4d.1.mlp.down_proj.weight"
    del published_state_dict[missing]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "n4b\.n4d\.1\.mlp\.down_proj\.weight"'):
        make_model().load_state_dict(published_state_dict, strict=True)

    result = make_model().load_state_dict(published_state_dict, strict=False)
    assert result.missing_keys == [missing]
    assert result.unexpected_keys == []


@pytest.mark.parametrize(
    "extra",
    [
        "n4b.n4d.0.n4.extra.weight",  # published prefix, unknown module
        "n4b.n4d.7.mlp.up_proj.weight",  # a block the model does not have
        "n4b.final_norm.weight",  # outside the published layout
        "blocks.0.mlp.up_proj.weight",  # CausalLM's own name, which N4C does not accept
    ],
)
def test_strict_loading_rejects_an_unexpected_key(published_state_dict, extra):
    published_state_dict[extra] = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"" + extra.replace(".", r"\.")):
        make_model().load_state_dict(published_state_dict, strict=True)

    result = make_model().load_state_dict(published_state_dict, strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys == [extra]


def test_state_dict_round_trip(published_state_dict):
    model = make_model()
    model.load_state_dict(published_state_dict)
    saved = model.state_dict()
    assert list(saved) == list(published_shapes())
    for key, value in published_state_dict.items():
        assert torch.equal(saved[key], value), key

    reloaded = make_model()
    reloaded.load_state_dict(saved, strict=True, assign=True)
    assert list(reloaded.state_dict()) == list(saved)
    assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in saved.items())


def test_unused_head_norm_is_a_buffer(published_state_dict):
    model = make_model()
    model.load_state_dict(published_state_dict)
    assert not any(name.endswith("attention.norm.weight") for name, _ in model.named_parameters())
    assert torch.equal(model.blocks[1].attention.norm.weight, published_state_dict["n4b.n4d.1.n4.norm.weight"])

    plain = CausalLM(ModelConfig.published(VOCAB, HIDDEN, INTER, HEADS, LAYERS))
    assert model.num_parameters() == plain.num_parameters()


def test_published_size_has_127m_parameters_without_embeddings():
    with torch.device("meta"):
        model = N4C(vocab_size=32768, hidden_size=768, inter_size=1536, heads=6, layers=18)
    assert model.num_parameters(exclude_embeddings=True) == 127_540_224
    assert model.num_parameters() == 177_871_872


def test_conversion_to_causal_lm_keys(published_state_dict):
    converted = published_to_causal_lm_state_dict(published_state_dict)
    plain = CausalLM(ModelConfig.published(VOCAB, HIDDEN, INTER, HEADS, LAYERS)).double()
    plain.load_state_dict(converted, strict=True)
    model = make_model()
    model.load_state_dict(published_state_dict)

    input_ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(plain(input_ids), model(input_ids), rtol=0, atol=0)

    with pytest.raises(ValueError, match="'n4b.final_norm.weight'"):
        published_to_causal_lm_state_dict({**published_state_dict, "n4b.final_norm.weight": torch.ones(1)})


def test_published_layout_inside_a_parent_module(published_state_dict):
    parent = nn.Module()
    parent.model = make_model()
    parent.probe = nn.Linear(2, 2).double()
    state_dict = {"model." + key: value for key, value in published_state_dict.items()}
    state_dict.update({"probe." + key: value for key, value in parent.probe.state_dict().items()})

    parent.load_state_dict(state_dict, strict=True)
    assert list(parent.state_dict()) == list(state_dict)

    del state_dict["model.lm_head.weight"]
    result = parent.load_state_dict(state_dict, strict=False)
    assert result.missing_keys == ["model.lm_head.weight"]


def test_bias_option_adds_linear_biases():
    keys = set(N4C(VOCAB, HIDDEN, INTER, HEADS, LAYERS, bias=True).state_dict())
    for name in ("n4.qkvh_linear", "n4.out_linear", "mlp.up_proj", "mlp.down_proj"):
        assert f"n4b.n4d.0.{name}.bias" in keys
    assert "n4b.n4d.0.pre_n4_norm.bias" not in keys  # the reduced DyT has no beta
