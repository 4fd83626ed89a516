"""The training loop of one run: AdamW, warm-up then cosine decay, clipping, accumulation, evaluation.

Under torchrun the same loop trains with DistributedDataParallel (see ``train_run``).

Shapes: B micro-batch size, T sequence length, V vocabulary size.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from experiments import distributed
from experiments.config import TrainConfig
from n4.config import ModelConfig
from n4.model import CausalLM

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # a target with this id contributes neither loss nor token count

# Called with (step, {metric name: value}) at every log and evaluation point.
MetricsCallback = Callable[[int, dict[str, float]], None]

# Called with (step, validation loss) after every evaluation after step 0. An exception raised by
# it (such as optuna.TrialPruned) ends the run and propagates out of train_run.
EvalCallback = Callable[[int, float], None]

RESUME_FORMAT = 1  # version of the resume-state layout written by save_resume_state


@dataclass
class RunResult:
    status: str  # "finished" or "failed"
    failure_reason: str = ""
    failed_step: int | None = None
    steps_done: int = 0
    params: int = 0
    non_embedding_params: int = 0
    flops_per_token: float = 0.0
    final_val_loss: float = math.nan
    initial_val_loss: float = math.nan
    tokens_per_s: float = math.nan
    mfu: float = math.nan
    peak_mem_mb: float = math.nan
    wall_s: float = 0.0
    data_fingerprint: str = ""
    val_history: list[tuple[int, float]] = field(default_factory=list)
    model: CausalLM | None = field(default=None, repr=False)  # the trained model, for checkpoints
    checkpoint: str = ""  # where the runner saved the model, if it did


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"loss became {value} at step {step}")
        self.step = step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use train.device=cpu or auto")
    return device


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Return the learning-rate multiplier after ``step`` optimizer steps (0-based).

    Linear warm-up from 1/warmup_steps to 1 over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@functools.lru_cache(maxsize=None)
def measured_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Return the FLOP/s of the fastest of ``repeats`` (size x size) products through F.linear.

    The denominator of model FLOPs utilisation when train.peak_flops is not given: a measured
    matmul peak of this machine in the run's dtype, not a vendor figure. Measured once per process.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    F.linear(a, b)
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        F.linear(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; norms' gains, scalars and biases are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps)


def save_resume_state(path: Path, state: dict) -> None:
    """Write a resume state with torch.save through a temporary file, so a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_resume_state(path: Path, resume_key: str) -> dict | None:
    """Return the resume state at ``path``, or None when there is none or it belongs to another run.

    Loaded with ``weights_only=True``, so nothing but tensors and plain containers is unpickled.
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unreadable state means "start from step 0"
        logger.warning("resume state %s is unreadable (%s); the run starts from step 0", path, error)
        return None
    if state.get("format") != RESUME_FORMAT or state.get("resume_key") != resume_key:
        logger.warning("resume state %s belongs to another run or format; the run starts from step 0", path)
        return None
    return state


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """Return this process's random number generator states, as stored in a resume state."""
    state = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], device)


def check_same_resume_step(state: dict | None, resume_path: Path | None) -> None:
    """Raise RuntimeError unless every rank loaded a resume state of the same step, or none."""
    step = int(state["step"]) if state is not None else 0
    steps = distributed.all_gather_object(step)
    if len(set(steps)) > 1:
        raise RuntimeError(
            f"the ranks loaded resume states of different steps {steps} (by rank) from {resume_path}; "
            f"put the resume state on a filesystem that every rank reads"
        )


