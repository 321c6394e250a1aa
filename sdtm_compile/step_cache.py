"""First-block caching - a step cache - composed with token merging, decided by the dispatcher.

A step cache skips work when consecutive steps barely differ; token merging makes the work that runs cheaper. They
compose. This is the rule of diffusers' ``FirstBlockCacheConfig`` (ParaAttention's "first block cache"), moved into
the compiled backend so it works with every merging engine and never breaks Dynamo's graph:

* every call first runs a small *head* engine: the unmerged model up to the end of its first block, returning the
  first block's image input and output (``[B, N, C]`` each); the residual ``r = out - in`` is compared with the one
  of the last computed step: ``mean|r - r_prev| / mean|r_prev|`` (diffusers' ``_should_compute_remaining_blocks``);
* above ``threshold`` (or with no earlier step, or ``threshold`` 0) the step's engine runs as usual (merged or
  not), returning also the last block's image output ``h``; the dispatcher keeps ``r`` and ``h - out``;
* at or below it the rest of the model is skipped: an *out* engine (final norm, projection, unpatchify) runs on
  ``out + (h - out)_cached``, and the merging state (``li``) is left as it was.

What it costs: one head (the embeddings and one unmerged block) per call, also on computed steps (the step's own
engine runs its first block again: ``1 / num_blocks`` extra, ours - diffusers' hook reuses the head's output), and
``2 x B x N x C`` of memory per call of a step. SD3 / SD3.5 only; not with cache fusion (both would keep a cache
of the same steps).
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx

from .passes import ModelSites, copy_graph_module

__all__ = ["FirstBlockCacheConfig", "ResidualSites", "residual_sites", "head_graph", "out_graph", "add_hidden_output"]

logger = logging.getLogger(__name__)

HIDDEN_INPUT_NAME = "sdtm_hidden"


@dataclass(frozen=True)
class FirstBlockCacheConfig:
    """First-block caching in the ``sdtm`` backend (``options={"step_cache": FirstBlockCacheConfig(0.1)}``).

    Attributes:
        threshold: Skip the rest of the model when the first block's residual changed by at most this much
            (relative mean absolute change) since the last computed step. ``0``: never skip (every step runs
            fully; the head still runs). Range ``[0, 10]``. diffusers' examples use 0.2 on Flux.
    """

    threshold: float = 0.1

    def __post_init__(self) -> None:
        value = self.threshold
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not 0 <= value <= 10
        ):
            raise ValueError(f"FirstBlockCacheConfig.threshold={value!r} is invalid: allowed a number in [0, 10]")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FirstBlockCacheConfig:
        unknown = sorted(set(values) - {"threshold"})
        if unknown:
            raise ValueError(f"FirstBlockCacheConfig has no field(s) {unknown}; valid fields: ['threshold']")
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class ResidualSites:
    """Names of the residual-stream nodes the cache reads (equal in every rewritten copy of one traced graph)."""

    first_in: str  #: the first block's image input ``[B, N, C]``
    first_out: str  #: the first block's image output
    last_out: str  #: the last block's image output (what the final norm reads)


def _gated_residual_add(branch_output: fx.Node, where: str) -> fx.Node:
    """``hidden + gate * branch_output``: the residual add that follows a branch's gate multiply."""
    gate = [u for u in branch_output.users if u.target in (operator.mul, torch.mul)]
    adds = [u for u in gate[0].users if u.target in (operator.add, torch.add)] if len(gate) == 1 else []
    if len(adds) != 1:
        raise ValueError(f"first-block cache: {where} is not followed by a gate multiply and a residual add")
    return adds[0]


def residual_sites(sites: ModelSites) -> ResidualSites:
    """Find the residual nodes on the *unmerged* graph's sites (SD3 / SD3.5 joint blocks)."""
    if sites.family != "sd3":
        raise ValueError(
            f"the first-block cache is implemented for SD3 / SD3.5, not for {sites.family} models; on Flux, "
            "diffusers' own FirstBlockCacheConfig runs on the unmerged model"
        )
    first, last = sites.blocks[0], sites.blocks[-1]
    assert first.attn is not None and first.ff is not None and last.ff is not None
    attn_add = _gated_residual_add(first.attn.output, f"{first.path}.attn")
    first_in = next(a for a in attn_add.args if isinstance(a, fx.Node) and a.target not in (operator.mul, torch.mul))
    first_out = _gated_residual_add(first.ff.output, f"{first.path}.ff")
    last_out = _gated_residual_add(last.ff.output, f"{last.path}.ff")
    return ResidualSites(first_in.name, first_out.name, last_out.name)


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    if node is None:
        raise ValueError(f"first-block cache: node {name} is missing from a rewritten graph")
    return node


def head_graph(full: fx.GraphModule, names: ResidualSites) -> fx.GraphModule:
    """A copy of the unmerged graph that stops after the first block: ``(*inputs, *state) -> (first_in,
    first_out)``."""
    gm = copy_graph_module(full)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((_node(gm, names.first_in), _node(gm, names.first_out)),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def out_graph(full: fx.GraphModule, names: ResidualSites, num_model_outputs: int) -> fx.GraphModule:
    """A copy of the unmerged graph that starts after the last block: ``(*inputs, *state, hidden) -> model
    outputs`` (the blocks are dead code once the last block's output is an input)."""
    gm = copy_graph_module(full)
    graph = gm.graph
    last = _node(gm, names.last_out)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        hidden = graph.placeholder(HIDDEN_INPUT_NAME)
    hidden.meta = dict(last.meta)
    last.replace_all_uses_with(hidden)
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(output.args[0][:num_model_outputs]),)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def add_hidden_output(gm: fx.GraphModule, names: ResidualSites) -> fx.GraphModule:
    """Append the last block's image output to a bucket graph's outputs (in place)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((*output.args[0], _node(gm, names.last_out)),)
    gm.recompile()
    return gm


def relative_change(previous: torch.Tensor, current: torch.Tensor) -> float:
    """``mean|current - previous| / mean|previous|`` (one host read)."""
    return float((current - previous).abs().mean() / previous.abs().mean())
