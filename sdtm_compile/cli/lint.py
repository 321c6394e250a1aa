"""``sdtm-compile lint``: the TensorRT-readiness lint of every bucket graph (a check on the aten graph)."""

from __future__ import annotations

import argparse

from ..compiler import BucketGraphs, capture_dynamo_graph
from ..passes import lint_report, to_aten
from .common import load_model, model_arguments

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    lint = sub.add_parser("lint", help="TensorRT-readiness lint of every bucket graph")
    model_arguments(lint)
    lint.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, inputs, config = load_model(args)
    buckets = BucketGraphs(*capture_dynamo_graph(model, inputs), config, include_full=True)
    errors = 0
    for bucket in buckets.distinct():  # with exact counts, each graph's count inputs symbolic over its range
        aten_graph = to_aten(bucket.graph.gm, buckets.engine_inputs(bucket.keys[0]))
        findings = lint_report(aten_graph)
        errors += sum(f.severity == "error" for f in findings)
        ops = len([n for n in aten_graph.graph.nodes if n.op == "call_function"])
        name = ", ".join(map(str, bucket.keys))
        print(f"{name:<15} {ops:>5} aten ops: " + ("OK" if not findings else f"{len(findings)} findings"))
        for finding in findings:
            print(f"    {finding}")
    return 1 if errors else 0
