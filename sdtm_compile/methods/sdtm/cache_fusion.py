"""Cache fusion (``SDTMConfig.cache_fusion``): the release's step cache, as an extension of SDTM.

Every ``protect_every``-th step of a generation (0, k, 2k, ...) is *protected*: it runs the unmerged engine, which
also returns each merged branch's gated output (one ``[B, N, C]`` per cached branch: the cache ``[K, B, N, C]``).
Every other step's merged engine takes the cache as an input and blends its merged positions,
``mcw * computed + (1 - mcw) * cached``, after the gate multiply. One cache is kept per call index of a step (CFG as
two calls keeps two), in the dispatcher's state of the generation.

The four parts of the extension (:mod:`sdtm_compile.core.extension`):

* state: ``cache`` ``[K, B, N, C]`` in the blocks' dtype, carried (:func:`cache_slots` orders it: per block the
  branches some stage merges, ``attn``, ``attn2``, ``ff``);
* pass :func:`fuse_cached_branches`: the ``FULL`` engine returns the stack of its gated branch outputs, a merged
  engine blends each merged branch with its cache slot (``sdtm_fuse``) and returns the cache it was given;
* reference hooks: the same store and blend on the eager reference's gated outputs;
* dispatcher: which steps are protected, and which cache each call is fed.

SD3 / SD3.5 as released; Flux too (ours): its double blocks' ``attn`` / ``ff`` like SD3's, and each single block's
attention and MLP columns of ``proj_out``, gated (see :func:`fuse_cached_branches`).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ...core.extension import Extension, ExtensionRun, ReferenceHooks
from ...core.layout import ModelLayout
from ...core.ops import PLAN_OUTPUTS, graph_op, sdtm_plan, sdtm_unmerge
from ...core.schedule import FULL, EngineKey, Stage
from ...core.signature import EngineSignature, EngineState, StateTensor
from ...passes import (
    BlockSites,
    Branch,
    GraphPass,
    ModelSites,
    PassSettings,
    copy_location,
    fact,
    set_state_output,
    split_single_blocks,
    state_input,
    state_outputs,
)
from .config import SDTMConfig

__all__ = ["CacheFusion", "CacheFusionError", "cache_slots", "fuse_cached", "fuse_cached_branches", "sdtm_fuse"]

logger = logging.getLogger(__name__)


class CacheFusionError(ValueError):
    """Cache fusion asked of a model or graph it does not support."""


def fuse_cached(computed: torch.Tensor, cached: torch.Tensor, li: torch.Tensor, mcw: float) -> torch.Tensor:
    """Cache fusion (the release's ``unmerge``): ``mcw * computed + (1 - mcw) * cached`` on merged positions.

    ``computed`` / ``cached``: ``[B, N, C]`` a branch's gated output now and at the last protected step; ``li``
    ``[B, N]``: the counter *after* this block's plan, which is 0 exactly on the tokens the plan left unmerged
    (SSM: tokens of unchosen windows; IDM: unmerged sources). So the blended positions are the release's: SSM's
    merged windows, IDM's destinations and merged sources (its ``dst_in_x_index`` is every destination).
    """
    return torch.where((li > 0)[..., None], mcw * computed + (1.0 - mcw) * cached, computed)


@graph_op
def sdtm_fuse(computed: torch.Tensor, cached: torch.Tensor, li: torch.Tensor, mcw: float) -> torch.Tensor:
    """Cache fusion on one gated branch output ``[B, N, C]`` (see :func:`fuse_cached`)."""
    return fuse_cached(computed, cached, li, mcw)


def cache_slots(layout: ModelLayout, method: Any) -> list[tuple[int, str]]:
    """``(block index, branch name)`` of every cached branch, in the cache's order: each block's image branches
    that some stage of ``method`` merges (SD3: ``attn``, ``attn2`` on SD3.5's dual-attention blocks, ``ff``), as
    the release stores ``attn_output``, ``attn_output2`` and ``mlp_output`` per layer; blocks the config's block
    schedule never merges are left out."""
    stages = (Stage.STRUCTURE, Stage.DETAIL)
    names = tuple(dict.fromkeys(name for stage in stages for name in method.merged_branches(stage, layout.family)))
    # a block the config's block schedule never merges has nothing to blend: no slot (the cache is K x B x N x C)
    merged = {
        index
        for stage in stages
        for index, key in enumerate(method.block_keys(layout.kinds, EngineKey(stage, 1.0), layout.grid))
        if key.stage is not Stage.FULL
    }
    return [
        (block.index, name)
        for block in layout.blocks
        for name in names
        if name in block.branches and block.index in merged
    ]


def _gate_multiply(value: fx.Node, where: str) -> fx.Node:
    """The node multiplying a branch output by its AdaLN gate (``gate.unsqueeze(1) * out``): the release caches and
    fuses *gated* outputs, so the cache is read and written there."""
    users = list(value.users)
    if len(users) == 1 and users[0].target in (operator.mul, torch.mul) and value in users[0].args:
        return users[0]
    raise CacheFusionError(
        f"{where}: expected the branch output to be used once, by its gate multiply; found users "
        f"{[u.format_node() for u in users]}. Cache fusion needs the diffusers blocks' layout "
        "(JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock)"
    )


def _plan_li(unmerged: fx.Node) -> fx.Node:
    """The ``li`` part of the plan an ``sdtm_unmerge`` node restores from (the counter after that block's plan)."""
    plan = unmerged.args[1].args[0]  # type: ignore[union-attr]  # slot = getitem(plan, 0)
    assert isinstance(plan, fx.Node) and plan.target is sdtm_plan
    return next(u for u in plan.users if u.target is operator.getitem and u.args[1] == PLAN_OUTPUTS.index("li"))


def _unmerge_of(branch: Branch | None) -> fx.Node | None:
    if branch is None:  # a single block's attention that this engine does not cut out: not merged
        return None
    return next((u for u in branch.output.users if u.target is sdtm_unmerge), None)


@dataclass(frozen=True)
class _SingleBlockGate:
    """Where a split Flux single block (``split_single_stream``) gates its update: ``gated = gate * (attn_out +
    mlp_joint)``, ``attn_out`` ``[B, T + N, C]`` its attention columns of ``proj_out`` (with the bias), ``mlp_joint``
    its MLP columns (image rows unmerged)."""

    gate: fx.Node  # [B, 1, C]
    attn_out: fx.Node
    mlp_joint: fx.Node
    gated: fx.Node


def _single_block_gate(block: BlockSites) -> _SingleBlockGate:
    assert block.mlp is not None, "split the single block first"
    image = _unmerge_of(block.mlp) or block.mlp.output
    joint = next((u for u in image.users if u.target is torch.cat), None)  # the seam cat([m[:, :T], m[:, T:]], 1)
    if joint is None or len(joint.users) != 1:
        raise CacheFusionError(
            f"{block.path}: expected the split single block's MLP columns to be joined once and added to its "
            "attention columns (split_single_stream's layout); cache fusion needs the diffusers "
            "FluxSingleTransformerBlock's layout"
        )
    projected = next(iter(joint.users))
    gated = _gate_multiply(projected, f"{block.path} proj_out")
    gate = next(a for a in gated.args if a is not projected)
    attn_out = next(a for a in projected.args if a is not joint)
    return _SingleBlockGate(gate, attn_out, joint, gated)  # type: ignore[arg-type]


def _single_block_slots(
    gm: fx.GraphModule, block: BlockSites, names: dict[str, int], cache: fx.Node | None, text: int, mcw: float
) -> list[fx.Node]:
    """A split single block's cached branches: their gated image rows ``gate * attn_out[:, T:]`` and ``gate *
    mlp_joint[:, T:]`` (``names``: branch -> cache slot). With ``cache`` (a merged engine), each merged one is blended
    with its slot and, if any is, the block's image update becomes their sum (its text rows stay ``gate * (attn +
    mlp)``).
    Returns the gated nodes to store, in the order of ``names`` (``FULL``; nothing for a merged engine)."""
    graph = gm.graph
    site = _single_block_gate(block)
    # the cached branches this engine blends (none in FULL), each with the unmerge whose plan gives its li
    blended = {
        name: unmerged
        for name in names
        if cache is not None and (unmerged := _unmerge_of(getattr(block, name))) is not None
    }
    if cache is not None and not blended:  # a merged engine that blends nothing here: the block stays as it is
        return []
    image_rows = (slice(None), slice(text, None))
    made: list[fx.Node] = []
    rows: dict[str, fx.Node] = {}
    last = site.gated
    # FULL stores the cached columns; a blending engine needs both, to sum them for the image rows
    for name, joint in (("attn", site.attn_out), ("mlp", site.mlp_joint)):
        if not blended and name not in names:
            continue
        with graph.inserting_after(last):
            image = graph.call_function(operator.getitem, (joint, image_rows))
        with graph.inserting_after(image):
            last = graph.call_function(operator.mul, (site.gate, image))
        made += [image, last]
        if name in blended:
            with graph.inserting_after(last):
                cached = graph.call_function(operator.getitem, (cache, names[name]))
            with graph.inserting_after(cached):
                last = graph.call_function(sdtm_fuse, (last, cached, _plan_li(blended[name]), mcw))
            made += [cached, last]
        rows[name] = last
    if blended:  # the image rows' update: the (fused) columns, summed
        with graph.inserting_after(last):
            image = graph.call_function(operator.add, (rows["attn"], rows["mlp"]))
        with graph.inserting_after(image):
            text_rows = graph.call_function(operator.getitem, (site.gated, (slice(None), slice(None, text))))
        with graph.inserting_after(text_rows):
            update = graph.call_function(torch.cat, ([text_rows, image], 1))
        made += [image, text_rows, update]
        site.gated.replace_all_uses_with(update, delete_user_cb=lambda user: user is not text_rows)
    for node in made:
        copy_location(node, site.gated, "fuse")
    return [rows[name] for name in names] if cache is None else []


def fuse_cached_branches(
    gm: fx.GraphModule, sites: ModelSites, settings: PassSettings
) -> tuple[fx.GraphModule, ModelSites]:
    """The ``FULL`` engine returns the stack of its cached branches' gated outputs as its ``cache``; a merged engine
    blends every merged cached branch with its slot of the ``sdtm_cache`` input (and returns that input).

    A Flux single block gates the sum of its attention and MLP columns of ``proj_out``: its cached branches are
    those columns' gated image rows, so the ``FULL`` engine splits ``proj_out`` too (equal to the unsplit model up
    to float summation order), and a merged engine sums the two (fused) gated rows for the block's image update."""
    config = settings.config
    graph = gm.graph
    cache = state_input(gm, "cache")
    if cache is None:
        raise ValueError("fuse_cached_branches needs the sdtm_cache input: run thread_engine_state first")
    slots = cache_slots(sites.layout(), settings.method)
    blocks = {block.index: block for block in sites.blocks}
    full = settings.key.stage is Stage.FULL
    singles = [blocks[i] for i in dict.fromkeys(i for i, _ in slots) if blocks[i].kind == "single"]
    unsplit = [block for block in singles if block.mlp is None]  # FULL: the pipeline split none of them
    if unsplit:
        gm, sites = split_single_blocks(gm, sites, unsplit)
        blocks = {block.index: block for block in sites.blocks}
    gated: dict[tuple[int, str], fx.Node] = {}
    for block in singles:
        names = {name: k for k, (i, name) in enumerate(slots) if i == block.index}
        nodes = _single_block_slots(
            gm, blocks[block.index], names, None if full else cache, sites.text_tokens or 0, config.mcw
        )
        gated.update(zip(((block.index, name) for name in names), nodes))
    if full:
        for i, name in slots:
            if (i, name) not in gated:
                gated[i, name] = _gate_multiply(getattr(blocks[i], name).output, f"block {i} {name}")
        stacked = [gated[slot] for slot in slots]
        output = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(output):
            stored = graph.call_function(torch.stack, (stacked, 0))
        copy_location(stored, stacked[-1], "cache")
        set_state_output(gm, settings.contract, "cache", stored)
        done = len(stacked)
    else:
        done = sum(n.target is sdtm_fuse for n in graph.nodes)
        for k, (i, name) in enumerate(slots):
            if blocks[i].kind == "single":
                continue
            unmerged = _unmerge_of(getattr(blocks[i], name))
            if unmerged is None:  # this stage leaves the branch unmerged: nothing to blend (as released)
                continue
            gate = _gate_multiply(unmerged, f"block {i} {name}")
            with graph.inserting_after(gate):
                cached = graph.call_function(operator.getitem, (cache, k))
            with graph.inserting_after(cached):
                fused = graph.call_function(sdtm_fuse, (gate, cached, _plan_li(unmerged), config.mcw))
            for node in (cached, fused):
                copy_location(node, gate, "fuse")
            gate.replace_all_uses_with(fused, delete_user_cb=lambda user: user is not fused)
            done += 1
    gm.recompile()
    logger.debug(
        "fuse_cached_branches: %s, %d cached branches (%d split single blocks), %s %d",
        settings.key,
        len(slots),
        len(unsplit),
        "stored" if full else "fused",
        done,
    )
    return gm, sites


@fact("cache_fused")
def _cache_fused(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> bool:
    """``FULL``: the cache output stacks every cached branch. Merged: one ``sdtm_fuse`` per merged cached branch."""
    if "cache" not in state_outputs(gm):
        return False
    slots = cache_slots(sites.layout(), settings.method)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    stored = output.args[0][-len(state_outputs(gm)) + state_outputs(gm).index("cache")]
    if settings.key.stage is Stage.FULL:
        return stored.target is torch.stack and len(stored.args[0]) == len(slots)
    blocks = {block.index: block for block in sites.blocks}
    merged = sum(_unmerge_of(getattr(blocks[i], name)) is not None for i, name in slots)
    fused = sum(n.target is sdtm_fuse for n in gm.graph.nodes)
    return fused == merged and stored is state_input(gm, "cache")


class _FusionHooks(ReferenceHooks):
    """Cache fusion in the eager reference: store (``FULL``) or blend every cached branch's gated output."""

    def __init__(self, slots: list[tuple[int, str]], config: SDTMConfig, cache: torch.Tensor, store: bool) -> None:
        self.slots, self.config, self.cache, self.store = slots, config, cache, store
        self.stored: dict[tuple[int, str], torch.Tensor] = {}

    def observes(self, block: int, branch: str) -> bool:
        return (block, branch) in self.slots

    def gated(self, block: int, branch: str, value: torch.Tensor, li: torch.Tensor | None) -> torch.Tensor:
        slot = (block, branch)
        if slot not in self.slots:
            return value
        if self.store:
            self.stored[slot] = value
            return value
        if li is None:  # this stage leaves the branch unmerged: nothing to blend
            return value
        return fuse_cached(value, self.cache[self.slots.index(slot)], li, self.config.mcw)

    def outputs(self) -> dict[str, torch.Tensor]:
        if not self.store:
            return {"cache": self.cache}
        return {"cache": torch.stack([self.stored[slot] for slot in self.slots])}


class _FusionRun(ExtensionRun):
    """Which steps are protected, and the cache each call index of a step stored at the last protected step."""

    def __init__(self, config: SDTMConfig) -> None:
        self.config = config
        self.caches: dict[int, torch.Tensor] = {}

    def choose(self, key: EngineKey, position: float, step: int, call: int, notes: dict[str, Any]) -> EngineKey:
        # a call with no stored cache (e.g. a third guidance call) runs unmerged too
        notes["protected"] = step % self.config.protect_every == 0 or call not in self.caches
        return FULL if notes["protected"] else key

    def inputs(self, call: int, signature: EngineSignature, device: torch.device) -> dict[str, torch.Tensor]:
        # a protected step's engine does not read its cache input: the stored one (or, before the first protected
        # step of this call index, an empty one) only fills the slot
        cache = self.caches.get(call)
        return {"cache": cache if cache is not None else signature["cache"].fresh(device)}

    def may_skip(self, call: int, notes: dict[str, Any]) -> bool:
        # a protected step always computes: it is what the next steps blend with (a skipped step reads and writes
        # no cache: nothing runs past the step cache's head)
        return not notes["protected"]

    def after(self, call: int, key: EngineKey, result: EngineState, notes: dict[str, Any]) -> None:
        if notes.get("protected"):
            self.caches[call] = result.cache  # type: ignore[assignment]


class CacheFusion(Extension):
    """The extension (see the module docstring); ``method``: the :class:`SDTMMethod` whose branches are cached."""

    name = "cache_fusion"

    def __init__(self, method: Any) -> None:
        self.method = method
        self.config: SDTMConfig = method.config

    def state(self, layout: ModelLayout) -> tuple[StateTensor, ...]:
        slots = cache_slots(layout, self.method)
        shape = (len(slots), layout.batch, layout.num_tokens, layout.width)
        description = (
            f"cache fusion: the gated outputs of {len(slots)} branches at the last protected step; the FULL engine "
            "writes it, merged engines read it"
        )
        return (StateTensor("cache", shape, layout.dtype, carried=True, description=description),)

    def passes(self) -> tuple[GraphPass, ...]:
        return (
            GraphPass(
                "fuse_cached_branches",
                fuse_cached_branches,
                requires=("state_threaded",),
                ensures=("cache_fused",),
                phase="state",
                doc="cache fusion: FULL stores every merged branch's gated output, merged engines blend with it",
            ),
        )

    def reference(self, state: EngineState, key: EngineKey, layout: ModelLayout) -> ReferenceHooks:
        if state.cache is None:
            raise ValueError("cache fusion is on: pass the cache (StageDispatcher carries it)")
        return _FusionHooks(cache_slots(layout, self.method), self.config, state.cache, key.stage is Stage.FULL)

    def start(self) -> ExtensionRun:
        return _FusionRun(self.config)
