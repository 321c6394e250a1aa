"""Trace a transformer with Dynamo once and keep the FX graph (for export and tests)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

__all__ = ["capture_dynamo_graph"]


def capture_dynamo_graph(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """``torch.compile(model, dynamic=False)`` once with a backend that keeps the graph Dynamo hands it.

    Returns ``(gm, example_inputs)``: the same graph and flattened inputs (parameters included) the ``sdtm``
    backends receive. Dynamo's caches are reset before and after so nothing leaks into later compiles.
    """
    captured: dict[str, Any] = {}

    def keep(gm: fx.GraphModule, example_inputs: list[torch.Tensor]):
        captured["gm"], captured["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=keep, dynamic=False)(**inputs, return_dict=False)
    finally:
        torch._dynamo.reset()
    if "gm" not in captured:
        raise RuntimeError("Dynamo produced no graph for this model and these inputs")
    return captured["gm"], captured["inputs"]
