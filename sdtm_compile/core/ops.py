"""The operations the passes insert into a graph, and the registry of every such operation.

They are plain Python functions over tensors and static ints, so every engine sees through them: the eager
engine runs them, Inductor and torch-tensorrt trace them into aten ops (``gather``, ``scatter``, ``index_put``,
compares, matmul), ONNX export turns them into ``GatherElements`` / ``ScatterElements``.

The four here are every method's: ``sdtm_plan`` (run a registered plan function), ``sdtm_merge``,
``sdtm_unmerge`` and ``sdtm_rotary`` (RoPE rows of merged tokens). A method's extension registers its own with
:func:`graph_op` (SDTM's cache fusion, SDTM* and size-aware attention: :mod:`sdtm_compile.methods.sdtm`), so that
:data:`GRAPH_OPS` names every function a rewritten graph can call; the engine cache hashes their source, which a
graph's code only names.

A new method needs no change here: ``sdtm_plan`` runs any registered plan function and always returns every part
of a :class:`~sdtm_compile.core.merge.MergePlan` (``None`` where a method has none); ``insert_merge_nodes``
hands them all to ``sdtm_merge`` and ``sdtm_unmerge``, which run whichever form the plan has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from .merge import MergePlan, merge, merged_rotary_table, unmerge_tokens
from .plans import PlanSpec, make_plan

__all__ = [
    "sdtm_plan",
    "sdtm_merge",
    "sdtm_unmerge",
    "sdtm_rotary",
    "GRAPH_OPS",
    "PLAN_OUTPUTS",
    "MERGE_ARGS",
    "graph_op",
]

_F = TypeVar("_F", bound=Callable[..., object])

#: Every function a pass may insert as a ``call_function`` node (this module's and the extensions').
GRAPH_OPS: list[Callable[..., object]] = []


def graph_op(fn: _F) -> _F:
    """Decorator: register ``fn`` as an operation the passes insert (see the module docstring)."""
    if fn not in GRAPH_OPS:
        GRAPH_OPS.append(fn)
    return fn


#: What :func:`sdtm_plan` returns, in order (``insert_merge_nodes`` reads them by these positions).
PLAN_OUTPUTS = ("slot", "inv_count", "li", "members", "extra_tokens", "extra_slots", "order", "assign", "restore")
#: :func:`sdtm_merge`'s arguments, in order: the tokens, then the plan's parts but ``li`` (a pass that reads a part
#: from a merge node finds it at ``MERGE_ARGS.index(part)``).
MERGE_ARGS = ("x", *(part for part in PLAN_OUTPUTS if part != "li"))


@graph_op
def sdtm_plan(
    x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int, method: str, count: int, options: tuple = ()
) -> tuple[torch.Tensor | None, ...]:
    """Plan one block: ``x`` ``[B, N, C]``, ``li`` (the method's state) ``[B, N]`` ->
    ``(slot, inv_count, li, members, extra_tokens, extra_slots, order, assign, restore)`` (:data:`PLAN_OUTPUTS`).

    Shapes: ``slot [B, N]``, ``inv_count [B, M]``, ``li [B, N]``; the rest are the plan's gather form and its soft
    form (see :class:`~sdtm_compile.core.merge.MergePlan`; ``None`` where a method has no such part). ``method``,
    ``count`` and ``options`` are a :class:`~sdtm_compile.core.plans.PlanSpec` (static, baked into the graph).
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


@graph_op
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
    """``[B, N, C] -> [B, M, C]`` (see :func:`sdtm_compile.core.merge.merge`)."""
    return merge(x, MergePlan(slot, inv_count, members, extra_tokens, extra_slots, order, assign, restore))


@graph_op
def sdtm_unmerge(y: torch.Tensor, slot: torch.Tensor, restore: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, M, C] -> [B, N, C]`` (see :func:`sdtm_compile.core.merge.unmerge`)."""
    return unmerge_tokens(y, slot, restore)


@graph_op
def sdtm_rotary(table: torch.Tensor, members: torch.Tensor, text_tokens: int) -> torch.Tensor:
    """A RoPE table ``[T + N, D]`` for merged attention -> ``[B, T + M, 1, D]`` (see
    :func:`sdtm_compile.core.merge.merged_rotary_table`)."""
    return merged_rotary_table(table, members, text_tokens)
