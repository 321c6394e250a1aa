"""Merge primitives: a data-dependent *plan*, then static-shape ``merge`` / ``unmerge`` (SDTM's plans here; the
other methods' plans in :mod:`sdtm_compile.methods`, built from the same parts).

Shapes: ``B`` batch, ``N = grid_h * grid_w`` image tokens, ``C`` channels, ``G`` 2x2 windows,
``M`` merged length (fixed per bucket), ``S = N - G`` IDM sources.

A :class:`MergePlan` is the same for every method: ``slot[b, n]`` says which merged token input token ``n``
goes to, and ``inv_count[b, m]`` is one over the number of tokens averaged into merged token ``m``. So

* ``merge(x, plan)``   = sum of the tokens into their slots (``index_put`` with accumulate), times ``inv_count``
  -> ``[B, M, C]``
* ``unmerge(y, plan)`` = one ``gather`` of every token's slot -> ``[B, N, C]``

Plans also say the same thing as gathers, which is how ``merge`` runs them: compilers turn an accumulating
scatter into atomic adds (Inductor on the CPU: one compare-and-swap loop per element), while a gather is a
plain parallel read. SSM slots all have fan-in 4 (``members[b, m, :]``, a kept token listed four times), so an
SSM merge is a gather and a mean. An IDM merge gathers one representative per slot and scatter-adds only the
``r`` merged sources into their destinations' slots. A pruning plan (SiTo) is the gather alone. A soft plan
(ToMA) has no slots to sum into: merge and unmerge are batched matmuls per tile (see :class:`MergePlan`).

Only the *indices* depend on the data; every shape is fixed by ``(N, bucket)``, so one compiled graph serves
every call of a bucket. Per DESIGN §4 there is no ``scatter_reduce(mean)``, no ``.item()`` and no Python
branch on tensor values here, and every batch row merges the same number of tokens (but may pick different
ones).

What it does not handle: SDTM windows other than 2x2 (:func:`bipartite_plan` takes any ``sy x sx``). On an odd
grid side, the last row/column is not covered by
any window: SSM passes those tokens through unmerged, IDM treats them as sources (they may be merged into a
destination), exactly like the release's padding of its index buffer.

Ranking: candidates are ranked by descending score with ties going to the lower window/source index,
computed without ``sort``/``topk`` so the result does not depend on the backend (see :func:`descending_rank`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import MethodConfig, SDTMConfig
from .schedule import EngineKey, Stage, idm_sources_merged, ssm_windows_merged

__all__ = [
    "MergePlan",
    "window_token_index",
    "leftover_token_index",
    "ssm_plan",
    "idm_plan",
    "window_score_fraction",
    "fuse_cached",
    "key_size_bias",
    "PlanSpec",
    "PLAN_METHODS",
    "MERGED_BRANCHES",
    "merged_branches",
    "plan_spec",
    "make_plan",
    "plan_for",
    "bipartite_plan",
    "merge",
    "unmerge",
    "unmerge_tokens",
    "merged_rotary_table",
    "update_li",
    "init_li",
    "unit_tokens",
    "descending_rank",
]

_LI_EPS = 1e-6  # the release's epsilon in li / mean(li)


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


def init_li(batch: int, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh "not attended" counter: ``[B, N]`` int32 zeros (start of every generation)."""
    return torch.zeros(batch, num_tokens, dtype=torch.int32, device=device)


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


def _check_tokens(x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int) -> None:
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


def _li_priority(li: torch.Tensor) -> torch.Tensor:
    """``li / mean(li)`` per row, as in the release (0 while all counters are 0)."""
    li_f = li.float()
    return li_f / (li_f.mean(dim=-1, keepdim=True) + _LI_EPS)


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


