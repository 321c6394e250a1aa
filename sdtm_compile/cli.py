"""The ``sdtm-compile`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios like 0.3,0.5, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdtm-compile", description="SDTM token merging for diffusion transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="tiny SD3 model, eager SDTM reference, per-step merge schedule")
    demo.add_argument("--ratios", type=_ratios, default=(0.3, 0.5), help="comma-separated, default 0.3,0.5")
    demo.add_argument("--steps", type=int, default=28)
    demo.add_argument("--latent", type=int, default=64, help="latent side (tokens = (side/2)^2), default 64")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )

    if args.command == "demo":
        from .demo import run_demo

        try:
            run_demo(args.ratios, args.steps, (args.latent, args.latent), args.seed)
        except ValueError as err:
            print(f"sdtm-compile demo: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
