"""Attention benchmark: forward plus backward time and memory of one attention layer.

Two comparisons, each measured inside one process with the cases interleaved (see
benchmarks/common.py):

1. Every attention of the registry (``variants.ATTENTION``, whatever is registered when this runs)
   against causal multi-head attention ("mha") of the same shape, at each sequence length.
2. N4 attention (n4/attention.py: a running sum for the keys, then fused causal attention) against
   the direct T x T formulation, computed by ``DirectN4Attention`` below with the same weights:
   key weights W[j, t] = t / j^2 as a (T, T) matrix, the (T, T) score matrix, and the published
   code's additive (T, T) causal mask of 0 and -inf before an explicit softmax. A second direct
   case, "cumsum_keys", computes the keys with a running sum as the published code's Cummean does
   and keeps the (T, T) scores and mask. It shows how much of the gap the scores alone make. All
   three agree to float32 rounding (checked on every run). Plain causal MHA of the same shape runs
   alongside: ``mha_speedup`` (direct time / MHA time) is what the fused kernel alone achieves.

Shapes: B batch, T sequence length, C width, H heads, D = C // H.

Time is the median wall time of one forward and backward pass (input and parameter gradients).
Ratios are given two ways: the median over rounds of the per-round ratio, and the ratio of the
fastest calls (``*_min``), which other processes on a shared machine disturb least.
Memory is given two ways:
    peak_mb   peak of the bytes allocated by tensors during forward and backward, above the level
              before the call (CUDA: max_memory_allocated; CPU: torch.profiler allocation events)
    saved_mb  bytes of the activations that autograd saves for backward (saved_tensors_hooks),
              parameters and the layer input excluded

Run from the repository root (the defaults took about 9 minutes on one core of a 2-core AMD EPYC):

    .venv/bin/python benchmarks/attention.py
    .venv/bin/python benchmarks/attention.py --lengths 256 1024 --width 512 --heads 8 --rounds 11

Writes benchmarks/results/attention.csv (comparison 1), attention-direct.csv (comparison 2) and
attention.json (both, with the machine and the settings).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import variants  # noqa: E402
from benchmarks import common  # noqa: E402
from n4 import ModelConfig  # noqa: E402
from n4.attention import N4Attention, split_head_grouped_qkvh  # noqa: E402

BASELINE = "mha"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class DirectN4Attention(nn.Module):
    """N4 attention with materialised (T, T) scores and an additive (T, T) causal mask.

    It shares the projections of an ``N4Attention``, so both compute the same function on the same
    weights. ``keys="matrix"`` applies the key weights W[j, t] = t / j^2 as a (T, T) matrix
    product, and ``keys="cumsum"`` computes the same keys with a running sum. Either way the scores
    and a mask of 0 and -inf, built as the published code builds it, are materialised before an
    explicit softmax. Heads are batched in one matmul.
    """

    def __init__(self, n4: N4Attention, keys: str = "matrix") -> None:
        super().__init__()
        if keys not in ("matrix", "cumsum"):
            raise ValueError(f"keys={keys!r} is invalid; allowed: matrix, cumsum")
        self.qkvh_linear = n4.qkvh_linear
        self.out_linear = n4.out_linear
        self.heads = n4.heads
        self.softmax_scale = n4.softmax_scale
        self.keys = keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v, gate_logits = split_head_grouped_qkvh(self.qkvh_linear(x), self.heads)  # (B, H, T, D), (B, H, T)
        gated_keys = torch.tanh(gate_logits).unsqueeze(-1) * k  # (B, H, T, D)

        # Modified keys k'_j = sum_{t<=j} (t / j^2) tanh(g_t) k_t (1-based t and j).
        positions = torch.arange(1, T + 1, device=x.device, dtype=x.dtype)
        if self.keys == "matrix":
            key_weights = torch.tril(positions[None, :] / positions[:, None].square())  # (T, T): W[j, t]
            k = key_weights @ gated_keys
        else:
            k = (positions[:, None] * gated_keys).cumsum(dim=2) / positions[:, None].square()

        # Scores plus an additive causal mask, then softmax, all (B, H, T, T).
        scores = (q @ k.transpose(-2, -1)) * self.softmax_scale
        above_diagonal = torch.triu(torch.ones(T, T, device=x.device), diagonal=1).bool()
        mask = torch.where(above_diagonal, float("-inf"), torch.zeros((), device=x.device, dtype=x.dtype))  # (T, T)
        probabilities = (scores + mask).softmax(dim=-1)

        # Weighted values, heads concatenated, output projection.
        y = (probabilities @ v).transpose(1, 2).reshape(B, T, C)
        return self.out_linear(y)


def layer_config(name: str, args: argparse.Namespace, max_len: int) -> ModelConfig:
    """Return a one-layer config around attention ``name``; only the attention sizes matter here."""
    return ModelConfig(
        vocab_size=256, hidden_size=args.width, inter_size=args.width, heads=args.heads, layers=1,
        attention=name, kv_heads=args.kv_heads, window=args.window, max_seq_len=max_len,
    )


def forward_backward(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """Return a closure that runs one forward and backward pass, gradients reset first."""
    parameters = list(module.parameters())

    def step() -> None:
        x.grad = None
        for parameter in parameters:
            parameter.grad = None
        module(x).backward(grad_out)

    return step


def measure_memory(module: nn.Module, step, x: torch.Tensor, device: torch.device) -> dict[str, float]:
    # Free the gradients of earlier calls first, so that every case starts from the same state and
    # its peak includes the gradients it allocates.
    x.grad = None
    for parameter in module.parameters():
        parameter.grad = None
    return {
        "peak_mb": common.peak_allocated_bytes(step, device) / 2**20,
        "saved_mb": common.saved_tensor_bytes(step, exclude=[*module.parameters(), x]) / 2**20,
    }


def inputs(args: argparse.Namespace, seq_len: int, dtype: torch.dtype, device: torch.device):
    generator = torch.Generator().manual_seed(seq_len)
    x = torch.randn(args.batch, seq_len, args.width, generator=generator).to(device, dtype).requires_grad_()
    grad_out = torch.randn(args.batch, seq_len, args.width, generator=generator).to(device, dtype)
    return x, grad_out


def rounds_for(seq_len: int, args: argparse.Namespace) -> int:
    """Timed rounds at ``seq_len``: --rounds, or more rounds for short (fast, noisier) calls."""
    return args.rounds or max(5, min(21, 16384 // seq_len))


def compare_registry(args, device, dtype) -> list[dict]:
    """Time and measure every registered attention against MHA of the same shape, at each length."""
    names = args.variants or list(variants.ATTENTION)
    if BASELINE not in names:
        names = [BASELINE, *names]
    rows = []
    for seq_len in args.lengths:
        x, grad_out = inputs(args, seq_len, dtype, device)
        modules, failed = {}, {}
        for name in names:
            torch.manual_seed(0)
            try:
                modules[name] = variants.ATTENTION[name](layer_config(name, args, max(args.lengths))).to(device, dtype)
            except Exception as error:  # noqa: BLE001 - a variant that cannot be built is reported, not fatal
                failed[name] = f"{type(error).__name__}: {error}"
        steps = {name: forward_backward(module, x, grad_out) for name, module in modules.items()}
        times = common.interleaved_times(steps, rounds_for(seq_len, args), args.warmup, device)
        base_memory = measure_memory(modules[BASELINE], steps[BASELINE], x, device)
        for name in names:
            row = {"seq_len": seq_len, "attention": name}
            if name in failed:
                rows.append({**row, "status": "failed", "reason": failed[name]})
                continue
            memory = base_memory if name == BASELINE else measure_memory(modules[name], steps[name], x, device)
            rows.append({
                **row,
                "median_ms": 1000 * common.median(times[name]),
                "min_ms": 1000 * min(times[name]),
                "time_vs_mha": common.median_ratio(times[name], times[BASELINE]),
                "time_vs_mha_min": common.min_ratio(times[name], times[BASELINE]),
                "spread": common.spread(times[name]),
                "rounds": len(times[name]),
                "peak_mb": memory["peak_mb"],
                "peak_vs_mha": memory["peak_mb"] / base_memory["peak_mb"],
                "saved_mb": memory["saved_mb"],
                "status": "ok",
                "reason": "",
            })
        print(common.format_table([r for r in rows if r["seq_len"] == seq_len], REGISTRY_COLUMNS), flush=True)
    return rows


def compare_direct(args, device, dtype) -> tuple[list[dict], float]:
    """N4 attention against the direct T x T formulations on the same weights, at each length.

    Returns the rows and the largest relative difference between the outputs.
    """
    torch.manual_seed(0)
    n4 = N4Attention(layer_config("n4", args, max(args.direct_lengths)), scale="hidden_size").to(device, dtype)
    modules = {"n4": n4, "direct": DirectN4Attention(n4, keys="matrix"), "cumsum_keys": DirectN4Attention(n4, keys="cumsum")}
    # Plain causal MHA of the same shape: how far the fused kernel alone gets from the direct form.
    torch.manual_seed(0)
    mha = variants.ATTENTION[BASELINE](layer_config(BASELINE, args, max(args.direct_lengths))).to(device, dtype)
    rows, largest_difference = [], 0.0
    for seq_len in args.direct_lengths:
        x, grad_out = inputs(args, seq_len, dtype, device)

        # Same function: the outputs agree to rounding.
        with torch.no_grad():
            outputs = {name: module(x) for name, module in modules.items()}
            scale = outputs["direct"].abs().max()
            difference = max(((out - outputs["direct"]).abs().max() / scale).item() for out in outputs.values())
        largest_difference = max(largest_difference, difference)

        steps = {name: forward_backward(module, x, grad_out) for name, module in modules.items()}
        steps[BASELINE] = forward_backward(mha, x, grad_out)
        times = common.interleaved_times(steps, rounds_for(seq_len, args), args.warmup, device)
        memory = {name: measure_memory(module, steps[name], x, device) for name, module in modules.items()}
        rows.append({
            "seq_len": seq_len,
            "n4_ms": 1000 * common.median(times["n4"]),
            "direct_ms": 1000 * common.median(times["direct"]),
            "cumsum_keys_ms": 1000 * common.median(times["cumsum_keys"]),
            "speedup": common.median_ratio(times["direct"], times["n4"]),
            "speedup_min": common.min_ratio(times["direct"], times["n4"]),
            "speedup_vs_cumsum_keys": common.median_ratio(times["cumsum_keys"], times["n4"]),
            "mha_ms": 1000 * common.median(times[BASELINE]),
            "mha_speedup": common.median_ratio(times["direct"], times[BASELINE]),
            "rounds": len(times["n4"]),
            **{f"{name}_peak_mb": memory[name]["peak_mb"] for name in modules},
            **{f"{name}_saved_mb": memory[name]["saved_mb"] for name in modules},
            "max_rel_diff": difference,
        })

    # Memory growth per doubling of T: mem(2T) / mem(T), ~2 when linear and ~4 when quadratic.
    for previous, row in zip(rows, rows[1:]):
        doublings = math.log2(row["seq_len"] / previous["seq_len"])
        for name in modules:
            for kind in ("peak", "saved"):
                before, after = previous[f"{name}_{kind}_mb"], row[f"{name}_{kind}_mb"]
                row[f"{name}_{kind}_growth"] = (after / before) ** (1 / doublings) if before > 0 else float("nan")
    print(common.format_table(rows, DIRECT_COLUMNS), flush=True)
    return rows, largest_difference


REGISTRY_COLUMNS = [
    "seq_len", "attention", "median_ms", "time_vs_mha", "time_vs_mha_min", "spread", "peak_mb", "peak_vs_mha", "saved_mb", "status",
]
DIRECT_COLUMNS = [
    "seq_len", "n4_ms", "direct_ms", "cumsum_keys_ms", "mha_ms", "speedup", "speedup_min", "speedup_vs_cumsum_keys", "mha_speedup",
    "n4_peak_mb", "direct_peak_mb", "n4_peak_growth", "direct_peak_growth", "n4_saved_growth", "direct_saved_growth",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096], help="sequence lengths of comparison 1")
    parser.add_argument("--direct-lengths", type=int, nargs="+", default=[512, 1024, 2048], help="sequence lengths of comparison 2")
    parser.add_argument("--variants", nargs="+", help="attention names (default: every registered one)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--width", type=int, default=256, help="hidden size C")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads of gqa")
    parser.add_argument("--window", type=int, default=256, help="window of swa")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the layer and its input")
    parser.add_argument("--rounds", type=int, help="timed calls of each case (default: 16384 // T, between 5 and 21)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each case first")
    parser.add_argument("--skip-direct", action="store_true", help="run comparison 1 only")
    parser.add_argument("--skip-registry", action="store_true", help="run comparison 2 only")
    common.add_common_arguments(parser, "attention")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, machine = common.setup(args)
    dtype = DTYPES[args.dtype]
    print(common.describe_machine(machine))
    print(f"B={args.batch} C={args.width} H={args.heads} dtype={args.dtype}, forward + backward\n")

    registry_rows, direct_rows, difference = [], [], float("nan")
    if not args.skip_registry:
        registry_rows = compare_registry(args, device, dtype)
    if not args.skip_direct:
        print("\nN4 attention against the direct T x T formulation (speedup = direct time / N4 time)")
        direct_rows, difference = compare_direct(args, device, dtype)
        print(f"largest relative difference between the two outputs: {difference:.2e}")

    settings = {k: v for k, v in vars(args).items() if k != "out"}
    meta = {"machine": machine, "settings": settings, "direct_max_rel_diff": difference}
    paths = common.write_results(args.out, registry_rows, meta, {"direct": direct_rows})
    print("\nwrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
