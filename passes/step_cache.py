"""The graph side of the first-block step cache (:mod:`sdtm_compile.runtime.step_cache`): where the residual
stream is read, the *head* and *out* graphs cut from the unmerged engine, and the pass that makes every engine
also return the last block's image output.

* head: the unmerged model up to the end of its first block, returning the first block's image input and output
  (``[B, N, C]`` each);
* out: the final norm, projection and unpatchify, from the last block's image output (an input ``sdtm_hidden``);
* :func:`add_hidden_output`: every engine returns the last block's image output as its ``hidden`` state output
  (:func:`hidden_state`), so the dispatcher can keep ``h_last - h_first`` for the steps it skips.

SD3 / SD3.5 joint blocks only.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
from torch import fx

from sdtm_compile.core.layout import ModelLayout
from sdtm_compile.core.ops import sdtm_unmerge
from sdtm_compile.core.signature import StateTensor

from ._graph import copy_graph_module, set_state_output, state_input_name, state_outputs
from .facts import fact
from .settings import PassSettings
from .sites import ModelSites

__all__ = [
    "ResidualSites",
    "residual_sites",
    "head_graph",
    "out_graph",
    "add_hidden_output",
    "hidden_state",
    "HIDDEN_STATE",
    "HIDDEN_INPUT_NAME",
]

logger = logging.getLogger(__name__)

#: The contract's name for the last block's image output (an engine returns it when the step cache is on).
HIDDEN_STATE = "hidden"
HIDDEN_INPUT_NAME = state_input_name(HIDDEN_STATE)


def hidden_state(layout: ModelLayout) -> StateTensor:
    """The contract's entry for the last block's image output ``[B, N, C]`` (an output only)."""
    return StateTensor(
        HIDDEN_STATE,
        (layout.batch, layout.num_tokens, layout.width),
        layout.dtype,
        carried=False,
        description="the last block's image output (the first-block step cache keeps it for skipped steps)",
    )


@dataclass(frozen=True)
class ResidualSites:
    """Names of the residual-stream nodes the cache reads (equal in every rewritten copy of one traced graph)."""

    first_in: str  #: the first block's image input ``[B, N, C]``
    first_out: str  #: the first block's image output
    last_out: str  #: the last block's image output (what the final norm reads)


def _gated_residual_add(branch_output: fx.Node, where: str) -> fx.Node:
    """``hidden + gate * branch_output``: the residual add that follows a branch's gate multiply (through the
    branch's unmerge, in a merged graph)."""
    unmerged = [u for u in branch_output.users if u.target is sdtm_unmerge]
    if len(unmerged) == 1:
        branch_output = unmerged[0]
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


def add_hidden_output(
    gm: fx.GraphModule, sites: ModelSites, settings: PassSettings
) -> tuple[fx.GraphModule, ModelSites]:
    """Return the last block's image output as the engine's ``hidden`` state output (the step cache)."""
    last = sites.blocks[-1]
    if last.ff is None:
        raise ValueError(f"first-block cache: {last.path} has no feed-forward branch to read the residual after")
    set_state_output(gm, settings.contract, HIDDEN_STATE, _gated_residual_add(last.ff.output, f"{last.path}.ff"))
    gm.recompile()
    logger.debug("add_hidden_output: %s returns %s's image output", settings.key, last.path)
    return gm, sites


@fact("hidden_output")
def _has_hidden_output(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> bool:
    """The engine returns its ``hidden`` state output."""
    return HIDDEN_STATE in state_outputs(gm)
