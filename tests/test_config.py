"""Ablation config resolution, run planning and the rejection of bad input before any work."""

import pytest
import yaml

import variants
from experiments.config import PRESETS, parse_overrides, parse_seeds, resolve_config, validate
from experiments.plan import build_plan, matched_inter_size, mlp_parameter_count, variant_cells


def test_defaults_are_tiny_preset_published_baseline():
    config = resolve_config()
    assert config.preset == "tiny"
    assert config.baseline == {"attention": "n4", "mlp": "asgg", "norm": "dyt", "position": "auto"}
    assert config.position_defaults["n4"] == "none"
    assert config.position_defaults["*"] == "rope"
    assert config.options["attention"]["n4"] == {"scale": "hidden_size"}
    assert config.options["norm"]["dyt"] == {"alpha_init": None, "bias": False}


def test_default_yaml_matches_defaults():
    from_file = resolve_config("experiments/configs/default.yaml")
    assert from_file.fingerprint() == resolve_config().fingerprint()


def test_preset_then_file_then_overrides(tmp_path):
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump({"preset": "smoke", "train": {"steps": 11, "lr": 0.01}}))
    config = resolve_config(str(path), overrides=["train.lr=0.02", "hidden_size=48"])
    assert config.model.heads == PRESETS["smoke"]["model"]["heads"]
    assert config.train.steps == 11
    assert config.train.lr == 0.02
    assert config.model.hidden_size == 48


def test_command_line_preset_wins_over_file(tmp_path):
    path = tmp_path / "ablation.yaml"
    path.write_text("preset: small\n")
    assert resolve_config(str(path), preset="smoke").preset == "smoke"


def test_override_values_parse_as_yaml():
    values = parse_overrides(["axes.attention=[n4, mha]", "model.kv_heads=null", "steps=5"])
    assert values == {"axes": {"attention": ["n4", "mha"]}, "model": {"kv_heads": None}, "train": {"steps": 5}}


def test_options_merge_per_variant():
    config = resolve_config(overrides=["options.norm.layernorm={eps: 0.001}"])
    assert config.options["norm"]["layernorm"] == {"eps": 0.001}
    assert config.options["norm"]["dyt"] == {"alpha_init": None, "bias": False}


def test_parse_seeds_count_and_list():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("4,7") == [4, 7]
    with pytest.raises(ValueError, match="'x'"):
        parse_seeds("x")
    with pytest.raises(ValueError, match="repeated"):
        parse_seeds("1,1")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stepz=3"], r"train\.stepz.*valid keys in train"),
        (["colour=red"], r"unknown override key 'colour'"),
        (["axes.attention=[n4, flash]"], r"unknown attention 'flash'; valid names: .*gqa.*mha"),
        (["baseline.norm=batchnorm"], r"unknown norm 'batchnorm'; valid names: .*dyt"),
        (["axes.speed=[1]"], r"unknown axis speed"),
        (["train.dtype=float16"], r"train\.dtype='float16'.*float32, bfloat16"),
        (["train.steps=0"], r"train\.steps=0"),
        (["model.window=0"], r"window=0.*>= 1"),
        (["options.attention.n4={scale: sqrt}"], r"cannot build attention=n4.*'sqrt'"),
        (["axes.attention=[n4"], r"invalid override 'axes.attention=\[n4': the value is not valid YAML"),
    ],
)
def test_bad_values_raise_naming_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        config = resolve_config(preset="smoke", overrides=overrides)
        build_plan(config, grid=True, vocab_size=config.data.vocab_size)


def test_kv_heads_not_dividing_heads_rejected():
    config = resolve_config(preset="smoke", overrides=["model.heads=4", "model.hidden_size=32", "model.kv_heads=3"])
    with pytest.raises(ValueError, match=r"kv_heads=3 does not divide heads=4; allowed values: \[1, 2, 4\]"):
        build_plan(config, grid=False, vocab_size=100)


def test_hidden_not_divisible_by_heads_rejected():
    config = resolve_config(preset="smoke", overrides=["model.hidden_size=30", "model.heads=4", "model.kv_heads=2"])
    with pytest.raises(ValueError, match=r"hidden_size=30 is not divisible by heads=4"):
        build_plan(config, grid=False, vocab_size=100)


def test_missing_data_file_rejected(tmp_path):
    missing = tmp_path / "absent.txt"
    with pytest.raises(ValueError, match="absent.txt"):
        resolve_config(overrides=[f"data.source={missing}"])


