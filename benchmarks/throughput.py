"""Training throughput and model FLOPs utilisation (MFU) of whole models, one per variant.

For each size, the models are those of a one-factor-at-a-time plan around the N4 baseline
(n4 + asgg + dyt), built by experiments.plan exactly as the runner builds them (matched MLP
parameters, the published N4 options). A training step is the runner's: forward (optionally under
bfloat16 autocast), next-token cross-entropy, backward, gradient clipping at 1.0, AdamW step, on
fixed random tokens. Every case of a size runs interleaved with the others (see
benchmarks/common.py). ``speed_vs_base`` is the median per-round ratio of the N4 baseline's eager
step time to the case's step time, in the first dtype of the size (float32 by default). Above 1
means faster than the baseline.

MFU = tokens/s * CausalLM.flops_per_token(T) / peak, where peak is the measured matmul peak of
this machine in the step's dtype (common.matmul_peak_flops: the fastest of five square matmuls of
up to 2048), not a vendor figure. flops_per_token is PaLM's 6N + 12 L T C estimate.

Sizes:
    tiny    the runner's default (preset tiny): width 96, 3 layers, 4 heads, seq 64, batch 16, vocab 2048
    small   preset small with batch 8: width 256, 6 layers, 4 heads, seq 256, vocab 8192

bfloat16 runs at the tiny size, for the attentions named by --bfloat16-attention (default n4 and
mha). torch.compile (inductor) is tried for the attentions named by --compile-attention only
(default n4 and mha, float32), because compiling takes a minute or more per model on a small CPU.
A compile that fails is recorded with status "failed" and its reason.

Run from the repository root (the defaults took about 11 minutes on one core of a 2-core AMD EPYC,
or about 15 with an empty torch.compile cache):

    .venv/bin/python benchmarks/throughput.py
    .venv/bin/python benchmarks/throughput.py --sizes tiny --dtypes float32 --no-compile

Writes benchmarks/results/throughput.csv and throughput.json.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import variants  # noqa: E402
from benchmarks import common  # noqa: E402
from experiments.config import AblationConfig, resolve_config  # noqa: E402
from experiments.plan import model_config_for, variant_cells  # noqa: E402
from experiments.train import build_optimizer  # noqa: E402
from n4.model import CausalLM  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Per size: the preset and overrides, then how many rounds and steps per round to time.
# bfloat16 runs at the tiny size only by default: on a CPU without bfloat16 matmul instructions a
# bfloat16 step of the small size takes tens of seconds.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"preset": "tiny", "overrides": [], "rounds": 5, "steps_per_round": 3, "warmup": 2,
             "dtypes": ["float32", "bfloat16"]},
    "small": {"preset": "small", "overrides": ["train.batch_size=8"], "rounds": 5, "steps_per_round": 1, "warmup": 1,
              "dtypes": ["float32"]},
}


@dataclass
class Case:
    """One model, dtype and compile setting, with its training step."""

    size: str
    axes: dict[str, str]
    dtype: str
    compiled: bool
    model: CausalLM
    tokens_per_step: int
    flops_per_token: float
    step: Any = None
    compile_s: float = float("nan")
    status: str = "ok"
    reason: str = ""
    times: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        variant = " ".join(f"{axis}={self.axes[axis]}" for axis in ("attention", "mlp", "norm", "position"))
        return f"{variant} {self.dtype}{' compiled' if self.compiled else ''}"


def size_config(size: str, axes: list[str]) -> AblationConfig:
    """Return the runner's config for ``size``, varying the named axes over every registered name."""
    registries = {"attention": variants.ATTENTION, "mlp": variants.MLP, "norm": variants.NORM}
    overrides = list(SIZES[size]["overrides"])
    for axis, registry in registries.items():
        if axis in axes:
            overrides.append(f"axes.{axis}=[{', '.join(registry)}]")
    config = resolve_config(preset=SIZES[size]["preset"], overrides=overrides)
    # Axes not varied keep only the baseline's value.
    for axis in registries:
        if axis not in axes:
            config.axes[axis] = [config.baseline[axis]]
    return config


def make_step(case: Case, forward, batches: list[torch.Tensor], grad_clip: float, optimizer) -> Any:
    """Return a closure that runs one training step of the case, as the runner's loop does."""
    autocast_dtype = DTYPES[case.dtype] if case.dtype != "float32" else None
    device = batches[0].device
    parameters = list(case.model.parameters())
    position = [0]

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    def one_step() -> None:
        batch = batches[position[0] % len(batches)]
        position[0] += 1
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast():
            logits = forward(inputs)  # (B, T, V) float32
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return one_step


def build_cases(size: str, args: argparse.Namespace, device: torch.device) -> list[Case]:
    config = size_config(size, args.axes)
    train = config.train
    batch_generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, config.data.vocab_size, (train.batch_size, train.seq_len + 1), generator=batch_generator).to(device)
        for _ in range(4)
    ]
    cases = []
    # The runner's plan (experiments.plan.build_plan) without its meta-device build check.
    for cell in variant_cells(config, grid=False):
        model_config = model_config_for(config, cell, config.data.vocab_size)
        baseline_parts = all(cell[axis] == config.baseline[axis] for axis in ("mlp", "norm"))
        for dtype in args.dtypes or SIZES[size]["dtypes"]:
            if dtype == "bfloat16" and args.bfloat16_attention and cell["attention"] not in args.bfloat16_attention:
                continue
            if dtype == "bfloat16" and not baseline_parts:
                continue
            compile_choices = [False]
            if baseline_parts and cell["attention"] in args.compile_attention and dtype in args.compile_dtypes:
                compile_choices.append(True)
            for compiled in compile_choices:
                torch.manual_seed(0)
                model = CausalLM(model_config).to(device)
                case = Case(
                    size=size, axes=cell, dtype=dtype, compiled=compiled, model=model,
                    tokens_per_step=train.tokens_per_step, flops_per_token=float(model.flops_per_token(train.seq_len)),
                )
                forward = torch.compile(model) if compiled else model
                case.step = make_step(case, forward, batches, train.grad_clip, build_optimizer(model, train))
                cases.append(case)
    return cases


