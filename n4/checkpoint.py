"""Save and load models as safetensors weights plus a JSON config, with no pickle involved.

A checkpoint directory contains:

    model.safetensors   the state dict (safetensors format, so loading runs no code)
    config.json         {"format", "format_version", "model_class", "config", "dtype",
                         "tied_weights", "tokenizer", "extra"}
    tokenizer.json      optional, a ``tokenizers`` tokenizer copied in by ``save_checkpoint``

``model_class`` is "CausalLM" or "N4C". An N4C checkpoint keeps the published key names
(``n4b.n4d.{i}.n4.qkvh_linear.weight``, ...), so its weights also load into the published code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from n4.config import ModelConfig
from n4.model import CausalLM
from n4.published import N4C

if TYPE_CHECKING:
    from tokenizers import Tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "n4-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(
    model: CausalLM,
    directory: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str] | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model's weights, its config and optionally its tokenizer into ``directory``.

    ``extra`` is any JSON-serialisable dict (training step, data fingerprint, ...) stored in
    config.json; ``read_checkpoint_metadata`` returns it. Weights that share memory (tied
    weights) are stored once and restored under every name. An existing checkpoint in
    ``directory`` raises FileExistsError unless ``overwrite`` is true. Every input is checked
    before anything is written. Each file is written under a temporary name and then renamed, so
    no file is ever half-written, and config.json comes last. Returns the directory.
    """
    directory = Path(directory)
    if not isinstance(model, CausalLM):
        raise TypeError(f"save_checkpoint expects a CausalLM (or N4C), got {type(model).__name__}")
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer file {tokenizer_path} not found")
    existing = [name for name in (WEIGHTS_FILE, CONFIG_FILE) if (directory / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{directory} already contains a checkpoint ({', '.join(existing)}): choose another directory "
            f"or pass overwrite=True"
        )

    # Tensors and metadata, prepared in memory so that any error comes before the first write.
    tensors, tied = _unique_contiguous_tensors(model.state_dict())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": "N4C" if isinstance(model, N4C) else "CausalLM",
        "config": model.config.to_dict(),
        "dtype": dtypes[0] if len(dtypes) == 1 else None,
        "tied_weights": tied,
        "tokenizer": TOKENIZER_FILE if tokenizer_path is not None else None,
        "extra": extra if extra is not None else {},
    }
    try:
        config_text = json.dumps(metadata, indent=2, sort_keys=False) + "\n"
    except TypeError as error:
        raise ValueError(f"extra must be JSON-serialisable: {error}") from None

    # Write each file under a temporary name in the directory, then rename it into place.
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomically(directory / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
    if tokenizer_path is not None:
        _write_atomically(directory / TOKENIZER_FILE, lambda path: shutil.copyfile(tokenizer_path, path))
    elif (directory / TOKENIZER_FILE).exists():
        # An overwritten checkpoint without a tokenizer must not keep an older, unrelated one.
        (directory / TOKENIZER_FILE).unlink()
    _write_atomically(directory / CONFIG_FILE, lambda path: Path(path).write_text(config_text, encoding="utf-8"))
    return directory


def read_checkpoint_metadata(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the parsed config.json of a checkpoint, checked for its format; see the module docstring."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} not found")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {directory} is not a checkpoint written by save_checkpoint")
    try:
        metadata = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not an N4 checkpoint config: expected \"format\": \"{FORMAT}\"")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format_version {metadata.get('format_version')!r}; this code reads version "
            f"{FORMAT_VERSION}"
        )
    return metadata


def load_checkpoint(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[CausalLM, Tokenizer | None]:
    """Build the model a checkpoint describes, load its weights and return it with its tokenizer.

    The model comes back in eval mode, on ``device``, in the floating-point dtype it was saved in.
    Weights that were tied get equal values but separate tensors unless the model's constructor
    ties them. The tokenizer is None when the checkpoint has none. Raises FileNotFoundError for a missing
    directory or file and ValueError for an invalid config. Only JSON and safetensors are read, so
    a checkpoint cannot run code.
    """
    directory = Path(directory)
    metadata = read_checkpoint_metadata(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found: the checkpoint in {directory} has no weights")

    # The model, rebuilt from its config.
    config = ModelConfig.from_dict(metadata["config"])
    model_class = metadata.get("model_class")
    if model_class == "CausalLM":
        model = CausalLM(config)
    elif model_class == "N4C":
        model = N4C(config.vocab_size, config.hidden_size, config.inter_size, config.heads, config.layers, config.bias)
        if model.config != config:
            raise ValueError(f"{directory / CONFIG_FILE} describes an N4C whose config is not the published one")
    else:
        raise ValueError(f"model_class={model_class!r} in {directory / CONFIG_FILE} is invalid: expected CausalLM or N4C")
    if metadata.get("dtype") is not None:
        model.to(getattr(torch, metadata["dtype"]))

    # The weights, with tied names restored, loaded strictly so that any mismatch raises.
    state_dict = load_file(str(weights_path))
    for name, source in metadata.get("tied_weights", {}).items():
        state_dict[name] = state_dict[source]
    model.load_state_dict(state_dict, strict=True)
    model.to(device).eval()

    tokenizer = None
    if metadata.get("tokenizer") is not None:
        tokenizer_path = directory / metadata["tokenizer"]
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"{tokenizer_path} not found, although {directory / CONFIG_FILE} names it")
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    return model, tokenizer


def _unique_contiguous_tensors(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into contiguous tensors that share no memory, and a map of tied names.

    safetensors rejects tensors that share memory. A name whose tensor is the same view of the
    same memory as an earlier one (tied weights) is recorded as an alias of the earlier name.
    Any other tensor that is not contiguous, covers only part of its memory, or uses memory an
    earlier tensor already uses, is copied.
    """
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    views: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, ...]] = set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and view in views:
            tied[name] = views[view]
            continue
        views[view] = name

        covers_storage = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        if storage in storages or not tensor.is_contiguous() or not covers_storage:
            tensor = tensor.contiguous().clone()
        storages.add(storage)
        tensors[name] = tensor.to("cpu")
    return tensors, tied


def _write_atomically(path: Path, write: Any) -> None:
    """Call ``write(temporary_path)`` for a file beside ``path``, then rename it to ``path``."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        # mkstemp creates the file readable by its owner only. Others who share the results
        # folder must read the checkpoint too, so it gets the mode that the umask allows.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
