"""FLOP counting with ``torch.utils.flop_counter.FlopCounterMode``, attention on the CPU included.

``FlopCounterMode`` has no formula for ``aten._scaled_dot_product_flash_attention_for_cpu`` (the op SDPA
dispatches to on the CPU) and silently counts that attention as zero. :func:`count_flops` adds torch's own
SDPA formula for it (``QK^T`` and ``AV``: ``4 B H Nq Nk d`` FLOPs, one multiply-add = 2 FLOPs), so a FLOP
ratio that includes attention means what it says.

What it does not count, like ``FlopCounterMode`` itself: element-wise work (norms, GELU, softmax, adds) and
indexing (``gather``, ``index_put``, compares). Those are memory-bound; their cost shows in wall time, which
the benchmark measures separately.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["FlopCount", "count_flops", "EXTRA_FLOP_FORMULAS", "mmdit_block_flops", "flux_block_flops"]

aten = torch.ops.aten


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``_scaled_dot_product_flash_attention_for_cpu(q [B,H,Nq,d], k [B,H,Nk,d], v [B,H,Nk,dv], ...)``."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: Formulas ``FlopCounterMode`` lacks, added by :func:`count_flops` (never registered globally).
EXTRA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop,
}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one call, in total and per aten op (e.g. ``{"addmm": ..., "bmm": ...}``)."""

    total: int
    by_op: dict[str, int]


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[FlopCount, Any]:
    """Run ``fn(*args, **kwargs)`` under ``FlopCounterMode`` (plus :data:`EXTRA_FLOP_FORMULAS`).

    Returns ``(FlopCount, fn's result)``. ``fn`` must run op by op (eager, or an FX graph): a compiled
    Inductor kernel is invisible to the counter.
    """
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        result = fn(*args, **kwargs)
    by_op: dict[str, int] = defaultdict(int)
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        by_op[getattr(op, "__name__", str(op)).split(".")[0]] += int(flops)
    return FlopCount(int(counter.get_total_flops()), dict(by_op)), result


def mmdit_block_flops(image_tokens: int, text_tokens: int, hidden: int, batch: int = 1) -> dict[str, int]:
    """FLOPs of one SD3 ``JointTransformerBlock`` (no merging), by part, counted like ``FlopCounterMode``.

    Per token of either stream: q/k/v/out projections ``8 C^2``, feed-forward (``C -> 4C -> C``) ``16 C^2``;
    joint attention ``4 (N + T)^2 C`` in all; the two AdaLN linears (``C -> 6C``) ``24 C^2`` per sample. So
    every share is a function of ``(N + T) / C``; e.g. the FF share is ``4C / (6C + N + T)``.
    """
    tokens, c = image_tokens + text_tokens, hidden
    parts = {
        "projections": 8 * tokens * c * c,
        "attention": 4 * tokens * tokens * c,
        "feed_forward": 16 * tokens * c * c,
        "adaln": 24 * c * c,
    }
    return {name: batch * flops for name, flops in parts.items()}


def flux_block_flops(
    image_tokens: int, text_tokens: int, hidden: int, double: int, single: int, batch: int = 1
) -> dict[str, int]:
    """FLOPs of all of a Flux model's blocks (no merging), by part, counted like ``FlopCounterMode``.

    Double-stream blocks are MMDiT blocks (:func:`mmdit_block_flops`). A single-stream block, per token: q/k/v
    ``6 C^2``, ``proj_mlp`` (``C -> 4C``) ``8 C^2``, ``proj_out`` (``5C -> C``) ``10 C^2``, of which the MLP
    columns (``4C -> C``) are ``8 C^2``; joint attention ``4 (N + T)^2 C``; AdaLN (``C -> 3C``) ``6 C^2``.
    ``feed_forward`` is what SDTM merges on Flux by default: the double blocks' FF and the single blocks' MLP.
    """
    tokens, c = image_tokens + text_tokens, hidden
    d = mmdit_block_flops(image_tokens, text_tokens, hidden)
    parts = {
        "projections": double * d["projections"] + single * (6 + 2) * tokens * c * c,
        "attention": (double + single) * 4 * tokens * tokens * c,
        "feed_forward": double * d["feed_forward"] + single * 16 * tokens * c * c,
        "adaln": double * d["adaln"] + single * 6 * c * c,
    }
    return {name: batch * flops for name, flops in parts.items()}
