"""Insert static-shape ``sdtm_plan`` / ``sdtm_merge`` / ``sdtm_unmerge`` nodes for one (stage, bucket)."""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from sdtm_compile.core.counts import count_input_name
from sdtm_compile.core.ops import PLAN_OUTPUTS, sdtm_merge, sdtm_plan, sdtm_unmerge
from sdtm_compile.core.schedule import EngineKey, TokenCounts

from ._graph import copy_location, set_state_output
from .settings import PassSettings
from .sites import BlockSites, Branch, ModelSites
from .thread_state import li_input

__all__ = [
    "insert_merge_nodes",
    "block_plans",
    "block_keys",
    "merged_blocks",
    "merged_branch_names",
    "block_token_counts",
]

logger = logging.getLogger(__name__)


def _wrap_branch(graph: fx.Graph, branch: Branch, plan: list[fx.Node], merges: dict[fx.Node, fx.Node]) -> None:
    """Merge what enters ``branch`` and unmerge what leaves it; nodes outside the branch are untouched.

    ``plan`` is ``[slot, inv_count, members, extra_tokens, extra_slots, order, assign, restore]``: getitem nodes of
    one ``sdtm_plan``, in ``sdtm_merge``'s order (``sdtm_unmerge`` takes ``slot`` and ``restore``); possibly an
    earlier block's plan, which this block reuses. ``merges``: the block's merges so far, by input; branches that
    share an input (a Flux single block's attention and MLP both read ``x[:, T:]``) share one merge.
    """
    inside = set(branch.nodes)
    slot, restore = plan[0], plan[-1]
    last = restore  # the plan's last getitem node (PLAN_OUTPUTS order)
    merged = merges.get(branch.input)
    if merged is None:
        with graph.inserting_after(last if _after(last, branch.input) else branch.input):
            merged = merges[branch.input] = graph.call_function(sdtm_merge, (branch.input, *plan))
        copy_location(merged, branch.input, "merge")
    branch.input.replace_all_uses_with(merged, delete_user_cb=lambda user: user in inside)
    with graph.inserting_after(branch.output):
        restored = graph.call_function(sdtm_unmerge, (branch.output, slot, restore))
    copy_location(restored, branch.output, "unmerge")
    branch.output.replace_all_uses_with(
        restored, delete_user_cb=lambda user: user is not restored and user not in inside
    )


def _after(a: fx.Node, b: fx.Node) -> bool:
    """True if node ``a`` comes after node ``b`` in graph order."""
    node = b
    while node.op != "root":
        if node is a:
            return True
        node = node.next
    return False


