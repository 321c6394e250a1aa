"""The ``sdtm-compile`` command line: one module per command, each with ``register(subparsers)``.

``demo`` (:mod:`.demo`), ``export`` and ``export-triton`` (:mod:`.export`), ``lint`` (:mod:`.lint`), ``passes``
(:mod:`.passes`), ``bench`` (:mod:`.bench`), ``train-testbed`` and ``testbed-samples`` (:mod:`.testbed`),
``tune`` (:mod:`.tune`), ``serve`` and ``serve-bench`` (:mod:`.serve`), ``doctor`` (:mod:`.doctor`).
"""

from __future__ import annotations

import argparse
import logging

from . import bench, demo, doctor, export, lint, passes, serve, testbed, tune

__all__ = ["main", "COMMANDS"]

#: The command modules, in the order ``--help`` lists them.
COMMANDS = (demo, export, lint, passes, bench, tune, testbed, serve, doctor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdtm-compile", description="Token merging for diffusion transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    return args.run(args)
