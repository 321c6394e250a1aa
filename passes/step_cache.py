"""The graph side of the first-block step cache (:mod:`sdtm_compile.runtime.step_cache`): where the residual
stream is read, the *head* and *out* graphs cut from the unmerged engine, and the pass that makes every engine
also return the last block's image output.

* head: the unmerged model up to the end of its first block, returning the first block's image input and its
  outputs (the image stream ``[B, N, C]`` first, then the text stream ``[B, T, C]``: :func:`first_block_outputs`);
* tail (:func:`tail_graph`): an engine whose first block runs unmerged, cut to start from the first block's outputs,
  so a computed step does not run the first block a second time;
* out: the final norm, projection and unpatchify, from the last block's image output (an input ``sdtm_hidden``);
* :func:`add_hidden_output`: every engine returns the last block's image output as its ``hidden`` state output
  (:func:`hidden_state`), so the dispatcher can keep ``h_last - h_first`` for the steps it skips.

SD3 / SD3.5 joint blocks only.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from sdtm_compile.core.layout import ModelLayout
from sdtm_compile.core.ops import sdtm_unmerge
from sdtm_compile.core.signature import StateTensor

from ._graph import copy_graph_module, module_stack, set_state_output, state_input_name, state_outputs
from .facts import fact
from .settings import PassSettings
from .sites import ModelSites

__all__ = [
    "ResidualSites",
    "residual_sites",
    "first_block_outputs",
    "first_block_nodes",
    "head_graph",
    "tail_graph",
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
#: The tail engines' inputs that take the first block's outputs are named this, numbered.
FIRST_BLOCK_INPUT_PREFIX = "sdtm_first_block_output_"


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
    adds = []
    if len(gate) == 1:
        node = gate[0]
        # an extension may rewrite the gated output before the add (cache fusion blends it: one op in between)
        if not any(u.target in (operator.add, torch.add) for u in node.users) and len(node.users) == 1:
            node = next(iter(node.users))
        adds = [u for u in node.users if u.target in (operator.add, torch.add)]
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


def first_block_nodes(gm: fx.GraphModule, sites: ModelSites) -> frozenset[str]:
    """Names of the nodes of the first block (by their module stack)."""
    path = sites.blocks[0].path
    computing = (n for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
    return frozenset(n.name for n in computing if any(p == path for p, _ in module_stack(n)))


def first_block_outputs(full: fx.GraphModule, sites: ModelSites, names: ResidualSites) -> tuple[str, ...]:
    """The first block's values the rest of the *unmerged* graph reads: its image output (``names.first_out``) first,
    then the text stream."""
    inside = first_block_nodes(full, sites)
    # what the model's outputs need, not a state output alone (cache fusion stacks the first block's gated outputs
    # into its cache: an engine that stores them runs its own first block)
    output = next(n for n in full.graph.nodes if n.op == "output")
    values = list(output.args[0])
    needed: set[fx.Node] = set()
    pending = [v for v in values[: len(values) - len(state_outputs(full))] if isinstance(v, fx.Node)]
    while pending:
        node = pending.pop()
        if node not in needed:
            needed.add(node)
            pending.extend(node.all_input_nodes)
    live = [
        n.name
        for n in full.graph.nodes
        if n.name in inside and any(u.name not in inside and u in needed for u in n.users)
    ]
    if names.first_out not in live or len(live) != 2:
        raise ValueError(
            f"first-block cache: expected the first block ({sites.blocks[0].path}) to hand the rest of the model "
            f"its image and text streams, found {live}"
        )
    return (names.first_out, *(name for name in live if name != names.first_out))


def head_graph(full: fx.GraphModule, names: ResidualSites, outputs: Sequence[str]) -> fx.GraphModule:
    """A copy of the unmerged graph that stops after the first block: ``(*inputs, *state) -> (first_in,
    *outputs)`` (``outputs``: :func:`first_block_outputs`)."""
    gm = copy_graph_module(full)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((_node(gm, names.first_in), *(_node(gm, name) for name in outputs)),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def tail_graph(gm: fx.GraphModule, sites: ModelSites, outputs: Sequence[str]) -> fx.GraphModule:
    """A copy of an engine's graph that starts after its (unmerged) first block: ``(*inputs, *state, *outputs) ->
    the engine's outputs``, where ``outputs`` are the first block's (:func:`first_block_outputs`, as the head
    returns them). Raises ``ValueError`` if anything of the first block would still run."""
    gm = copy_graph_module(gm)
    graph = gm.graph
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for number, name in enumerate(outputs):
        node = _node(gm, name)
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(f"{FIRST_BLOCK_INPUT_PREFIX}{number}")
        anchor.meta = {k: node.meta[k] for k in ("val", "example_value", "tensor_meta") if k in node.meta}
        node.replace_all_uses_with(anchor)
    graph.eliminate_dead_code()
    left = first_block_nodes(gm, sites)
    if left:
        raise ValueError(f"first-block cache: {len(left)} nodes of {sites.blocks[0].path} still run after the cut")
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
