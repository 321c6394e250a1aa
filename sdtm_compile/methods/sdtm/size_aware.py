"""Size-aware attention (``SDTMConfig.size_aware_attention``): prompt reweighting, our formulation, as an extension.

The paper names prompt reweighting; the release declares ``a_p`` and never reads it. Ours: in a merged attention,
each merged image key standing for ``s`` tokens gets an additive ``log(s)`` bias (so it keeps the attention mass of
the tokens it replaced) and the text keys ``log(text_key_weight)``: the ``attn_mask`` of the attention's
``scaled_dot_product_attention``, built from the plan's ``inv_count``.

The parts of the extension (:mod:`sdtm_compile.core.extension`): the pass :func:`add_key_size_bias` on every
merged attention of a merged engine, and the same bias passed to the eager reference's attention call. It adds no
state.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import fx

from ...core.extension import Extension, ReferenceHooks
from ...core.layout import ModelLayout
from ...core.merge import MergePlan
from ...core.method import ATTENTION_BRANCHES
from ...core.ops import MERGE_ARGS, graph_op, sdtm_merge
from ...core.schedule import EngineKey, Stage
from ...core.signature import EngineState
from ...passes import (
    GraphPass,
    ModelSites,
    PassContext,
    PassSettings,
    copy_location,
    fact,
    merged_blocks,
    merged_branch_names,
    node_shape,
    node_value,
)
from .config import SDTMConfig

__all__ = ["SizeAwareAttention", "add_key_size_bias", "key_size_bias", "sdtm_key_bias", "SDPA_TARGETS"]

logger = logging.getLogger(__name__)

_INV_COUNT = MERGE_ARGS.index("inv_count")

#: How a traced graph calls scaled-dot-product attention.
SDPA_TARGETS = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def key_size_bias(inv_count: torch.Tensor, text_tokens: int, text_first: bool, text_log_weight: float) -> torch.Tensor:
    """Size-aware attention's additive key bias ``[B, 1, 1, M + T]``.

    ``inv_count`` ``[B, M]``: ``1 / size`` of each merged image token, so its bias ``-log(inv_count) = log(size)``
    makes one merged key weigh like the ``size`` keys it replaced; text keys get ``text_log_weight``. ``text_first``:
    the joint sequence's order (Flux: text first; SD3: image first); ``text_tokens`` 0 for an image-only attention.
    """
    image = -torch.log(inv_count.float())
    text = image.new_full((image.shape[0], text_tokens), float(text_log_weight))
    parts = (text, image) if text_first else (image, text)
    return torch.cat(parts, dim=1)[:, None, None, :]


@graph_op
def sdtm_key_bias(inv_count: torch.Tensor, text_tokens: int, text_first: bool, text_log_weight: float) -> torch.Tensor:
    """Size-aware attention's key bias ``[B, 1, 1, M + T]`` (see :func:`key_size_bias`)."""
    return key_size_bias(inv_count, text_tokens, text_first, text_log_weight)


def _operand(node: fx.Node, position: int, name: str) -> fx.Node:
    """An argument of a traced SDPA call, given by position or by keyword."""
    value = node.args[position] if len(node.args) > position else node.kwargs.get(name)
    if not isinstance(value, fx.Node):
        raise ValueError(f"{node.name}: scaled_dot_product_attention has no {name} argument")
    return value


def _merged_attentions(sites: ModelSites, settings: PassSettings):
    """``(block, name, branch)`` of every merged attention branch of the engine."""
    names = tuple(b for b in ATTENTION_BRANCHES if b in merged_branch_names(sites, settings))
    for block in merged_blocks(sites, settings):
        for name, branch in block.branches_named(names):
            yield block, name, branch


