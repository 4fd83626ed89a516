"""Harness overhead: the real runner against bare training steps of the same models on the same batches.

The runner case is experiments.runner.run_ablation on a generated local text corpus in a temporary
directory, with MLflow writing to a sqlite store there. The bare case is a hand-written loop over
the same runs. It builds each model with the run's seed, and each step takes the same batch
(TrainBatches) and runs forward, loss, backward, gradient clipping, the AdamW step and the
learning-rate schedule. That is the training work of experiments.train.train_run, without
evaluation, logging, hashing or files. Both reach the same training loss, which the script checks.

    overhead = (runner wall time - bare wall time) / bare wall time

The runner's time is attributed to parts by wrapping its functions for the duration of the run.
The parts are data preparation (from cached tokens, because the tokenizer is trained once before
timing), planning, MLflow (store and run creation, params, tags, artifacts, closing runs), metrics
calls, evaluation, checkpoints (saving each finished model and logging it to MLflow), figures and
tables, result files, and the training steps themselves. Each part is also given as a share of the bare
time. Time inside a wrapped call is counted once, in the outermost wrapped call.

The runner and the bare loop alternate in the order runner, bare, bare, runner, so that a drift in
the machine's speed affects both alike. The first runner invocation creates the MLflow store, a
one-off cost of a new results directory; the second finds it.

Run from the repository root (the defaults took about 6 minutes on one core of a 2-core AMD EPYC):

    .venv/bin/python benchmarks/overhead.py
    .venv/bin/python benchmarks/overhead.py --steps 400 --attention n4 mha gqa

Writes benchmarks/results/overhead.csv and overhead.json.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import experiments.coordination as coordination  # noqa: E402
import experiments.runner as runner  # noqa: E402
import experiments.worker as worker  # noqa: E402
import experiments.train as train_module  # noqa: E402
from benchmarks import common  # noqa: E402
from experiments.config import AblationConfig, resolve_config  # noqa: E402
from experiments.data import TrainBatches, prepare_data  # noqa: E402
from experiments.plan import build_plan  # noqa: E402
from experiments.tracking import AblationTracker  # noqa: E402
from n4.model import CausalLM  # noqa: E402

# Parts of the runner's time, in the order they are reported.
PARTS = (
    "data", "plan", "queue", "mlflow", "mlflow_metrics", "evaluation", "checkpoints", "figures", "files", "train_steps", "other",
)

WORDS = {
    "subject": ["the king", "a fool", "my lord", "the queen", "this night", "the ghost", "our army", "her father",
                "the duke", "a soldier", "the nurse", "his daughter"],
    "verb": ["speaks of", "remembers", "betrays", "follows", "fears", "loves", "commands", "forgets", "praises",
             "curses", "awaits", "mourns"],
    "object": ["the crown", "his brother", "the sea", "a letter", "the tower", "sweet music", "the field",
               "old debts", "the storm", "a promise", "the garden", "her honour"],
}


def write_corpus(path: Path, lines: int) -> Path:
    """Write ``lines`` random short sentences, about 30 characters each, to ``path``."""
    rng = random.Random(0)
    text = "\n".join(
        f"{rng.choice(WORDS['subject']).capitalize()} {rng.choice(WORDS['verb'])} {rng.choice(WORDS['object'])}."
        for _ in range(lines)
    )
    path.write_text(text + "\n")
    return path


class Attribution:
    """Time calls of wrapped functions by part. A call inside another wrapped call counts once, in the outer one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.longest: dict[str, float] = defaultdict(float)
        self._depth = 0
        self._restore: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, part: str, exclusive: bool = True) -> None:
        """Replace ``owner.name`` by a timed version. ``exclusive=False`` times it even when nested
        and lets calls inside it be counted as well (used for train_run, which contains evaluation)."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if exclusive and self._depth:
                return original(*args, **kwargs)
            if exclusive:
                self._depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                if exclusive:
                    self._depth -= 1
                self.seconds[part] += elapsed
                self.calls[part] += 1
                self.longest[part] = max(self.longest[part], elapsed)

        setattr(owner, name, timed)
        self._restore.append((owner, name, original))

    def wrap_if_present(self, owner: Any, name: str, part: str) -> bool:
        """Wrap ``owner.name`` if it exists; return whether it did."""
        if not hasattr(owner, name):
            return False
        self.wrap(owner, name, part)
        return True

    def restore(self) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()


# The runner's functions whose time goes to each part. A name that a later version of the runner no
# longer has is reported as missing, and its time then counts as "other".
WRAPPED = [
    (runner, "prepare_data", "data"),
    (worker, "prepare_data", "data"),
    (worker, "TrainBatches", "data"),
    (worker, "val_windows", "data"),
    (runner, "build_plan", "plan"),
    (worker, "build_plan", "plan"),
    # The work queue in Optuna's storage: set-up, claims, heartbeats and results.
    *((coordination.WorkQueue, method, "queue") for method in (
        "__init__", "create_or_join", "join", "claim", "complete", "results", "unfinished")),
    *((AblationTracker, method, "mlflow") for method in (
        "__init__", "start_parent", "start_child", "log_params", "set_tags", "log_artifact", "end_run", "flush")),
    (AblationTracker, "log_metrics", "mlflow_metrics"),
    (train_module, "evaluate", "evaluation"),
    # Saving each finished model and logging it to MLflow.
    (worker, "save_run_checkpoint", "checkpoints"),
    (AblationTracker, "log_artifacts", "checkpoints"),
    (runner, "write_figures_and_tables", "figures"),  # called by the worker that writes the report
    (runner, "write_atomic", "files"),
]


def ablation_config(args: argparse.Namespace, workdir: Path, corpus: Path, name: str) -> AblationConfig:
    return resolve_config(
        preset=args.preset,
        name=name,
        overrides=[
            f"data.source={corpus}",
            f"data.cache_dir={workdir / 'cache'}",
            f"results_dir={workdir / 'results'}",
            f"tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
            f"axes.attention=[{', '.join(args.attention)}]",
            "axes.mlp=[asgg]",
            "axes.norm=[dyt]",
            # No position encoding for any run, as published N4 has none: the runs then differ only
            # in their attention, and the plan needs no RoPE tables.
            "baseline.position=none",
            "axes.position=[none]",
            f"train.steps={args.steps}",
            *([f"train.log_interval={args.log_interval}"] if args.log_interval else []),
        ],
    )


def run_runner(config: AblationConfig) -> dict[str, Any]:
    """Run the real runner once with its parts timed; return the seconds per part and checks."""
    attribution = Attribution()
    last_train_loss: dict[str, float] = {}
    metrics_calls_in_loop: list[float] = []
    in_train_run = [False]

    # Remember the last training loss of each run, and time each metrics call made inside the loop.
    log_metrics = AblationTracker.log_metrics

    def recording_log_metrics(self, run_id, step, metrics):
        start = time.perf_counter()
        log_metrics(self, run_id, step, metrics)
        if in_train_run[0]:
            metrics_calls_in_loop.append(time.perf_counter() - start)
        if "train/loss" in metrics:
            last_train_loss[run_id] = metrics["train/loss"]

    train_run = runner.train_run

    def flagged_train_run(*args, **kwargs):
        in_train_run[0] = True
        try:
            return train_run(*args, **kwargs)
        finally:
            in_train_run[0] = False

    results: list[Any] = []

    def collecting_train_run(*args, **kwargs):
        result = flagged_train_run(*args, **kwargs)
        results.append(result)
        return result

    AblationTracker.log_metrics = recording_log_metrics
    runner.train_run = collecting_train_run
    try:
        missing = [
            f"{getattr(owner, '__name__', owner)}.{name}"
            for owner, name, part in WRAPPED
            if not attribution.wrap_if_present(owner, name, part)
        ]
        attribution.wrap(runner, "train_run", "train_run", exclusive=False)
        start = time.perf_counter()
        summary = runner.run_ablation(config, grid=False, show_progress=False)
        total = time.perf_counter() - start
    finally:
        attribution.restore()
        AblationTracker.log_metrics = log_metrics
        runner.train_run = train_run

    if not (summary["status"] == "finished").all():
        raise RuntimeError(f"a run of the runner failed: {summary[['run_name', 'failure_reason']].to_dict('records')}")
    tokens_per_step = config.train.tokens_per_step
    step_seconds = sum(r.steps_done * tokens_per_step / r.tokens_per_s for r in results)
    seconds = dict(attribution.seconds)
    # Inside train_run: the timed steps, evaluation and metrics calls; the rest (model build,
    # hashing, progress) is "other".
    seconds["train_steps"] = step_seconds
    seconds["other"] = total - sum(seconds.get(part, 0.0) for part in PARTS if part != "other")
    return {
        "total_s": total,
        "seconds": seconds,
        "final_train_losses": list(last_train_loss.values()),
        "metrics_calls_in_loop": len(metrics_calls_in_loop),
        "longest_metrics_call_ms": 1000 * max(metrics_calls_in_loop, default=0.0),
        "mean_metrics_call_ms": 1000 * sum(metrics_calls_in_loop) / max(len(metrics_calls_in_loop), 1),
        "missing": missing,
    }


def run_bare(config: AblationConfig, vocab_size: int, batches: TrainBatches, steps: int | None = None) -> dict[str, Any]:
    """Train every planned run with a bare loop; return the wall time, the step time and the last losses.

    The loss is computed as train_run computes it (summed cross-entropy over the step's target
    tokens, divided by their count), so both loops do the same arithmetic and end at the same loss.
    """
    train = config.train
    autocast_dtype = torch.bfloat16 if train.dtype == "bfloat16" else None
    total_start = time.perf_counter()
    step_seconds = 0.0
    final_losses = []
    for spec in build_plan(config, grid=False, vocab_size=vocab_size):
        torch.manual_seed(spec.seed)
        model = CausalLM(spec.model)
        optimizer = train_module.build_optimizer(model, train)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: train_module.lr_factor(step, train.warmup_steps, train.steps, train.min_lr_ratio),
        )
        model.train()
        loss = torch.zeros(())
        steps_start = time.perf_counter()
        for step in range(steps or train.steps):
            micro_batches = [batches.batch(step * train.grad_accum + micro) for micro in range(train.grad_accum)]
            step_tokens = train.grad_accum * train.batch_size * train.seq_len
            loss = torch.zeros(())
            for batch in micro_batches:
                inputs, targets = batch[:, :-1], batch[:, 1:]
                with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = model(inputs)  # (B, T, V) float32
                micro_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / step_tokens
                micro_loss.backward()
                loss += micro_loss.detach()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step_seconds += time.perf_counter() - steps_start
        final_losses.append(loss.item())
    return {"total_s": time.perf_counter() - total_start, "step_s": step_seconds, "final_train_losses": final_losses}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="size preset of experiments.config (default: tiny)")
    parser.add_argument("--attention", nargs="+", default=["n4", "mha"], help="attentions to run (one run each)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (tiny preset: 200)")
    parser.add_argument("--log-interval", type=int,
                        help="train.log_interval (default: the preset's); 1 makes MLflow's asynchronous batches start mid-run")
    parser.add_argument("--repeats", type=int, default=2, help="runner and bare invocations each, alternating")
    parser.add_argument("--corpus-lines", type=int, default=40000, help="sentences in the generated corpus")
    common.add_common_arguments(parser, "overhead")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, machine = common.setup(args)
    if device.type != "cpu":
        raise SystemExit("overhead.py measures the CPU runner; the runner picks its own device with train.device")
    logging.basicConfig(level=logging.WARNING)
    print(common.describe_machine(machine))

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="n4-overhead-") as directory:
        workdir = Path(directory)
        corpus = write_corpus(workdir / "corpus.txt", args.corpus_lines)
        # Work inside the temporary directory, so nothing written relative to the current directory
        # (older runners put MLflow artifacts in ./mlruns) lands in the checkout.
        previous_cwd = os.getcwd()
        os.chdir(workdir)
        try:
            # Untimed: tokenise the corpus once (the runner then reads the cached tokens) and
            # warm up PyTorch with a few bare steps.
            config = ablation_config(args, workdir, corpus, "warmup")
            data = prepare_data(config.data)
            batches = TrainBatches(data, config.train.seq_len, config.train.batch_size, seed=config.data.seed)
            run_bare(config, data.vocab_size, batches, steps=3)

            order = []
            for repeat in range(args.repeats):
                order += ["runner", "bare"] if repeat % 2 == 0 else ["bare", "runner"]
            runner_results, bare_results = [], []
            for index, kind in enumerate(order):
                if kind == "runner":
                    config = ablation_config(args, workdir, corpus, f"overhead-{index}")
                    runner_results.append(run_runner(config))
                    print(f"runner: {runner_results[-1]['total_s']:.1f} s", flush=True)
                else:
                    bare_results.append(run_bare(config, data.vocab_size, batches))
                    print(f"bare:   {bare_results[-1]['total_s']:.1f} s", flush=True)
        finally:
            os.chdir(previous_cwd)

    # One row per pair (the i-th runner invocation with the i-th bare one).
    for index, (run, bare) in enumerate(zip(runner_results, bare_results)):
        same_losses = all(
            math.isclose(a, b, rel_tol=1e-5) for a, b in zip(run["final_train_losses"], bare["final_train_losses"])
        )
        row = {
            "invocation": index + 1,
            "mlflow_store": "new" if index == 0 else "existing",
            "runs": len(args.attention),
            "steps_per_run": args.steps,
            "runner_s": run["total_s"],
            "bare_s": bare["total_s"],
            "overhead": (run["total_s"] - bare["total_s"]) / bare["total_s"],
            "bare_steps_s": bare["step_s"],
            "runner_steps_s": run["seconds"]["train_steps"],
        }
        for part in PARTS:
            if part != "train_steps":
                row[f"{part}_s"] = run["seconds"].get(part, 0.0)
                row[f"{part}_share"] = run["seconds"].get(part, 0.0) / bare["total_s"]
        row["step_loop_share"] = (run["seconds"]["train_steps"] - bare["step_s"]) / bare["total_s"]
        row["metrics_calls_in_loop"] = run["metrics_calls_in_loop"]
        row["longest_metrics_call_ms"] = run["longest_metrics_call_ms"]
        row["same_final_loss"] = same_losses
        rows.append(row)

    print()
    print(common.format_table(rows, ["invocation", "mlflow_store", "runner_s", "bare_s", "overhead", "runner_steps_s", "bare_steps_s", "same_final_loss"]))
    print()
    share_columns = ["invocation"] + [f"{part}_share" for part in PARTS if part != "train_steps"] + ["step_loop_share"]
    print("parts of the runner's time as shares of the bare time:")
    print(common.format_table(rows, share_columns))
    print(f"\nmetrics calls inside the training loop: longest {max(r['longest_metrics_call_ms'] for r in rows):.3f} ms")

    missing = sorted({name for run in runner_results for name in run["missing"]})
    if missing:
        print(f"not found in this version of the runner, so counted as other: {', '.join(missing)}")

    settings = {k: v for k, v in vars(args).items() if k != "out"}
    meta = {"machine": machine, "settings": settings, "parts": PARTS, "not_found": missing}
    paths = common.write_results(args.out, rows, meta)
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
