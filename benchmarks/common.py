"""Helpers shared by the benchmark scripts: machine description, timing, memory, tables and files.

Every script measures its figures as ratios against a baseline inside one process. The compared
cases run interleaved, one call of each case per round with the order rotating between rounds, and
a ratio is the median over rounds of the per-round ratio. A busy or shared machine slows neighbouring
calls alike, so these ratios move much less than absolute times do.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# CPU features that decide how fast float32 and bfloat16 matmuls can be.
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and value.strip():
                model = value.strip()
            elif key == "flags":
                present = set(value.split())
                flags = [flag for flag in _CPU_FLAGS if flag in present]
                break
    except OSError:
        pass
    return model, flags


def load_average() -> float | None:
    """Return the one-minute load average, or None where the system has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Describe the machine, the software and the moment of a benchmark run."""
    model, flags = _cpu_model_and_flags()
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": " ".join(flags),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average_at_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(info: Mapping[str, Any]) -> str:
    """Return a one-line description of the machine for the head of a printed table."""
    text = (
        f"{info['date_utc']} UTC, {info['cpu']} ({info['logical_cores']} logical cores, "
        f"{info['torch_threads']} torch threads), torch {info['torch']}, device {info['device']}"
    )
    if info.get("gpu"):
        text += f" ({info['gpu']})"
    if info.get("load_average_at_start") is not None:
        text += f", load average {info['load_average_at_start']} at start"
    return text


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Return the wall time of one call of ``fn`` in seconds, waiting for the device to finish."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_times(
    cases: Mapping[str, Callable[[], Any]], rounds: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Time every case once per round, ``rounds`` times, after ``warmup`` untimed calls of each.

    The order of the cases rotates by one place each round, so no case always runs first (right
    after a pause) or right after the same neighbour. Returns the seconds of each call, by case.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(cases[name], device))
    return times


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i], for two cases timed in the same rounds."""
    return median(a / b for a, b in zip(numerator, denominator, strict=True))


def min_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """min(numerator) / min(denominator): the ratio of the fastest calls, which a busy machine only
    ever slows down, so it is the least disturbed estimate when other processes share the cores."""
    return min(numerator) / min(denominator)


def spread(values: Sequence[float]) -> float:
    """Relative spread of repeated measurements: (p75 - p25) / median, a rough noise figure."""
    if len(values) < 4:
        return float("nan")
    quartiles = statistics.quantiles(values, n=4)
    return (quartiles[2] - quartiles[0]) / statistics.median(values)


def peak_allocated_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Return the peak of bytes allocated by tensors during one call of ``fn``, above the level before it.

    CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated). CPU: the running sum of
    the allocation and free events that torch.profiler records with profile_memory=True, in time
    order, and its maximum. This counts memory allocated through PyTorch's CPU allocator, which
    contains every tensor. Scratch memory that a math library allocates by itself is not included.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    ]
    running = peak = 0
    for _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return peak


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Return the bytes of the distinct storages that autograd saves for backward during ``fn``.

    Counted through torch.autograd.graph.saved_tensors_hooks: each storage once, whole (a view
    keeps its base alive). Storages of the tensors in ``exclude``, such as the parameters, are
    left out, so the figure is the activation memory that the forward pass holds for backward.
    """
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in excluded:
            storages[pointer] = max(storages.get(pointer, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def matmul_peak_flops(
    dtype: torch.dtype, device: torch.device, max_size: int = 2048, min_call_s: float = 0.1, repeats: int = 5
) -> tuple[float, int]:
    """Measure the matmul peak: FLOP/s of the fastest of ``repeats`` (n x n) by (n x n) products.

    The product runs through F.linear, the call that nn.Linear makes. On CPUs PyTorch can route it
    to a faster library kernel than ``a @ b``, about 3x faster for bfloat16 on a CPU without
    AVX-512 BF16.

    n doubles from 256 until one product takes ``min_call_s`` or n reaches ``max_size``, so a dtype
    without fast kernels on this machine (bfloat16 on a CPU without AVX-512 BF16 or AMX) is not
    timed on products that take minutes. Returns the FLOP/s and n. This is what this machine and
    this PyTorch build reach on one large matmul, not a vendor figure.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    size = 256
    while True:
        a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
        b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
        first = time_call(lambda: F.linear(a, b), device)
        if first >= min_call_s or size >= max_size:
            break
        size *= 2
    best = min(time_call(lambda: F.linear(a, b), device) for _ in range(repeats))
    return 2 * size**3 / best, size


def add_common_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice)")
    parser.add_argument(
        "--out", default=str(RESULTS_DIR / default_name),
        help=f"output path without extension; .csv and .json are written (default: benchmarks/results/{default_name})",
    )


def setup(args: argparse.Namespace) -> tuple[torch.device, dict[str, Any]]:
    """Apply the common arguments; return the device and the machine description."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    return device, machine_info(device)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Return the rows as a fixed-width text table with the given columns."""
    cells = [[format_value(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.rjust(width) for column, width in zip(columns, widths))]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def write_results(
    out: str | Path, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
) -> list[Path]:
    """Write ``rows`` to OUT.csv, and the machine description, settings and every table to OUT.json.

    ``tables`` adds further tables, each to OUT-NAME.csv and under its name in the JSON file.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "load_average_at_end": load_average(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    written = []
    all_tables = {"rows": rows, **(tables or {})}
    for name, table in all_tables.items():
        if not table:
            continue
        path = out.with_name(out.name + ("" if name == "rows" else f"-{name}") + ".csv")
        columns: list[str] = []
        for row in table:
            columns += [key for key in row if key not in columns]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(table)
        written.append(path)
    json_path = out.with_name(out.name + ".json")
    json_path.write_text(json.dumps({"meta": meta, **{k: list(v) for k, v in all_tables.items()}}, indent=2, default=str) + "\n")
    written.append(json_path)
    return written