def compile_cases(cases: list[Case], device: torch.device) -> None:
    """Run the first steps of each compiled case, which compile it; record the time or the failure."""
    for case in cases:
        if not case.compiled:
            continue
        print(f"compiling {case.label} ...", flush=True)
        start = time.perf_counter()
        try:
            for _ in range(2):  # the first step compiles forward and backward, the second checks reuse
                case.step()
            common.synchronize(device)
            case.compile_s = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - any compiler failure is a result, not a crash
            case.status = "failed"
            case.reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
            print(f"  failed: {case.reason}", flush=True)


def run_size(size: str, args: argparse.Namespace, device: torch.device, peaks: dict[str, float]) -> list[dict]:
    settings = SIZES[size]
    cases = build_cases(size, args, device)
    compile_cases(cases, device)
    live = [case for case in cases if case.status == "ok"]
    steps_per_round = args.steps_per_round or settings["steps_per_round"]

    def repeated(step):
        def run() -> None:
            for _ in range(steps_per_round):
                step()
        return run

    print(f"{size}: timing {len(live)} cases, {args.rounds or settings['rounds']} rounds of {steps_per_round} steps", flush=True)
    times = common.interleaved_times(
        {case.label: repeated(case.step) for case in live},
        args.rounds or settings["rounds"],
        settings["warmup"],
        device,
    )
    # The baseline: the plan's first variant (the N4 baseline), eager, in the first dtype asked for.
    base = next(case for case in live if not case.compiled and case.dtype == cases[0].dtype and case.axes == cases[0].axes)
    rows = []
    for case in cases:
        row = {
            "size": size, **{axis: case.axes[axis] for axis in ("attention", "mlp", "norm", "position")},
            "dtype": case.dtype, "compiled": case.compiled, "status": case.status,
        }
        if case.status == "ok":
            step_s = common.median(times[case.label]) / steps_per_round
            tokens_per_s = case.tokens_per_step / step_s
            row.update({
                "step_ms": 1000 * step_s,
                "tokens_per_s": tokens_per_s,
                "speed_vs_base": common.median_ratio(times[base.label], times[case.label]),
                "spread": common.spread(times[case.label]),
                "flops_per_token": case.flops_per_token,
                "mfu": tokens_per_s * case.flops_per_token / peaks[case.dtype],
            })
        row.update({"compile_s": case.compile_s, "reason": case.reason})
        rows.append(row)
    print(common.format_table(rows, COLUMNS), flush=True)
    return rows


COLUMNS = ["size", "attention", "mlp", "norm", "position", "dtype", "compiled", "step_ms", "tokens_per_s", "speed_vs_base", "spread", "mfu", "compile_s", "status"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "small"])
    parser.add_argument("--axes", nargs="+", choices=["attention", "mlp", "norm"], default=["attention"],
                        help="axes varied one at a time around the baseline (default: attention)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                        help="float32 and/or bfloat16 autocast as train.dtype=bfloat16 runs it "
                             "(default: both for tiny, float32 for small)")
    parser.add_argument("--bfloat16-attention", nargs="*", default=["n4", "mha"],
                        help="attentions timed in bfloat16 too; none given: all (default: n4 mha)")
    parser.add_argument("--compile-attention", nargs="*", default=["n4", "mha"],
                        help="attentions (with the baseline MLP and norm) also timed under torch.compile")
    parser.add_argument("--compile-dtypes", nargs="+", choices=sorted(DTYPES), default=["float32"])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile entirely")
    parser.add_argument("--rounds", type=int, help="timed rounds (default: 5)")
    parser.add_argument("--steps-per-round", type=int, help="training steps per timed call (default: 3 tiny, 1 small)")
    common.add_common_arguments(parser, "throughput")
    args = parser.parse_args(argv)
    if args.no_compile:
        args.compile_attention = []
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, machine = common.setup(args)
    print(common.describe_machine(machine))

    # Measured matmul peaks, the denominators of MFU.
    dtypes = sorted({dtype for size in args.sizes for dtype in (args.dtypes or SIZES[size]["dtypes"])})
    peaks, peak_sizes = {}, {}
    for name in dtypes:
        peaks[name], peak_sizes[name] = common.matmul_peak_flops(DTYPES[name], device)
    print("measured matmul peak: " + ", ".join(
        f"{name} {peaks[name] / 1e9:.1f} GFLOP/s (n={peak_sizes[name]})" for name in dtypes) + "\n")

    rows = []
    for size in args.sizes:
        rows += run_size(size, args, device, peaks)
        print()

    settings = {k: v for k, v in vars(args).items() if k != "out"}
    meta = {"machine": machine, "settings": settings, "matmul_peak_flops": peaks, "matmul_peak_size": peak_sizes, "sizes": SIZES}
    paths = common.write_results(args.out, rows, meta)
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
