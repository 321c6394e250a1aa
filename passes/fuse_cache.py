"""Cache fusion: thread ``sdtm_cache`` through the graph; the unmerged engine stores every cached branch's gated
output, a merged engine blends its merged positions with them (the release's step cache, DESIGN §3)."""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from sdtm_compile.config import SDTMConfig
from sdtm_compile.merge import merged_branches
from sdtm_compile.ops import sdtm_fuse, sdtm_plan, sdtm_unmerge
from sdtm_compile.schedule import Stage

from ._graph import copy_location
from .find_blocks import Branch, ModelSites
from .settings import PassSettings
from .thread_li import li_input

__all__ = ["thread_step_cache", "cache_slots", "new_cache", "cache_input", "CACHE_INPUT_NAME", "CacheFusionError"]

logger = logging.getLogger(__name__)

CACHE_INPUT_NAME = "sdtm_cache"


class CacheFusionError(ValueError):
    """Cache fusion asked of a model or graph it does not support."""


def _fusing(settings: PassSettings) -> bool:
    return isinstance(settings.config, SDTMConfig) and settings.config.fuses_cache


def cache_slots(sites: ModelSites, config: SDTMConfig) -> list[tuple[int, str]]:
    """``(block index, branch name)`` of every cached branch, in the cache's order: each block's image branches
    that some stage merges (SD3: ``attn``, ``attn2`` on SD3.5's dual-attention blocks, ``ff``), as the release
    stores ``attn_output``, ``attn_output2`` and ``mlp_output`` per layer."""
    if sites.family != "sd3":
        raise CacheFusionError(
            f"cache fusion is implemented for SD3 / SD3.5 (as the release), not for {sites.family} models: compile "
            "with SDTMConfig(cache_fusion=False)"
        )
    names = tuple(
        dict.fromkeys((*merged_branches(Stage.STRUCTURE, "sd3", config), *merged_branches(Stage.DETAIL, "sd3", config)))
    )
    return [(block.index, name) for block in sites.blocks for name, _ in block.branches_named(names)]


def new_cache(
    sites: ModelSites, config: SDTMConfig, batch: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """An empty cache: zeros ``[K, B, N, C]`` (K cached branches of ``[B, N, C]`` each), in the branches' dtype.

    Its contents are only read after a protected step has filled it (the dispatcher protects the first step)."""
    slots = cache_slots(sites, config)
    block = next(b for b in sites.blocks if b.index == slots[0][0])
    output = getattr(block, slots[0][1]).output
    value = output.meta.get("val", output.meta.get("example_value"))
    assert isinstance(value, torch.Tensor)
    return torch.zeros(len(slots), batch, sites.num_tokens, value.shape[-1], dtype=value.dtype, device=device)


def cache_input(gm: fx.GraphModule) -> fx.Node | None:
    """The graph's ``sdtm_cache`` input, or ``None``."""
    return next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == CACHE_INPUT_NAME), None)


def _gate_multiply(value: fx.Node, where: str) -> fx.Node:
    """The node multiplying a branch output by its AdaLN gate (``gate.unsqueeze(1) * out``): the release caches and
    fuses *gated* outputs, so the cache is read and written there."""
    users = list(value.users)
    if len(users) == 1 and users[0].target in (operator.mul, torch.mul) and value in users[0].args:
        return users[0]
    raise CacheFusionError(
        f"{where}: expected the branch output to be used once, by its gate multiply; found users "
        f"{[u.format_node() for u in users]}. Cache fusion needs the diffusers JointTransformerBlock's layout"
    )


def _plan_li(unmerged: fx.Node) -> fx.Node:
    """The ``li`` part of the plan an ``sdtm_unmerge`` node restores from (the counter after that block's plan)."""
    plan = unmerged.args[1].args[0]  # type: ignore[union-attr]  # slot = getitem(plan, 0)
    assert isinstance(plan, fx.Node) and plan.target is sdtm_plan
    return next(u for u in plan.users if u.target is operator.getitem and u.args[1] == 2)


def _unmerge_of(branch: Branch) -> fx.Node | None:
    return next((u for u in branch.output.users if u.target is sdtm_unmerge), None)


def thread_step_cache(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> fx.GraphModule:
    """With cache fusion on: add the ``[K, B, N, C]`` ``sdtm_cache`` input after ``sdtm_li`` and return a cache after
    ``li``; the ``FULL`` engine returns the stack of its gated branch outputs, a merged engine fuses and returns
    its input. Without cache fusion: nothing."""
    if not _fusing(settings):
        return gm
    config = settings.config
    assert isinstance(config, SDTMConfig)
    if cache_input(gm) is not None:
        raise ValueError("the graph already has an sdtm_cache input: thread_step_cache ran twice")
    graph = gm.graph
    li = li_input(gm)
    if li is None:
        raise ValueError("thread_step_cache needs the sdtm_li input: run thread_li_state first")
    with graph.inserting_after(li):
        cache = graph.placeholder(CACHE_INPUT_NAME)
    slots = cache_slots(sites, config)
    blocks = {block.index: block for block in sites.blocks}
    output = next(n for n in graph.nodes if n.op == "output")
    if settings.key.stage is Stage.FULL:
        gated = [_gate_multiply(getattr(blocks[i], name).output, f"block {i} {name}") for i, name in slots]
        with graph.inserting_before(output):
            cache_out = graph.call_function(torch.stack, (gated, 0))
        copy_location(cache_out, gated[-1], "cache")
        stored = len(gated)
    else:
        cache_out, stored = cache, 0
        for k, (i, name) in enumerate(slots):
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
            stored += 1
    outputs = output.args[0]
    output.args = ((*outputs[:-1], outputs[-1], cache_out),)  # li stays where it was, the cache follows it
    gm.recompile()
    logger.debug(
        "thread_step_cache: %s, %d cached branches, %s %d",
        settings.key,
        len(slots),
        "stored" if settings.key.stage is Stage.FULL else "fused",
        stored,
    )
    return gm
