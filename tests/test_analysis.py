"""analysis/: runs and histories read back from a real MLflow store, the results table, figures and the report.

The store is built through MlflowClient with the tags, params and metrics the runner writes, and
known values, so every statistic can be checked against a formula written here.
"""

import math

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from scipy import stats

from analysis.figures import curve_points
from analysis.report import main, write_report
from analysis.runs import load_history, load_runs
from analysis.tables import variant_table
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
