"""The three graph-level operations the passes insert: ``sdtm_plan``, ``sdtm_merge``, ``sdtm_unmerge``.

They are plain Python functions over tensors and static ints, so every engine sees through them: the eager
engine runs them, Inductor and torch-tensorrt trace them into aten ops (``gather``, ``scatter``,
``index_put``, compares, matmul), ONNX export turns them into ``GatherElements`` / ``ScatterElements``.

Adding a method (:mod:`sdtm_compile.methods`) needs no change here: ``sdtm_plan`` runs any registered plan
function and always returns every part of a :class:`~sdtm_compile.merge.MergePlan` (``None`` where a method has
none); ``insert_merge_nodes`` hands them all to ``sdtm_merge`` and ``sdtm_unmerge``, which run whichever form the
plan has (gather/mean, scatter-add, or a soft assignment's matmuls).
"""

from __future__ import annotations

import torch

from .merge import (
    MergePlan,
    PlanSpec,
    fuse_cached,
    key_size_bias,
    make_plan,
    merge,
    merged_rotary_table,
    unmerge_tokens,
    window_score_fraction,
)

__all__ = [
    "sdtm_plan",
    "sdtm_merge",
    "sdtm_unmerge",
    "sdtm_rotary",
    "sdtm_fuse",
    "sdtm_window_stat",
    "sdtm_key_bias",
    "GRAPH_OPS",
    "PLAN_OUTPUTS",
]

#: What :func:`sdtm_plan` returns, in order (``insert_merge_nodes`` reads them by these positions).
PLAN_OUTPUTS = ("slot", "inv_count", "li", "members", "extra_tokens", "extra_slots", "order", "assign", "restore")


def sdtm_plan(
    x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int, method: str, count: int, options: tuple = ()
) -> tuple[torch.Tensor | None, ...]:
    """Plan one block: ``x`` ``[B, N, C]``, ``li`` (the method's state) ``[B, N]`` ->
    ``(slot, inv_count, li, members, extra_tokens, extra_slots, order, assign, restore)`` (:data:`PLAN_OUTPUTS`).

    Shapes: ``slot [B, N]``, ``inv_count [B, M]``, ``li [B, N]``; the rest are the plan's gather form and its soft
    form (see :class:`~sdtm_compile.merge.MergePlan`; ``None`` where a method has no such part). ``method``,
    ``count`` and ``options`` are a :class:`~sdtm_compile.merge.PlanSpec` (static, baked into the graph).
    """
    plan, li = make_plan(PlanSpec(method, count, options), x, li, grid_h, grid_w)
    return (
        plan.slot,
        plan.inv_count,
        li,
        plan.members,
        plan.extra_tokens,
        plan.extra_slots,
        plan.order,
        plan.assign,
        plan.restore,
    )


def sdtm_merge(
    x: torch.Tensor,
    slot: torch.Tensor,
    inv_count: torch.Tensor,
    members: torch.Tensor | None = None,
    extra_tokens: torch.Tensor | None = None,
    extra_slots: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    assign: torch.Tensor | None = None,
    restore: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, N, C] -> [B, M, C]`` (see :func:`sdtm_compile.merge.merge`)."""
    return merge(x, MergePlan(slot, inv_count, members, extra_tokens, extra_slots, order, assign, restore))


def sdtm_unmerge(y: torch.Tensor, slot: torch.Tensor, restore: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, M, C] -> [B, N, C]`` (see :func:`sdtm_compile.merge.unmerge`)."""
    return unmerge_tokens(y, slot, restore)


def sdtm_rotary(table: torch.Tensor, members: torch.Tensor, text_tokens: int) -> torch.Tensor:
    """A RoPE table ``[T + N, D]`` for merged attention -> ``[B, T + M, 1, D]`` (see
    :func:`sdtm_compile.merge.merged_rotary_table`)."""
    return merged_rotary_table(table, members, text_tokens)


def sdtm_fuse(computed: torch.Tensor, cached: torch.Tensor, li: torch.Tensor, mcw: float) -> torch.Tensor:
    """Cache fusion on one gated branch output ``[B, N, C]`` (see :func:`sdtm_compile.merge.fuse_cached`)."""
    return fuse_cached(computed, cached, li, mcw)


def sdtm_window_stat(
    x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int, a_s: float, threshold: float
) -> torch.Tensor:
    """SDTM*'s statistic ``[B]`` (see :func:`sdtm_compile.merge.window_score_fraction`)."""
    return window_score_fraction(x, li, grid_h, grid_w, a_s, threshold)


def sdtm_key_bias(inv_count: torch.Tensor, text_tokens: int, text_first: bool, text_log_weight: float) -> torch.Tensor:
    """Size-aware attention's key bias ``[B, 1, 1, M + T]`` (see :func:`sdtm_compile.merge.key_size_bias`)."""
    return key_size_bias(inv_count, text_tokens, text_first, text_log_weight)


#: Every call_function target the passes insert.
GRAPH_OPS = (sdtm_plan, sdtm_merge, sdtm_unmerge, sdtm_rotary, sdtm_fuse, sdtm_window_stat, sdtm_key_bias)
