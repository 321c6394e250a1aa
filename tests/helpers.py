"""Shared test helpers: capture the graph Dynamo hands a backend, for real."""

from __future__ import annotations

import torch


def capture_dynamo_graph(model, inputs: dict):
    """Run ``torch.compile(model)`` once with a backend that keeps Dynamo's graph; returns (gm, example_inputs)."""
    captured = {}

    def keep(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=keep, dynamic=False)(**inputs, return_dict=False)
    torch._dynamo.reset()
    return captured["gm"], captured["inputs"]
