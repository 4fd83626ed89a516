"""analysis/: runs and histories read back from a real MLflow store, the results table, figures and the report.

The store is built through MlflowClient with the tags, params and metrics the runner writes, and
known values, so every statistic can be checked against a formula written here.
"""

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from scipy import stats

from analysis.figures import curve_points, heatmap_title
from analysis.report import main, write_report
from analysis.runs import load_history, load_runs
from analysis.tables import (
    SEED_STATISTICS_COLUMNS, ablation_kind, seed_statistics, variant_names, variant_table, varying_axes,
    write_seed_statistics,
)
from experiments.tracking import ABLATION_TAG, CONFIG_TAG, PARENT_TAG, RUN_KEY_TAG

AXES = ("attention", "mlp", "norm", "position")
BASELINE = {"attention": "n4", "mlp": "asgg", "norm": "dyt", "position": "none"}
TOKENS_PER_STEP = 100
T0 = 1_700_000_000_000  # ms since the epoch; run i starts at T0 + i * 100 s

# One factor at a time: (changed axis values, seed, val/loss at steps 0, 2, 4, tokens_per_s at
# steps 1, 2, 4, params, flops_per_token, peak_mem_mb, how the run ended).
RUNS = [
    ({}, 0, [5.0, 4.0, 3.0], [1000, 2000, 4000], 1000, 6000, 100.0, "finished"),
    ({}, 1, [5.0, 4.2, 3.2], [1000, 1000, 1000], 1000, 6000, 110.0, "finished"),
    ({"attention": "mha"}, 0, [5.0, 3.9, 2.8], [3000, 3000, 3000], 1200, 6600, 90.0, "finished"),
    ({"attention": "mha"}, 1, [5.0, 4.1, 3.1], [3000, 3000, 3000], 1200, 6600, 90.0, "finished"),
    ({"mlp": "swiglu"}, 0, [5.0, 4.0, 3.05], [2000, 2000, 2000], 1000, 6000, 100.0, "finished"),
    ({"mlp": "swiglu"}, 2, [5.0, 4.3, 3.25], [2000, 2000, 2000], 1000, 6000, 100.0, "finished"),
    ({"norm": "layernorm"}, 0, [5.0], [], 1000, 6000, 0.0, "killed"),  # interrupted, then retried:
    ({"norm": "layernorm"}, 0, [5.0, 4.4, 3.4], [2500, 2500, 2500], 1000, 6000, 120.0, "finished"),
    ({"norm": "rmsnorm"}, 0, [5.0, 4.6], [2000], 1000, 6000, 100.0, "failed"),
]
FAILURE = "non-finite loss nan at step 3"


