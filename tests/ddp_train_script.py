"""Train the small model of test_distributed.py with DistributedDataParallel on two CPU ranks.

``python tests/ddp_train_script.py OUT_DIR [--compile]`` launches this script on two ranks
through torch.distributed.run, with every server bound to 127.0.0.1. Each rank writes its results
to OUT_DIR/rank{r}.pt. The test imports the data and configs from here for its single-process run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from test_train import VOCAB, FixedBatches, tiny_model_config, tiny_train_config
from torchrun_loopback import main as run_on_loopback

from experiments import distributed
from experiments.train import IGNORE_INDEX, train_run

WORLD_SIZE = 2


def training_windows() -> torch.Tensor:
    """Return 16 windows (16, 9), read as 4 micro-batches of 4 rows in a cycle."""
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, VOCAB, (16, 9), generator=generator)
    # Rank 0's rows of the first micro-batch count fewer targets than rank 1's rows, so a mean over
    # each rank's own tokens would give a different gradient than the token mean over the step.
    windows[0, 2:] = IGNORE_INDEX
    windows[1, 5:] = IGNORE_INDEX
    windows[6, 4:] = IGNORE_INDEX
    return windows


def validation_windows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    windows = torch.randint(0, VOCAB, (4, 9), generator=generator)
    windows[3, 6:] = IGNORE_INDEX
    return windows


def train_config(**changes):
    values = dict(steps=6, batch_size=4, grad_accum=2, seq_len=8, eval_interval=2, log_interval=1, warmup_steps=2,
                  grad_clip=1.0)
    values.update(changes)
    return tiny_train_config(**values)


def run(model_config, train, resume_path: Path | None = None) -> dict:
    """Train with train_run and return what the test compares: metrics, history and weights."""
    logged = []
    result = train_run(
        model_config,
        train,
        FixedBatches(training_windows(), train.batch_size),
        validation_windows(),
        seed=0,
        on_metrics=lambda step, metrics: logged.append((step, dict(metrics))),
        resume_path=resume_path,
        resume_key="ddp-test",
    )
    return {
        "status": result.status,
        "logged": logged,
        "val_history": result.val_history,
        "fingerprint": result.data_fingerprint,
        "weights": {name: tensor.detach().clone() for name, tensor in result.model.state_dict().items()},
    }


def run_rank(out_dir: Path, compile_model: bool) -> None:
    """Run the training cases on this rank and write their results to OUT_DIR/rank{r}.pt.

    With ``compile_model``, the only case is the plain run with train.compile set.
    """
    context = distributed.init_from_env("cpu")
    try:
        outputs = {"rank": context.rank, "world_size": context.world_size}
        if compile_model:
            outputs["compiled"] = run(tiny_model_config(), train_config(compile=True))
            torch.save(outputs, out_dir / f"rank{context.rank}.pt")
            return

        outputs["plain"] = run(tiny_model_config(), train_config())

        # The first dropout run saves resume states at steps 2 and 4 and leaves the one of step 4,
        # and the second run continues from it.
        resume_path = out_dir / "resume.pt"
        dropout_model = tiny_model_config(dropout=0.1)
        outputs["dropout"] = run(dropout_model, train_config(checkpoint_interval=2), resume_path)
        outputs["resumed"] = run(dropout_model, train_config(checkpoint_interval=2), resume_path)
        outputs["random_after_run"] = torch.rand(4)

        try:
            run(tiny_model_config(), train_config(batch_size=3))
            outputs["indivisible_error"] = ""
        except ValueError as error:
            outputs["indivisible_error"] = str(error)

        torch.save(outputs, out_dir / f"rank{context.rank}.pt")
    finally:
        distributed.destroy()


def launch(script_args: list[str]) -> None:
    """Run this script on WORLD_SIZE ranks, with every server bound to 127.0.0.1 (see torchrun_loopback)."""
    run_on_loopback([str(WORLD_SIZE), __file__, *script_args])

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path, help="folder for each rank's rank{r}.pt")
    parser.add_argument("--compile", action="store_true", help="train only the plain case with train.compile set")
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:
        run_rank(args.out_dir, args.compile)
    else:
        launch([str(args.out_dir), *(["--compile"] if args.compile else [])])
