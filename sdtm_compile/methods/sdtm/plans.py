"""SDTM's plans: SSM for the structure stage, IDM (the release's "FIDM") for the detail stage, and ``li``.

``li`` is the "not attended" counter ``[B, N]`` int32 carried across blocks and steps of a generation: every plan
adds 1 to the tokens it merges and resets the others to 0. SSM scores 2x2 windows by their tokens' mutual cosine
similarity plus ``a_s`` times their ``li``; IDM picks each window's destination by ``li``. Both are registered
plan functions (``"ssm"``, ``"idm"``) built from the shared primitives of :mod:`sdtm_compile.core.merge`.
"""

from __future__ import annotations

import torch

from ...core.merge import (
    MergePlan,
    bipartite_plan,
    check_tokens,
    descending_rank,
    leftover_token_index,
    plan_count,
    unit_tokens,
    window_token_index,
)
from ...core.plans import plan_method

__all__ = ["ssm_plan", "idm_plan", "init_li", "update_li", "window_score_fraction"]


_LI_EPS = 1e-6  # the release's epsilon in li / mean(li)


def init_li(batch: int, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh "not attended" counter: ``[B, N]`` int32 zeros (start of every generation)."""
    return torch.zeros(batch, num_tokens, dtype=torch.int32, device=device)


def _li_priority(li: torch.Tensor) -> torch.Tensor:
    """``li / mean(li)`` per row, as in the release (0 while all counters are 0)."""
    li_f = li.float()
    return li_f / (li_f.mean(dim=-1, keepdim=True) + _LI_EPS)


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
    check_tokens(x, li, grid_h, grid_w)
    win = window_token_index(grid_h, grid_w, x.device)  # [G, 4]
    score = _window_score(unit_tokens(x)[:, win], li, win, a_s)
    return (score >= threshold).float().mean(dim=-1)


@plan_method("ssm")
def ssm_plan(
    x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int, num_windows: int | torch.SymInt, a_s: float
) -> tuple[MergePlan, torch.Tensor]:
    """Similarity-prioritized structure merging: average the ``num_windows`` most uniform 2x2 windows.

    Args:
        x: ``[B, N, C]`` the block's attention input (image tokens after ``norm1`` modulation).
        li: ``[B, N]`` int32 "not attended" counter.
        num_windows: windows to merge, ``k`` (an int, or a symbolic size: ``plan_count``; each removes 3 tokens).
        a_s: weight of the window's mean ``li / mean(li)`` in its score.

    Score of a window = mean of its 4x4 cosine-similarity matrix (the release includes the diagonal) +
    ``a_s * mean(li / mean(li))``. Output order: kept windows' tokens (4 each, by rank), leftover tokens of an
    odd side, then the ``k`` merged windows. Returns the plan (``M = N - 3k``, with ``members``) and the
    updated ``li``.
    """
    check_tokens(x, li, grid_h, grid_w)
    batch, n = li.shape
    win = window_token_index(grid_h, grid_w, x.device)  # [G, 4]
    left = leftover_token_index(grid_h, grid_w, x.device)  # [L]
    g, k = win.shape[0], plan_count(num_windows)
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


@plan_method("idm")
def idm_plan(
    x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int, num_sources: int | torch.SymInt
) -> tuple[MergePlan, torch.Tensor]:
    """Inattentive-prioritized detail merging (the release's "FIDM"): merge ``num_sources`` tokens.

    Args:
        x: ``[B, N, C]`` the block's attention input.
        li: ``[B, N]`` int32 "not attended" counter.
        num_sources: sources to merge, ``r`` (an int, or a symbolic size: ``plan_count``).

    Each 2x2 window's destination is its token with the largest ``li`` (ties: the first); the rest is
    :func:`bipartite_plan`. As in the release's ``FIDM``, a source's score is its best similarity alone: ``li``
    picks the destinations, not the sources. Returns the plan (``M = N - r``) and the updated ``li``
    (destinations and merged sources ``+1``, unmerged sources ``0``).
    """
    check_tokens(x, li, grid_h, grid_w)
    win = window_token_index(grid_h, grid_w, x.device)  # [G, 4]
    dst_pos = li[:, win].argmax(dim=-1, keepdim=True)  # [B, G, 1]; argmax returns the first maximum
    plan, merged = bipartite_plan(x, dst_pos, grid_h, grid_w, num_sources)
    return plan, update_li(li, merged)
