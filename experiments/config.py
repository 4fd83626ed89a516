"""Ablation configuration: dataclasses, size presets, YAML files and ``key=value`` overrides.

Resolution order, each step overriding the previous one: the dataclass defaults, the size preset
(``--preset``, else the config file's ``preset`` key, else ``tiny``), the YAML config file, and the
command-line ``key=value`` overrides. Unknown keys fail at once with the list of valid keys.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments.data import DataConfig
from n4.config import PUBLISHED_ATTENTION_OPTIONS, PUBLISHED_NORM_OPTIONS

AXES = ("attention", "mlp", "norm", "position")

# The position value that resolves per attention through AblationConfig.position_defaults.
AUTO_POSITION = "auto"
DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class ModelSizes:
    """The size fields of ``n4.ModelConfig``; the variant names come from the ablation axes."""

    hidden_size: int = 96
    inter_size: int = 192  # the baseline MLP's width; other MLPs are resized to match its parameters
    heads: int = 4
    layers: int = 3
    kv_heads: int | None = 2
    window: int = 32
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    kv_lora_rank: int | None = None
    q_lora_rank: int = 0
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    bias: bool = False
    dropout: float = 0.0


@dataclass
class TrainConfig:
    """Optimiser, schedule, batch shape and evaluation settings, identical for every run."""

    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-9
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 25  # optimizer steps between validation evaluations
    eval_windows: int = 64  # fixed validation windows of seq_len tokens
    eval_batch_size: int = 32
    log_interval: int = 10  # optimizer steps between train/loss, lr and tokens_per_s points
    dtype: str = "float32"  # "bfloat16" turns on autocast
    device: str = "auto"
    threads: int | None = None  # torch.set_num_threads; None keeps PyTorch's default
    compile: bool = False  # torch.compile the model; no gain measured on CPU (docs/benchmarks.md)
    peak_flops: float | None = None  # FLOP/s for model FLOPs utilisation; None measures a matmul peak once per process
    checkpoint_interval: int | None = None  # steps between resume states of an unfinished run; None: eval_interval

    # Settings that change how fast a run goes or how often it saves, not what it computes. They
    # are left out of run keys and config fingerprints.
    NOT_IN_KEYS = ("threads", "checkpoint_interval")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


TUNABLE = ("lr",)  # hyperparameters that --tune can search


@dataclass
class TuneConfig:
    """Per-variant hyperparameter search with Optuna (``--tune lr --trials N``)."""

    params: list[str] = field(default_factory=list)  # what to tune; empty: no tuning, use train.lr
    trials: int = 8  # finished (complete or pruned) trials per variant
    lr_min: float = 1e-4  # the learning rate is drawn log-uniformly from [lr_min, lr_max]
    lr_max: float = 3e-2
    sampler_seed: int = 0  # seed of the TPE sampler, so a study is reproducible
    startup_trials: int = 3  # trials per study drawn at random and never pruned; TPE models the rest
    pruning_warmup_steps: int | None = None  # steps before a trial can be pruned; None: train.steps // 4


@dataclass
class AblationConfig:
    """One ablation: data, sizes, training settings, the baseline and the axes varied around it."""

    name: str = "default"
    preset: str = "tiny"
    seeds: list[int] = field(default_factory=lambda: [0])
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSizes = field(default_factory=ModelSizes)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    baseline: dict[str, str] = field(
        default_factory=lambda: {"attention": "n4", "mlp": "asgg", "norm": "dyt", "position": AUTO_POSITION}
    )
    axes: dict[str, list[str]] = field(
        default_factory=lambda: {
            "attention": ["n4", "mha", "swa", "gqa", "mla"],
            "mlp": ["asgg", "swiglu", "gelu"],
            "norm": ["dyt", "layernorm", "rmsnorm"],
            "position": [AUTO_POSITION],
        }
    )
    # What position "auto" means for each attention. N4 as published uses none, and so do the fused
    # N4 variants, because their key running mean carries order information. The baselines use
    # RoPE, and "*" covers every attention not listed.
    position_defaults: dict[str, str] = field(
        default_factory=lambda: {"*": "rope", "n4": "none", "n4-swa": "none", "n4-gqa": "none", "n4-mla": "none"}
    )
    # Builder options per axis and variant name; the defaults reproduce the published N4 choices.
    options: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {
            "attention": {"n4": dict(PUBLISHED_ATTENTION_OPTIONS)},
            "mlp": {},
            "norm": {"dyt": dict(PUBLISHED_NORM_OPTIONS)},
        }
    )
    match_mlp_params: bool = True  # resize each MLP's inter_size to the baseline MLP's parameter count
    save_checkpoints: bool = True  # save each finished model (safetensors + config) to results and MLflow
    results_dir: str = "results"
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<results_dir>/mlflow.db
    optuna_storage: str | None = None  # None: $N4_OPTUNA_STORAGE, else sqlite:///<results_dir>/optuna.db
    heartbeat_interval: int = 30  # seconds between a worker's heartbeats in the work queue
    grace_period: int = 120  # seconds without a heartbeat after which another worker takes a unit over

    # Settings that decide where results go and how workers coordinate, not what a run computes;
    # they are left out of the config fingerprint.
    NOT_IN_FINGERPRINT = ("results_dir", "tracking_uri", "optuna_storage", "preset", "heartbeat_interval", "grace_period")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Return a hash of every setting that changes what the ablation computes."""
        values = self.to_dict()
        values["data"].pop("cache_dir", None)
        for key in self.NOT_IN_FINGERPRINT:
            values.pop(key, None)
        for key in TrainConfig.NOT_IN_KEYS:
            values["train"].pop(key, None)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


