"""The rewrite pipeline: which passes run, in which order, and what each needs and guarantees.

Like ``torch.fx``'s ``PassBase.requires`` / ``ensures``, every pass declares the facts it needs before it runs
and the facts it establishes; :func:`rewrite_for_engine` checks both *on the graph* (the facts are functions
of the graph, not bookkeeping), so a pass run out of order, or one that silently did nothing, fails loudly
and names itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from sdtm_compile.config import MethodConfig
from sdtm_compile.engine_state import state_inputs, state_outputs
from sdtm_compile.merge import merged_branches
from sdtm_compile.ops import sdtm_merge, sdtm_plan, sdtm_unmerge
from sdtm_compile.schedule import EngineKey, Stage

from ._graph import copy_with_node_map, node_shape
from .attention_bias import add_key_size_bias
from .find_blocks import FALLBACK_HINT, ModelSites, find_mmdit_blocks
from .fix_token_shapes import TokenShapeError, fix_token_shapes, propagate_shapes
from .fuse_cache import new_cache, thread_step_cache
from .gather_rotary import gather_rotary_positions, pending_rotary_reads
from .insert_merge import block_plans, insert_merge_nodes, merged_blocks
from .settings import PassSettings
from .split_single_stream import split_single_stream
from .thread_li import li_input, thread_li_state
from .window_stat import add_window_statistic

__all__ = [
    "engine_state_examples",
    "GraphPass",
    "REWRITE_PIPELINE",
    "FACTS",
    "PassOrderError",
    "RewrittenGraph",
    "rewrite_for_engine",
]

logger = logging.getLogger(__name__)

Pass = Callable[[fx.GraphModule, ModelSites, PassSettings], fx.GraphModule]


class PassOrderError(RuntimeError):
    """A pass ran without a fact it requires, or did not establish a fact it promises."""


def _has_li(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> bool:
    return li_input(gm) is not None


def _merged_as_planned(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> bool:
    """One plan per planning block, a merge per distinct merged input and an unmerge per merged branch (none for
    FULL)."""
    plans = sum(n.target is sdtm_plan for n in gm.graph.nodes)
    merges = sum(n.target is sdtm_merge for n in gm.graph.nodes)
    unmerges = sum(n.target is sdtm_unmerge for n in gm.graph.nodes)
    if settings.key.stage is Stage.FULL:
        return plans == merges == unmerges == 0
    merged = merged_branches(settings.key.stage, sites.family, settings.config)
    branches = [b.branches_named(merged) for b in merged_blocks(sites, settings)]
    inputs = sum(len({branch.input for _, branch in named}) for named in branches)
    distinct_plans = {source for source in block_plans(sites, settings) if source is not None}
    return plans == len(distinct_plans) and merges == inputs and unmerges == sum(map(len, branches))


def _rotary_per_token(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> bool:
    """No merged attention reads the RoPE table of the unmerged sequence."""
    return not pending_rotary_reads(sites, settings)


def _single_streams_split(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> bool:
    """Every merged single-stream block has its ``mlp`` branch and no ``proj_out`` over ``cat([attn, mlp])`` is left
    (nothing to split for the FULL engine, or for a model without single-stream blocks)."""
    if settings.key.stage is Stage.FULL:
        return True
    singles = [b for b in merged_blocks(sites, settings) if b.stream is not None]
    left = [b for b in singles if b.stream.proj_out in gm.graph.nodes]  # type: ignore[union-attr]
    return all(b.mlp is not None for b in singles) and not left


#: Facts a pass may require or ensure: ``name -> check(gm, sites, settings)``.
FACTS: dict[str, Callable[[fx.GraphModule, ModelSites, PassSettings], bool]] = {
    "li_threaded": _has_li,
    "merge_nodes_inserted": _merged_as_planned,
    "single_streams_split": _single_streams_split,
    "rotary_per_token": _rotary_per_token,
}


@dataclass(frozen=True)
class GraphPass:
    """One rewrite pass: ``run(gm, sites, settings) -> gm`` with the facts it requires and ensures."""

    name: str
    run: Pass
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ()


#: The rewrite of one bucket graph, in order. ``find_mmdit_blocks`` (an analysis) runs before it; after it,
#: :func:`rewrite_for_engine` propagates fake tensors through the result (every shape must fit, the outputs keep
#: their shapes), and the TensorRT lint (a check on the aten graph) runs before TensorRT builds.
REWRITE_PIPELINE: tuple[GraphPass, ...] = (
    GraphPass("split_single_stream", split_single_stream, ensures=("single_streams_split",)),
    GraphPass("thread_li_state", thread_li_state, ensures=("li_threaded",)),
    GraphPass(
        "insert_merge_nodes",
        insert_merge_nodes,
        requires=("li_threaded", "single_streams_split"),
        ensures=("merge_nodes_inserted",),
    ),
    GraphPass(
        "gather_rotary_positions",
        gather_rotary_positions,
        requires=("merge_nodes_inserted",),
        ensures=("rotary_per_token",),
    ),
    GraphPass("add_key_size_bias", add_key_size_bias, requires=("merge_nodes_inserted",)),
    GraphPass("fix_token_shapes", fix_token_shapes, requires=("merge_nodes_inserted", "rotary_per_token")),
    # The state the dispatcher carries besides li, after the graph's shapes are final (each is a no-op unless the
    # config asks for it): the cache-fusion cache, then SDTM*'s statistic.
    GraphPass("thread_step_cache", thread_step_cache, requires=("merge_nodes_inserted",)),
    GraphPass("add_window_statistic", add_window_statistic, requires=("li_threaded",)),
)


@dataclass(frozen=True)
class RewrittenGraph:
    """One engine's graph: takes the traced graph's inputs plus the state (``li`` [, cache]) and returns its outputs
    plus the state [and SDTM*'s statistic] (:mod:`sdtm_compile.engine_state`)."""

    key: EngineKey
    gm: fx.GraphModule
    sites: ModelSites  #: the merge sites, as nodes of ``gm``


def _check(facts: tuple[str, ...], gm: fx.GraphModule, sites: ModelSites, settings: PassSettings, what: str) -> None:
    for fact in facts:
        if not FACTS[fact](gm, sites, settings):
            raise PassOrderError(f"{what}: fact {fact!r} does not hold on the graph ({settings.key})")


def rewrite_for_engine(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    settings: PassSettings,
    sites: ModelSites | None = None,
    pipeline: tuple[GraphPass, ...] | None = None,
) -> RewrittenGraph:
    """A copy of ``gm`` rewritten for ``settings.key`` by ``pipeline``; output shapes checked.

    ``sites`` (from :func:`find_mmdit_blocks` on ``gm``) is found when not given; ``pipeline`` defaults to
    :data:`REWRITE_PIPELINE` (read at call time). ``gm`` is not modified.
    """
    pipeline = REWRITE_PIPELINE if pipeline is None else pipeline
    sites = sites if sites is not None else find_mmdit_blocks(gm, example_inputs)
    out, node_map = copy_with_node_map(gm)
    sites = sites.remapped(node_map)
    for graph_pass in pipeline:
        _check(graph_pass.requires, out, sites, settings, f"before {graph_pass.name}")
        out = graph_pass.run(out, sites, settings)
        _check(graph_pass.ensures, out, sites, settings, f"after {graph_pass.name}")
    _check_shapes(gm, out, example_inputs, sites, settings)
    return RewrittenGraph(settings.key, out, sites)


def _check_shapes(
    traced: fx.GraphModule, out: fx.GraphModule, inputs: list[torch.Tensor], sites: ModelSites, settings: PassSettings
) -> None:
    """Propagate fake tensors through ``out``; its outputs must keep the traced graph's shapes (plus ``li``)."""
    batch = inputs[sites.latent_index].shape[0]
    state = engine_state_examples(sites, settings.config, batch)  # CPU tensors: only shapes and dtypes matter
    before = _output_shapes(traced)
    merged = merged_branches(settings.key.stage, sites.family, settings.config)
    changed = {n for n in out.graph.nodes if "sdtm" in n.meta}  # plan, merge, unmerge, the plan's parts, splits
    blocks = merged_blocks(sites, settings)
    changed |= {n for block in blocks for _, branch in block.branches_named(merged) for n in branch.nodes}
    propagate_shapes(out, [*inputs, *state], changed)
    after = _output_shapes(out)
    expected = [*before, *(tuple(t.shape) for t in state)]
    if state_outputs(settings.config)[-1] == "stat":
        expected.append((batch,))
    if after != expected:
        raise TokenShapeError(
            f"{settings.key}: the rewrite changed the graph's output shapes {expected} -> {after}; a merged region "
            f"leaks merged tokens into an output. {FALLBACK_HINT}"
        )


def engine_state_examples(sites: ModelSites, config: MethodConfig, batch: int, device=None) -> list[torch.Tensor]:
    """Fresh state inputs of an engine (:mod:`sdtm_compile.engine_state`): the method's ``li`` and, with cache
    fusion, an empty cache."""
    from sdtm_compile.methods import method_for

    state = [method_for(config).init_state(batch, sites.num_tokens, device)]
    if state_inputs(config)[-1] == "cache":
        state.append(new_cache(sites, config, batch, device))  # type: ignore[arg-type]
    return state


def _output_shapes(gm: fx.GraphModule) -> list[tuple[int, ...] | None]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return [node_shape(value) for value in output.args[0]]
