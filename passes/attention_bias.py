"""Size-aware attention (prompt reweighting, ours): a ``log(size)`` bias on every merged image key of a merged
attention and ``log(text_key_weight)`` on its text keys, as its ``scaled_dot_product_attention``'s ``attn_mask``."""

from __future__ import annotations

import logging
import math

import torch
from torch import fx

from sdtm_compile.config import SDTMConfig
from sdtm_compile.merge import merged_branches
from sdtm_compile.ops import sdtm_key_bias, sdtm_merge
from sdtm_compile.schedule import Stage

from ._graph import copy_location, node_shape
from .find_blocks import ModelSites
from .insert_merge import merged_blocks
from .settings import PassSettings

__all__ = ["add_key_size_bias", "SDPA_TARGETS"]

logger = logging.getLogger(__name__)

#: How a traced graph calls scaled-dot-product attention.
SDPA_TARGETS = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def add_key_size_bias(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> fx.GraphModule:
    """With ``size_aware_attention`` on: give each merged attention branch's SDPA an additive key bias built from
    its plan's ``inv_count`` (:func:`~sdtm_compile.merge.key_size_bias`). Otherwise, or for ``FULL``: nothing."""
    config = settings.config
    if not (isinstance(config, SDTMConfig) and config.size_aware_attention) or settings.key.stage is Stage.FULL:
        return gm
    graph = gm.graph
    merged = merged_branches(settings.key.stage, sites.family, config)
    biased = 0
    for block in merged_blocks(sites, settings):
        for name, branch in block.branches_named(tuple(b for b in ("attn", "attn2") if b in merged)):
            merge = next(u for u in graph.nodes if u.target is sdtm_merge and u.args[0] is branch.input)
            sdpa = [n for n in branch.nodes if n.target in SDPA_TARGETS]
            if len(sdpa) != 1:
                raise ValueError(f"{block.path}.{name}: expected one scaled_dot_product_attention, found {len(sdpa)}")
            node = sdpa[0]
            if node.kwargs.get("attn_mask") is not None or len(node.args) > 3 or node.kwargs.get("is_causal"):
                raise ValueError(
                    f"{block.path}.{name}: the attention already has a mask; size-aware attention cannot add one"
                )
            key_shape = node_shape(node.args[1])  # recorded before merging: [B, H, N + T, D]
            assert key_shape is not None
            text = key_shape[2] - sites.num_tokens
            with graph.inserting_before(node):
                bias = graph.call_function(
                    sdtm_key_bias, (merge.args[2], text, sites.family == "flux", math.log(config.text_key_weight))
                )
            query = node.args[0].meta.get("val", node.args[0].meta.get("example_value"))  # type: ignore[union-attr]
            with graph.inserting_after(bias):
                mask = graph.call_method("to", (bias, query.dtype))  # SDPA wants the query's dtype
            for inserted in (bias, mask):
                copy_location(inserted, node, "bias")
            node.kwargs = {**node.kwargs, "attn_mask": mask}
            biased += 1
    gm.recompile()
    logger.debug("add_key_size_bias: %s, %d attentions biased", settings.key, biased)
    return gm
