"""Time per generated token with a KV cache and without, for every registered attention.

    .venv/bin/python benchmarks/decode.py [--contexts 64,128,256,512,1024,2048] [--attentions n4,mha]

For each attention and context length L, a small model (width 128, 4 heads, 2 key/value heads for
the GQA variants, 2 layers, window 256) processes a random prompt of L tokens and then generates
greedily:

- cached: the prompt fills a KV cache once (not timed), then each new token runs alone through
  the model;
- uncached: each new token reruns the whole sequence, as the published N4 generator does (here
  with this project's attention kernels, not the published T x T formulation).

It prints milliseconds per new token, the speedup, and the cache size: numbers stored per token
(summed over layers), the fixed-size state (N4's running key sums) and the numbers held at
context L. It writes the same to benchmarks/results/decode.csv, with the machine and torch
version in every row. Timings are wall-clock medians over the new tokens of one batch-1 run,
so other processes on the machine show in them. The CSV also has the fastest step of each
run, which other processes disturb the least.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

import variants
from n4 import CausalLM, ModelConfig

CONTEXTS = (64, 128, 256, 512, 1024, 2048)
RESULTS = Path(__file__).resolve().parent / "results" / "decode.csv"


def build_model(attention: str, position: str, max_seq_len: int) -> CausalLM:
    config = ModelConfig(
        vocab_size=1024,
        hidden_size=128,
        inter_size=256,
        heads=4,
        layers=2,
        attention=attention,
        position=position,
        kv_heads=2,
        window=256,
        max_seq_len=max_seq_len,
    )
    torch.manual_seed(0)
    return CausalLM(config).eval()


def time_cached(model: CausalLM, prompt: torch.Tensor, new_tokens: int) -> tuple[list[float], dict[str, int]]:
    """Return the milliseconds of each cached decoding step, and the cache sizes afterwards."""
    cache = model.new_cache()
    next_token = model(prompt, cache=cache)[:, -1].argmax(dim=-1, keepdim=True)  # prefill, not timed
    timings = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        next_token = model(next_token, cache=cache)[:, -1].argmax(dim=-1, keepdim=True)
        timings.append(time.perf_counter() - start)
    sizes = {
        "cache_numbers_per_token": cache.numbers_per_token,
        "cache_state_numbers": cache.state_numbers,
        "cache_numbers_held": cache.numbers(),
    }
    return [1000 * seconds for seconds in timings], sizes


def time_uncached(model: CausalLM, prompt: torch.Tensor, new_tokens: int) -> list[float]:
    """Return the milliseconds of each step that reruns the whole sequence."""
    sequence = prompt
    timings = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        next_token = model(sequence)[:, -1].argmax(dim=-1, keepdim=True)
        timings.append(time.perf_counter() - start)
        sequence = torch.cat((sequence, next_token), dim=1)
    return [1000 * seconds for seconds in timings]


def machine_description() -> dict[str, str]:
    return {
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} logical CPUs",
        "processor": platform.processor() or "unknown",
        "torch_version": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def parse_names(text: str, valid: list[str], what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; valid: {', '.join(valid)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="comma-separated prompt lengths")
    parser.add_argument("--attentions", default="all", help="comma-separated attention names, or 'all'")
    parser.add_argument("--position", default="none", choices=sorted(variants.POSITION), help="position encoding")
    parser.add_argument("--new-tokens", type=int, default=16, help="timed tokens per cached run")
    parser.add_argument("--uncached-tokens", type=int, default=4, help="timed tokens per uncached run")
    parser.add_argument("--output", type=Path, default=RESULTS, help="CSV file to write")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice); 1 is steadier "
        "when other processes share the CPU"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    contexts = [int(value) for value in args.contexts.split(",")]
    registered = sorted(variants.ATTENTION)
    attentions = registered if args.attentions == "all" else parse_names(args.attentions, registered, "attention")
    machine = machine_description()
    print(f"{machine['machine']}, {machine['processor']}, torch {machine['torch_version']}, "
          f"{machine['torch_threads']} threads")

    rows = []
    for attention in attentions:
        model = build_model(attention, args.position, max(contexts) + max(args.new_tokens, args.uncached_tokens) + 1)
        with torch.inference_mode():
            # One short untimed run first, so that one-off allocations do not land in the first row.
            warmup = torch.randint(0, model.config.vocab_size, (1, 16))
            time_cached(model, warmup, 2)
            time_uncached(model, warmup, 2)
            for context in contexts:
                prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
                cached_steps, sizes = time_cached(model, prompt, args.new_tokens)
                uncached_steps = time_uncached(model, prompt, args.uncached_tokens)
                cached_ms, uncached_ms = statistics.median(cached_steps), statistics.median(uncached_steps)
                rows.append({
                    "attention": attention,
                    "position": args.position,
                    "context": context,
                    "cached_ms_per_token": round(cached_ms, 3),
                    "uncached_ms_per_token": round(uncached_ms, 3),
                    "speedup": round(uncached_ms / cached_ms, 2),
                    "cached_min_ms_per_token": round(min(cached_steps), 3),
                    "uncached_min_ms_per_token": round(min(uncached_steps), 3),
                    "cache_numbers_per_token_per_layer": sizes["cache_numbers_per_token"] // model.config.layers,
                    **sizes,
                    **machine,
                })
                print(f"{attention:>7} L={context:>5}: cached {cached_ms:8.2f} ms, uncached {uncached_ms:8.2f} ms")

    table = pd.DataFrame(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output, index=False)

    print("\nMilliseconds per new token with a KV cache (batch 1):")
    print(table.pivot(index="attention", columns="context", values="cached_ms_per_token").to_string())
    print("\nMilliseconds per new token rerunning the whole sequence:")
    print(table.pivot(index="attention", columns="context", values="uncached_ms_per_token").to_string())
    print("\nFastest step with a KV cache, the least disturbed by other processes:")
    print(table.pivot(index="attention", columns="context", values="cached_min_ms_per_token").to_string())
    print("\nSpeedup of the cache (medians):")
    print(table.pivot(index="attention", columns="context", values="speedup").to_string())
    print(f"\nCache size per sequence, in numbers (all {model.config.layers} layers):")
    sizes = table[table.context == max(contexts)].set_index("attention")[
        ["cache_numbers_per_token_per_layer", "cache_numbers_per_token", "cache_state_numbers", "cache_numbers_held"]
    ]
    sizes = sizes.rename(columns={"cache_numbers_held": f"held_at_{max(contexts) + args.new_tokens}_tokens"})
    print(sizes.to_string())
    print(f"\nWrote {args.output}")


if __name__ == "__main__":
    main()
