"""SDTM's schedule: the CRA ratio per step, the structure / detail stages, and the release's token counts.

Every function takes the trajectory position ``p`` in ``[0, 1]`` (see :mod:`sdtm_compile.core.schedule`): the
ratio follows the CRA cosine from ``ratio + deviation`` to ``ratio - deviation``, the stage switches at
``switch_at``, and the ratio is rounded *down* to a compiled bucket.
"""

from __future__ import annotations

import math

from ...core.schedule import FULL, EngineKey, Stage, TokenCounts, round_to_bucket
from .config import SDTMConfig

__all__ = [
    "cra_ratio",
    "stage_at",
    "engine_key_at",
    "engines_for_trajectory",
    "stage_ratios",
    "stage_engine",
    "ssm_windows_merged",
    "idm_sources_merged",
    "token_counts",
    "SWITCH_TOLERANCE",
]

_EPS = 1e-9

#: Positions within this of ``switch_at`` count as reaching it: a position read back from a float32 sigma lands a
#: few 1e-8 off the step fraction it stands for (FLUX at 20 steps: step 8 is exactly 0.4), and which stage a step
#: gets must not hang on that rounding.
SWITCH_TOLERANCE = 1e-6


def cra_ratio(position: float, config: SDTMConfig) -> float:
    """CRA: ``(ratio - dev) + 2 dev cos(pi/2 p)``, falling from ``ratio + dev`` (p=0) to ``ratio - dev`` (p=1)."""
    p = min(max(float(position), 0.0), 1.0)
    return (config.ratio - config.deviation) + 2.0 * config.deviation * math.cos(math.pi / 2.0 * p)


def stage_at(position: float, config: SDTMConfig) -> Stage:
    """``STRUCTURE`` before ``config.switch_at``, ``DETAIL`` from it on (within :data:`SWITCH_TOLERANCE`);
    ``FULL`` when SDTM is off."""
    if not config.enabled:
        return Stage.FULL
    return Stage.STRUCTURE if position < config.switch_at - SWITCH_TOLERANCE else Stage.DETAIL


def engine_key_at(position: float, config: SDTMConfig) -> EngineKey:
    """The engine of trajectory position ``position``: its stage and the CRA ratio rounded down to a bucket (with
    ``counts="exact"``: the CRA ratio itself, to 9 digits)."""
    stage = stage_at(position, config)
    if stage is Stage.FULL:
        return FULL
    ratio = cra_ratio(position, config)
    bucket = round(ratio, 9) if config.exact_counts else round_to_bucket(ratio, config.buckets)
    return FULL if bucket <= 0.0 else EngineKey(stage, bucket)


def stage_ratios(stage: Stage, config: SDTMConfig) -> tuple[float, float]:
    """``(lowest, highest)`` CRA ratio of the positions in ``stage`` (the curve falls with the position)."""
    lo_p, hi_p = (0.0, config.switch_at) if stage is Stage.STRUCTURE else (config.switch_at, 1.0)
    return round(cra_ratio(hi_p, config), 9), round(cra_ratio(lo_p, config), 9)


def stage_engine(stage: Stage, config: SDTMConfig) -> EngineKey:
    """With ``counts="exact"``: the key of ``stage``'s one engine, named by the stage's highest ratio."""
    return EngineKey(stage, stage_ratios(stage, config)[1])


def _stages_reached(config: SDTMConfig) -> list[Stage]:
    """The merged stages some position reaches: structure before ``switch_at``, detail from it on."""
    return [Stage.STRUCTURE] * (config.switch_at > 0.0) + [Stage.DETAIL] * (config.switch_at < 1.0)


def engines_for_trajectory(config: SDTMConfig) -> list[EngineKey]:
    """Every engine any step count or scheduler can reach: the buckets the CRA curve crosses in each stage.

    This is what the compiler builds, so that no step count or timestep spacing can ask for a missing engine.
    With the defaults (ratio 0.5, deviation 0.2, switch 0.4, buckets 0.1..0.7) it is 6 engines; cache fusion adds
    ``FULL`` (protected steps), SDTM* every bucket of each stage (and ``FULL``: the first step's ratio may round to
    no bucket). With ``counts="exact"``: one engine per stage, keyed by the stage's largest ratio.
    """
    if not config.enabled:
        return [FULL]
    keys: set[EngineKey] = {FULL} if config.fuses_cache else set()  # cache fusion: protected steps run FULL
    if config.exact_counts:  # one engine per stage the trajectory reaches, named by its largest ratio
        keys |= {stage_engine(stage, config) for stage in _stages_reached(config)}
        if any(stage_ratios(s, config)[0] <= 0.0 for s in _stages_reached(config)):  # a step at ratio 0: unmerged
            keys.add(FULL)
        return sorted(keys)
    if config.adaptive:  # SDTM*: a step may pick any bucket of the stages its positions reach
        return sorted({FULL, *(EngineKey(stage, b) for stage in _stages_reached(config) for b in config.buckets)})
    # cra_ratio is monotone in p, so each stage covers a closed ratio interval; sample its ends and every
    # bucket edge inside it.
    for stage, lo_p, hi_p in ((Stage.STRUCTURE, 0.0, config.switch_at), (Stage.DETAIL, config.switch_at, 1.0)):
        if hi_p <= lo_p and stage is Stage.STRUCTURE:
            continue
        r_hi, r_lo = cra_ratio(lo_p, config), cra_ratio(hi_p, config)
        for r in [r_hi, r_lo, *[b for b in config.buckets if r_lo <= b <= r_hi]]:
            bucket = round_to_bucket(r, config.buckets)
            keys.add(FULL if bucket == 0.0 else EngineKey(stage, bucket))
    return sorted(keys)


def _window_count(grid_h: int, grid_w: int) -> int:
    return (grid_h // 2) * (grid_w // 2)


def ssm_windows_merged(bucket: float, grid_h: int, grid_w: int) -> int:
    """Windows SSM merges (release rounding: ``floor(N r) // 48 * 16``, at most all windows)."""
    n = grid_h * grid_w
    reduce_num = math.floor(n * bucket + _EPS)
    return min(reduce_num // 48, _window_count(grid_h, grid_w) // 16) * 16


def idm_sources_merged(bucket: float, grid_h: int, grid_w: int) -> int:
    """Sources IDM merges (release rounding: ``min(#sources, floor(N r)) // 16 * 16``)."""
    n = grid_h * grid_w
    sources = n - _window_count(grid_h, grid_w)
    return min(sources, math.floor(n * bucket + _EPS)) // 16 * 16


def token_counts(key: EngineKey, grid_h: int, grid_w: int) -> TokenCounts:
    """Exact token counts of one SDTM engine on a token grid of ``grid_h x grid_w`` (N = grid_h * grid_w), with
    SD3's branches (the structure stage merges the attention too). Per family and config:
    :meth:`TokenMethod.token_counts <sdtm_compile.core.method.TokenMethod.token_counts>`."""
    if grid_h < 1 or grid_w < 1:
        raise ValueError(
            f"token grid must be at least 1x1, got {grid_h}x{grid_w}: pass the image-token grid (latent height "
            "and width divided by the patch size)"
        )
    n = grid_h * grid_w
    if key.stage is Stage.FULL:
        return TokenCounts(n, n, n, 0)
    if key.stage is Stage.STRUCTURE:
        removed = 3 * ssm_windows_merged(key.bucket, grid_h, grid_w)
        return TokenCounts(n, n - removed, n - removed, removed)
    removed = idm_sources_merged(key.bucket, grid_h, grid_w)
    return TokenCounts(n, n, n - removed, removed)
