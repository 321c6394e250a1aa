"""SDTM (structure-then-detail token merging) as a :class:`~sdtm_compile.methods.TokenMethod`.

The algorithm lives where it always did - the plans in :mod:`sdtm_compile.merge` (``ssm_plan``, ``idm_plan``),
the CRA schedule in :mod:`sdtm_compile.schedule`, the config in :mod:`sdtm_compile.config` - and this class only
answers the interface's questions with it, so SDTM's results do not change.
"""

from __future__ import annotations

import torch

from ..config import SDTMConfig
from ..merge import PlanSpec, init_li, merged_branches, plan_spec
from ..schedule import EngineKey, Stage, TokenCounts, engine_key_at, engines_for_trajectory, token_counts
from .base import ATTENTION_BRANCHES, TokenMethod, register_method

__all__ = ["SDTMMethod"]


@register_method
class SDTMMethod(TokenMethod):
    """SDTM: SSM plans in the structure stage, IDM plans in the detail stage, CRA ratio schedule, ``li`` state."""

    config_class = SDTMConfig
    config: SDTMConfig

    def engine_key_at(self, position: float) -> EngineKey:
        return engine_key_at(position, self.config)

    def engines_for_trajectory(self) -> list[EngineKey]:
        return engines_for_trajectory(self.config)

    def plan_spec(self, key: EngineKey, grid_h: int, grid_w: int) -> PlanSpec:
        return plan_spec(key, grid_h, grid_w, self.config)

    def merged_branches(self, stage: Stage, family: str) -> tuple[str, ...]:
        return merged_branches(stage, family, self.config)

    def merged_tokens(self, key: EngineKey, grid_h: int, grid_w: int) -> int:
        counts = token_counts(key, grid_h, grid_w)
        return counts.tokens - counts.removed

    def token_counts(self, key: EngineKey, grid_h: int, grid_w: int, family: str) -> TokenCounts:
        attention = any(b in self.merged_branches(key.stage, family) for b in ATTENTION_BRANCHES)
        return token_counts(key, grid_h, grid_w, merges_attention=attention)

    def init_state(self, batch: int, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        return init_li(batch, num_tokens, device)
