"""SiTo (similarity-based token pruning, AAAI 2025) on MMDiT image tokens, through our passes and engines.

The rule, as the authors' code (``EvelynZhang-epiclab/SiTo``, ``sito.py``) does it: every token gets a score,
its summed cosine similarity to all tokens plus Gaussian noise, ``sim_beta * x_i . sum_j x_j + noise_alpha * z``
(computed in O(NC) here, not as the N x N matrix); the best-scoring token of each ``sy x sx`` window is its
*base* and is kept; every other token is a candidate, scored by its highest similarity to a base; the
``int(N * ratio)`` candidates most similar to a base are pruned (a gather: nothing is averaged). After the
branch, each pruned token is restored as a copy of its most similar kept token (over every kept token, bases
and unpruned candidates, as the code does; its README says "base tokens"). Text tokens are never pruned.

What differs from the authors' code, and why:

* the noise comes from the engine's state input (``[B, N]`` int32 seeded per generation from ``seed``, a
  Box-Muller draw per token per block; :mod:`~sdtm_compile.methods.base`) instead of ``torch.randn`` on the
  global generator, so every backend prunes the same tokens and a generation is reproducible. As in SiTo every
  batch row gets its own noise;
* scores in float32 (SiTo casts to fp16); plans from the attention input after ``norm1`` (SiTo: the block input
  before ``norm1``), the same plan site as every method here;
* ``max_downsample_ratio`` has no meaning in a DiT, ``prune_crossattn_flag`` neither (no cross-attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.config import MethodConfig
from ..core.merge import MergePlan, descending_rank, leftover_token_index, unit_tokens, window_token_index
from ..core.method import register_method
from ..core.plans import PlanSpec, plan_method
from ..core.schedule import EngineKey
from .base import WindowMethod, advance_state, seeded_state, state_uniform, window_method_count

__all__ = ["SiToConfig", "SiToMethod", "sito_plan", "sito_tokens_pruned"]


@dataclass(frozen=True)
class SiToConfig(MethodConfig):
    """SiTo, with its code's argument names (``ratio`` is its ``prune_ratio``; ``buckets`` and the timestep
    fields: :class:`~sdtm_compile.core.config.MethodConfig`).

    Attributes:
        ratio: fraction of image tokens pruned, ``int(N * ratio)``, at every step. Default 0.5, SiTo's. At most
            ``1 - 1 / (sx * sy)``.
        sx, sy: base-token window width and height in tokens (SiTo's defaults, 2 x 2). 1 to 4 each.
        noise_alpha: weight of the Gaussian noise in the base score (SiTo: 0.1).
        sim_beta: weight of the summed similarity in the base score (SiTo: 1).
        prune_selfattn_flag: prune the tokens entering the joint attention (and SD3.5's ``attn2``). Default on.
        prune_mlp_flag: prune the feed-forward input (Flux single blocks: their MLP branch). Default off, as SiTo.
        seed: seed of the noise; every generation starts from it again.
    """

    method: ClassVar[str] = "sito"
    max_ratio: ClassVar[float] = 0.9375
    _other_fields: ClassVar[tuple[str, ...]] = ("sx", "sy", "prune_selfattn_flag", "prune_mlp_flag", "seed")

    sx: int = 2
    sy: int = 2
    noise_alpha: float = 0.1
    sim_beta: float = 1.0
    prune_selfattn_flag: bool = True
    prune_mlp_flag: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_window("base token")
        if not 0.0 <= self.noise_alpha <= 10.0:
            self._fail("noise_alpha", self.noise_alpha, "0 <= noise_alpha <= 10")
        if not 0.0 <= self.sim_beta <= 10.0:
            self._fail("sim_beta", self.sim_beta, "0 <= sim_beta <= 10")
        for name in ("prune_selfattn_flag", "prune_mlp_flag"):
            self._check_flag(name)
        if not (self.prune_selfattn_flag or self.prune_mlp_flag):
            self._fail("prune_selfattn_flag", False, "True, or prune_mlp_flag=True: something must be pruned")
        self._check_seed()


#: ``P``, tokens pruned: ``int(N * ratio)``, at most the tokens outside one per window
sito_tokens_pruned = window_method_count


def gaussian_noise(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A standard normal float32 per state entry (Box-Muller over two LCG draws) and the state after them."""
    second = advance_state(state)
    radius = torch.sqrt(-2.0 * torch.log(state_uniform(state)))
    return radius * torch.cos((2.0 * math.pi) * state_uniform(second)), advance_state(second)


@plan_method("sito")
def sito_plan(
    x: torch.Tensor,
    state: torch.Tensor,
    grid_h: int,
    grid_w: int,
    num_pruned: int,
    sx: int = 2,
    sy: int = 2,
    noise_alpha: float = 0.1,
    sim_beta: float = 1.0,
) -> tuple[MergePlan, torch.Tensor]:
    """SiTo's plan: ``x`` ``[B, N, C]``, ``state`` ``[B, N]`` int32 -> (plan with ``M = N - P``, next state).

    Kept tokens (the plan's ``members`` ``[B, M, 1]``): unpruned candidates by rank, then the ``G`` bases.
    ``slot``: a kept token's own slot; a pruned token's most similar kept token's slot.
    """
    batch, n = x.shape[:2]
    win = window_token_index(grid_h, grid_w, x.device, sy, sx)  # [G, K]
    left = leftover_token_index(grid_h, grid_w, x.device, sy, sx)  # [L]
    g, k = win.shape
    num_cand, p = n - g, int(num_pruned)
    if not 0 <= p <= num_cand:
        raise ValueError(f"SiTo cannot prune {p} of {num_cand} candidates")
    metric = unit_tokens(x)  # [B, N, C] unit rows
    score = sim_beta * (metric @ metric.sum(dim=1, keepdim=True).transpose(-1, -2)).squeeze(-1)  # [B, N]
    noise, state = gaussian_noise(state)
    score = score + noise_alpha * noise
    win_b = win.expand(batch, -1, -1)
    base_pos = score[:, win].argmax(dim=-1, keepdim=True)  # [B, G, 1]; the first maximum
    base_tok = win_b.gather(2, base_pos).squeeze(-1)  # [B, G]
    others = (base_pos + torch.arange(1, k, device=x.device)) % k
    cand_tok = torch.cat([win_b.gather(2, others).reshape(batch, -1), left.expand(batch, -1)], 1)  # [B, S]

    def rows(tokens: torch.Tensor) -> torch.Tensor:
        return metric.gather(1, tokens[..., None].expand(-1, -1, metric.shape[-1]))

    to_base = rows(cand_tok) @ rows(base_tok).transpose(-1, -2)  # [B, S, G]
    rank = descending_rank(to_base.amax(dim=-1))  # most similar to a base first
    cand_by_rank = torch.empty_like(cand_tok).scatter_(1, rank, cand_tok)
    kept = torch.cat([cand_by_rank[:, p:], base_tok], 1)  # [B, M]
    pruned = cand_by_rank[:, :p]  # [B, P]
    m = n - p
    kept_slot = torch.arange(m, device=x.device).expand(batch, -1)
    pruned_slot = (rows(pruned) @ rows(kept).transpose(-1, -2)).argmax(dim=-1)  # [B, P]: most similar kept token
    slot = torch.empty(batch, n, dtype=torch.int64, device=x.device).scatter_(
        1, torch.cat([kept, pruned], 1), torch.cat([kept_slot, pruned_slot], 1)
    )
    return MergePlan(slot, metric.new_ones(batch, m), kept[..., None]), state


@register_method
class SiToMethod(WindowMethod):
    """SiTo: one stage at a constant ratio, a pruning plan in every block, a random state for the noise."""

    config_class = SiToConfig
    config: SiToConfig
    attention_flag = "prune_selfattn_flag"
    feed_forward_flag = "prune_mlp_flag"

    def plan_spec(self, key: EngineKey, grid_h: int, grid_w: int) -> PlanSpec:
        c = self.config
        options = (("sx", c.sx), ("sy", c.sy), ("noise_alpha", c.noise_alpha), ("sim_beta", c.sim_beta))
        return PlanSpec("sito", self.removed(key, grid_h, grid_w), options)

    def init_state(self, batch: int, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        return seeded_state(self.config.seed, (batch, num_tokens), device)  # SiTo: its own noise per batch row
