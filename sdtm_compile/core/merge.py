"""Merge primitives every method is built from: a :class:`MergePlan`, then static-shape ``merge`` / ``unmerge``.

Shapes: ``B`` batch, ``N = grid_h * grid_w`` image tokens, ``C`` channels, ``G`` windows, ``M`` merged length
(fixed per engine), ``S = N - G`` sources of a bipartite plan.

A :class:`MergePlan` is the same for every method: ``slot[b, n]`` says which merged token input token ``n``
goes to, and ``inv_count[b, m]`` is one over the number of tokens averaged into merged token ``m``. So

* ``merge(x, plan)``   = sum of the tokens into their slots (``index_put`` with accumulate), times ``inv_count``
  -> ``[B, M, C]``
* ``unmerge(y, plan)`` = one ``gather`` of every token's slot -> ``[B, N, C]``

Plans also say the same thing as gathers, which is how ``merge`` runs them: compilers turn an accumulating
scatter into atomic adds (Inductor on the CPU: one compare-and-swap loop per element), while a gather is a
plain parallel read. A fixed fan-in plan (SDTM's SSM: 4 tokens a slot, ``members[b, m, :]``) merges with a gather
and a mean. A bipartite plan (SDTM's IDM, ToMeSD) gathers one representative per slot and scatter-adds only the
``r`` merged sources into their destinations' slots. A pruning plan (SiTo) is the gather alone. A soft plan
(ToMA) has no slots to sum into: merge and unmerge are batched matmuls per tile (see :class:`MergePlan`).

Only the *indices* depend on the data; every shape is fixed by ``(N, count)``, so one compiled graph serves every
call of an engine. The static-shape rules (``docs/design.md``): no ``scatter_reduce(mean)``, no ``.item()``, no
Python branch on tensor values, and every batch row merges the same number of tokens (but may pick different
ones).

On a grid side that the windows do not fill, the last row/column is not covered by any window
(:func:`leftover_token_index`); a bipartite plan treats those tokens as sources.

Ranking: candidates are ranked by descending score with ties going to the lower index, computed without
``sort``/``topk`` so the result does not depend on the backend (see :func:`descending_rank`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "MergePlan",
    "window_token_index",
    "leftover_token_index",
    "check_tokens",
    "plan_count",
    "unit_tokens",
    "descending_rank",
    "bipartite_plan",
    "merge",
    "unmerge",
    "unmerge_tokens",
    "merged_rotary_table",
    "concat_plans",
]


class MergePlan(NamedTuple):
    """Where each token goes.

    ``slot``: ``[B, N]`` int64 in ``[0, M)``. ``inv_count``: ``[B, M]``, float32 (float64 for float64 inputs).
    ``members``: ``[B, M, F]`` int64 or ``None``. With ``F > 1`` (SSM, ``F = 4``, a kept token repeated)
    merged token ``m`` is the mean of its ``F`` members. With ``F = 1`` (IDM, ToMeSD, SiTo) it is slot ``m``'s
    representative token, to which ``extra_tokens`` ``[B, E]`` are added at ``extra_slots`` ``[B, E]`` before
    scaling by ``inv_count``. ``None``: every token is accumulated into its slot (the general form).

    A *soft* plan (ToMA) merges and unmerges with matmuls per tile of ``n`` tokens, ``T`` tiles, ``d``
    destinations per tile (``M = T d``): ``order`` ``[B, N]`` lists the tokens tile by tile, ``assign``
    ``[B, T, d, n]`` holds each merged token's weights over its tile (rows sum to 1), ``restore`` ``[B, T, n, d]``
    each token's weights over its tile's merged tokens, and ``slot`` ``[B, N]`` is then the position of token ``n``
    in ``order`` (how the restored tiles go back to token order). ``members`` ``[B, M, 1]``: the destination
    token of each merged token (its rotary position).
    """

    slot: torch.Tensor
    inv_count: torch.Tensor
    members: torch.Tensor | None = None
    extra_tokens: torch.Tensor | None = None
    extra_slots: torch.Tensor | None = None
    order: torch.Tensor | None = None
    assign: torch.Tensor | None = None
    restore: torch.Tensor | None = None


def window_token_index(
    grid_h: int, grid_w: int, device: torch.device | str | None = None, sy: int = 2, sx: int = 2
) -> torch.Tensor:
    """``[G, sy*sx]`` token indices of each ``sy x sx`` window, windows row-major, tokens row-major inside
    (2x2: (0,0) (0,1) (1,0) (1,1))."""
    if grid_h < sy or grid_w < sx:
        raise ValueError(
            f"a {grid_h}x{grid_w} token grid has no {sy}x{sx} window to merge; the merge needs at least "
            f"{sy}x{sx} image tokens"
        )
    # Only arange arithmetic, no tensor literals: compiled artifacts then carry no baked constants.
    gh, gw = grid_h // sy, grid_w // sx
    top_left = (torch.arange(gh, device=device) * sy * grid_w)[:, None] + torch.arange(gw, device=device) * sx
    offsets = torch.arange(sy, device=device)[:, None] * grid_w + torch.arange(sx, device=device)[None, :]
    return (top_left.reshape(-1, 1) + offsets.reshape(1, sy * sx)).reshape(gh * gw, sy * sx)


def leftover_token_index(
    grid_h: int, grid_w: int, device: torch.device | str | None = None, sy: int = 2, sx: int = 2
) -> torch.Tensor:
    """``[L]`` tokens no ``sy x sx`` window covers: the right columns beside the windows' rows, then the bottom
    rows (row-major within each part)."""
    # Built from static sizes, not a boolean mask: a mask index is a data-dependent shape (aten.nonzero).
    covered_h, covered_w = grid_h // sy * sy, grid_w // sx * sx
    parts = []
    if covered_w < grid_w:
        rows = torch.arange(covered_h, device=device)[:, None] * grid_w
        parts.append((rows + torch.arange(covered_w, grid_w, device=device)[None, :]).reshape(-1))
    if covered_h < grid_h:
        parts.append(covered_h * grid_w + torch.arange((grid_h - covered_h) * grid_w, device=device))
    if not parts:
        return torch.arange(0, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def plan_count(count: int | torch.SymInt) -> int | torch.SymInt:
    """A plan's count as the engine gives it: an int (a static graph per count) or a symbolic size (one graph for
    every count, the count read from a dynamic input dimension). ``int()`` would specialise a symbolic count to
    the value it was traced with, so only a non-symbolic count is converted."""
    return count if isinstance(count, torch.SymInt) else int(count)


def check_tokens(x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int) -> None:
    """Raise a ``ValueError`` naming the problem unless ``x`` is ``[B, N, C]`` image tokens of the grid and ``li``
    (the method's state) is ``[B, N]``."""
    if x.dim() != 3:
        raise ValueError(f"expected image tokens [B, N, C], got shape {tuple(x.shape)}")
    if x.shape[1] != grid_h * grid_w:
        raise ValueError(
            f"{x.shape[1]} image tokens do not fill the {grid_h}x{grid_w} token grid ({grid_h * grid_w} tokens)"
        )
    if li.shape != x.shape[:2]:
        raise ValueError(f"li must be [B, N] = {tuple(x.shape[:2])}, got {tuple(li.shape)}")


def unit_tokens(x: torch.Tensor) -> torch.Tensor:
    """Unit-norm tokens for cosine similarity, in at least float32 so fp16/bf16 engines rank like fp32."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)


def descending_rank(score: torch.Tensor) -> torch.Tensor:
    """``rank[b, i]`` = place of item ``i`` when row ``b`` is sorted by descending score, ties by index.

    Counted as ``#{j: s_j > s_i} + #{j < i: s_j == s_i}`` instead of sorting: only element-wise compares and a
    sum, so every backend ranks ties the same way (``torch.sort(stable=True)`` has no ONNX export, ``topk``
    orders ties differently per backend, and TensorRT caps ``topk`` at k <= 3840). Cost: ``K^2`` compares per
    row, e.g. 9.4 M for the 3072 IDM sources of a 1024^2 image, small next to the similarity matmul.
    """
    idx = torch.arange(score.shape[-1], device=score.device)
    s_i, s_j = score[..., :, None], score[..., None, :]
    ahead = torch.logical_or(s_j > s_i, torch.logical_and(s_j == s_i, idx[None, :] < idx[:, None]))
    return ahead.sum(dim=-1)


def bipartite_plan(
    x: torch.Tensor,
    dst_pos: torch.Tensor,
    grid_h: int,
    grid_w: int,
    num_sources: int | torch.SymInt,
    sy: int = 2,
    sx: int = 2,
) -> tuple[MergePlan, torch.Tensor]:
    """ToMe's bipartite soft matching with one destination per ``sy x sx`` window (IDM, ToMeSD).

    Args:
        x: ``[B, N, C]`` tokens the similarity is measured on.
        dst_pos: ``[B, G, 1]`` int64, the destination's position inside each window (row-major).
        num_sources: sources to merge, ``r`` (an int, or a symbolic size: :func:`plan_count`).

    Every other token of a window (and every leftover token of a side the windows do not fill) is a source
    and finds its most cosine-similar destination over all destinations; the ``r`` sources with the highest
    best similarity are averaged with their destination (unweighted mean of the destination and all sources
    merged into it). Output order: unmerged sources (by rank), then the ``G`` destinations. Returns the plan
    (``M = N - r``) and ``merged`` ``[B, N]`` bool (destinations and merged sources).
    """
    batch, n = x.shape[:2]
    win = window_token_index(grid_h, grid_w, x.device, sy, sx)  # [G, K]
    left = leftover_token_index(grid_h, grid_w, x.device, sy, sx)  # [L]
    g, k = win.shape
    num_src = n - g
    r = plan_count(num_sources)
    if not 0 <= r <= num_src:
        raise ValueError(f"cannot merge {r} of {num_src} sources")
    win_b = win.expand(batch, -1, -1)  # [B, G, K]
    dst_tok = win_b.gather(2, dst_pos).squeeze(-1)  # [B, G]
    others = (dst_pos + torch.arange(1, k, device=x.device)) % k  # [B, G, K-1]: the window's other positions
    src_tok = torch.cat([win_b.gather(2, others).reshape(batch, -1), left.expand(batch, -1)], 1)  # [B, S]

    metric = unit_tokens(x)
    src = metric.gather(1, src_tok[..., None].expand(-1, -1, metric.shape[-1]))
    dst = metric.gather(1, dst_tok[..., None].expand(-1, -1, metric.shape[-1]))
    similarity = src @ dst.transpose(-1, -2)  # [B, S, G]
    # argmax, not max(dim): torch-tensorrt has no converter for max.dim when its indices are used
    best_dst = similarity.argmax(dim=-1)  # [B, S]
    score = similarity.amax(dim=-1)  # [B, S]: a reduction output, which Inductor stores once before ranking
    rank = descending_rank(score)
    is_merged = rank < r
    src_slot = torch.where(is_merged, (num_src - r) + best_dst, rank - r)
    dst_slot = (num_src - r) + torch.arange(g, device=x.device).expand(batch, -1)
    token = torch.cat([src_tok, dst_tok], 1)
    slot = torch.empty_like(token).scatter_(1, token, torch.cat([src_slot, dst_slot], 1))
    count = _sum_into_slots(metric.new_ones(batch, n, 1), slot, n - r).squeeze(-1)
    merged = torch.ones(batch, n, dtype=torch.bool, device=x.device).scatter_(1, src_tok, is_merged)
    # The same plan as gathers: one representative per slot (kept sources by rank, then destinations), plus
    # the r merged sources added into their destination's slot. Only those r rows need an accumulating scatter.
    src_by_rank = torch.empty_like(src_tok).scatter_(1, rank, src_tok)  # rank is a permutation of 0..S-1
    representative = torch.cat([src_by_rank[:, r:], dst_tok], 1)  # [B, M]
    extra_tokens = extra_slots = None
    if r > 0:
        extra_tokens = src_by_rank[:, :r]  # [B, r]
        extra_slots = (num_src - r) + torch.empty_like(best_dst).scatter_(1, rank, best_dst)[:, :r]
    return MergePlan(slot, 1.0 / count, representative[..., None], extra_tokens, extra_slots), merged


def _sum_into_slots(x: torch.Tensor, slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``out[b, slot[b, n]] += x[b, n]``: ``[B, N, C] -> [B, num_slots, C]``.

    Written as ``index_put(accumulate=True)`` rather than ``scatter_add``: torch-tensorrt 2.13 has no
    ``scatter_add`` converter and unrolls it into one scatter per token, while ``index_put`` with
    ``accumulate`` maps to TensorRT's ScatterAdd plugin. ONNX exports it as ``ScatterND(reduction="add")``.
    """
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(slot)
    return x.new_zeros(x.shape[0], num_slots, x.shape[-1]).index_put((rows, slot), x, accumulate=True)


def merged_rotary_table(table: torch.Tensor, members: torch.Tensor, text_tokens: int) -> torch.Tensor:
    """A RoPE table (``cos`` or ``sin``) ``[T + N, D]`` for merged attention -> ``[B, T + M, 1, D]``.

    Text rows stay; merged token ``m`` takes the row of its representative ``members[:, m, 0]`` (IDM: the kept
    token or destination; SSM: a kept token, or a merged window's first token). A merged token needs *one*
    rotation: averaging cos/sin would not be one. ``index_select`` rather than advanced indexing:
    it has a TensorRT converter and exports to one ONNX ``Gather``.
    """
    batch, slots = members.shape[:2]
    image = table[text_tokens:].index_select(0, members[..., 0].reshape(-1)).reshape(batch, slots, table.shape[-1])
    text = table[:text_tokens].expand(batch, -1, -1)
    return torch.cat([text, image], 1)[:, :, None, :]


def merge(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """``[B, N, C] -> [B, M, C]``: each merged token is the mean of the tokens planned into it (a soft plan: their
    weighted mean)."""
    if plan.assign is not None:  # soft (ToMA): per tile, assign [B, T, d, n] @ tokens [B, T, n, C]
        assert plan.order is not None
        batch, tiles, _, per_tile = plan.assign.shape
        tokens = x.gather(1, plan.order[..., None].expand(-1, -1, x.shape[-1])).reshape(batch, tiles, per_tile, -1)
        return (plan.assign.to(x.dtype) @ tokens).reshape(batch, -1, x.shape[-1])
    # Sums of several tokens accumulate in float32 when x is half precision: fp16 / bf16 sums of tens of tokens
    # lose the low bits of the mean (and ONNX Runtime's CPU provider has no fp16 ScatterND with reduction "add").
    accumulate = torch.promote_types(x.dtype, torch.float32)
    if plan.members is None:  # the general form: accumulate every token into its slot
        total = _sum_into_slots(x.to(accumulate), plan.slot, plan.inv_count.shape[1])
        return (total * plan.inv_count[..., None].to(accumulate)).to(x.dtype)
    batch, slots, fan_in = plan.members.shape
    channels = x.shape[-1]
    gathered = x.gather(1, plan.members.reshape(batch, slots * fan_in, 1).expand(-1, -1, channels))
    if fan_in > 1:  # fixed fan-in (SSM): a mean of gathered tokens, no accumulating scatter at all
        return gathered.reshape(batch, slots, fan_in, channels).mean(dim=2)
    if plan.extra_tokens is not None:  # representatives + the extra tokens (IDM's merged sources)
        rows = torch.arange(batch, device=x.device)[:, None].expand_as(plan.extra_slots)
        extra = x.gather(1, plan.extra_tokens[..., None].expand(-1, -1, channels)).to(accumulate)
        total = gathered.to(accumulate).index_put((rows, plan.extra_slots), extra, accumulate=True)
        return (total * plan.inv_count[..., None].to(accumulate)).to(x.dtype)
    return gathered * plan.inv_count[..., None].to(x.dtype)


def unmerge(y: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """``[B, M, C] -> [B, N, C]``: every token takes the value of the merged token it went into (a soft plan:
    its weighted mix of its tile's merged tokens)."""
    return unmerge_tokens(y, plan.slot, plan.restore)


def unmerge_tokens(y: torch.Tensor, slot: torch.Tensor, restore: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`unmerge` from the plan's parts: ``y`` ``[B, M, C]``, ``slot`` ``[B, N]``, ``restore`` (soft plans)
    ``[B, T, n, d]``."""
    if restore is not None:  # per tile restore [B, T, n, d] @ merged [B, T, d, C], then back to token order
        batch, tiles, _, per_tile = restore.shape
        y = (restore.to(y.dtype) @ y.reshape(batch, tiles, per_tile, -1)).reshape(batch, -1, y.shape[-1])
    return y.gather(1, slot[..., None].expand(-1, -1, y.shape[-1]))


def concat_plans(plans: list[MergePlan], num_tokens: int) -> MergePlan:
    """One plan for ``len(plans)`` consecutive shards of ``num_tokens`` tokens each, every shard merged on its own
    by its plan: what context parallelism computes, one shard per rank (the eager reference's view of it).

    Shard ``s`` holds tokens ``[s N, (s + 1) N)`` and its merged tokens take slots ``[s M, (s + 1) M)``: token
    indices (``members``, ``extra_tokens``, ``order``) move by ``s N``, slot indices (``extra_slots``) by ``s M``;
    a soft plan's tiles follow one another. Every shard's plan must have the same merged length ``M``.
    """
    counts = {plan.inv_count.shape[1] for plan in plans}
    if len(counts) != 1:
        raise ValueError(f"every shard must merge to the same length, got {sorted(counts)}")
    merged = counts.pop()

    def joined(name: str, step: int) -> torch.Tensor | None:
        parts = [getattr(plan, name) for plan in plans]
        if all(part is None for part in parts):
            return None
        return torch.cat([part + shard * step for shard, part in enumerate(parts)], dim=1)

    soft = plans[0].assign is not None
    return MergePlan(
        # a soft plan's slot is a position in ``order`` (tokens listed shard by shard), otherwise a merged slot
        slot=joined("slot", num_tokens if soft else merged),  # type: ignore[arg-type]
        inv_count=torch.cat([plan.inv_count for plan in plans], dim=1),
        members=joined("members", num_tokens),
        extra_tokens=joined("extra_tokens", num_tokens),
        extra_slots=joined("extra_slots", merged),
        order=joined("order", num_tokens),
        assign=joined("assign", 0),
        restore=joined("restore", 0),
    )
