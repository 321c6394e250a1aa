"""Give merged attention its rotary positions: RoPE rows gathered per merged token (Flux, ``merge_attention``).

Flux computes ``(cos, sin)`` ``[T + N, D]`` once, outside the blocks, and every attention reads them as
``table[None, :, None, :]`` ``[1, T + N, 1, D]``. Once a double block's image queries and keys are merged to
``M`` tokens, those reads must become ``[B, T + M, 1, D]``: text rows as they are, merged token ``m`` rotated by
its representative token's row (``sdtm_rotary``; see :func:`sdtm_compile.core.merge.merged_rotary_table`). The
representative comes from the plan (``members[:, :, 0]``), so the rows differ per batch row.

The pipeline runs it for Flux engines whose stage merges attention (SD3 has no RoPE read).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import replace

from torch import fx

from sdtm_compile.core.ops import MERGE_ARGS, sdtm_merge, sdtm_rotary

from ._graph import copy_location, node_shape
from .insert_merge import merged_blocks, merged_branch_names
from .settings import PassSettings
from .sites import BlockSites, ModelSites

__all__ = ["gather_rotary_positions", "pending_rotary_reads", "rotary_reads"]

logger = logging.getLogger(__name__)

_MEMBERS = MERGE_ARGS.index("members")


def rotary_reads(nodes: list[fx.Node], joint_tokens: int) -> list[fx.Node]:
    """The ``table[None, :, None, :]`` reads among ``nodes`` of a table ``[T + N, D]`` made outside them."""
    inside = set(nodes)
    found = []
    for node in nodes:
        if node.op != "call_function" or node.target is not operator.getitem:
            continue
        table, index = node.args
        shape = node_shape(table)
        if (
            isinstance(table, fx.Node)
            and table not in inside
            and shape is not None
            and len(shape) == 2
            and shape[0] == joint_tokens
            and index == (None, slice(None), None, slice(None))
        ):
            found.append(node)
    return found


def pending_rotary_reads(sites: ModelSites, settings: PassSettings) -> list[tuple[BlockSites, list[fx.Node]]]:
    """``(block, reads)`` for every merged attention that still reads the unmerged RoPE table (empty when the stage
    merges no attention, or once :func:`gather_rotary_positions` has run)."""
    if "attn" not in merged_branch_names(sites, settings) or not sites.text_tokens:
        return []
    joint = sites.num_tokens + sites.text_tokens
    blocks = merged_blocks(sites, settings)
    found = [(block, rotary_reads(block.attn.nodes, joint)) for block in blocks if block.attn is not None]
    return [(block, reads) for block, reads in found if reads]


def gather_rotary_positions(
    gm: fx.GraphModule, sites: ModelSites, settings: PassSettings
) -> tuple[fx.GraphModule, ModelSites]:
    """Replace every RoPE read inside a merged attention with ``sdtm_rotary(table, members, T)``; the sites'
    attention branches list the new nodes instead of the reads."""
    pending = pending_rotary_reads(sites, settings)
    updated = []
    for block, reads in pending:
        assert block.attn is not None
        merge_node = next((u for u in block.attn.input.users if u.target is sdtm_merge), None)
        if merge_node is None:
            raise ValueError(f"{block.path}: merged attention without an sdtm_merge node: run insert_merge_nodes first")
        members = merge_node.args[_MEMBERS]
        if members is None:
            raise ValueError(f"{block.path}: this merge plan has no representative tokens to take RoPE rows from")
        nodes = list(block.attn.nodes)
        for read in reads:
            with gm.graph.inserting_after(read):
                rotary = gm.graph.call_function(sdtm_rotary, (read.args[0], members, sites.text_tokens))
            copy_location(rotary, read, "rotary")
            read.replace_all_uses_with(rotary)
            gm.graph.erase_node(read)
            nodes[nodes.index(read)] = rotary
        updated.append(replace(block, attn=replace(block.attn, nodes=tuple(nodes))))
    gm.recompile()
    logger.debug(
        "gather_rotary_positions: %s: %d RoPE reads gathered per merged token",
        settings.key,
        sum(len(reads) for _, reads in pending),
    )
    return gm, sites.with_blocks(*updated)