# Size presets. "seed" is the published 127M-parameter N4 run (see the README). Its published step
# count (976) disagrees with its token budget (0.5B), so it trains 7630 steps of 8 x 16 x 512 tokens.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        "data": {"vocab_size": 512},
        "model": {"hidden_size": 32, "inter_size": 64, "heads": 2, "layers": 1, "kv_heads": 1, "window": 8},
        "train": {
            "steps": 6, "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "lr": 3e-3,
            "eval_interval": 3, "eval_windows": 4, "eval_batch_size": 4, "log_interval": 2,
        },
    },
    # The defaults of ModelSizes and TrainConfig are the tiny sizes: the 45-run grid takes about
    # 25 minutes on 2 CPU cores.
    "tiny": {"data": {"vocab_size": 2048}},
    "small": {
        "data": {"vocab_size": 8192},
        "model": {"hidden_size": 256, "inter_size": 512, "heads": 4, "layers": 6, "kv_heads": 2, "window": 128},
        "train": {
            "steps": 2000, "batch_size": 32, "seq_len": 256, "warmup_steps": 100, "lr": 2e-3,
            "eval_interval": 100, "eval_windows": 128, "eval_batch_size": 32, "log_interval": 20,
        },
    },
    "seed": {
        "data": {"vocab_size": 32768},
        "model": {
            "hidden_size": 768, "inter_size": 1536, "heads": 6, "layers": 18, "kv_heads": 2,
            "window": 256, "max_seq_len": 512,
        },
        "train": {
            "steps": 7630, "batch_size": 8, "grad_accum": 16, "seq_len": 512, "lr": 6e-4,
            "warmup_steps": 2000, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-9,
            "eval_interval": 250, "eval_windows": 256, "eval_batch_size": 16, "log_interval": 10,
            "dtype": "bfloat16",
        },
    },
}

class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading exponent floats without a dot (``1e-3``) as numbers.

    PyYAML follows YAML 1.1, where ``1e-3`` is a string; YAML 1.2 reads it as a float, and so do
    researchers writing ``train.lr=1e-3``.
    """


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text):
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


_SECTIONS = {"data": DataConfig, "model": ModelSizes, "train": TrainConfig, "tune": TuneConfig}


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _merge_section(section: str, current: Any, values: Any) -> Any:
    """Return a copy of dataclass ``current`` with ``values`` set, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ValueError(f"config section {section!r} must be a mapping, got {values!r}")
    known = _field_names(type(current))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"valid keys in {section}: {', '.join(known)}"
        )
    return dataclasses.replace(current, **values)


