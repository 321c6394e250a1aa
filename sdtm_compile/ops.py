"""The three graph-level operations the passes insert: ``sdtm_plan``, ``sdtm_merge``, ``sdtm_unmerge``.

They are plain Python functions over tensors and static ints, so every engine sees through them: the eager
engine runs them, Inductor and torch-tensorrt trace them into aten ops (``gather``, ``scatter``,
``index_put``, compares, matmul), ONNX export turns them into ``GatherElements`` / ``ScatterElements``.
A method other than SDTM plugs in by adding a ``method`` value to :func:`sdtm_plan`.
"""

from __future__ import annotations

import torch

from .merge import MergePlan, idm_plan, merge, ssm_plan

__all__ = ["sdtm_plan", "sdtm_merge", "sdtm_unmerge", "GRAPH_OPS"]


def sdtm_plan(
    x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int, method: str, count: int, weight: float
) -> tuple[torch.Tensor | None, ...]:
    """Plan one block: ``x`` ``[B, N, C]``, ``li`` ``[B, N]`` ->
    ``(slot, inv_count, li, members, extra_tokens, extra_slots)``.

    Shapes: ``slot [B, N]``, ``inv_count [B, M]``, ``li [B, N]``; the last three are the plan's gather form
    (see :class:`~sdtm_compile.merge.MergePlan`; ``None`` where a method has no such part). ``method`` is
    ``"ssm"`` (``count`` windows, ``weight`` = ``a_s``) or ``"idm"`` (``count`` sources, ``weight`` = ``a_d``).
    """
    if method == "ssm":
        plan, li = ssm_plan(x, li, grid_h, grid_w, count, weight)
    elif method == "idm":
        plan, li = idm_plan(x, li, grid_h, grid_w, count, weight)
    else:
        raise ValueError(f"unknown merge method {method!r}: expected 'ssm' or 'idm'")
    return plan.slot, plan.inv_count, li, plan.members, plan.extra_tokens, plan.extra_slots


def sdtm_merge(
    x: torch.Tensor,
    slot: torch.Tensor,
    inv_count: torch.Tensor,
    members: torch.Tensor | None = None,
    extra_tokens: torch.Tensor | None = None,
    extra_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, N, C] -> [B, M, C]`` (see :func:`sdtm_compile.merge.merge`)."""
    return merge(x, MergePlan(slot, inv_count, members, extra_tokens, extra_slots))


def sdtm_unmerge(y: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """``[B, M, C] -> [B, N, C]`` (see :func:`sdtm_compile.merge.unmerge`)."""
    return y.gather(1, slot[..., None].expand(-1, -1, y.shape[-1]))


#: Every call_function target the passes insert.
GRAPH_OPS = (sdtm_plan, sdtm_merge, sdtm_unmerge)
