"""SDTM's variants worth measuring beside it: cache fusion, SDTM* and size-aware attention, each turned on alone, and
the operating point of the release's evaluation scripts (:meth:`SDTMConfig.release_eval`).

:func:`sdtm_variants` answers :meth:`~sdtm_compile.core.method.TokenMethod.variants` for SDTM; SDTM*'s threshold is
picked so that its expected ratio equals the fixed schedule's mean ratio (equal FLOPs), from the first block's plan
inputs in an unmodified generation (:func:`calibrate_adaptive_threshold`).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Sequence

import torch

from ...core.method import MethodVariant, VariantCalibration
from ...core.schedule import position_at_step, round_to_bucket
from .config import MAX_RATIO, SDTMConfig
from .plans import window_score_fraction
from .schedule import engine_key_at

__all__ = ["calibrate_adaptive_threshold", "sdtm_variants"]

logger = logging.getLogger(__name__)

#: The thresholds SDTM*'s calibration tries (window scores seen in practice lie in this range).
THRESHOLD_CANDIDATES = torch.linspace(-0.2, 1.0, 121).tolist()


def calibrate_adaptive_threshold(
    plan_inputs: Sequence[torch.Tensor], grid: tuple[int, int], num_steps: int, config: SDTMConfig
) -> float:
    """The SDTM* threshold whose expected mean ratio is ``config``'s fixed schedule's, rounded to 3 decimals.

    ``plan_inputs``: the first block's plan input of each call of one unmodified generation (one per step). Among
    :data:`THRESHOLD_CANDIDATES`, picks the one for which ``mean_s round(0.75 * fraction_{s-1})`` (step 0 from the
    CRA schedule, as the dispatcher does) is closest to the fixed schedule's mean bucket. ``li`` is 0 there (no
    merging ran), so the ``a_s`` term is absent: an approximation that the measured FLOP ratios then report.
    """
    fixed = [engine_key_at(position_at_step(s, num_steps), config).bucket for s in range(num_steps)]
    target = statistics.mean(fixed)
    li = torch.zeros(plan_inputs[0].shape[:2], dtype=torch.int32)
    best, best_gap = THRESHOLD_CANDIDATES[0], float("inf")
    for threshold in THRESHOLD_CANDIDATES:
        fractions = [float(window_score_fraction(x, li, *grid, 0.0, threshold).min()) for x in plan_inputs]
        # each merged 2x2 window removes 3 of its 4 tokens; a step runs at the ratio its predecessor measured
        picked = [fixed[0]] + [round_to_bucket(MAX_RATIO * f, config.buckets) for f in fractions[:-1]]
        gap = abs(statistics.mean(picked) - target)
        if gap < best_gap:
            best, best_gap = threshold, gap
    logger.info(
        "SDTM* threshold %.3f: expected mean ratio within %.3f of the fixed schedule's %.3f", best, best_gap, target
    )
    return round(best, 3)


def sdtm_variants(config: SDTMConfig, calibration: VariantCalibration) -> list[MethodVariant]:
    """Cache fusion, SDTM* (calibrated to equal expected FLOPs) and size-aware attention on ``config``, in that order,
    then the release's evaluation operating point (at ``config``'s buckets and block schedule).

    Returns none on Flux: this comparison has not been extended to Flux yet (cache fusion, SDTM* and, with
    ``merge_attention=True``, size-aware attention run there and follow the reference; they are not measured here).
    """
    if calibration.family != "sd3":
        return []
    plan_inputs = calibration.first_block_plan_inputs()
    threshold = calibrate_adaptive_threshold(plan_inputs, calibration.grid, calibration.num_steps, config)
    return [
        MethodVariant(
            "sdtm+fusion",
            f"SDTM + cache fusion as released (one step in {config.protect_every} unmerged and stored, "
            f"mcw {config.mcw:g})",
            dataclasses.replace(config, cache_fusion=True),
        ),
        MethodVariant(
            "sdtm*",
            f"SDTM* (ratio from the window statistic, threshold {threshold:.3f}: equal expected FLOPs)",
            dataclasses.replace(config, adaptive_threshold=threshold),
        ),
        MethodVariant(
            "sdtm+size-aware",
            "SDTM + size-aware attention (log(size) key bias)",
            dataclasses.replace(config, size_aware_attention=True),
        ),
        MethodVariant(
            "sdtm-release-eval",
            "the release's evaluation scripts' operating point: ratio 0.3 +- 0.2, cache fusion every 3rd step, mcw 0.1",
            SDTMConfig.release_eval(buckets=config.buckets, blocks=config.blocks),
        ),
    ]