def _child(client, experiment_id, parent_id, index, changes, seed, val, throughput, params, flops, memory, end):
    axes = {**BASELINE, **changes}
    label = " ".join(f"{axis}={axes[axis]}" for axis in AXES)
    run_key = f"key-{label}-{seed}"
    tags = {**axes, "seed": str(seed), RUN_KEY_TAG: run_key, ABLATION_TAG: "abl", "is_baseline": str(axes == BASELINE), PARENT_TAG: parent_id}
    start = T0 + index * 100_000
    run_id = client.create_run(experiment_id, start_time=start, tags=tags, run_name=f"{label} seed={seed}").info.run_id
    client.log_batch(run_id, params=[
        Param("ablation", "abl"), Param("seed", str(seed)), Param("model.attention", axes["attention"]),
        Param("model.hidden_size", "32"), Param("train.tokens_per_step", str(TOKENS_PER_STEP)),
    ])
    steps = [0, 2, 4][: len(val)]
    metrics = [Metric("val/loss", value, start + 1000 * step, step) for step, value in zip(steps, val)]
    metrics += [Metric("train/loss", 6.0 - step, start + 1000 * step - 100, step) for step in range(1, 2 * len(val) - 1)]
    metrics += [Metric("tokens_per_s", value, start + 1000 * step - 50, step) for step, value in zip([1, 2, 4], throughput)]
    metrics += [Metric("lr", 0.001 * step, start + 1000 * step - 50, step) for step in [1, 2, 4][: len(throughput)]]
    if end != "killed":
        last = steps[-1]
        final = val[-1] if end == "finished" else float("nan")
        metrics += [Metric(name, value, start + 1000 * last, last) for name, value in
                    [("final_val_loss", final), ("params", params), ("flops_per_token", flops), ("peak_mem_mb", memory)]]
        reason = FAILURE if end == "failed" else ""
        client.log_batch(run_id, tags=[RunTag("status", end), RunTag("failure_reason", reason), RunTag("data_fingerprint", "abc")])
    client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id, status={"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}[end], end_time=start + 5000)
    return run_id


def _ablation(client, name, artifacts, runs):
    experiment_id = client.create_experiment(name, artifact_location=artifacts.as_uri())
    parent_id = client.create_run(experiment_id, start_time=T0 - 1000, tags={ABLATION_TAG: name, CONFIG_TAG: "f"}, run_name=name).info.run_id
    child_ids = [_child(client, experiment_id, parent_id, i, *spec) for i, spec in enumerate(runs)]
    return parent_id, child_ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with the one-factor ablation ``abl`` and a 2 x 2 grid ``grid``, reported by the CLI."""
    root = tmp_path_factory.mktemp("analysis")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    parent_id, child_ids = _ablation(client, "abl", root / "artifacts", RUNS)
    grid = [
        ({"attention": attention, "mlp": mlp}, 0, [5.0, 4.0, loss], [2000, 2000, 2000], 1000, 6000, 100.0, "finished")
        for (attention, mlp), loss in zip([("n4", "asgg"), ("n4", "swiglu"), ("mha", "asgg"), ("mha", "swiglu")], [3.0, 3.1, 2.9, 3.3])
    ]
    grid_parent, _ = _ablation(client, "grid", root / "grid-artifacts", grid)
    code = main(["abl", "--tracking-uri", uri, "--results-dir", str(root / "results")])
    return {"uri": uri, "root": root, "client": client, "parent": parent_id, "children": child_ids, "grid_parent": grid_parent, "code": code}


def _half_width(values):
    values = np.asarray(values, dtype=float)
    return stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))


# Loading.

def test_runs_frame_holds_every_child(store):
    runs = load_runs(store["uri"], "abl")
    assert len(runs) == len(RUNS)
    assert list(runs["run_id"]) == store["children"]
    assert set(runs["parent_run_id"]) == {store["parent"]}
    assert list(runs["seed"]) == [spec[1] for spec in RUNS]
    assert list(runs["status"]) == [spec[7] for spec in RUNS]
    assert list(runs["mlflow_status"]) == ["FINISHED"] * 6 + ["KILLED", "FINISHED", "FAILED"]
    assert list(runs["superseded"]) == [False] * 6 + [True, False, False]
    assert list(runs["is_baseline"]) == [True, True] + [False] * 7
    assert list(runs["attention"]) == ["n4", "n4", "mha", "mha"] + ["n4"] * 5
    assert runs.loc[8, "norm"] == "rmsnorm"
    assert runs.loc[8, "failure_reason"] == FAILURE
    assert math.isnan(runs.loc[8, "final_val_loss"])
    assert runs.loc[0, "run_name"] == "attention=n4 mlp=asgg norm=dyt position=none seed=0"
    assert runs.loc[0, "label"] == "attention=n4 mlp=asgg norm=dyt position=none"
    assert list(runs["final_val_loss"][:6]) == [3.0, 3.2, 2.8, 3.1, 3.05, 3.25]
    assert list(runs["params"][:3]) == [1000, 1000, 1200]
    assert runs.loc[2, "flops_per_token"] == 6600
    assert runs.loc[1, "peak_mem_mb"] == 110.0
    assert list(runs["tokens_per_step"].unique()) == [TOKENS_PER_STEP]
    assert runs.loc[0, "param.model.hidden_size"] == "32"
    assert runs.loc[0, "metric.final_val_loss"] == 3.0
    assert runs.loc[0, "start_time"] == pd.Timestamp(T0, unit="ms", tz="UTC")


def test_runs_of_one_parent(store):
    assert len(load_runs(store["uri"], "grid", store["grid_parent"])) == 4
    assert load_runs(store["uri"], "grid", store["parent"]).empty


def test_history_frame_holds_every_point(store):
    run_id = store["children"][0]
    history = load_history(store["uri"], [run_id])
    assert sorted(history["metric"].unique()) == ["lr", "tokens_per_s", "train/loss", "val/loss"]
    val = history[history["metric"] == "val/loss"]
    assert list(val["step"]) == [0, 2, 4]
    assert list(val["tokens"]) == [0, 200, 400]
    assert list(val["wall_s"]) == [0.0, 2.0, 4.0]
    assert list(val["value"]) == [5.0, 4.0, 3.0]
    train = history[history["metric"] == "train/loss"]
    assert list(train["step"]) == [1, 2, 3, 4]
    assert list(train["wall_s"]) == [0.9, 1.9, 2.9, 3.9]
    assert list(train["value"]) == [5.0, 4.0, 3.0, 2.0]
    assert list(history[history["metric"] == "tokens_per_s"]["value"]) == [1000, 2000, 4000]


def test_missing_store_rejected(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_runs(f"sqlite:///{tmp_path / 'none.db'}", "abl")
    assert not (tmp_path / "none.db").exists()


def test_unknown_experiment_rejected(store):
    with pytest.raises(ValueError, match="'nope' not found.*abl, .*grid"):
        load_runs(store["uri"], "nope")


# The table.

@pytest.fixture(scope="module")
def table(store):
    runs = load_runs(store["uri"], "abl")
    history = load_history(store["uri"], runs["run_id"])
    return variant_table(runs, history).set_index("variant")


def test_table_rows_and_status(table):
    assert list(table.index) == [
        "baseline (n4, asgg, dyt, none)", "attention=mha", "mlp=swiglu", "norm=layernorm", "norm=rmsnorm",
    ]
    assert list(table["status"]) == ["finished"] * 4 + ["failed"]
    assert table.loc["norm=rmsnorm", "failure_reason"] == f"seed 0: {FAILURE}"
    assert list(table["n_runs"]) == [2, 2, 2, 1, 1]
    assert list(table["n_finished"]) == [2, 2, 2, 1, 0]
    assert list(table["seeds"]) == ["0,1", "0,1", "0,2", "0", "0"]


def test_table_means_and_intervals(table):
    for variant, losses in [("baseline (n4, asgg, dyt, none)", [3.0, 3.2]), ("attention=mha", [2.8, 3.1]), ("mlp=swiglu", [3.05, 3.25])]:
        row = table.loc[variant]
        assert row["final_val_loss"] == pytest.approx(np.mean(losses), abs=1e-12)
        assert row["final_val_loss_ci"] == pytest.approx(_half_width(losses), abs=1e-12)
        assert row["perplexity"] == pytest.approx(np.mean(np.exp(losses)), abs=1e-12)
        assert row["perplexity_ci"] == pytest.approx(_half_width(np.exp(losses)), abs=1e-12)
    single = table.loc["norm=layernorm"]
    assert single["final_val_loss"] == 3.4
    assert math.isnan(single["final_val_loss_ci"])
    failed = table.loc["norm=rmsnorm"]
    assert math.isnan(failed["final_val_loss"])
    assert failed["params"] == 1000


def test_table_differences_to_baseline(table):
    baseline = table.loc["baseline (n4, asgg, dyt, none)"]
    assert math.isnan(baseline["delta_val_loss"])

    # Same seeds as the baseline: paired differences, t-interval over them.
    mha = table.loc["attention=mha"]
    differences = [2.8 - 3.0, 3.1 - 3.2]
    assert mha["delta_paired"]
    assert mha["delta_val_loss"] == pytest.approx(np.mean(differences), abs=1e-12)
    assert mha["delta_val_loss_ci"] == pytest.approx(_half_width(differences), abs=1e-12)

    # Seeds 0, 2 against 0, 1: Welch's interval. Equal variances of 2 values each give 2 degrees of freedom.
    swiglu = table.loc["mlp=swiglu"]
    a, b = np.array([3.05, 3.25]), np.array([3.0, 3.2])
    standard_error = math.sqrt(a.var(ddof=1) / 2 + b.var(ddof=1) / 2)
    assert not swiglu["delta_paired"]
    assert swiglu["delta_val_loss"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert swiglu["delta_val_loss_ci"] == pytest.approx(stats.t.ppf(0.975, 2) * standard_error, abs=1e-12)

    layernorm = table.loc["norm=layernorm"]
    assert layernorm["delta_val_loss"] == pytest.approx(3.4 - 3.1, abs=1e-12)
    assert math.isnan(layernorm["delta_val_loss_ci"])


def test_table_costs(table):
    # Windows of 1, 1 and 2 steps of 100 tokens at 1000, 2000 and 4000 tokens/s take 0.1 + 0.05 + 0.05 s.
    assert table.loc["baseline (n4, asgg, dyt, none)", "tokens_per_s"] == pytest.approx((400 / 0.2 + 1000) / 2, abs=1e-9)
    assert table.loc["attention=mha", "tokens_per_s"] == pytest.approx(3000, abs=1e-9)
    assert list(table["params"]) == [1000, 1200, 1000, 1000, 1000]
    assert list(table["flops_per_token"]) == [6000, 6600, 6000, 6000, 6000]
    assert table.loc["baseline (n4, asgg, dyt, none)", "peak_mem_mb"] == 105.0
    assert math.isnan(table.loc["norm=rmsnorm", "peak_mem_mb"])


# The report.

def test_report_exit_status(store):
    assert store["code"] == 0


def test_markdown_marks_best_values(store, table):
    markdown = (store["root"] / "results" / "abl" / "tables" / "final_results.md").read_text()
    lines = {line.split(" | ")[0].strip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    mha = lines["attention=mha"]
    row = table.loc["attention=mha"]
    assert f"**{row['final_val_loss']:.3f} ± {row['final_val_loss_ci']:.3f}**" in mha
    assert f"**{row['perplexity']:.2f} ± {row['perplexity_ci']:.2f}**" in mha
    assert f"**{row['delta_val_loss']:+.3f} ± {row['delta_val_loss_ci']:.3f}**" in mha
    assert "**3,000**" in mha
    assert "**90.0**" in mha
    assert "**1,200**" not in mha
    assert "**1,000**" in lines["baseline (n4, asgg, dyt, none)"]
    assert "**6.00k**" in lines["mlp=swiglu"]
    assert f"{table.loc['mlp=swiglu', 'delta_val_loss']:+.3f} ± " in lines["mlp=swiglu"]
    assert "†" in lines["mlp=swiglu"]
    assert "†" not in mha

    # Bold cells: five best values of attention=mha, and the fewest params and FLOPs/token, which
    # four variants share.
    assert markdown.count("**") == 2 * (5 + 4 + 4)


def test_failed_variant_row(store):
    markdown = (store["root"] / "results" / "abl" / "tables" / "final_results.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| norm=rmsnorm"))
    assert "| failed |" in row
    assert FAILURE in row
    assert "| — |" in row
    csv = pd.read_csv(store["root"] / "results" / "abl" / "tables" / "final_results.csv", keep_default_na=False)
    assert csv.loc[4, "status"] == "failed"
    assert csv.loc[4, "final_val_loss"] == ""


def test_latex_and_csv(store, table):
    tables = store["root"] / "results" / "abl" / "tables"
    latex = tables.joinpath("final_results.tex").read_text()
    row = table.loc["attention=mha"]
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}"):
        assert rule in latex
    assert rf"\textbf{{{row['final_val_loss']:.3f} $\pm$ {row['final_val_loss_ci']:.3f}}}" in latex
    assert r"$^\dagger$" in latex
    assert rf"\textbf{{$-${-row['delta_val_loss']:.3f} $\pm$ {row['delta_val_loss_ci']:.3f}}}" in latex
    csv = pd.read_csv(tables / "final_results.csv")
    assert csv.loc[1, "best_in"] == "final_val_loss;perplexity;delta_val_loss;tokens_per_s;peak_mem_mb"
    assert csv.loc[0, "best_in"] == "params;flops_per_token"
    assert csv.loc[1, "final_val_loss_ci"] == pytest.approx(_half_width([2.8, 3.1]), abs=1e-12)


FIGURES = ["loss_curves", "loss_curves_time", "loss_curves_flops", "train_loss_curves", "loss_by_axis", "final_val_loss_bars"]


def test_every_figure_written(store):
    figures = store["root"] / "results" / "abl" / "figures"
    expected = {f"{stem}{width}.{extension}" for stem in FIGURES for width in ("", "_1col") for extension in ("pdf", "png")}
    assert {path.name for path in figures.iterdir()} == expected
    for name in expected:
        assert (figures / name).stat().st_size > 5_000, name


def test_artifacts_logged_on_parent(store):
    client = store["client"]
    logged = {a.path for a in client.list_artifacts(store["parent"], "figures")}
    assert logged == {f"figures/{path.name}" for path in (store["root"] / "results" / "abl" / "figures").iterdir()}
    tables = {a.path for a in client.list_artifacts(store["parent"], "tables")}
    assert tables == {"tables/final_results.md", "tables/final_results.tex", "tables/final_results.csv"}


def test_grid_heatmap_and_table(store, tmp_path):
    paths = write_report(store["uri"], "grid", tmp_path, log_artifacts=False)
    names = {path.name for path in paths}
    assert {"final_val_loss_heatmap.pdf", "final_val_loss_heatmap_1col.png"} <= names
    table = pd.read_csv(tmp_path / "tables" / "final_results.csv")
    assert list(table["variant"]) == ["n4 + asgg (baseline)", "n4 + swiglu", "mha + asgg", "mha + swiglu"]
    assert list(table["final_val_loss"]) == [3.0, 3.1, 2.9, 3.3]
    assert not store["client"].list_artifacts(store["grid_parent"])


def test_ema_smoothing_of_curves(store):
    runs = load_runs(store["uri"], "abl")
    baseline = runs[runs["is_baseline"]]
    history = load_history(store["uri"], baseline["run_id"], ("val/loss",))
    curves = curve_points(baseline, history, smooth=0.5)
    # The step-0 loss stays out of the average. Seed 0: 5, 4, 3 -> 5, 4, 3.5. Seed 1: 5, 4.2, 3.2 -> 5, 4.2, 3.7.
    assert list(curves["mean"]) == pytest.approx([5.0, 4.1, 3.6], abs=1e-12)
    assert list(curves["min"]) == pytest.approx([5.0, 4.0, 3.5], abs=1e-12)
    assert list(curves["max"]) == pytest.approx([5.0, 4.2, 3.7], abs=1e-12)
    assert list(curves["x"]) == [0, 200, 400]
    flops = curve_points(baseline, history, x="flops")
    assert list(flops["x"]) == [0, 200 * 6000, 400 * 6000]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope"], "'nope' not found"),
        (["abl", "--smooth", "1.5"], "smooth=1.5 is invalid"),
        (["abl", "--heatmap", "attention,colour"], "heatmap axes attention,colour are invalid"),
    ],
)
def test_report_bad_input(store, capsys, argv, message):
    assert main([*argv, "--tracking-uri", store["uri"], "--results-dir", str(store["root"] / "bad")]) == 2
    assert message in capsys.readouterr().err
    assert not (store["root"] / "bad").exists()


# Seed statistics from summary.csv.

NAN = math.nan
BASELINE_LABEL = "attention=n4 mlp=asgg norm=dyt position=none"

# (changed axis values, seed, final_val_loss, status), in the order the runner appended the rows.
SUMMARY_ROWS = [
    ({"attention": "mha"}, 0, 2.9, "finished"),  # before the baseline, which still comes first
    ({}, 0, 3.0, "finished"),
    ({}, 1, 3.2, "finished"),
    ({}, 2, 3.1, "finished"),
    ({"attention": "mha"}, 1, 9.9, "finished"),  # duplicate of seed 1: the next row replaces it
    ({"attention": "mha"}, 1, 3.05, "finished"),
    ({"attention": "mha"}, 2, 3.3, "finished"),
    ({"mlp": "swiglu"}, 0, 3.15, "finished"),
    ({"mlp": "swiglu"}, 1, 2.0, "finished"),  # duplicate of seed 1: the failed row after it replaces it
    ({"mlp": "swiglu"}, 1, 2.5, "failed"),  # a failed run with a finite loss, which is left out
    ({"mlp": "swiglu"}, 2, 3.0, "finished"),
    ({"norm": "layernorm"}, 1, 3.4, "finished"),
    ({"norm": "rmsnorm"}, 0, NAN, "failed"),
    ({"norm": "rmsnorm"}, 1, 4.0, "failed"),
    ({"norm": "rmsnorm"}, 2, NAN, "failed"),
    ({"attention": "mha", "position": "rope"}, 0, 2.95, "finished"),
    ({"attention": "mha", "position": "rope"}, 1, 3.0, "finished"),
    ({"attention": "mha", "position": "rope"}, 3, 3.5, "finished"),  # the baseline has no seed 3
]
SEED_LABELS = [
    BASELINE_LABEL,
    "attention=mha mlp=asgg norm=dyt position=none",
    "attention=n4 mlp=swiglu norm=dyt position=none",
    "attention=n4 mlp=asgg norm=layernorm position=none",
    "attention=n4 mlp=asgg norm=rmsnorm position=none",
    "attention=mha mlp=asgg norm=dyt position=rope",
]
# Finished losses per variant label, by seed.
FINISHED_LOSSES = {
    BASELINE_LABEL: {0: 3.0, 1: 3.2, 2: 3.1},
    SEED_LABELS[1]: {0: 2.9, 1: 3.05, 2: 3.3},
    SEED_LABELS[2]: {0: 3.15, 2: 3.0},
    SEED_LABELS[3]: {1: 3.4},
    SEED_LABELS[4]: {},
    SEED_LABELS[5]: {0: 2.95, 1: 3.0, 3: 3.5},
}


def _summary(rows=SUMMARY_ROWS):
    records = []
    for changes, seed, loss, status in rows:
        axes = {**BASELINE, **changes}
        label = " ".join(f"{axis}={axes[axis]}" for axis in AXES)
        records.append({
            "run_name": f"{label} seed={seed}",
            **axes,
            "seed": seed,
            "final_val_loss": loss,
            "status": status,
            "failure_reason": "" if status == "finished" else FAILURE,
            "is_baseline": axes == BASELINE,
        })
    return pd.DataFrame(records)


def _textbook(values, confidence=0.95):
    """Return (mean, sample std, t half-width) written out from their definitions."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1))
    half_width = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return mean, std, half_width


def _differences(label):
    losses, baseline = FINISHED_LOSSES[label], FINISHED_LOSSES[BASELINE_LABEL]
    return [losses[seed] - baseline[seed] for seed in sorted(losses) if seed in baseline]


@pytest.fixture
def seed_table():
    return seed_statistics(_summary()).set_index("label")


def test_seed_stats_order_and_counts(seed_table):
    assert list(seed_table.index) == SEED_LABELS
    assert list(seed_table["is_baseline"]) == [True, False, False, False, False, False]
    assert list(seed_table["n_seeds"]) == [3, 3, 3, 1, 3, 3]
    assert list(seed_table["n_finished"]) == [3, 3, 2, 1, 0, 3]
    assert list(seed_table["n_pairs"]) == [0, 3, 2, 1, 0, 2]
    assert list(seed_table["attention"]) == ["n4", "mha", "n4", "n4", "n4", "mha"]
    assert list(seed_table["position"]) == ["none"] * 5 + ["rope"]


def test_seed_stats_columns(seed_table):
    assert list(seed_table.reset_index().columns) == SEED_STATISTICS_COLUMNS


def test_seed_stats_mean_and_interval(seed_table):
    for label in (BASELINE_LABEL, SEED_LABELS[1], SEED_LABELS[2], SEED_LABELS[5]):
        mean, std, half_width = _textbook(list(FINISHED_LOSSES[label].values()))
        row = seed_table.loc[label]
        assert row["mean_val_loss"] == pytest.approx(mean, abs=1e-12), label
        assert row["std_val_loss"] == pytest.approx(std, abs=1e-12), label
        assert row["ci_half_width"] == pytest.approx(half_width, abs=1e-12), label
        assert row["ci_low"] == pytest.approx(mean - half_width, abs=1e-12), label
        assert row["ci_high"] == pytest.approx(mean + half_width, abs=1e-12), label


def test_seed_stats_baseline_numbers(seed_table):
    # Losses 3.0, 3.2, 3.1: mean 3.1, squared deviations 0.01 + 0.01 + 0, so s = sqrt(0.02 / 2) = 0.1.
    row = seed_table.loc[BASELINE_LABEL]
    assert row["mean_val_loss"] == pytest.approx(3.1, abs=1e-12)
    assert row["std_val_loss"] == pytest.approx(0.1, abs=1e-12)
    assert row["ci_half_width"] == pytest.approx(4.302652729749464 * 0.1 / math.sqrt(3), abs=1e-9)


def test_seed_stats_paired_differences(seed_table):
    assert _differences(SEED_LABELS[1]) == pytest.approx([-0.1, -0.15, 0.2], abs=1e-12)
    assert _differences(SEED_LABELS[2]) == pytest.approx([0.15, -0.1], abs=1e-12)
    assert _differences(SEED_LABELS[5]) == pytest.approx([-0.05, -0.2], abs=1e-12)
    for label in (SEED_LABELS[1], SEED_LABELS[2], SEED_LABELS[5]):
        differences = _differences(label)
        mean, _, half_width = _textbook(differences)
        row = seed_table.loc[label]
        assert row["n_pairs"] == len(differences), label
        assert row["delta_vs_baseline"] == pytest.approx(mean, abs=1e-12), label
        assert row["delta_ci_half_width"] == pytest.approx(half_width, abs=1e-12), label
        assert row["delta_ci_low"] == pytest.approx(mean - half_width, abs=1e-12), label
        assert row["delta_ci_high"] == pytest.approx(mean + half_width, abs=1e-12), label


def test_seed_stats_baseline_has_no_delta(seed_table):
    row = seed_table.loc[BASELINE_LABEL]
    for column in ("delta_vs_baseline", "delta_ci_low", "delta_ci_high", "delta_ci_half_width"):
        assert math.isnan(row[column]), column
    assert row["n_pairs"] == 0


def test_seed_stats_single_seed_is_nan(seed_table):
    row = seed_table.loc[SEED_LABELS[3]]
    assert row["mean_val_loss"] == 3.4
    assert row["delta_vs_baseline"] == pytest.approx(3.4 - 3.2, abs=1e-12)
    for column in ("std_val_loss", "ci_low", "ci_high", "ci_half_width", "delta_ci_low", "delta_ci_high", "delta_ci_half_width"):
        assert math.isnan(row[column]), column


def test_seed_stats_all_failed_variant(seed_table):
    row = seed_table.loc[SEED_LABELS[4]]
    assert row["n_seeds"] == 3
    assert row["n_finished"] == 0
    assert row["n_pairs"] == 0
    for column in ("mean_val_loss", "std_val_loss", "ci_low", "ci_high", "ci_half_width", "delta_vs_baseline", "delta_ci_half_width"):
        assert math.isnan(row[column]), column


def test_seed_stats_last_duplicate_counts():
    rows = [
        ({}, 0, 3.0, "finished"),
        ({"attention": "mha"}, 0, 9.9, "finished"),
        ({"attention": "mha"}, 0, 2.5, "finished"),
        ({"mlp": "gelu"}, 0, 2.0, "finished"),
        ({"mlp": "gelu"}, 0, NAN, "failed"),
    ]
    table = seed_statistics(_summary(rows)).set_index("label")
    mha = table.loc["attention=mha mlp=asgg norm=dyt position=none"]
    assert mha["n_seeds"] == 1
    assert mha["mean_val_loss"] == 2.5
    assert mha["delta_vs_baseline"] == pytest.approx(-0.5, abs=1e-12)
    gelu = table.loc["attention=n4 mlp=gelu norm=dyt position=none"]
    assert gelu["n_finished"] == 0
    assert math.isnan(gelu["mean_val_loss"])


def test_seed_stats_finished_without_loss():
    rows = [({}, 0, 3.0, "finished"), ({}, 1, NAN, "finished"), ({}, 2, 3.2, "finished")]
    row = seed_statistics(_summary(rows)).iloc[0]
    assert row["n_seeds"] == 3
    assert row["n_finished"] == 2
    assert row["mean_val_loss"] == pytest.approx(3.1, abs=1e-12)


def test_seed_stats_text_baseline_flags(tmp_path):
    expected = seed_statistics(_summary())
    text = _summary().astype({"is_baseline": str})
    assert set(text["is_baseline"]) == {"True", "False"}
    pd.testing.assert_frame_equal(seed_statistics(text), expected)

    # The runner reads summary.csv back with these options. With an empty cell, is_baseline stays text.
    path = tmp_path / "summary.csv"
    with_blank = _summary()
    with_blank["is_baseline"] = with_blank["is_baseline"].astype(object)
    with_blank.loc[len(with_blank) - 1, "is_baseline"] = None
    with_blank.to_csv(path, index=False)
    read_back = pd.read_csv(path, keep_default_na=False, na_values=[""])
    assert read_back["is_baseline"].dtype == object
    table = seed_statistics(read_back).set_index("label")
    assert list(table["is_baseline"]) == [True, False, False, False, False, False]
    assert table.loc[SEED_LABELS[1], "delta_vs_baseline"] == pytest.approx(np.mean(_differences(SEED_LABELS[1])), abs=1e-12)


def test_seed_stats_confidence_level():
    table = seed_statistics(_summary(), confidence=0.9).set_index("label")
    _, _, half_width = _textbook(list(FINISHED_LOSSES[BASELINE_LABEL].values()), confidence=0.9)
    assert table.loc[BASELINE_LABEL, "ci_half_width"] == pytest.approx(stats.t.ppf(0.95, 2) * 0.1 / math.sqrt(3), abs=1e-12)
    assert table.loc[BASELINE_LABEL, "ci_half_width"] == pytest.approx(half_width, abs=1e-12)
    _, _, delta_half_width = _textbook(_differences(SEED_LABELS[1]), confidence=0.9)
    assert table.loc[SEED_LABELS[1], "delta_ci_half_width"] == pytest.approx(delta_half_width, abs=1e-12)


def test_seed_stats_without_baseline():
    summary = _summary()
    summary["is_baseline"] = False
    table = seed_statistics(summary)
    assert list(table["label"]) == [SEED_LABELS[1], BASELINE_LABEL, *SEED_LABELS[2:]]
    assert not table["is_baseline"].any()
    assert table["delta_vs_baseline"].isna().all()
    assert (table["n_pairs"] == 0).all()


def test_seed_stats_empty_summary():
    table = seed_statistics(_summary([]).reindex(columns=["run_name", *AXES, "seed", "final_val_loss", "status", "is_baseline"]))
    assert table.empty
    assert list(table.columns) == SEED_STATISTICS_COLUMNS


def _two_baselines():
    summary = _summary()
    summary.loc[summary["norm"] == "layernorm", "is_baseline"] = True
    return summary


def _unreadable_flag():
    summary = _summary().astype({"is_baseline": object})
    summary.loc[0, "is_baseline"] = "yes"
    return summary


@pytest.mark.parametrize(
    ("make_summary", "confidence", "message"),
    [
        (lambda: _summary().drop(columns=["status", "seed"]), 0.95, "missing the columns seed, status"),
        (_two_baselines, 0.95, "several variants are marked is_baseline"),
        (_unreadable_flag, 0.95, "invalid is_baseline value 'yes'"),
        (_summary, 1.5, "confidence must be between 0 and 1, got 1.5"),
    ],
)
def test_seed_stats_bad_input(make_summary, confidence, message):
    with pytest.raises(ValueError, match=message):
        seed_statistics(make_summary(), confidence)


def _markdown_rows(text):
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| variant"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_seed_stats_files_round_trip(tmp_path):
    out_dir = tmp_path / "results" / "abl"
    paths = write_seed_statistics(_summary(), out_dir)
    assert paths == [out_dir / "seed_statistics.csv", out_dir / "seed_statistics.md"]
    assert sorted(path.name for path in out_dir.iterdir()) == ["seed_statistics.csv", "seed_statistics.md"]

    expected = seed_statistics(_summary())
    read_back = pd.read_csv(paths[0])
    pd.testing.assert_frame_equal(read_back, expected, check_exact=True)

    # A second write replaces both files and leaves no temporary file.
    write_seed_statistics(_summary(SUMMARY_ROWS[1:4]), out_dir)
    assert sorted(path.name for path in out_dir.iterdir()) == ["seed_statistics.csv", "seed_statistics.md"]
    assert list(pd.read_csv(paths[0])["label"]) == [BASELINE_LABEL]
    assert len(_markdown_rows(paths[1].read_text())) == 1


def test_seed_stats_write_is_atomic(tmp_path, monkeypatch):
    old_paths = write_seed_statistics(_summary(SUMMARY_ROWS[1:4]), tmp_path)
    old_text = [path.read_text() for path in old_paths]
    replaced = []
    real_replace = os.replace

    def recording_replace(source, target):
        replaced.append((Path(source), Path(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", recording_replace)
    paths = write_seed_statistics(_summary(), tmp_path)
    assert [target for _, target in replaced] == paths
    for source, target in replaced:
        assert source.parent == target.parent
        assert source.name != target.name

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_seed_statistics(_summary(SUMMARY_ROWS[1:4]), tmp_path)
    assert paths[0].read_text() != old_text[0]
    assert pd.read_csv(paths[0])["label"].tolist() == SEED_LABELS
    assert sorted(path.name for path in tmp_path.iterdir()) == ["seed_statistics.csv", "seed_statistics.md"]


def test_seed_stats_markdown_cells(tmp_path):
    _, markdown_path = write_seed_statistics(_summary(), tmp_path)
    text = markdown_path.read_text()
    rows = _markdown_rows(text)
    # MHA with and without RoPE make this a grid, so the names are those of a grid.
    assert list(rows) == [
        "n4 + asgg + dyt + none (baseline)", "mha + asgg + dyt + none", "n4 + swiglu + dyt + none",
        "n4 + asgg + layernorm + none", "n4 + asgg + rmsnorm + none", "mha + asgg + dyt + rope",
    ]

    mean, std, half_width = _textbook(list(FINISHED_LOSSES[SEED_LABELS[1]].values()))
    delta, _, delta_half_width = _textbook(_differences(SEED_LABELS[1]))
    assert rows["mha + asgg + dyt + none"] == [
        "3/3", f"{mean:.4f} ± {half_width:.4f}", f"{std:.4f}",
        f"[{mean - half_width:.4f}, {mean + half_width:.4f}]", f"{delta:+.4f} ± {delta_half_width:.4f}", "3",
    ]
    assert rows["n4 + asgg + dyt + none (baseline)"] == ["3/3", "3.1000 ± 0.2484", "0.1000", "[2.8516, 3.3484]", "—", "0"]
    assert rows["n4 + asgg + layernorm + none"] == ["1/1", "3.4000", "—", "—", "+0.2000", "1"]
    assert rows["n4 + asgg + rmsnorm + none"] == ["0/3", "—", "—", "—", "—", "0"]
    assert "95% two-sided t-interval" in text
    assert "sample standard deviation (ddof=1)" in text


def _variants(*changes: dict) -> pd.DataFrame:
    """Variants as ``variants_of`` returns them: the N4 baseline first, then one row per change."""
    baseline = {"attention": "n4", "mlp": "asgg", "norm": "dyt", "position": "none"}
    rows = [{**baseline, "is_baseline": True}] + [{**baseline, **change, "is_baseline": False} for change in changes]
    for row in rows:
        row["label"] = " ".join(f"{axis}={row[axis]}" for axis in ("attention", "mlp", "norm", "position"))
    return pd.DataFrame(rows)


def test_attention_with_position_one_factor():
    # The default ablation: position "auto" gives MHA RoPE, so MHA differs in two axes but one factor.
    variants = _variants({"attention": "mha", "position": "rope"}, {"mlp": "swiglu"}, {"norm": "rmsnorm"})
    assert ablation_kind(variants) == "one-factor"
    assert list(variant_names(variants).values()) == [
        "baseline (n4, asgg, dyt, none)", "attention=mha position=rope", "mlp=swiglu", "norm=rmsnorm",
    ]


def test_position_set_by_attention_dropped():
    variants = _variants({"mlp": "swiglu"}, {"attention": "mha", "position": "rope"},
                         {"attention": "mha", "mlp": "swiglu", "position": "rope"})
    assert ablation_kind(variants) == "grid"
    assert varying_axes(variants) == ["attention", "mlp"]
    assert list(variant_names(variants).values()) == [
        "n4 + asgg (baseline)", "n4 + swiglu", "mha + asgg", "mha + swiglu",
    ]
    crossed = _variants({"position": "rope"}, {"attention": "mha"}, {"attention": "mha", "position": "rope"})
    assert varying_axes(crossed) == ["attention", "position"]


def test_heatmap_title_names_averaged_axes():
    # Position "auto" follows the attention, so the cells average the norms and seeds only.
    variants = _variants({"attention": "mha", "position": "rope"}, {"norm": "rmsnorm"},
                         {"attention": "mha", "norm": "rmsnorm", "position": "rope"})
    runs = pd.concat([variants.assign(seed=0), variants.assign(seed=1)])
    title = heatmap_title(runs, variants, ("attention", "mlp"))
    assert title == "final validation loss (nats/token)\nmean over norm and seeds"
    assert heatmap_title(variants.assign(seed=0), variants, ("attention", "norm")) == "final validation loss (nats/token)"


def test_attention_crossed_with_position_is_grid():
    variants = _variants({"attention": "mha"}, {"attention": "mha", "position": "rope"}, {"position": "rope"})
    assert ablation_kind(variants) == "grid"
    assert ablation_kind(_variants({"attention": "mha", "mlp": "swiglu"})) == "grid"
