"""The benchmark's sections, assembled from its measurements: the main points, the targets, FLOPs and the schedule.

The targets the benchmark checks (their names are the keys of ``BenchReport.targets``):

* ``sdtm_speedup_reaches_0.9x_flop_ratio``: ``sdtm``'s speed-up over Inductor is at least 0.9 x its FLOP ratio;
* ``sdtm_faster_than_eager_reference``: ``sdtm`` is faster than the eager reference of the same algorithm;
* ``sdtm_fidelity_equals_reference``: ``sdtm`` and the reference differ by float rounding only (their PSNR
  against each other is 20 dB above either's PSNR against ``eager``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from typing import Any

from ..core.config import MethodConfig
from ..core.schedule import EngineKey, TokenCounts
from .config import BASELINE, FIDELITY_REFERENCE, BenchConfig, variant_description
from .flops import FlopCount
from .measures import fidelity, measure
from .record import FlopSummary, Measurement, RunSettings, ScheduleStep, Target
from .timing import TimedCall

__all__ = [
    "FIDELITY_TARGET",
    "REFERENCE_SPEED_TARGET",
    "SPEEDUP_TARGET",
    "bench_targets",
    "flop_summary",
    "main_points",
    "run_settings",
    "schedule_steps",
]

SPEEDUP_TARGET = "sdtm_speedup_reaches_0.9x_flop_ratio"
REFERENCE_SPEED_TARGET = "sdtm_faster_than_eager_reference"
FIDELITY_TARGET = "sdtm_fidelity_equals_reference"

#: The main variants that run the method (the others run the unmodified model).
MERGED_VARIANTS = ("sdtm", "reference")


def main_points(
    timed: Mapping[str, TimedCall],
    method: MethodConfig,
    description: str,
    step_flops: list[int],
    full_per_step: int,
    engines: list[str],
    pixel_space: bool,
) -> list[Measurement]:
    """One measurement per main variant, in ``timed``'s order: time against ``inductor`` and ``eager`` (same
    rounds), FLOPs (the merged variants: ``step_flops``; the others ``full_per_step`` at every step) and fidelity
    against ``eager``."""
    reference = timed[FIDELITY_REFERENCE].latent
    assert reference is not None
    baseline_s = statistics.median(timed[BASELINE].seconds)
    eager_s = statistics.median(timed[FIDELITY_REFERENCE].seconds)
    points = []
    for name, call in timed.items():
        merged = name in MERGED_VARIANTS
        points.append(
            measure(
                call,
                reference,
                pixel_space,
                baseline_s,
                eager_s=eager_s,
                step_flops=step_flops if merged else [full_per_step] * len(step_flops),
                full_per_step=full_per_step,
                description=variant_description(name, description),
                config=method.to_dict() if merged else None,
                engines=engines if merged else [],
            )
        )
    return points


def bench_targets(points: Mapping[str, Measurement], sdtm: TimedCall, reference: TimedCall) -> dict[str, Target]:
    """The three targets (see the module docstring) from the main points and the two merged variants' latents."""
    fast, slow = points["sdtm"], points["reference"]
    assert sdtm.latent is not None and reference.latent is not None
    same = fidelity(sdtm.latent, reference.latent, pixel_space=False)
    return {
        SPEEDUP_TARGET: Target(
            {
                "speedup": fast.speedup_vs_inductor,
                "target": 0.9 * fast.flop_ratio,  # type: ignore[operator]
                "fraction_of_flop_ratio": fast.speedup_over_flop_ratio,
            },
            met=fast.speedup_over_flop_ratio >= 0.9,  # type: ignore[operator]
        ),
        REFERENCE_SPEED_TARGET: Target(
            {
                "sdtm_median_s": fast.median_s,
                "reference_median_s": slow.median_s,
                "speedup": slow.median_s / fast.median_s,  # type: ignore[operator]
            },
            met=fast.median_s < slow.median_s,  # type: ignore[operator]
        ),
        FIDELITY_TARGET: Target(
            {
                "sdtm_psnr_db": fast.psnr_db,
                "reference_psnr_db": slow.psnr_db,
                "sdtm_vs_reference_psnr_db": same["psnr_db"],
                "sdtm_vs_reference_cosine": same["cosine"],
            },
            # "within noise": the two paths differ by float rounding only, far below the method's own effect
            met=same["psnr_db"] >= max(fast.psnr_db, slow.psnr_db) + 20.0,  # type: ignore[type-var]
        ),
    }


def flop_summary(
    full: FlopCount, keys: list[EngineKey], step_flops: list[int], linear_ratio: float | None
) -> FlopSummary:
    """FLOPs of the unmodified model per step and per generation, of the merged generation whose steps ran on
    ``keys``, and per engine; ``linear_ratio``: the FLOP ratio of the linear layers alone."""
    return FlopSummary(
        full_per_step=full.total,
        full_by_op=full.by_op,
        per_generation={"full": full.total * len(keys), "sdtm": sum(step_flops)},
        by_engine={str(key): flops for key, flops in sorted(dict(zip(keys, step_flops)).items())},
        linear_ratio=linear_ratio,
    )


def schedule_steps(
    records: list[Any], step_flops: list[int], counts_of: Callable[[EngineKey], TokenCounts]
) -> list[ScheduleStep]:
    """The schedule rows of a generation: per step (``records``: the dispatcher's), its engine, stage, bucket, the
    tokens its attention and feed-forward see (``counts_of``: the compiled graph's token counts) and its FLOPs."""
    rows = []
    for step, (record, flops) in enumerate(zip(records, step_flops)):
        counts = counts_of(record.key)
        rows.append(
            ScheduleStep(
                engine=str(record.key),
                stage=record.key.stage.value,
                bucket=record.key.bucket,
                attention_tokens=counts.attention,
                ff_tokens=counts.feed_forward,
                step=step,
                timestep=record.timestep,
                flops=flops,
            )
        )
    return rows


def run_settings(config: BenchConfig, comparison: bool = False, step_threshold: float | None = None) -> RunSettings:
    """The settings of a run of ``config`` that its numbers depend on. A ``comparison`` (of methods or variants)
    times every point ``sweep_runs`` times after one warm-up generation, whatever ``runs`` and ``warmup`` say."""
    return RunSettings(
        steps=config.steps,  # type: ignore[arg-type]
        guidance_scale=config.guidance_scale,
        runs=None if comparison else config.runs,
        warmup=1 if comparison else config.warmup,
        sweep_runs=config.sweep_runs,
        engine=config.engine,
        cold_caches=config.cold_caches,
        seed=config.seed,
        baseline=BASELINE,
        fidelity_reference=FIDELITY_REFERENCE,
        step_threshold=step_threshold,
    )