def apply_values(config: AblationConfig, values: dict[str, Any], origin: str) -> AblationConfig:
    """Return ``config`` with a nested dict of values applied; ``origin`` names them in errors."""
    config = copy.deepcopy(config)
    known = _field_names(AblationConfig)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)} in {origin}; valid keys: {', '.join(known)}")
    for key, value in values.items():
        if key in _SECTIONS:
            setattr(config, key, _merge_section(key, getattr(config, key), value or {}))
        elif key in ("baseline", "axes", "position_defaults"):
            if not isinstance(value, dict):
                raise ValueError(f"{key} in {origin} must be a mapping of axis to value(s), got {value!r}")
            bad = sorted(set(value) - set(AXES)) if key != "position_defaults" else []
            if bad:
                raise ValueError(f"unknown axis {', '.join(bad)} in {origin}; valid axes: {', '.join(AXES)}")
            merged = dict(getattr(config, key))
            merged.update(value)
            setattr(config, key, merged)
        elif key == "options":
            if not isinstance(value, dict):
                raise ValueError(f"options in {origin} must be a mapping, got {value!r}")
            bad = sorted(set(value) - {"attention", "mlp", "norm"})
            if bad:
                raise ValueError(f"unknown options axis {', '.join(bad)} in {origin}; valid: attention, mlp, norm")
            for axis, per_name in value.items():
                # Merged per variant name, so setting layernorm's options keeps dyt's.
                config.options.setdefault(axis, {}).update(per_name or {})
        else:
            setattr(config, key, value)
    return config


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    target = values
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"override {dotted!r} sets a key below a non-mapping value")
    target[parts[-1]] = value


def _expand_short_key(key: str) -> str:
    """Map a bare key such as ``steps`` to ``train.steps`` when exactly one section has it."""
    if "." in key or key in _field_names(AblationConfig):
        return key
    owners = [section for section, cls in _SECTIONS.items() if key in _field_names(cls)]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    if len(owners) > 1:
        raise ValueError(f"override key {key!r} is ambiguous; write one of: {', '.join(f'{o}.{key}' for o in owners)}")
    valid = _field_names(AblationConfig) + [f"{s}.<key>" for s in _SECTIONS]
    raise ValueError(f"unknown override key {key!r}; valid keys: {', '.join(valid)}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings into a nested dict; values are read as YAML (``[a, b]``, ``null``)."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"invalid override {item!r}: expected key=value, for example train.steps=100")
        try:
            value = _load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ValueError(f"invalid override {item!r}: the value is not valid YAML ({error.problem})") from None
        _set_dotted(values, _expand_short_key(key.strip()), value)
    return values


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    with path.open() as handle:
        try:
            values = _load_yaml(handle) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a YAML mapping, got {type(values).__name__}")
    return values


