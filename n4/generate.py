"""Sample continuations from a ``CausalLM``, with or without a KV cache, and from the command line.

    python -m n4.generate --checkpoint DIR --prompt "Now is the winter" --max-new-tokens 50 \
        --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0

loads a directory written by ``n4.checkpoint.save_checkpoint`` and prints the prompt followed by
its continuation, decoded with the checkpoint's tokenizer.

Sampling of each new token from the float32 logits l (B, V) of the last position:

1. temperature 0 picks argmax l (greedy) and ignores top_k and top_p;
2. otherwise the logits become l / temperature;
3. top_k keeps the k largest logits (all tokens tied with the k-th largest are kept too);
4. top_p keeps the most probable tokens, in decreasing order of probability, up to and including
   the first one at which their total probability reaches top_p (nucleus sampling, Holtzman et
   al., arXiv 1904.09751), so at least one token stays;
5. the token is drawn from the softmax over the kept tokens.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from n4.cache import ModelCache
    from n4.model import CausalLM


def check_sampling_arguments(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    """Raise ValueError naming the first invalid sampling argument and what is allowed."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an integer >= 0")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature={temperature!r} is invalid: expected a number >= 0 (0 for greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid: expected None or an integer >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: expected None or a number in (0, 1]")


def next_token_probabilities(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Return the sampling distribution (B, V), float32, of logits (B, V) for temperature > 0.

    Applies the temperature, then top_k, then top_p, as the module docstring states; tokens
    filtered out get probability 0.
    """
    check_sampling_arguments(0, temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("temperature=0 is greedy decoding, which has no sampling distribution")
    scaled = logits.float() / temperature  # (B, V)

    # Top-k: drop every logit below the k-th largest.
    if top_k is not None and top_k < scaled.shape[-1]:
        kth_largest = scaled.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))

    # Top-p: drop each token whose more probable predecessors already reach top_p.
    if top_p is not None and top_p < 1:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V), 0 for the most probable token
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        scaled = scaled.masked_fill(drop, float("-inf"))

    return scaled.softmax(dim=-1)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token id per row of logits (B, V), as a (B,) int64 tensor; temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probabilities = next_token_probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(-1)


def _last_logits(model: CausalLM, input_ids: torch.Tensor, cache: ModelCache | None) -> torch.Tensor:
    """Return the logits (B, V) after input_ids, computed in eval mode without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(input_ids, cache=cache)[:, -1]
    finally:
        model.train(was_training)


def stream(
    model: CausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Return an iterator over up to ``max_new_tokens`` tokens sampled after input_ids (B, T).

    Each step yields a (B,) tensor with one token per row. Invalid arguments raise ValueError at
    the call. With ``use_cache`` the prompt runs once to fill a KV cache and each later step runs only the
    newest token. Without it every step runs the whole sequence again, as the published N4
    generator does. Both give the same tokens up to floating-point rounding. A row that has
    emitted ``eos_token_id`` gets ``eos_token_id`` at every later step, and the stream ends once
    every row has emitted it. The model runs in eval mode (no dropout) without gradients, and
    its mode is restored after each step. ``generator`` seeds the sampling.
    """
    check_sampling_arguments(max_new_tokens, temperature, top_k, top_p)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, seq) with seq >= 1, got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    vocab_size = model.config.vocab_size
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        raise ValueError(
            f"input_ids contains token ids from {int(input_ids.min())} to {int(input_ids.max())}, "
            f"outside the vocabulary 0 .. {vocab_size - 1}"
        )
    if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id={eos_token_id} is outside the vocabulary 0 .. {vocab_size - 1}")
    cache = model.new_cache() if use_cache else None  # raises TypeError for an attention without cache support
    return _decode(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, cache, generator)


def _decode(
    model: CausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | None,
    cache: ModelCache | None,
    generator: torch.Generator | None,
) -> Iterator[torch.Tensor]:
    if max_new_tokens == 0:
        return

    # Logits of the prompt's last position; a cache keeps the prompt's keys and values.
    sequence = input_ids
    logits = _last_logits(model, input_ids, cache)  # (B, V)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    for step in range(max_new_tokens):
        next_tokens = sample_next_token(logits, temperature, top_k, top_p, generator).to(input_ids.dtype)  # (B,)
        if eos_token_id is not None:
            next_tokens = next_tokens.masked_fill(finished, eos_token_id)
            finished |= next_tokens == eos_token_id
        yield next_tokens

        if step == max_new_tokens - 1 or bool(finished.all()):
            return

        # The next logits: from the newest token alone with a cache, else from the whole sequence.
        sequence = torch.cat((sequence, next_tokens[:, None]), dim=1)
        if cache is not None:
            logits = _last_logits(model, next_tokens[:, None], cache)
        else:
            logits = _last_logits(model, sequence, None)


def generate(
    model: CausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return input_ids (B, T) followed by the tokens of ``stream``, (B, T + N) with N <= max_new_tokens.

    N is smaller than max_new_tokens only when every row has emitted ``eos_token_id``.
    """
    new_tokens = list(
        stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, use_cache, generator)
    )
    if not new_tokens:
        return input_ids
    return torch.cat((input_ids, torch.stack(new_tokens, dim=1)), dim=1)


# --- Command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m n4.generate",
        description="Continue a prompt with a model saved by n4.checkpoint.save_checkpoint, decoded with "
        "the tokenizer saved beside it. Prints the prompt followed by the continuation.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json, model.safetensors)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="maximum number of tokens to generate")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the K most probable tokens")
    parser.add_argument(
        "--top-p", type=float, default=None, help="sample only among the most probable tokens whose probability sums to P"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling, for repeatable output")
    parser.add_argument("--eos-token", default=None, help="token text that ends generation, such as '<|endoftext|>'")
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute the whole sequence for every token instead of a KV cache"
    )
    parser.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (argument errors exit with status 2)."""
    from n4.checkpoint import load_checkpoint

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_sampling_arguments(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        model, tokenizer = load_checkpoint(args.checkpoint, device=args.device)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if tokenizer is None:
        parser.error(
            f"checkpoint {args.checkpoint} has no tokenizer: save it with "
            f"save_checkpoint(model, directory, tokenizer_path=...)"
        )

    # Encode the prompt and check it against the model's vocabulary.
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        parser.error(f"prompt {args.prompt!r} encodes to no tokens")
    if max(prompt_ids) >= model.config.vocab_size:
        parser.error(
            f"the tokenizer produced token id {max(prompt_ids)}, outside the model's vocabulary of "
            f"{model.config.vocab_size}: the checkpoint's tokenizer does not match its model"
        )
    eos_token_id = None
    if args.eos_token is not None:
        eos_token_id = tokenizer.token_to_id(args.eos_token)
        if eos_token_id is None:
            parser.error(f"--eos-token {args.eos_token!r} is not a token of the checkpoint's tokenizer")

    generator = torch.Generator(device=args.device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=args.device)

    # Print the continuation as it is generated. A byte-level token can end inside a multi-byte
    # character, which decodes to U+FFFD until the remaining bytes arrive, so such text waits.
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    generated: list[int] = []
    printed = ""
    for next_tokens in stream(
        model,
        input_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=eos_token_id,
        use_cache=not args.no_cache,
        generator=generator,
    ):
        generated.append(int(next_tokens[0]))
        text = tokenizer.decode(generated)
        if text.startswith(printed) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text

    # Whatever is still held back, such as an incomplete character at the very end.
    text = tokenizer.decode(generated)
    sys.stdout.write((text[len(printed) :] if text.startswith(printed) else text) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
