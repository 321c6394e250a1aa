"""ToMeSD (Bolya & Hoffman, 2023; ``tomesd`` on PyPI) on MMDiT image tokens, through our passes and engines.

tomesd's rule (``tomesd.merge.bipartite_soft_matching_random2d``): every ``sy x sx`` window of the token grid
has one destination - a random one, or the top-left one with ``use_rand=False`` - and every other token is a
source; each source finds its most cosine-similar destination, and the ``r = int(N * ratio)`` sources with the
highest similarity are averaged into their destinations (a mean over the destination and its sources). Unmerge
copies each merged token back to all its members. Text tokens are never merged. It is SDTM's IDM plan
(:func:`~sdtm_compile.core.merge.bipartite_plan`) with another destination rule and no ``li``.

What differs from tomesd, and why:

* the random destinations come from the engine's state input (``[B, N]`` int32, seeded per generation from
  ``seed``, advanced once per block; :mod:`~sdtm_compile.methods.base`), not from ``torch.randint`` inside the
  model: an engine must not draw random numbers itself, or the backends would disagree. As in tomesd, every
  batch row (e.g. CFG's two halves) gets the same destinations;
* tomesd measures similarity on the block's input before ``norm1``; here every method plans from the same
  tokens, the attention input after ``norm1`` and its modulation (ours: one plan site for every method);
* ``max_downsample`` has no meaning in a DiT (every block sees the full token grid) and is not a field;
  ``merge_crossattn`` neither (MMDiT has no cross-attention: text joins the joint attention unmerged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.config import MethodConfig
from ..core.merge import MergePlan, bipartite_plan, window_token_index
from ..core.method import register_method
from ..core.plans import PlanSpec, plan_method
from ..core.schedule import EngineKey
from .base import STATE_MODULUS, WindowMethod, advance_state, seeded_state, window_method_count

__all__ = ["ToMeSDConfig", "ToMeSDMethod", "tomesd_plan", "tomesd_sources_merged"]


@dataclass(frozen=True)
class ToMeSDConfig(MethodConfig):
    """ToMeSD, with tomesd's argument names (``ratio``, ``buckets`` and the timestep fields:
    :class:`~sdtm_compile.core.config.MethodConfig`).

    Attributes:
        ratio: fraction of image tokens merged away, ``r = int(N * ratio)``, at every step (tomesd has no
            schedule). Default 0.5, tomesd's. At most ``1 - 1 / (sx * sy)``.
        sx, sy: destination window width and height in tokens (tomesd's defaults, 2 x 2). 1 to 4 each.
        use_rand: a random destination per window (tomesd's default) or always the top-left one.
        merge_attn: merge the image tokens entering the joint attention (and SD3.5's ``attn2``). Default on.
        merge_mlp: merge the feed-forward input (Flux single blocks: their MLP branch). Default off, as tomesd.
        seed: seed of the random destinations; every generation starts from it again (same inputs, same output).
    """

    method: ClassVar[str] = "tomesd"
    max_ratio: ClassVar[float] = 0.9375
    _other_fields: ClassVar[tuple[str, ...]] = ("sx", "sy", "use_rand", "merge_attn", "merge_mlp", "seed")

    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_mlp: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_window("destination")
        for name in ("use_rand", "merge_attn", "merge_mlp"):
            self._check_flag(name)
        if not (self.merge_attn or self.merge_mlp):
            self._fail("merge_attn", self.merge_attn, "True, or merge_mlp=True: something must be merged")
        self._check_seed()


#: ``r``, tokens merged: ``int(N * ratio)``, at most the tokens outside one per window
tomesd_sources_merged = window_method_count


@plan_method("tomesd")
def tomesd_plan(
    x: torch.Tensor,
    state: torch.Tensor,
    grid_h: int,
    grid_w: int,
    num_sources: int,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
) -> tuple[MergePlan, torch.Tensor]:
    """ToMeSD's plan: ``x`` ``[B, N, C]``, ``state`` ``[B, N]`` int32 -> (plan with ``M = N - r``, next state).

    The destination of window ``g`` is at position ``floor(state[:, first token of g] * sx*sy / 65536)`` (the
    state's high bits) with ``use_rand``, else 0 (top-left). The state advances once per call when random.
    """
    win = window_token_index(grid_h, grid_w, x.device, sy, sx)  # [G, K]
    if use_rand:
        dst_pos = (state[:, win[:, 0]] * win.shape[1]) // STATE_MODULUS  # [B, G] in [0, K)
        state = advance_state(state)
    else:
        dst_pos = torch.zeros(x.shape[0], win.shape[0], dtype=torch.int64, device=x.device)
    plan, _ = bipartite_plan(x, dst_pos.long()[..., None], grid_h, grid_w, num_sources, sy, sx)
    return plan, state


@register_method
class ToMeSDMethod(WindowMethod):
    """ToMeSD: one stage at a constant ratio, the same plan rule in every block, a random state."""

    config_class = ToMeSDConfig
    config: ToMeSDConfig
    attention_flag = "merge_attn"
    feed_forward_flag = "merge_mlp"

    def plan_spec(self, key: EngineKey, grid_h: int, grid_w: int) -> PlanSpec:
        c = self.config
        options = (("sx", c.sx), ("sy", c.sy), ("use_rand", c.use_rand))
        return PlanSpec("tomesd", self.removed(key, grid_h, grid_w), options)

    def init_state(self, batch: int, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        # one row of random numbers shared by the batch, as tomesd shares its rand_idx across the batch
        return seeded_state(self.config.seed, (1, num_tokens), device).expand(batch, -1).contiguous()