def parse_seeds(text: str) -> list[int]:
    """Parse ``--seeds``: one integer N means seeds 0..N-1; a comma-separated list gives the seeds."""
    try:
        if "," in text:
            seeds = [int(part) for part in text.split(",") if part.strip()]
        else:
            count = int(text)
            if count < 1:
                raise ValueError
            seeds = list(range(count))
    except ValueError:
        raise ValueError(f"invalid --seeds {text!r}: expected a count of at least 1 such as 3, or a list such as 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"invalid --seeds {text!r}: a seed is repeated")
    return seeds


def resolve_config(
    config_file: str | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    name: str | None = None,
    seeds: list[int] | None = None,
) -> AblationConfig:
    """Build the ablation config from defaults, preset, file and overrides, then validate it."""
    file_values = load_config_file(config_file) if config_file else {}
    preset_name = preset or file_values.get("preset") or "tiny"
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; valid presets: {', '.join(PRESETS)}")

    config = AblationConfig(preset=preset_name)
    config = apply_values(config, PRESETS[preset_name], f"preset {preset_name!r}")
    file_values = {k: v for k, v in file_values.items() if k != "preset"}
    if file_values:
        config = apply_values(config, file_values, str(config_file))
    if overrides:
        config = apply_values(config, parse_overrides(overrides), "command-line overrides")
    if name is not None:
        config.name = name
    if seeds is not None:
        config.seeds = seeds
    validate(config)
    return config


def validate(config: AblationConfig) -> None:
    """Raise ValueError for any invalid value, before any data is loaded or any run starts."""
    import variants

    if not config.name or any(ch in config.name for ch in '/\\:*?"<>|') or config.name.startswith("."):
        raise ValueError(f"invalid name {config.name!r}: use letters, digits, '-', '_' or '.', not starting with '.'")
    if not isinstance(config.seeds, list) or not config.seeds or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in config.seeds
    ):
        raise ValueError(f"invalid seeds {config.seeds!r}: expected a non-empty list of non-negative integers")

    registries = {"attention": variants.ATTENTION, "mlp": variants.MLP, "norm": variants.NORM, "position": variants.POSITION}
    missing = [axis for axis in AXES if axis not in config.baseline]
    if missing:
        raise ValueError(f"baseline is missing axis {', '.join(missing)}; it needs a value for each of {', '.join(AXES)}")
    for axis in AXES:
        values = config.axes.get(axis, [config.baseline[axis]])
        if isinstance(values, str):
            values = [values]
            config.axes[axis] = values
        if not isinstance(values, list) or not values:
            raise ValueError(f"axes.{axis}={values!r} is invalid: expected a non-empty list of names")
        for value in [config.baseline[axis], *values]:
            if axis == "position" and value == AUTO_POSITION:
                continue
            registries[axis][value]  # raises UnknownVariantError with the valid names
        if len(set(values)) != len(values):
            raise ValueError(f"axes.{axis}={values!r} repeats a name")
    if "*" not in config.position_defaults:
        raise ValueError("position_defaults needs a '*' entry: the position of attentions not listed")
    for attention, position in config.position_defaults.items():
        if attention != "*":
            registries["attention"][attention]
        registries["position"][position]

    # Arguments that the model passes itself, so they are not options.
    builder_arguments = {"attention": ("config",), "mlp": ("hidden_size", "inter_size", "bias"), "norm": ("dim",)}
    for axis, per_name in config.options.items():
        for variant, opts in per_name.items():
            if not isinstance(opts, dict):
                raise ValueError(f"options.{axis}.{variant} must be a mapping of option to value, got {opts!r}")
            registries[axis].check_options(variant, opts, fixed=builder_arguments[axis])

    train = config.train
    positive = ("steps", "batch_size", "grad_accum", "seq_len", "eval_interval", "eval_windows", "eval_batch_size", "log_interval")
    for key in positive:
        value = getattr(train, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train.{key}={value!r} is invalid: expected a positive integer")
    interval = train.checkpoint_interval
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
        raise ValueError(f"train.checkpoint_interval={interval!r} is invalid: expected a positive integer or null")
    if not (isinstance(train.lr, (int, float)) and train.lr > 0):
        raise ValueError(f"train.lr={train.lr!r} is invalid: expected a positive number")
    if not 0 <= train.min_lr_ratio <= 1:
        raise ValueError(f"train.min_lr_ratio={train.min_lr_ratio!r} is invalid: expected a number in [0, 1]")
    if not isinstance(train.warmup_steps, int) or train.warmup_steps < 0:
        raise ValueError(f"train.warmup_steps={train.warmup_steps!r} is invalid: expected an integer >= 0")
    if train.grad_clip < 0 or train.weight_decay < 0 or train.eps <= 0:
        raise ValueError("train.grad_clip and train.weight_decay must be >= 0 and train.eps > 0")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(train, key) < 1:
            raise ValueError(f"train.{key}={getattr(train, key)!r} is invalid: expected 0 <= value < 1")
    if train.dtype not in DTYPES:
        raise ValueError(f"train.dtype={train.dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    if train.device not in DEVICES and not train.device.startswith("cuda:"):
        raise ValueError(f"train.device={train.device!r} is invalid; allowed: {', '.join(DEVICES)} or cuda:N")
    if config.model.max_seq_len < train.seq_len:
        raise ValueError(
            f"model.max_seq_len={config.model.max_seq_len} is below train.seq_len={train.seq_len}; "
            f"raise model.max_seq_len or lower train.seq_len"
        )
    validate_tune(config.tune, train)
    for key in ("heartbeat_interval", "grace_period"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} is invalid: expected a positive number of seconds")
    if config.grace_period <= config.heartbeat_interval:
        raise ValueError(
            f"grace_period={config.grace_period} must be longer than heartbeat_interval={config.heartbeat_interval}, "
            f"or live workers would lose their units"
        )
    config.data.validate()


def validate_tune(tune: TuneConfig, train: TrainConfig) -> None:
    if not isinstance(tune.params, list) or any(param not in TUNABLE for param in tune.params):
        raise ValueError(f"tune.params={tune.params!r} is invalid; allowed: a list of {', '.join(TUNABLE)}")
    for key in ("trials", "startup_trials"):
        value = getattr(tune, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "trials" else 0):
            raise ValueError(f"tune.{key}={value!r} is invalid: expected an integer >= {1 if key == 'trials' else 0}")
    if not (isinstance(tune.lr_min, (int, float)) and isinstance(tune.lr_max, (int, float)) and 0 < tune.lr_min < tune.lr_max):
        raise ValueError(f"tune.lr_min={tune.lr_min!r} and tune.lr_max={tune.lr_max!r} are invalid: expected 0 < lr_min < lr_max")
    warmup = tune.pruning_warmup_steps
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= train.steps):
        raise ValueError(f"tune.pruning_warmup_steps={warmup!r} is invalid: expected an integer in [0, train.steps={train.steps}] or null")
