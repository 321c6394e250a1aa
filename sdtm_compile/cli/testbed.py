"""``sdtm-compile train-testbed`` (train the testbed) and ``sdtm-compile testbed-samples`` (its sample picture)."""

from __future__ import annotations

import argparse

from ..models.testbed.model import load_testbed
from ..models.testbed.quality import plot_samples
from ..models.testbed.train import TrainConfig, train_testbed

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train-testbed", help="train the testbed model (resumes from OUT_DIR/checkpoint.pt)")
    defaults = TrainConfig()
    train.add_argument("--out-dir", default=defaults.out_dir, help="checkpoint and loss log (default testbed_run)")
    train.add_argument(
        "--weights",
        default=None,
        help="final weights (default OUT_DIR/testbed-1024.safetensors; the package's: "
        "sdtm_compile/models/testbed/weights/testbed-1024.safetensors)",
    )
    train.add_argument("--steps-low", type=int, default=defaults.steps_low, help="steps on 32x32 crops")
    train.add_argument("--steps-full", type=int, default=defaults.steps_full, help="steps on 64x64 crops")
    train.add_argument("--batch-low", type=int, default=defaults.batch_low)
    train.add_argument("--batch-full", type=int, default=defaults.batch_full)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    train.set_defaults(run=run_train)
    samples = sub.add_parser("testbed-samples", help="picture: testbed samples next to real held-out crops")
    samples.add_argument("--out", default="testbed_samples.png")
    samples.add_argument("--seeds", type=int, default=8)
    samples.add_argument("--steps", type=int, default=28)
    samples.add_argument("--guidance-scale", type=float, default=3.0)
    samples.set_defaults(run=run_samples)


def run_train(args: argparse.Namespace) -> int:
    manifest = train_testbed(
        TrainConfig(
            out_dir=args.out_dir,
            weights=args.weights,
            steps_low=args.steps_low,
            steps_full=args.steps_full,
            batch_low=args.batch_low,
            batch_full=args.batch_full,
            seed=args.seed,
            threads=args.threads,
        )
    )
    training = manifest["training"]
    print(
        f"trained {training['steps']} steps in {training['wall_s']:.0f} s: held-out loss "
        f"{training['final_heldout_loss']} (random init {training['random_init_heldout_loss']}), train loss "
        f"{training['final_train_loss']}; wrote {manifest['weights']} (sha256 {manifest['sha256'][:16]}...)"
    )
    return 0


def run_samples(args: argparse.Namespace) -> int:
    path = plot_samples(load_testbed(), args.out, tuple(range(args.seeds)), args.steps, args.guidance_scale)
    print(f"wrote {path}")
    return 0