def test_unknown_option_for_variant_rejected():
    with pytest.raises(ValueError, match=r"unknown option\(s\) approximate for mlp 'gelu'"):
        resolve_config(preset="smoke", overrides=["options.mlp.gelu={approximate: tanh}"])


def test_one_factor_at_a_time_cells():
    config = resolve_config(preset="smoke", overrides=["axes.position=[none, rope]"])
    cells = variant_cells(config, grid=False)
    baseline = {"attention": "n4", "mlp": "asgg", "norm": "dyt", "position": "none"}
    assert cells[0] == baseline
    # Position none for n4 is the baseline itself, so the position axis adds only rope.
    assert len(cells) == 1 + 4 + 2 + 2 + 1
    for cell in cells[1:]:
        changed = [axis for axis in cell if cell[axis] != baseline[axis]]
        if cell["attention"] != "n4":
            assert changed == ["attention", "position"]
            assert cell["position"] == "rope"
        else:
            assert len(changed) == 1


def test_auto_position_resolves_per_attention():
    config = resolve_config(preset="smoke")
    positions = {cell["attention"]: cell["position"] for cell in variant_cells(config, grid=True)}
    assert positions == {"n4": "none", "mha": "rope", "swa": "rope", "gqa": "rope", "mla": "rope"}
    crossed = resolve_config(preset="smoke", overrides=["axes.position=[none, rope]"])
    assert len(variant_cells(crossed, grid=True)) == 90


def test_position_defaults_need_fallback():
    config = resolve_config(overrides=["position_defaults={mha: none}"])
    assert config.position_defaults["mha"] == "none"
    assert config.position_defaults["*"] == "rope"
    config.position_defaults = {"n4": "none"}
    with pytest.raises(ValueError, match=r"position_defaults needs a '\*' entry"):
        validate(config)


def test_position_defaults_reject_unknown_names():
    with pytest.raises(ValueError, match=r"unknown position 'alibi'"):
        resolve_config(overrides=["position_defaults={mha: alibi}"])


def test_grid_is_full_product():
    config = resolve_config(preset="smoke")
    cells = variant_cells(config, grid=True)
    assert len(cells) == 45
    assert len({tuple(sorted(c.items())) for c in cells}) == 45


def test_seeds_multiply_runs():
    config = resolve_config(preset="smoke", seeds=[0, 1])
    runs = build_plan(config, grid=False, vocab_size=100)
    assert len(runs) == 2 * 9
    assert {run.seed for run in runs} == {0, 1}
    assert sum(run.is_baseline for run in runs) == 2


def test_mlp_parameters_matched_to_asgg():
    config = resolve_config(preset="smoke", overrides=["model.hidden_size=64", "model.inter_size=96"])
    runs = {run.axes["mlp"]: run.model for run in build_plan(config, grid=False, vocab_size=100)}
    target = mlp_parameter_count("asgg", 64, 96, False, {})
    assert target == 4 * 64 * 96
    assert runs["swiglu"].inter_size == 128  # 3 d m' = 4 d m  ->  m' = 4/3 m
    assert runs["gelu"].inter_size == 192  # 2 d m' = 4 d m  ->  m' = 2 m
    for name, model in runs.items():
        count = mlp_parameter_count(name, 64, model.inter_size, False, {})
        assert abs(count - target) <= 64 * 3


def test_matched_inter_size_with_bias():
    target = mlp_parameter_count("asgg", 32, 50, True, {})
    width = matched_inter_size("gelu", target, 32, True, {})
    best = min(range(1, 400), key=lambda m: abs(mlp_parameter_count("gelu", 32, m, True, {}) - target))
    assert width == best


def test_registries_hold_design_names():
    assert {"n4", "mha", "swa", "gqa", "mla"} <= set(variants.ATTENTION)
    assert {"asgg", "swiglu", "gelu"} <= set(variants.MLP)
    assert {"dyt", "layernorm", "rmsnorm"} <= set(variants.NORM)
    assert {"none", "rope"} <= set(variants.POSITION)


def test_config_file_with_invalid_yaml_rejected(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: {steps: 4\n")
    with pytest.raises(ValueError, match=r"broken.yaml is not valid YAML"):
        resolve_config(str(path))


def test_exponent_without_dot_is_float():
    values = parse_overrides(["train.lr=1e-3", "tune.lr_max=3E2", "train.steps=12", "name=1e3abc"])
    assert values["train"]["lr"] == 0.001
    assert values["tune"]["lr_max"] == 300.0
    assert values["train"]["steps"] == 12
    assert values["name"] == "1e3abc"