def wrap_data_parallel(module: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """Wrap ``module`` in DistributedDataParallel, which broadcasts rank 0's weights to every rank."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


class PeakMemory:
    """Peak memory of one run in MiB: CUDA's allocator peak, or the process's peak RSS on CPU.

    On Linux, writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM), so each run of a
    grid measures its own peak. Elsewhere the CPU figure is the peak of the whole process so far.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")

    def read_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def evaluate(model: CausalLM, windows: torch.Tensor, batch_size: int, device: torch.device, autocast) -> float:
    """Return the mean next-token loss over the fixed validation windows (N, T + 1)."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device, non_blocking=True)
        inputs, targets = batch[:, :-1].clamp(min=0), batch[:, 1:]
        with autocast():
            logits = model(inputs)  # (B, T, V) float32
        total += F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
        ).double()
        count += int((targets != IGNORE_INDEX).sum())
    model.train()
    return (total / count).item()


def train_run(
    model_config: ModelConfig,
    train: TrainConfig,
    batches,
    val_windows: torch.Tensor,
    seed: int,
    on_metrics: MetricsCallback | None = None,
    progress: Callable[[int, float], None] | None = None,
    on_eval: EvalCallback | None = None,
    resume_path: Path | None = None,
    resume_key: str = "",
    before_checkpoint: Callable[[], None] | None = None,
) -> RunResult:
    """Train one model and return its result; a non-finite loss ends the run as failed.

    ``batches.batch(i)`` returns the i-th micro-batch (B, T + 1) of the shared data order, so
    every run of an ablation reads the same tokens in the same order. ``seed`` only initialises
    the model (and dropout).

    With ``resume_path``, the run saves its full state there every ``train.checkpoint_interval``
    steps: model, optimizer, scheduler, random number generators, the validation history and the
    step, which is also the position in the data. A later call with the same path and
    ``resume_key`` continues from that state, so that in float32 on CPU the resumed run gives the
    same losses as an uninterrupted one. Metrics are reported again only for steps after the
    saved one. The caller removes the file once the run has ended.

    When a process group of W > 1 ranks is initialised (``distributed.init_from_env``), every
    rank calls train_run with the same arguments and trains the model in DistributedDataParallel.
    Rank r takes rows [r * B / W, (r + 1) * B / W) of each micro-batch, and the gradient and the
    logged loss remain the token mean over the whole global step, so the run computes what a
    single process computes, up to floating-point rounding. Only rank 0 evaluates, calls the
    callbacks and writes resume states. Every rank reads the resume state from ``resume_path`` and
    returns the same validation history and fingerprint.
    """
    context = distributed.current_context()
    world_size = context.world_size
    if context.is_distributed:
        distributed.check_divisible(train.batch_size, world_size)
    if not context.is_main:
        # NOTE: an exception raised by a callback leaves the other ranks waiting in their next
        # collective until the launcher (torchrun) ends them after rank 0's process exits.
        on_metrics, progress, on_eval = None, None, None
    on_metrics = on_metrics or (lambda step, metrics: None)
    device = resolve_device(train.device)
    if context.is_distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # init_from_env set it from LOCAL_RANK
    if train.threads:
        torch.set_num_threads(train.threads)
    autocast_dtype = torch.bfloat16 if train.dtype == "bfloat16" else None

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    # Model and optimizer; the seed fixes the initial weights and nothing else.
    torch.manual_seed(seed)
    model = CausalLM(model_config).to(device)
    # The compiled module shares its parameters with ``model``, which stays the one to save.
    # DistributedDataParallel wraps the compiled module, so rank 0 evaluates the compiled module
    # without the wrapper and its collectives.
    forward_model = torch.compile(model) if train.compile else model
    train_model = wrap_data_parallel(forward_model, device) if context.is_distributed else forward_model
    if context.is_distributed:
        # Each rank draws its own dropout masks, because the ranks hold different rows. The CPU
        # generator keeps only the low 32 bits of a seed, so the ranks get consecutive seeds.
        torch.manual_seed(seed * world_size + context.rank)
    optimizer = build_optimizer(model, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train.warmup_steps, train.steps, train.min_lr_ratio)
    )
    result = RunResult(
        status="finished",
        params=model.num_parameters(),
        non_embedding_params=model.num_parameters(exclude_embeddings=True),
        flops_per_token=float(model.flops_per_token(train.seq_len)),
    )
    # The peak of all ranks together, since tokens_per_s counts the tokens of every rank.
    peak_flops = (train.peak_flops or measured_peak_flops(device, autocast_dtype or torch.float32)) * world_size
    memory = PeakMemory(device)
    fingerprint = hashlib.sha256(val_windows.numpy().tobytes())
    tokens_per_step = train.tokens_per_step
    checkpoint_interval = train.checkpoint_interval or train.eval_interval
    start_time = time.perf_counter()
    train_time = 0.0
    first_step = 1

    def run_evaluation() -> float:
        # Rank 0 evaluates and broadcasts the loss, so every rank records the same value.
        val_loss = math.nan
        if context.is_main:
            val_loss = evaluate(forward_model, val_windows, train.eval_batch_size, device, autocast)
        return distributed.broadcast_object(val_loss)

    state = load_resume_state(resume_path, resume_key) if resume_path is not None else None
    if context.is_distributed:
        check_same_resume_step(state, resume_path)
    if state is not None:
        # Continue after the saved step. The data position is the step itself, because batch i
        # is computed from i alone; the fingerprint is rebuilt from the batches already read.
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first_step = int(state["step"]) + 1
        result.steps_done = int(state["step"])
        result.val_history = [(int(step), float(loss)) for step, loss in state["val_history"]]
        result.initial_val_loss = result.val_history[0][1]
        train_time = float(state["train_time"])
        start_time -= float(state["wall_s"])
        for index in range((first_step - 1) * train.grad_accum):
            fingerprint.update(batches.batch(index).numpy().tobytes())
        if context.is_distributed and len(state.get("rng_ranks", [])) == world_size:
            set_rng_state(state["rng_ranks"][context.rank], device)
        else:
            # When one process or another number of ranks saved the state, every rank takes the
            # generators of the process or rank 0 that saved it.
            set_rng_state(state, device)
        logger.info("resuming from step %d (%s)", result.steps_done, resume_path)
    else:
        # Step 0: the loss of the untrained model, so every curve starts from the same point.
        val_loss = run_evaluation()
        result.initial_val_loss = val_loss
        result.val_history.append((0, val_loss))
        on_metrics(0, {"val/loss": val_loss})

    def save_state(step: int) -> None:
        # Every rank calls this, because the generator states are gathered from all ranks.
        rng_ranks = distributed.all_gather_object(rng_state(device)) if context.is_distributed else None
        if not context.is_main:
            return
        state = {
            "format": RESUME_FORMAT,
            "resume_key": resume_key,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **rng_state(device),
            "val_history": [[s, v] for s, v in result.val_history],
            "train_time": train_time,
            "wall_s": time.perf_counter() - start_time,
        }
        if rng_ranks is not None:
            state["rng_ranks"] = rng_ranks
        save_resume_state(resume_path, state)

    window_time = 0.0
    window_tokens = 0
    pending_losses: list[torch.Tensor] = []
    pending_first_step = first_step
    model.train()
    try:
        for step in range(first_step, train.steps + 1):
            step_start = time.perf_counter()

            # Forward and backward over the micro-batches. Each micro-batch's summed loss is
            # divided by the counted target tokens of the whole step, so the gradient is the token
            # mean over the step rather than a mean of micro-batch means. Targets equal to
            # IGNORE_INDEX, such as padding, are not counted.
            micro_batches = [batches.batch((step - 1) * train.grad_accum + micro) for micro in range(train.grad_accum)]
            local_batches = micro_batches
            if context.is_distributed:
                local_batches = [distributed.local_rows(batch, context.rank, world_size) for batch in micro_batches]
            step_tokens = sum(int((batch[:, 1:] != IGNORE_INDEX).sum()) for batch in local_batches)
            if context.is_distributed:
                # Sum the counted tokens over the ranks, so the mean is over the global step.
                step_tokens = int(distributed.all_reduce_sum(torch.tensor(step_tokens, device=device)).item())
            step_loss = torch.zeros((), device=device)
            for index, (global_batch, batch) in enumerate(zip(micro_batches, local_batches)):
                fingerprint.update(global_batch.numpy().tobytes())
                batch = batch.to(device, non_blocking=True)
                inputs, targets = batch[:, :-1].clamp(min=0), batch[:, 1:]
                # DistributedDataParallel averages the gradients over the ranks once, in the
                # backward pass of the step's last micro-batch.
                is_last = index == len(micro_batches) - 1
                no_sync = train_model.no_sync() if context.is_distributed and not is_last else contextlib.nullcontext()
                with no_sync:
                    with autocast():
                        logits = train_model(inputs)  # (B / W, T, V) float32
                    loss_sum = F.cross_entropy(
                        logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
                    )
                    loss = loss_sum / max(step_tokens, 1)
                    if context.is_distributed:
                        # Undo the average over the ranks, so the gradient is the global token mean.
                        loss = loss * world_size
                    loss.backward()
                step_loss += loss_sum.detach() / max(step_tokens, 1)

            # Clip, step, schedule.
            lr = optimizer.param_groups[0]["lr"]
            if train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            pending_losses.append(step_loss)
            elapsed = time.perf_counter() - step_start
            train_time += elapsed
            window_time += elapsed
            window_tokens += tokens_per_step
            result.steps_done = step

            # Log at step 1, every log_interval steps, before each resume state and at the end.
            # Losses stay on the device between log points, so the loop does not wait for the
            # device on every step.
            is_eval = step % train.eval_interval == 0 or step == train.steps
            is_checkpoint = resume_path is not None and step % checkpoint_interval == 0 and step < train.steps
            if step == 1 or step % train.log_interval == 0 or is_eval or is_checkpoint:
                # Each rank's losses are its rows' share of the step's token mean. Their sum over
                # the ranks is the global step's loss, so every rank makes the same non-finite check.
                values = distributed.all_reduce_sum(torch.stack(pending_losses)).tolist()
                for offset, value in enumerate(values):
                    if not math.isfinite(value):
                        raise NonFiniteLossError(pending_first_step + offset, value)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                window_time += time.perf_counter() - step_start - elapsed
                metrics = {
                    "train/loss": values[-1],
                    "lr": lr,
                    "tokens_per_s": window_tokens / max(window_time, 1e-9),
                }
                metrics["mfu"] = metrics["tokens_per_s"] * result.flops_per_token / peak_flops
                on_metrics(step, metrics)
                if progress:
                    progress(step, values[-1])
                pending_losses.clear()
                pending_first_step = step + 1
                window_time = 0.0
                window_tokens = 0

            if is_eval:
                val_loss = run_evaluation()
                if not math.isfinite(val_loss):
                    raise NonFiniteLossError(step, val_loss)
                result.val_history.append((step, val_loss))
                on_metrics(step, {"val/loss": val_loss})
                if on_eval is not None:
                    on_eval(step, val_loss)

            if is_checkpoint:
                if before_checkpoint is not None:
                    before_checkpoint()
                save_state(step)
    except NonFiniteLossError as error:
        result.status = "failed"
        result.failed_step = error.step
        result.failure_reason = str(error)
        logger.warning("run failed: %s", error)

    result.wall_s = time.perf_counter() - start_time
    result.final_val_loss = result.val_history[-1][1] if result.status == "finished" else math.nan
    trained_tokens = result.steps_done * tokens_per_step
    result.tokens_per_s = trained_tokens / train_time if train_time > 0 else math.nan
    result.mfu = result.tokens_per_s * result.flops_per_token / peak_flops
    result.peak_mem_mb = memory.read_mb()
    result.data_fingerprint = fingerprint.hexdigest()[:16]
    result.model = model
    return result
