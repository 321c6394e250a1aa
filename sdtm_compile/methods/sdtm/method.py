"""SDTM (structure-then-detail token merging) as a :class:`~sdtm_compile.core.method.TokenMethod`: which branches
each stage merges, which plan each engine runs, and which extensions the config turns on."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ...core.extension import Extension
from ...core.method import ATTENTION_BRANCHES, MethodVariant, TokenMethod, VariantCalibration, register_method
from ...core.plans import PlanSpec
from ...core.schedule import EngineKey, Stage
from .adaptive import AdaptiveRatio
from .cache_fusion import CacheFusion
from .config import MAX_RATIO, SDTMConfig
from .schedule import (
    engine_key_at,
    engines_for_trajectory,
    idm_sources_merged,
    ssm_windows_merged,
    stage_engine,
    stage_ratios,
    token_counts,
)
from .size_aware import SizeAwareAttention
from .variants import sdtm_variants

__all__ = ["SDTMMethod", "MERGED_BRANCHES"]

#: The stage -> merged branches mapping per model family, in one place (branch names:
#: :data:`sdtm_compile.core.layout.BRANCHES`). SD3, as released: the structure stage merges attention and FF with
#: one plan, the detail stage only the FF. Flux: both stages merge the feed-forward only (the double blocks' FF and
#: the single blocks' MLP); the authors left attention unmerged on RoPE models. ``SDTMConfig.merge_attention``
#: overrides the attention part (see :meth:`SDTMMethod.merged_branches`).
MERGED_BRANCHES: dict[str, dict[Stage, tuple[str, ...]]] = {
    "sd3": {Stage.FULL: (), Stage.STRUCTURE: ("attn", "attn2", "ff"), Stage.DETAIL: ("ff",)},
    "flux": {Stage.FULL: (), Stage.STRUCTURE: ("ff", "mlp"), Stage.DETAIL: ("ff", "mlp")},
}


@register_method
class SDTMMethod(TokenMethod):
    """SDTM: SSM plans in the structure stage, IDM plans in the detail stage, CRA ratio schedule, ``li`` state;
    cache fusion, SDTM* and size-aware attention as extensions."""

    config_class = SDTMConfig
    config: SDTMConfig
    #: the release's counts are multiples of 16 (``reduce_num // 48 * 16`` windows in ``SSM``; sources ``// 16 * 16``)
    count_step = 16

    def engine_key_at(self, position: float) -> EngineKey:
        return engine_key_at(position, self.config)

    def engines_for_trajectory(self) -> list[EngineKey]:
        return engines_for_trajectory(self.config)

    def describe(self) -> str:
        c = self.config
        exact = ", exact counts" if c.exact_counts else ""
        return f"sdtm ratio {c.ratio:g} (deviation {c.deviation:g}, switch at {c.switch_at:g}{exact})"

    @property
    def dynamic_counts(self) -> bool:
        return self.config.exact_counts

    def engine_of(self, key: EngineKey) -> EngineKey:
        """With ``counts="exact"``: the stage's engine, keyed by the stage's largest ratio; else ``key``."""
        if not self.config.exact_counts or key.stage is Stage.FULL:
            return key
        return stage_engine(key.stage, self.config)

    def count_range(
        self, kinds: Sequence[str], key: EngineKey, grid: tuple[int, int]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """With ``counts="exact"``: the counts at the lowest and the highest ratio of ``key``'s stage (a count
        never rises as the ratio falls)."""
        if not self.config.exact_counts or key.stage is Stage.FULL:
            return super().count_range(kinds, key, grid)
        low, high = stage_ratios(key.stage, self.config)
        lowest = self.plan_counts(kinds, EngineKey(key.stage, max(low, 1e-9)), grid)
        return lowest, self.plan_counts(kinds, EngineKey(key.stage, high), grid)

    def with_ratio(self, ratio: float) -> SDTMConfig:
        """The config at ``ratio``, its deviation narrowed where ``ratio`` +- deviation would leave [0, 0.75]."""
        deviation = max(0.0, min(self.config.deviation, ratio, MAX_RATIO - ratio))
        return dataclasses.replace(self.config, ratio=ratio, deviation=round(deviation, 6))

    def plan_spec(self, key: EngineKey, grid_h: int, grid_w: int) -> PlanSpec:
        """SSM for the structure stage, IDM for the detail stage, at the bucket's count."""
        if key.stage is Stage.STRUCTURE:
            return PlanSpec("ssm", ssm_windows_merged(key.bucket, grid_h, grid_w), (("a_s", self.config.a_s),))
        if key.stage is Stage.DETAIL:
            return PlanSpec("idm", idm_sources_merged(key.bucket, grid_h, grid_w))
        raise ValueError(f"stage {key.stage.value!r} has no SDTM merge plan")

    def merged_branches(self, stage: Stage, family: str) -> tuple[str, ...]:
        """:data:`MERGED_BRANCHES`, with ``config.merge_attention``: ``None`` keeps the family's default; ``True``
        merges the attention in the structure stage (never in the detail stage, which is SDTM's definition of it);
        ``False`` never merges it."""
        names = MERGED_BRANCHES[family][stage]
        if self.config.merge_attention is None or stage is Stage.FULL:
            return names
        rest = tuple(name for name in names if name not in ATTENTION_BRANCHES)
        return (ATTENTION_BRANCHES + rest) if self.config.merge_attention and stage is Stage.STRUCTURE else rest

    def merged_tokens(self, key: EngineKey, grid_h: int, grid_w: int) -> int:
        counts = token_counts(key, grid_h, grid_w)
        return counts.tokens - counts.removed

    def extensions(self) -> tuple[Extension, ...]:
        """SDTM* (``adaptive_threshold``), cache fusion (``cache_fusion``), size-aware attention, in the order the
        dispatcher asks them for a call's engine (SDTM* picks the bucket, cache fusion may protect the step)."""
        config = self.config
        found: list[Extension] = []
        if config.adaptive:
            found.append(AdaptiveRatio(config))
        if config.fuses_cache:
            found.append(CacheFusion(self))
        if config.size_aware_attention:
            found.append(SizeAwareAttention(config))
        return tuple(found)

    def variants(self, calibration: VariantCalibration) -> list[MethodVariant]:
        """Cache fusion, SDTM* and size-aware attention, each alone (:func:`~.variants.sdtm_variants`)."""
        return sdtm_variants(self.config, calibration)