def insert_merge_nodes(
    gm: fx.GraphModule, sites: ModelSites, settings: PassSettings
) -> tuple[fx.GraphModule, ModelSites]:
    """For every merged block: plan from its image tokens (``plan_input``) or reuse the plan of the block the
    method names (:meth:`~sdtm_compile.core.method.TokenMethod.block_plans`), merge/unmerge the stage's branches
    (:meth:`~sdtm_compile.core.method.TokenMethod.merged_branches`)."""
    key = settings.key
    li = li_input(gm)
    if li is None:
        raise ValueError("insert_merge_nodes needs the sdtm_li input: run thread_engine_state first")
    sources = block_plans(sites, settings)
    if all(source is None for source in sources):  # the FULL engine (the pipeline leaves this pass out for it)
        logger.debug("insert_merge_nodes: %s engine merges no block, nothing to insert", key)
        return gm, sites
    grid_h, grid_w = sites.grid
    keys = block_keys(sites, settings)
    graph = gm.graph
    merged = settings.method.merged_branches(key.stage, sites.family)
    plans: dict[int, list[fx.Node]] = {}  # block index -> its plan's parts, in sdtm_merge's order
    counts: list[int] = []  # each plan's count (with dynamic counts: at the key the graph is rewritten for)
    count_inputs = _add_count_inputs(gm, sites, settings)
    for block, source in zip(sites.blocks, sources):
        if source is None:
            continue
        if source == block.index:
            spec = settings.method.plan_spec(keys[block.index], grid_h, grid_w)
            counts.append(spec.count)
            count: int | fx.Node = spec.count
            anchor = block.plan_input
            if count_inputs:  # the plan reads its count from its count input's length, N - count (core.counts)
                with graph.inserting_after(anchor):
                    length = graph.call_function(torch.ops.aten.sym_size.int, (count_inputs[block.index], 0))
                with graph.inserting_after(length):
                    count = anchor = graph.call_function(operator.sub, (sites.num_tokens, length))
                for node in (length, count):
                    copy_location(node, block.plan_input, "plan")
            with graph.inserting_after(anchor):
                plan = graph.call_function(
                    sdtm_plan, (block.plan_input, li, grid_h, grid_w, spec.method, count, spec.options)
                )
            parts, last = {}, plan
            for index, name in enumerate(PLAN_OUTPUTS):  # every part; a method without one returns None there
                with graph.inserting_after(last):
                    last = parts[name] = graph.call_function(operator.getitem, (plan, index))
            li = parts["li"]
            for node in (plan, *parts.values()):
                copy_location(node, block.plan_input, "plan")
            plans[block.index] = [parts[name] for name in PLAN_OUTPUTS if name != "li"]  # sdtm_merge's order
        merges: dict[fx.Node, fx.Node] = {}
        for _, branch in block.branches_named(merged):
            _wrap_branch(graph, branch, plans[source], merges)
    set_state_output(gm, settings.contract, "li", li)
    gm.recompile()
    logger.debug(
        "insert_merge_nodes: %s (%s, counts %s): %d plans for %d merged of %d blocks",
        key,
        settings.method.name,
        counts,
        len(plans),
        sum(source is not None for source in sources),
        len(sites.blocks),
    )
    return gm, sites


def _add_count_inputs(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> dict[int, fx.Node]:
    """With dynamic counts: the count inputs ``sdtm_count_<j>`` after the graph's inputs, and which one each
    planning block reads (block index -> placeholder); else nothing."""
    if not settings.method.dynamic_counts:
        return {}
    slots = settings.method.count_slots([block.kind for block in sites.blocks], settings.key, sites.grid)
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    inputs: list[fx.Node] = []
    for slot in range(1 + max((s for s in slots if s is not None), default=-1)):
        with gm.graph.inserting_after(last):
            last = gm.graph.placeholder(count_input_name(slot))
        inputs.append(last)
    return {index: inputs[slot] for index, slot in enumerate(slots) if slot is not None}


def block_plans(sites: ModelSites, settings: PassSettings) -> list[int | None]:
    """Per block of ``sites``: ``None`` (left unmerged) or the index of the block whose plan it uses (none
    merges in the ``FULL`` engine)."""
    return settings.method.plan_sources([block.kind for block in sites.blocks], settings.key, sites.grid)


def block_keys(sites: ModelSites, settings: PassSettings) -> list[EngineKey]:
    """Per block of ``sites``: the key it runs as in the engine of ``settings.key`` (``FULL``: unmerged; a merged
    block's ratio is the engine's scaled by the config's block schedule)."""
    return settings.method.block_keys([block.kind for block in sites.blocks], settings.key, sites.grid)


def merged_blocks(sites: ModelSites, settings: PassSettings) -> list[BlockSites]:
    """The blocks the engine of ``settings.key`` merges (every block for SDTM; a method may skip some)."""
    return [block for block, source in zip(sites.blocks, block_plans(sites, settings)) if source is not None]


def block_token_counts(sites: ModelSites, settings: PassSettings) -> tuple[TokenCounts, ...]:
    """Image tokens each branch of each block sees in the engine of ``settings.key`` (block order)."""
    kinds = [block.kind for block in sites.blocks]
    return settings.method.block_token_counts(kinds, settings.key, sites.grid, sites.family)


def merged_branch_names(sites: ModelSites, settings: PassSettings) -> tuple[str, ...]:
    """The branches the engine of ``settings.key`` merges on this model."""
    return settings.method.merged_branches(settings.key.stage, sites.family)
