"""ToMA (token merging with attention, ICML 2025) on MMDiT image tokens, through our passes and engines.

The rule, as the authors' code (``WenboLuu/ToMA``, Flux only) does it:

* destinations: the image grid is cut into square tiles; in each tile, greedy facility location on the cosine
  similarity ``S`` of its (normalised) tokens picks ``d`` destinations - first the token with the largest row sum
  of ``S``, then each time the token that most raises ``sum_j max(S[v, j] - best_j, 0)`` (``best_j``: token
  ``j``'s similarity to its best destination so far). ``d`` is fixed per bucket (``(N - int(N * ratio)) // T``
  for ``T`` tiles), so the greedy loop has a fixed number of steps and unrolls into a static graph;
* a soft assignment ``A = softmax(attention_scale * D X^T)`` over the destination axis (``D`` the destinations'
  normalised tokens, ``X`` the tile's): merge is ``(A / rowsum A) @ x`` (each merged token a weighted mean of its
  tile), unmerge is ``A^T @ y`` - two batched matmuls per tile, no scatter at all;
* the plan is made once per block kind and shared by the blocks after it (the code computes it in the first
  merged double block and the first merged single block and reuses it in the rest); on Flux the first blocks
  stay unmerged (FLUX.1: 5 of 19 double and 5 of 38 single blocks);
* merged branches: the joint attention (image queries, keys and values; a merged token takes its destination's
  rotary position) in double / SD3 blocks, their feed-forward unmerged; in a single block the attention *and*
  the MLP branch (the code merges ``proj_mlp`` too, despite a comment saying otherwise).

What differs, and why (ours): destinations per batch row (the code picks them from batch element 0 and reuses
them for the batch); softmax and matmul weights in float32 (the code: the model's dtype); SD3 / SD3.5 (the code
has Flux only): joint blocks like Flux's double blocks, every block merged, one shared plan; on a small model the
unmerged leading blocks scale with its depth (``unmerged_double`` / ``unmerged_single``). The code's release merges
only every third step (``merge_step = range(0, steps, 3)`` in its ``run_flux.py``); here, as for every method,
the merge runs at every step, and the plan is recomputed every step as the release does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.config import MethodConfig
from ..core.merge import MergePlan, leftover_token_index, unit_tokens, window_token_index
from ..core.method import TokenMethod, register_method
from ..core.plans import PlanSpec, plan_method
from ..core.schedule import EngineKey, Stage

__all__ = ["ToMAConfig", "ToMAMethod", "toma_plan", "toma_destinations_per_tile", "facility_location"]

#: FLUX.1's blocks and how many of each ToMA leaves unmerged (its ``flux.yaml``: 5 double, 5 single).
_FLUX1_BLOCKS = {"double": (19, 5), "single": (38, 5)}


@dataclass(frozen=True)
class ToMAConfig(MethodConfig):
    """ToMA (``ratio``, ``buckets`` and the timestep fields: :class:`~sdtm_compile.core.config.MethodConfig`).

    Attributes:
        ratio: fraction of image tokens merged away at every step (``r = int(N * ratio)``; the merged length is
            ``T * ((N - r) // T)`` for ``T`` tiles). Default 0.5, ToMA's. At most ``1 - 1 / tile_size^2``.
        tile_size: tile side in tokens (ToMA's ``num_tiles`` counts tiles instead; its run at 1024^2 used 256
            tiles of 4 x 4 tokens on the 64 x 64 grid, which is our default at any size). The grid sides must be
            multiples of it.
        attention_scale: the softmax temperature ``tau`` of the soft assignment (ToMA's name and default, 1000).
        share_plan: one plan per block kind, made in the first merged block of that kind and reused by the others
            (ToMA). ``False``: every merged block makes its own.
        unmerged_double: leading Flux double-stream blocks left unmerged. ``None``: ToMA's share of FLUX.1's
            (5 of 19), rounded, for the model's depth.
        unmerged_single: the same for single-stream blocks (``None``: 5 of 38, rounded).
    """

    method: ClassVar[str] = "toma"
    max_ratio: ClassVar[float] = 0.9375
    _other_fields: ClassVar[tuple[str, ...]] = ("tile_size", "share_plan", "unmerged_double", "unmerged_single")

    tile_size: int = 4
    attention_scale: float = 1000.0
    share_plan: bool = True
    unmerged_double: int | None = None
    unmerged_single: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int) or not 2 <= self.tile_size <= 16:
            self._fail("tile_size", self.tile_size, "an int from 2 to 16 (tokens per tile side)")
        limit = 1.0 - 1.0 / self.tile_size**2
        if self.ratio > limit + 1e-9:
            self._fail("ratio", self.ratio, f"at most 1 - 1/tile_size^2 = {limit:g}: a tile keeps a destination")
        if not 0.0 < self.attention_scale <= 1e6:
            self._fail("attention_scale", self.attention_scale, "0 < attention_scale <= 1e6")
        self._check_flag("share_plan")
        for name in ("unmerged_double", "unmerged_single"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                self._fail(name, value, "None (ToMA's share of the blocks) or an int >= 0")


def toma_destinations_per_tile(bucket: float, grid_h: int, grid_w: int, tile: int) -> int:
    """``d``, destinations per tile: ``(N - int(N * ratio)) // T`` (ToMA's rounding), at least 1."""
    n = grid_h * grid_w
    tiles = (grid_h // tile) * (grid_w // tile)
    return max(1, (n - int(n * bucket)) // tiles)


def facility_location(similarity: torch.Tensor, picks: int) -> torch.Tensor:
    """Greedy facility location: ``similarity`` ``[..., n, n]`` -> ``[..., picks]`` int64 positions, in pick order.

    First the row with the largest sum, then each time the row that most raises ``sum_j max(S[v, j] - best_j, 0)``.
    Chosen rows are not excluded (as ToMA's code): a row already chosen gains 0 and is picked again only when
    no row gains anything. ``picks`` is static: the loop unrolls.
    """
    first = similarity.sum(dim=-1).argmax(dim=-1, keepdim=True)  # [..., 1]
    chosen = [first]
    best = similarity.gather(-2, first[..., None].expand(*first.shape, similarity.shape[-1])).squeeze(-2)
    for _ in range(picks - 1):
        gain = torch.relu(similarity - best[..., None, :]).sum(dim=-1)  # [..., n]
        pick = gain.argmax(dim=-1, keepdim=True)
        chosen.append(pick)
        row = similarity.gather(-2, pick[..., None].expand(*pick.shape, similarity.shape[-1])).squeeze(-2)
        best = torch.maximum(best, row)
    return torch.cat(chosen, dim=-1)


@plan_method("toma")
def toma_plan(
    x: torch.Tensor,
    state: torch.Tensor,
    grid_h: int,
    grid_w: int,
    per_tile: int,
    tile: int = 4,
    attention_scale: float = 1000.0,
) -> tuple[MergePlan, torch.Tensor]:
    """ToMA's plan: ``x`` ``[B, N, C]`` -> (soft plan with ``M = T * per_tile``, ``state`` unchanged).

    Tiles are ``tile x tile`` windows of the grid, row-major; ``order`` lists the tokens tile by tile.
    """
    if leftover_token_index(grid_h, grid_w, x.device, tile, tile).numel():
        raise ValueError(
            f"ToMA tiles of {tile}x{tile} tokens do not cover the {grid_h}x{grid_w} token grid: use a tile_size that "
            "divides both grid sides (ToMAConfig(tile_size=...)), or another image size"
        )
    batch, n = x.shape[:2]
    tiles = window_token_index(grid_h, grid_w, x.device, tile, tile)  # [T, n_t]
    num_tiles, size = tiles.shape
    metric = unit_tokens(x)[:, tiles]  # [B, T, n_t, C]
    similarity = metric @ metric.transpose(-1, -2)  # [B, T, n_t, n_t]
    picks = facility_location(similarity, per_tile)  # [B, T, d]
    destinations = metric.gather(2, picks[..., None].expand(-1, -1, -1, metric.shape[-1]))  # [B, T, d, C]
    weights = torch.softmax(attention_scale * (destinations @ metric.transpose(-1, -2)), dim=-2)  # [B, T, d, n_t]
    assign = weights / weights.sum(dim=-1, keepdim=True)
    restore = weights.transpose(-1, -2)  # [B, T, n_t, d]
    order = tiles.reshape(1, n).expand(batch, -1)
    slot = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device).expand(batch, -1))
    members = tiles.expand(batch, -1, -1).gather(2, picks).reshape(batch, num_tiles * per_tile, 1)
    ones = metric.new_ones(batch, num_tiles * per_tile)
    return MergePlan(slot, ones, members, order=order, assign=assign, restore=restore), state


@register_method
class ToMAMethod(TokenMethod):
    """ToMA: one stage at a constant ratio, soft plans shared per block kind, leading Flux blocks unmerged."""

    config_class = ToMAConfig
    config: ToMAConfig

    def plan_spec(self, key: EngineKey, grid_h: int, grid_w: int) -> PlanSpec:
        c = self.config
        per_tile = toma_destinations_per_tile(key.bucket, grid_h, grid_w, c.tile_size)
        return PlanSpec("toma", per_tile, (("tile", c.tile_size), ("attention_scale", c.attention_scale)))

    def merged_branches(self, stage: Stage, family: str) -> tuple[str, ...]:
        # double / SD3 blocks: attention (and attn2); single blocks: attention and the MLP branch
        return () if stage is Stage.FULL else ("attn", "attn2", "mlp")

    def merged_tokens(self, key: EngineKey, grid_h: int, grid_w: int) -> int:
        if key.stage is Stage.FULL:
            return grid_h * grid_w
        tile = self.config.tile_size
        tiles = (grid_h // tile) * (grid_w // tile)
        return tiles * toma_destinations_per_tile(key.bucket, grid_h, grid_w, tile)

    def check_grid(self, grid_h: int, grid_w: int) -> str | None:
        tile = self.config.tile_size
        if grid_h % tile or grid_w % tile:
            return (
                f"ToMA tiles of {tile}x{tile} tokens do not cover the {grid_h}x{grid_w} token grid: use a tile_size "
                "that divides both grid sides (ToMAConfig(tile_size=...)), or another image size"
            )
        return None

    def unmerged_blocks(self, kinds: Sequence[str]) -> dict[str, int]:
        """Leading blocks of each kind left unmerged."""
        out = {"joint": 0}
        for kind, field_value in (("double", self.config.unmerged_double), ("single", self.config.unmerged_single)):
            total, skipped = _FLUX1_BLOCKS[kind]
            count = sum(k == kind for k in kinds)
            out[kind] = field_value if field_value is not None else int(round(count * skipped / total))
        return out

    def block_plans(self, kinds: Sequence[str]) -> list[int | None]:
        skip = self.unmerged_blocks(kinds)
        seen: dict[str, int] = {}
        first: dict[str, int] = {}
        plans: list[int | None] = []
        for index, kind in enumerate(kinds):
            seen[kind] = seen.get(kind, 0) + 1
            if seen[kind] <= skip.get(kind, 0):
                plans.append(None)
            elif self.config.share_plan:
                plans.append(first.setdefault(kind, index))
            else:
                plans.append(index)
        return plans