def add_key_size_bias(
    gm: fx.GraphModule, sites: ModelSites, settings: PassSettings
) -> tuple[fx.GraphModule, ModelSites]:
    """Give each merged attention branch's SDPA an additive key bias built from its plan's ``inv_count``
    (:func:`key_size_bias`)."""
    config = settings.config
    graph = gm.graph
    biased = 0
    for block, name, branch in _merged_attentions(sites, settings):
        merge = next(u for u in branch.input.users if u.target is sdtm_merge)
        sdpa = [n for n in branch.nodes if n.target in SDPA_TARGETS]
        if len(sdpa) != 1:
            raise ValueError(f"{block.path}.{name}: expected one scaled_dot_product_attention, found {len(sdpa)}")
        node = sdpa[0]
        if node.kwargs.get("attn_mask") is not None or len(node.args) > 3 or node.kwargs.get("is_causal"):
            raise ValueError(
                f"{block.path}.{name}: the attention already has a mask; size-aware attention cannot add one"
            )
        key_shape = node_shape(_operand(node, 1, "key"))  # recorded before merging: [B, H, N + T, D]
        assert key_shape is not None
        text = key_shape[2] - sites.num_tokens
        with graph.inserting_before(node):
            bias = graph.call_function(
                sdtm_key_bias, (merge.args[_INV_COUNT], text, sites.family == "flux", math.log(config.text_key_weight))
            )
        query = node_value(_operand(node, 0, "query"))
        with graph.inserting_after(bias):
            mask = graph.call_method("to", (bias, query.dtype))  # SDPA wants the query's dtype
        for inserted in (bias, mask):
            copy_location(inserted, node, "bias")
        node.kwargs = {**node.kwargs, "attn_mask": mask}
        biased += 1
    gm.recompile()
    logger.debug("add_key_size_bias: %s, %d attentions biased", settings.key, biased)
    return gm, sites


@fact("attention_biased")
def _attention_biased(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> bool:
    """Every merged attention's SDPA takes a mask made by ``sdtm_key_bias``."""
    for _, _, branch in _merged_attentions(sites, settings):
        sdpa = [n for n in branch.nodes if n.target in SDPA_TARGETS]
        mask = sdpa[0].kwargs.get("attn_mask") if len(sdpa) == 1 else None
        if not isinstance(mask, fx.Node) or mask.args[0].target is not sdtm_key_bias:  # type: ignore[union-attr]
            return False
    return True


class _BiasHooks(ReferenceHooks):
    """Size-aware attention in the eager reference: the same key bias, passed to the attention call."""

    def __init__(self, config: SDTMConfig) -> None:
        self.log_weight = math.log(config.text_key_weight)

    def attention_bias(self, plan: MergePlan, text_tokens: int, text_first: bool) -> torch.Tensor:
        return key_size_bias(plan.inv_count, text_tokens, text_first, self.log_weight)


def _merges_attention(context: PassContext) -> bool:
    return context.merges and any(b in context.merged_branches for b in ATTENTION_BRANCHES)


class SizeAwareAttention(Extension):
    """The extension (see the module docstring)."""

    name = "size_aware_attention"

    def __init__(self, config: SDTMConfig) -> None:
        self.config = config

    def check(self, layout: ModelLayout) -> str | None:
        if layout.context_parallel > 1:
            return (
                "size_aware_attention biases each key by the size of the merged token it is; under context "
                "parallelism the keys of every rank meet after Ulysses' all-to-all, which carries no bias with them "
                "(not supported yet). Use size_aware_attention=False"
            )
        return None

    def passes(self) -> tuple[GraphPass, ...]:
        return (
            GraphPass(
                "add_key_size_bias",
                add_key_size_bias,
                requires=("merge_nodes_inserted",),
                ensures=("attention_biased",),
                phase="rewrite",
                applies=_merges_attention,
                doc="size-aware attention: a log(size) key bias on every merged attention",
            ),
        )

    def reference(self, state: EngineState, key: EngineKey, layout: ModelLayout) -> ReferenceHooks | None:
        return _BiasHooks(self.config) if key.stage is not Stage.FULL else None