def update_li(li: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """The release's counter update: every merged token ``+1``, every token left unmerged back to ``0``.

    ``li``: ``[B, N]`` int32; ``merged``: ``[B, N]`` bool. (The release adds 1 to all tokens, then zeroes the
    unmerged ones, which is the same thing.)
    """
    return torch.where(merged, li + 1, torch.zeros_like(li))


def _window_score(xw: torch.Tensor, li: torch.Tensor, win: torch.Tensor, a_s: float) -> torch.Tensor:
    """SSM's window score ``[B, G]``: mean of the 4x4 cosine-similarity matrix of each window (unit tokens ``xw``
    ``[B, G, 4, C]``, diagonal included as in the release) + ``a_s * mean(li / mean(li))`` over the window."""
    return (xw @ xw.transpose(-1, -2)).mean(dim=(-1, -2)) + a_s * _li_priority(li)[:, win].mean(-1)


def window_score_fraction(
    x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int, a_s: float, threshold: float
) -> torch.Tensor:
    """SDTM*'s statistic: the fraction ``[B]`` (float32) of 2x2 windows whose SSM score is ``>= threshold``.

    ``x`` ``[B, N, C]``: a block's plan input; ``li`` ``[B, N]``. The release's dead adaptive branch counts the
    same thing (``torch.ge(ssmscore_map, node_mean).sum(dim=1)``) and takes the minimum over the batch, which the
    dispatcher does.
    """
    _check_tokens(x, li, grid_h, grid_w)
    win = window_token_index(grid_h, grid_w, x.device)  # [G, 4]
    score = _window_score(unit_tokens(x)[:, win], li, win, a_s)
    return (score >= threshold).float().mean(dim=-1)


def ssm_plan(
    x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int, num_windows: int, a_s: float
) -> tuple[MergePlan, torch.Tensor]:
    """Similarity-prioritized structure merging: average the ``num_windows`` most uniform 2x2 windows.

    Args:
        x: ``[B, N, C]`` the block's attention input (image tokens after ``norm1`` modulation).
        li: ``[B, N]`` int32 "not attended" counter.
        num_windows: windows to merge, ``k`` (a static int; each removes 3 tokens).
        a_s: weight of the window's mean ``li / mean(li)`` in its score.

    Score of a window = mean of its 4x4 cosine-similarity matrix (the release includes the diagonal) +
    ``a_s * mean(li / mean(li))``. Output order: kept windows' tokens (4 each, by rank), leftover tokens of an
    odd side, then the ``k`` merged windows. Returns the plan (``M = N - 3k``, with ``members``) and the
    updated ``li``.
    """
    _check_tokens(x, li, grid_h, grid_w)
    batch, n = li.shape
    win = window_token_index(grid_h, grid_w, x.device)  # [G, 4]
    left = leftover_token_index(grid_h, grid_w, x.device)  # [L]
    g, k = win.shape[0], int(num_windows)
    if not 0 <= k <= g:
        raise ValueError(f"SSM cannot merge {k} of {g} windows")
    xw = unit_tokens(x)[:, win]  # [B, G, 4, C]
    score = _window_score(xw, li, win, a_s)
    rank = descending_rank(score)[..., None]  # [B, G, 1]
    chosen = rank < k
    pass_through = 4 * (g - k) + left.numel()
    window_slot = torch.where(chosen, pass_through + rank, 4 * (rank - k) + torch.arange(4, device=x.device))
    left_slot = (4 * (g - k) + torch.arange(left.numel(), device=x.device)).expand(batch, -1)
    token = torch.cat([win.reshape(-1), left]).expand(batch, -1)
    slot = torch.empty_like(token).scatter_(1, token, torch.cat([window_slot.reshape(batch, -1), left_slot], 1))
    inv_count = torch.cat([xw.new_ones(pass_through), xw.new_full((k,), 0.25)]).expand(batch, -1)
    merged = torch.zeros(batch, n, dtype=torch.bool, device=x.device).scatter_(
        1, token[:, : 4 * g], chosen.expand(-1, -1, 4).reshape(batch, -1)
    )
    # Windows in rank order (rank is a permutation, so this scatter writes every entry exactly once).
    window_ids = torch.arange(g, device=x.device).expand(batch, -1)
    by_rank = torch.empty_like(rank[..., 0]).scatter_(1, rank[..., 0], window_ids)
    window_tokens = win[by_rank]  # [B, G, 4]
    kept = torch.cat([window_tokens[:, k:].reshape(batch, -1), left.expand(batch, -1)], 1)  # [B, pass_through]
    members = torch.cat([kept[..., None].expand(-1, -1, 4), window_tokens[:, :k]], 1)  # [B, M, 4]
    return MergePlan(slot, inv_count, members), update_li(li, merged)


def idm_plan(
    x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int, num_sources: int
) -> tuple[MergePlan, torch.Tensor]:
    """Inattentive-prioritized detail merging (the release's "FIDM"): merge ``num_sources`` tokens.

    Args:
        x: ``[B, N, C]`` the block's attention input.
        li: ``[B, N]`` int32 "not attended" counter.
        num_sources: sources to merge, ``r`` (a static int).

    Each 2x2 window's destination is its token with the largest ``li`` (ties: the first); the rest is
    :func:`bipartite_plan`. As in the release's ``FIDM``, a source's score is its best similarity alone: ``li``
    picks the destinations, not the sources. Returns the plan (``M = N - r``) and the updated ``li``
    (destinations and merged sources ``+1``, unmerged sources ``0``).
    """
    _check_tokens(x, li, grid_h, grid_w)
    win = window_token_index(grid_h, grid_w, x.device)  # [G, 4]
    dst_pos = li[:, win].argmax(dim=-1, keepdim=True)  # [B, G, 1]; argmax returns the first maximum
    plan, merged = bipartite_plan(x, dst_pos, grid_h, grid_w, num_sources)
    return plan, update_li(li, merged)


def bipartite_plan(
    x: torch.Tensor, dst_pos: torch.Tensor, grid_h: int, grid_w: int, num_sources: int, sy: int = 2, sx: int = 2
) -> tuple[MergePlan, torch.Tensor]:
    """ToMe's bipartite soft matching with one destination per ``sy x sx`` window (IDM, ToMeSD).

    Args:
        x: ``[B, N, C]`` tokens the similarity is measured on.
        dst_pos: ``[B, G, 1]`` int64, the destination's position inside each window (row-major).
        num_sources: sources to merge, ``r`` (a static int).

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
    r = int(num_sources)
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


class PlanSpec(NamedTuple):
    """Which plan one engine makes: ``method`` (a key of :data:`PLAN_METHODS`) and its static arguments."""

    method: str
    count: int  #: windows (SSM) or sources (IDM) to merge
    options: tuple[tuple[str, float], ...] = ()  #: keyword arguments of the plan function, e.g. ``a_s``


#: The stage -> merged branches mapping per model family, in one place. Branch names: ``attn`` (joint attention),
#: ``attn2`` (SD3.5's second attention), ``ff`` (feed-forward; Flux double blocks: the image FF), ``mlp`` (Flux
#: single blocks: the image part of the MLP branch). SD3, as released: the structure stage merges attention and
#: FF with one plan, the detail stage only the FF. Flux (DESIGN §8): both stages merge the feed-forward only; the
#: authors left attention unmerged on RoPE models. ``SDTMConfig.merge_attention`` overrides the attention part
#: (see :func:`merged_branches`). The passes and their checks read this through :func:`merged_branches`.
MERGED_BRANCHES: dict[str, dict[Stage, tuple[str, ...]]] = {
    "sd3": {Stage.FULL: (), Stage.STRUCTURE: ("attn", "attn2", "ff"), Stage.DETAIL: ("ff",)},
    "flux": {Stage.FULL: (), Stage.STRUCTURE: ("ff", "mlp"), Stage.DETAIL: ("ff", "mlp")},
}
_ATTENTION = ("attn", "attn2")


def merged_branches(stage: Stage, family: str, config: MethodConfig) -> tuple[str, ...]:
    """The branches merged in ``stage`` for a model of ``family`` (``sd3`` / ``flux``) under ``config`` (any
    method's: a method that is not SDTM answers through :meth:`~sdtm_compile.methods.TokenMethod.merged_branches`).

    ``config.merge_attention``: ``None`` keeps the family's default; ``True`` merges the attention in the
    structure stage (never in the detail stage, which is SDTM's definition of it); ``False`` never merges it.
    """
    if not isinstance(config, SDTMConfig):
        from .methods import method_for

        return method_for(config).merged_branches(stage, family)
    names = MERGED_BRANCHES[family][stage]
    if config.merge_attention is None or stage is Stage.FULL:
        return names
    rest = tuple(name for name in names if name not in _ATTENTION)
    return (_ATTENTION + rest) if config.merge_attention and stage is Stage.STRUCTURE else rest


def plan_spec(key: EngineKey, grid_h: int, grid_w: int, config: MethodConfig) -> PlanSpec:
    """The stage -> plan mapping, in one place. SDTM: SSM for structure, IDM for detail, at the bucket's count;
    another method: its :meth:`~sdtm_compile.methods.TokenMethod.plan_spec`."""
    if not isinstance(config, SDTMConfig):
        from .methods import method_for

        return method_for(config).plan_spec(key, grid_h, grid_w)
    if key.stage is Stage.STRUCTURE:
        return PlanSpec("ssm", ssm_windows_merged(key.bucket, grid_h, grid_w), (("a_s", config.a_s),))
    if key.stage is Stage.DETAIL:
        return PlanSpec("idm", idm_sources_merged(key.bucket, grid_h, grid_w))
    raise ValueError(f"stage {key.stage.value!r} has no merge plan")


#: Plan functions by name: ``plan(x, state, grid_h, grid_w, count, **options) -> (MergePlan, state)``. SDTM's
#: two are here; every other method registers its own from its module (``sdtm_compile.methods``).
PLAN_METHODS: dict[str, Callable[..., tuple[MergePlan, torch.Tensor]]] = {"ssm": ssm_plan, "idm": idm_plan}


def make_plan(
    spec: PlanSpec, x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int
) -> tuple[MergePlan, torch.Tensor]:
    """Run the plan function ``spec`` names on ``x`` ``[B, N, C]`` and ``li`` ``[B, N]``."""
    plan = PLAN_METHODS.get(spec.method)
    if plan is None:  # the other methods register their plans when sdtm_compile.methods is imported
        import sdtm_compile.methods  # noqa: F401

        plan = PLAN_METHODS.get(spec.method)
    if plan is None:
        raise ValueError(f"unknown merge method {spec.method!r}: expected one of {sorted(PLAN_METHODS)}")
    return plan(x, li, grid_h, grid_w, spec.count, **dict(spec.options))


def plan_for(
    key: EngineKey, x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int, config: MethodConfig
) -> tuple[MergePlan, torch.Tensor]:
    """The plan of one engine's stage and bucket (see :func:`plan_spec`), with its new ``li``."""
    return make_plan(plan_spec(key, grid_h, grid_w, config), x, li, grid_h, grid_w)


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
    rotation: averaging cos/sin would not be one (DESIGN §8). ``index_select`` rather than advanced indexing:
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
    if plan.members is None:  # the general form: accumulate every token into its slot
        return _sum_into_slots(x, plan.slot, plan.inv_count.shape[1]) * plan.inv_count[..., None].to(x.dtype)
    batch, slots, fan_in = plan.members.shape
    channels = x.shape[-1]
    gathered = x.gather(1, plan.members.reshape(batch, slots * fan_in, 1).expand(-1, -1, channels))
    if fan_in > 1:  # fixed fan-in (SSM): a mean of gathered tokens, no accumulating scatter at all
        return gathered.reshape(batch, slots, fan_in, channels).mean(dim=2)
    if plan.extra_tokens is not None:  # representatives + the extra tokens (IDM's merged sources)
        rows = torch.arange(batch, device=x.device)[:, None].expand_as(plan.extra_slots)
        extra = x.gather(1, plan.extra_tokens[..., None].expand(-1, -1, channels))
        gathered = gathered.index_put((rows, plan.extra_slots), extra, accumulate=True)
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


def fuse_cached(computed: torch.Tensor, cached: torch.Tensor, li: torch.Tensor, mcw: float) -> torch.Tensor:
    """Cache fusion (the release's ``unmerge``): ``mcw * computed + (1 - mcw) * cached`` on merged positions.

    ``computed`` / ``cached``: ``[B, N, C]`` a branch's gated output now and at the last protected step; ``li``
    ``[B, N]``: the counter *after* this block's plan, which is 0 exactly on the tokens the plan left unmerged
    (SSM: tokens of unchosen windows; IDM: unmerged sources). So the blended positions are the release's: SSM's
    merged windows, IDM's destinations and merged sources (its ``dst_in_x_index`` is every destination).
    """
    return torch.where((li > 0)[..., None], mcw * computed + (1.0 - mcw) * cached, computed)


def key_size_bias(inv_count: torch.Tensor, text_tokens: int, text_first: bool, text_log_weight: float) -> torch.Tensor:
    """Size-aware attention's additive key bias ``[B, 1, 1, M + T]`` (prompt reweighting, ours).

    ``inv_count`` ``[B, M]``: ``1 / size`` of each merged image token, so its bias ``-log(inv_count) = log(size)``
    makes one merged key weigh like the ``size`` keys it replaced; text keys get ``text_log_weight``. ``text_first``:
    the joint sequence's order (Flux: text first; SD3: image first); ``text_tokens`` 0 for an image-only attention.
    """
    image = -torch.log(inv_count.float())
    text = image.new_full((image.shape[0], text_tokens), float(text_log_weight))
    parts = (text, image) if text_first else (image, text)
    return torch.cat(parts, dim=1)[:, None, None, :]
