"""``sdtm-compile train-testbed`` (train the testbed) and ``sdtm-compile testbed-samples`` (its sample picture)."""

from __future__ import annotations

import argparse
import dataclasses

from ..models.testbed.model import TESTBEDS, load_testbed
from ..models.testbed.quality import plot_samples
from ..models.testbed.train import TrainConfig, train_testbed

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train-testbed", help="train a testbed model (resumes from OUT_DIR/checkpoint.pt)")
    train.add_argument(
        "--model",
        default="testbed-1024",
        choices=sorted(TESTBEDS),
        help="testbed-1024 (4 blocks, ~100 min) or testbed12-1024 (12 blocks, ~70 min; TrainConfig.deep())",
    )
    train.add_argument("--out-dir", default=None, help="checkpoint and loss log (default testbed_run / testbed12_run)")
    train.add_argument(
        "--weights",
        default=None,
        help="final weights (default OUT_DIR/MODEL.safetensors; the package's: "
        "sdtm_compile/models/testbed/weights/MODEL.safetensors)",
    )
    train.add_argument("--steps-low", type=int, default=None, help="steps on 32x32 crops")
    train.add_argument("--steps-full", type=int, default=None, help="steps on 64x64 crops")
    train.add_argument("--batch-low", type=int, default=None)
    train.add_argument("--batch-full", type=int, default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    train.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps (a time slice; run again to resume)"
    )
    train.set_defaults(run=run_train)
    samples = sub.add_parser("testbed-samples", help="picture: testbed samples next to real held-out crops")
    samples.add_argument("--model", default="testbed-1024", choices=sorted(TESTBEDS))
    samples.add_argument("--out", default="testbed_samples.png")
    samples.add_argument("--seeds", type=int, default=8)
    samples.add_argument("--steps", type=int, default=28)
    samples.add_argument("--guidance-scale", type=float, default=3.0)
    samples.set_defaults(run=run_samples)


def run_train(args: argparse.Namespace) -> int:
    base = TrainConfig.deep() if args.model == "testbed12-1024" else TrainConfig()
    given = {
        "out_dir": args.out_dir,
        "weights": args.weights,
        "steps_low": args.steps_low,
        "steps_full": args.steps_full,
        "batch_low": args.batch_low,
        "batch_full": args.batch_full,
        "seed": args.seed,
        "threads": args.threads,
    }
    config = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    manifest = train_testbed(config, max_steps=args.max_steps)
    if manifest is None:
        print(f"stopped after --max-steps {args.max_steps}; run the same command again to resume")
        return 0
    training = manifest["training"]
    print(
        f"trained {training['steps']} steps in {training['wall_s']:.0f} s: held-out loss "
        f"{training['final_heldout_loss']} (random init {training['random_init_heldout_loss']}), train loss "
        f"{training['final_train_loss']}; wrote {manifest['weights']} (sha256 {manifest['sha256'][:16]}...)"
    )
    return 0


def run_samples(args: argparse.Namespace) -> int:
    testbed = load_testbed(name=args.model)
    path = plot_samples(testbed, args.out, tuple(range(args.seeds)), args.steps, args.guidance_scale)
    print(f"wrote {path}")
    return 0
