"""``sdtm-compile passes``: the rewrite pipeline of each engine of a method on a model, and the engine contract
(like torch-tensorrt's ``dump_lowering_passes()``)."""

from __future__ import annotations

import argparse

from ..compiler import BucketGraphs, capture_dynamo_graph
from ..passes import build_pipeline
from .common import load_model, model_arguments

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    passes = sub.add_parser(
        "passes", help="print the rewrite passes of every engine of a method on a model, and the engine contract"
    )
    model_arguments(passes)
    passes.set_defaults(latent=32)
    passes.add_argument("--step-cache", action="store_true", help="with the first-block step cache's output")
    passes.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, inputs, config = load_model(args)
    buckets = BucketGraphs(*capture_dynamo_graph(model, inputs), config, include_full=True, step_cache=args.step_cache)
    layout = buckets.sites.layout()
    print(
        f"{args.model}: {layout.family}, {len(layout.blocks)} blocks, {layout.grid[0]}x{layout.grid[1]} image tokens; "
        f"{buckets.method.name}: engines {', '.join(map(str, buckets.keys))}"
    )
    print(f"engine contract: {buckets.signature}")
    for stage in dict.fromkeys(key.stage for key in buckets.keys):
        print(build_pipeline(buckets.method, layout.family, stage, args.step_cache).describe())
    return 0
