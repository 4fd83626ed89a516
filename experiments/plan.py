"""Expand an ablation config into the list of runs: variant cells, seeds and matched model configs."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass

import torch

import variants
from experiments.config import AUTO_POSITION, AXES, AblationConfig, TrainConfig
from n4.config import ModelConfig


@dataclass(frozen=True)
class RunSpec:
    """One training run: a variant (one name per axis), a model-initialisation seed and its model."""

    variant: tuple[tuple[str, str], ...]  # ((axis, name), ...) in AXES order
    seed: int
    model: ModelConfig
    is_baseline: bool

    @property
    def axes(self) -> dict[str, str]:
        return dict(self.variant)

    @property
    def label(self) -> str:
        """Variant label without the seed, as used in figure legends and tables."""
        return " ".join(f"{axis}={name}" for axis, name in self.variant)

    @property
    def slug(self) -> str:
        """File-name form of the run name, such as ``gqa-swiglu-rmsnorm-rope-seed0``."""
        return "-".join(name for _, name in self.variant) + f"-seed{self.seed}"

    @property
    def run_name(self) -> str:
        return f"{self.label} seed={self.seed}"

    def key(self, config: AblationConfig, corpus_fingerprint: str) -> str:
        """Return a hash of everything that determines this run's result."""
        train = config.to_dict()["train"]
        for name in TrainConfig.NOT_IN_KEYS:
            train.pop(name, None)
        payload = {
            "model": self.model.to_dict(),
            "train": train,
            "data_seed": config.data.seed,
            "corpus": corpus_fingerprint,
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def resolve_position(config: AblationConfig, cell: dict[str, str]) -> dict[str, str]:
    """Replace position "auto" by the attention's default from ``config.position_defaults``."""
    if cell["position"] != AUTO_POSITION:
        return cell
    defaults = config.position_defaults
    return {**cell, "position": defaults.get(cell["attention"], defaults["*"])}


def resolved_baseline(config: AblationConfig) -> dict[str, str]:
    return resolve_position(config, dict(config.baseline))


def variant_cells(config: AblationConfig, grid: bool) -> list[dict[str, str]]:
    """Return the variants to train: the full product of the axes, or one factor at a time.

    One factor at a time is the baseline followed, axis by axis, by the baseline with that axis
    changed to each of its other values. Position "auto" is resolved per attention, and cells that
    become identical after that are kept once.
    """
    if grid:
        values = [config.axes[axis] for axis in AXES]
        cells = [dict(zip(AXES, combination)) for combination in itertools.product(*values)]
    else:
        cells = [dict(config.baseline)]
        for axis in AXES:
            for name in config.axes[axis]:
                if name != config.baseline[axis]:
                    cells.append({**config.baseline, axis: name})

    unique: dict[tuple[str, ...], dict[str, str]] = {}
    for cell in cells:
        resolved = resolve_position(config, cell)
        unique.setdefault(tuple(resolved[axis] for axis in AXES), resolved)
    return list(unique.values())


def mlp_parameter_count(name: str, hidden_size: int, inter_size: int, bias: bool, options: dict) -> int:
    # Built on the meta device, so no memory is allocated and no initialiser runs on real data.
    with torch.device("meta"):
        module = variants.MLP[name](hidden_size, inter_size, bias=bias, **options)
    return sum(p.numel() for p in module.parameters())


def matched_inter_size(name: str, target: int, hidden_size: int, bias: bool, options: dict) -> int:
    """Return the inter_size at which MLP ``name`` has the parameter count closest to ``target``.

    An MLP's parameter count is linear in its width, so two probe widths give the line to solve.
    """
    low, high = 64, 128
    count_low = mlp_parameter_count(name, hidden_size, low, bias, options)
    count_high = mlp_parameter_count(name, hidden_size, high, bias, options)
    slope = (count_high - count_low) / (high - low)
    if slope <= 0:
        raise ValueError(f"mlp {name!r} has a parameter count that does not grow with inter_size; set match_mlp_params=false")
    estimate = max(1, round(low + (target - count_low) / slope))
    candidates = range(max(1, estimate - 1), estimate + 2)
    return min(candidates, key=lambda m: abs(mlp_parameter_count(name, hidden_size, m, bias, options) - target))


def model_config_for(config: AblationConfig, cell: dict[str, str], vocab_size: int) -> ModelConfig:
    """Build the validated ModelConfig of one variant, with its MLP resized if matching is on."""
    sizes = config.model.__dict__.copy()
    mlp_options = config.options.get("mlp", {}).get(cell["mlp"], {})
    if config.match_mlp_params and cell["mlp"] != config.baseline["mlp"]:
        baseline_options = config.options.get("mlp", {}).get(config.baseline["mlp"], {})
        target = mlp_parameter_count(
            config.baseline["mlp"], sizes["hidden_size"], sizes["inter_size"], sizes["bias"], baseline_options
        )
        sizes["inter_size"] = matched_inter_size(cell["mlp"], target, sizes["hidden_size"], sizes["bias"], mlp_options)
    return ModelConfig(
        vocab_size=vocab_size,
        attention=cell["attention"],
        mlp=cell["mlp"],
        norm=cell["norm"],
        position=cell["position"],
        attention_options=dict(config.options.get("attention", {}).get(cell["attention"], {})),
        mlp_options=dict(mlp_options),
        norm_options=dict(config.options.get("norm", {}).get(cell["norm"], {})),
        **sizes,
    )


def check_builds(model: ModelConfig) -> None:
    """Build the model on the meta device (no memory, no initialisation) to surface errors early."""
    from n4.model import CausalLM

    try:
        with torch.device("meta"):
            CausalLM(model)
    except (TypeError, ValueError) as error:
        variant = f"attention={model.attention} mlp={model.mlp} norm={model.norm} position={model.position}"
        raise ValueError(f"cannot build {variant}: {error}") from error


def build_plan(config: AblationConfig, grid: bool, vocab_size: int) -> list[RunSpec]:
    """Return every run of the ablation, variants in plan order and seeds inside each variant.

    Each variant's ModelConfig is validated and its model built once on the meta device, so an
    invalid combination or option value fails here, before any data is loaded or any run starts.
    """
    runs = []
    for cell in variant_cells(config, grid):
        model = model_config_for(config, cell, vocab_size)
        check_builds(model)
        variant = tuple((axis, cell[axis]) for axis in AXES)
        is_baseline = cell == resolved_baseline(config)
        for seed in config.seeds:
            runs.append(RunSpec(variant=variant, seed=seed, model=model, is_baseline=is_baseline))
    return runs
