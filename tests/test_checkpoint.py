"""Checkpoints (safetensors weights plus JSON config) and the ``python -m n4.generate`` command line."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from n4 import N4C, CausalLM, ModelConfig
from n4.checkpoint import _unique_contiguous_tensors, load_checkpoint, read_checkpoint_metadata, save_checkpoint
from n4.generate import main

REPOSITORY = Path(__file__).resolve().parents[1]
TEXTS = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "To be, or not to be, that is the question.",
    "All the world's a stage, and all the men and women merely players.",
] * 5


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer of a few hundred tokens, trained on TEXTS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tokenizer.train_from_iterator(TEXTS, trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def make_model(vocab_size: int = 41, **overrides) -> CausalLM:
    values = dict(vocab_size=vocab_size, hidden_size=16, inter_size=24, heads=4, layers=2)
    values.update(overrides)
    torch.manual_seed(0)
    return CausalLM(ModelConfig(**values)).eval()


def input_ids(vocab_size: int = 41) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


# --- Save and load ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(attention="gqa", kv_heads=2, position="rope", mlp="swiglu", norm="rmsnorm", bias=True),
        dict(attention="n4-mla", q_lora_rank=6, norm="layernorm", attention_options={}),
        dict(attention="n4", attention_options={"scale": "hidden_size"}, norm_options={"alpha_init": None}),
    ],
)
def test_round_trip_gives_identical_logits(tmp_path, overrides):
    model = make_model(**overrides)
    save_checkpoint(model, tmp_path / "checkpoint")

    loaded, tokenizer = load_checkpoint(tmp_path / "checkpoint")

    assert tokenizer is None
    assert type(loaded) is CausalLM
    assert loaded.config == model.config
    assert not loaded.training
    assert torch.equal(loaded(input_ids()), model(input_ids()))
    for (name, tensor), (loaded_name, loaded_tensor) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == loaded_name
        assert torch.equal(tensor, loaded_tensor)


def test_n4c_keeps_published_key_names(tmp_path):
    torch.manual_seed(0)
    model = N4C(vocab_size=41, hidden_size=16, inter_size=24, heads=4, layers=2).eval()
    save_checkpoint(model, tmp_path)

    loaded, _ = load_checkpoint(tmp_path)
    with open(tmp_path / "model.safetensors", "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        stored_names = set(json.loads(handle.read(header_size))) - {"__metadata__"}

    assert type(loaded) is N4C
    assert stored_names == set(model.state_dict())
    assert "n4b.n4d.0.n4.qkvh_linear.weight" in stored_names
    assert torch.equal(loaded(input_ids()), model(input_ids()))


def test_bfloat16_model_keeps_its_dtype(tmp_path):
    model = make_model().to(torch.bfloat16)
    save_checkpoint(model, tmp_path)

    loaded, _ = load_checkpoint(tmp_path)

    assert read_checkpoint_metadata(tmp_path)["dtype"] == "bfloat16"
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded(input_ids()), model(input_ids()))


def test_tied_and_non_contiguous_weights(tmp_path):
    model = make_model(vocab_size=16, hidden_size=16)
    with torch.no_grad():
        # A transposed view (not contiguous), and lm_head tied to the embedding (shared memory).
        up = model.blocks[0].mlp.up_proj
        up.weight = torch.nn.Parameter(up.weight.detach().T.contiguous().T)
        model.lm_head.weight = model.embedding.weight
    assert not up.weight.is_contiguous()

    save_checkpoint(model, tmp_path)
    loaded, _ = load_checkpoint(tmp_path)

    assert read_checkpoint_metadata(tmp_path)["tied_weights"] == {"lm_head.weight": "embedding.weight"}
    assert torch.equal(loaded.lm_head.weight, model.embedding.weight)
    assert torch.equal(loaded.blocks[0].mlp.up_proj.weight, up.weight)
    assert torch.equal(loaded(input_ids(16)), model(input_ids(16)))


def test_overlapping_views_are_stored_apart(tmp_path):
    # Three names on one storage: the same view twice (tied) and a different view of it.
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    state_dict = {"a": base, "b": base, "c": base.view(-1)[2:6], "d": base.T}

    tensors, tied = _unique_contiguous_tensors(state_dict)
    save_file(tensors, str(tmp_path / "weights.safetensors"))
    loaded = load_file(str(tmp_path / "weights.safetensors"))

    assert tied == {"b": "a"}
    assert set(loaded) == {"a", "c", "d"}
    for name in ("a", "c", "d"):
        assert torch.equal(loaded[name], state_dict[name])


def test_loading_never_unpickles(tmp_path, monkeypatch):
    save_checkpoint(make_model(), tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint load must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded, _ = load_checkpoint(tmp_path)

    assert torch.equal(loaded(input_ids()), make_model()(input_ids()))


def test_tokenizer_and_extra_are_saved(tmp_path, tokenizer_path):
    save_checkpoint(make_model(vocab_size=300), tmp_path, tokenizer_path=tokenizer_path, extra={"step": 7})

    _, tokenizer = load_checkpoint(tmp_path)
    metadata = read_checkpoint_metadata(tmp_path)

    assert (tmp_path / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    assert tokenizer.encode(TEXTS[0]).ids == Tokenizer.from_file(str(tokenizer_path)).encode(TEXTS[0]).ids
    assert metadata["extra"] == {"step": 7}
    assert metadata["model_class"] == "CausalLM"


def test_files_get_umask_mode(tmp_path, tokenizer_path):
    previous = os.umask(0o022)
    try:
        save_checkpoint(make_model(vocab_size=300), tmp_path, tokenizer_path=tokenizer_path)
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644, "tokenizer.json": 0o644}


def test_existing_checkpoint_is_not_overwritten(tmp_path):
    first, second = make_model(), make_model(attention="mha")
    save_checkpoint(first, tmp_path)
    weights = (tmp_path / "model.safetensors").read_bytes()

    with pytest.raises(FileExistsError, match="already contains a checkpoint.*overwrite=True"):
        save_checkpoint(second, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == weights

    save_checkpoint(second, tmp_path, overwrite=True)
    assert load_checkpoint(tmp_path)[0].config.attention == "mha"


def test_invalid_inputs_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="extra must be JSON-serialisable"):
        save_checkpoint(make_model(), tmp_path / "a", extra={"tensor": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="tokenizer file .*missing.json not found"):
        save_checkpoint(make_model(), tmp_path / "b", tokenizer_path=tmp_path / "missing.json")

    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory .*nowhere not found"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_checkpoint(tmp_path)

    save_checkpoint(make_model(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        load_checkpoint(tmp_path)


def test_foreign_config_raises(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match='not an N4 checkpoint config: expected "format": "n4-checkpoint"'):
        load_checkpoint(tmp_path)


# --- Command line --------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path, tokenizer_path) -> Path:
    vocab_size = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    directory = tmp_path / "checkpoint"
    save_checkpoint(make_model(vocab_size=vocab_size, position="rope"), directory, tokenizer_path=tokenizer_path)
    return directory


def test_cli_prints_greedy_continuation(checkpoint, capsys):
    prompt = "To be, or"
    status = main(["--checkpoint", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0"])
    output = capsys.readouterr().out

    # The same continuation computed directly from the library.
    model, tokenizer = load_checkpoint(checkpoint)
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    continuation = tokenizer.decode(model.generate(ids, 6, temperature=0)[0, ids.shape[1] :].tolist())

    assert status == 0
    assert output == prompt + continuation + "\n"
    assert len(continuation) > 0


def test_cli_seed_repeats_sample(checkpoint, capsys):
    arguments = ["--checkpoint", str(checkpoint), "--prompt", "All the", "--max-new-tokens", "8"]
    arguments += ["--top-k", "20", "--top-p", "0.9", "--temperature", "1.5", "--seed", "3"]

    main(arguments)
    first = capsys.readouterr().out
    main(arguments + ["--no-cache"])
    second = capsys.readouterr().out

    assert first == second
    assert first.startswith("All the")


def test_cli_runs_as_module(checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "n4.generate", "--checkpoint", str(checkpoint), "--prompt", "Now is",
         "--max-new-tokens", "4", "--seed", "0"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Now is")
    assert len(result.stdout) > len("Now is\n")


def test_cli_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "hi"])

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"checkpoint directory {tmp_path / 'nowhere'} not found" in error
    assert "Traceback" not in error


def test_cli_checkpoint_without_tokenizer(tmp_path, capsys):
    save_checkpoint(make_model(), tmp_path)

    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path), "--prompt", "hi"])

    assert exit_info.value.code == 2
    assert "has no tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--temperature", "-1"], "temperature=-1.0 is invalid"),
        (["--top-p", "2"], "top_p=2.0 is invalid"),
        (["--eos-token", "<|nothing|>"], "is not a token of the checkpoint's tokenizer"),
    ],
)
def test_cli_invalid_arguments(checkpoint, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(checkpoint), "--prompt", "hi", *arguments])

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
