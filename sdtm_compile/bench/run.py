"""Orchestration: :func:`run_benchmark` compiles, times, counts, sweeps and records, then writes the report.

The steps of a run: (1) compile the Inductor baseline and the ``sdtm`` backend cold, then warm
(:mod:`~sdtm_compile.bench.harness`); (2) time whole generations of every variant round-robin
(:func:`timed_rounds`, so drift hits every variant alike); (3) count FLOPs and profile the merge ops on the
bucket graphs (:mod:`~sdtm_compile.bench.instrument`); (4) sweep the ratio, re-timing the baseline beside each
point; (5) record merge maps from a reference generation; on a pixel-space model (the trained testbed), measure
image quality after (2) (:func:`image_quality`); then assemble the typed result
(:mod:`~sdtm_compile.bench.result`) and render it (:mod:`~sdtm_compile.bench.report`).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.schedule import FULL
from .config import BASELINE, FIDELITY_REFERENCE, BenchConfig
from .harness import Compiled, compiler_caches
from .instrument import CapturedBucketGraphs, generation_share, merge_time_share, record_merge_maps
from .memory import peak_rss, resident_mib
from .report import render
from .result import BenchResult, ImageQuality, SeedFidelity, SweepPoint, assemble, sweep_point
from .workload import Workload, make_workload

__all__ = ["Variant", "run_benchmark", "timed_rounds"]

# the package's name, as before the split: the CLI's log lines ("INFO sdtm_compile.bench: ...") stay the same
logger = logging.getLogger("sdtm_compile.bench")


@dataclass
class Variant:
    """One variant under measurement: its transformer call, compile times, timed generations, its final latent
    (of the first generation), whether every generation gave the same latent, and its peak memory."""

    name: str
    call: Callable[..., torch.Tensor]
    build_cold_s: float | None = None
    build_warm_s: float | None = None
    seconds: list[float] = field(default_factory=list)
    latent: torch.Tensor | None = None
    deterministic: bool = True
    peak_rss_mib: float | None = None
    peak_above_start_mib: float | None = None

    def record_peak(self, start: float | None, peak: float | None) -> None:
        """Keep the highest peak resident memory seen, and the most it rose above a generation's start."""
        if peak is None or start is None:
            return
        self.peak_rss_mib = max(self.peak_rss_mib or 0.0, peak)
        self.peak_above_start_mib = max(self.peak_above_start_mib or 0.0, peak - start)


def _generate(variant: Variant, workload: Workload, config: BenchConfig) -> tuple[torch.Tensor, float]:
    """One whole generation with ``variant``; returns the final latent and its wall time."""
    start = time.perf_counter()
    latent = workload.generate(variant.call, config)
    return latent, time.perf_counter() - start


def timed_rounds(variants: list[Variant], workload: Workload, config: BenchConfig, runs: int, what: str) -> None:
    """``warmup`` then ``runs`` generations per variant, round-robin; keeps latents, times and peak memory."""
    total = len(variants) * (config.warmup + runs)
    done = 0
    for round_index in range(config.warmup + runs):
        timed = round_index >= config.warmup
        for variant in variants:
            start, read_peak = (resident_mib(), peak_rss()) if not timed else (None, None)
            latent, seconds = _generate(variant, workload, config)
            done += 1
            if read_peak is not None:
                variant.record_peak(start, read_peak())
            if timed:
                variant.seconds.append(seconds)
            if variant.latent is None:
                variant.latent = latent
            elif not torch.equal(latent, variant.latent):
                variant.deterministic = False
            label = f"run {round_index - config.warmup + 1}/{runs}" if timed else f"warm-up {round_index + 1}"
            logger.info("[%s %d/%d] %-9s %s: %.2f s", what, done, total, variant.name, label, seconds)
    if config.warmup == 0:  # no untimed generation to read the peak from: take one more
        for variant in variants:
            start, read_peak = resident_mib(), peak_rss()
            _generate(variant, workload, config)
            variant.record_peak(start, read_peak())


def _steps_of(compiled_graph: Any, num_steps: int) -> list[dict[str, Any]]:
    """The last generation's engine per step, from the dispatcher's history."""
    steps = [record for record in compiled_graph.dispatcher.history if record.new_step][-num_steps:]
    return [{"step": i, "timestep": r.timestep, "position": r.position, "key": r.key} for i, r in enumerate(steps)]


def _run_sweep_point(
    ratio: float,
    workload: Workload,
    graphs: CapturedBucketGraphs,
    variants: dict[str, Variant],
    full_total: int,
    config: BenchConfig,
    cache_dir: Path | None,
) -> SweepPoint:
    """Compile SDTM at ``ratio`` and time it beside a fresh round of the baseline: one sweep point."""
    sdtm_config = config.sweep_config(ratio)
    logger.info("sweep: ratio %.2f (deviation %.2f): compiling ...", ratio, sdtm_config.deviation)
    compiled = Compiled(workload.model, sdtm_config, config.engine, workload.probe, cache_dir)
    point = Variant(f"sdtm@{ratio:g}", workload.call_of(compiled.module))
    baseline = Variant(BASELINE, variants[BASELINE].call)
    with torch.no_grad():
        sweep_config = dataclasses.replace(config, warmup=1)
        timed_rounds([baseline, point], workload, sweep_config, config.sweep_runs, f"sweep {ratio:g}")
    step_flops = [graphs.flops(s["key"], sdtm_config).total for s in _steps_of(compiled.compiled_graph, config.steps)]
    return sweep_point(
        sdtm_config, baseline, point, step_flops, full_total, variants[FIDELITY_REFERENCE], workload.pixel_space
    )


def image_quality(workload: Workload, config: BenchConfig, variants: dict[str, Variant]) -> ImageQuality:
    """The testbed's image measures: held-out loss merged vs unmerged per sigma (eager reference), and paired
    PSNR / SSIM of the ``sdtm`` backend's final image vs ``eager``'s over ``config.quality_seeds`` seeds."""
    from ..models.testbed.quality import image_psnr, image_ssim, merged_losses, to_image

    logger.info("image measures: held-out loss at %d noise levels, merged vs unmerged ...", len(config.quality_sigmas))
    losses = [
        {**dataclasses.asdict(row), "increase": row.increase}
        for row in merged_losses(workload.testbed, config.sdtm, config.quality_sigmas)
    ]
    seeds = []
    for index, seed in enumerate(range(config.seed, config.seed + config.quality_seeds)):
        if seed == config.seed:
            eager, merged = variants["eager"].latent, variants["sdtm"].latent
        else:
            other = workload.with_seed(seed)
            with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
                eager = other.generate(variants["eager"].call, config)
                merged = other.generate(variants["sdtm"].call, config)
        seeds.append(SeedFidelity(seed, image_psnr(merged, eager), image_ssim(merged, eager)))
        logger.info(
            "image measures: seed %d (%d/%d): PSNR %.2f dB, SSIM %.4f",
            seed,
            index + 1,
            config.quality_seeds,
            seeds[-1].psnr_db,
            seeds[-1].ssim,
        )
    image = (to_image(variants["eager"].latent) * 255).round().astype("uint8").tolist()
    psnrs, ssims = [s.psnr_db for s in seeds], [s.ssim for s in seeds]
    return ImageQuality(
        losses=losses,
        seeds=seeds,
        psnr_db_mean=statistics.mean(psnrs),
        ssim_mean=statistics.mean(ssims),
        psnr_db_min=min(psnrs),
        ssim_min=min(ssims),
        image=image,
    )


def run_benchmark(config: BenchConfig, command: str | None = None) -> BenchResult:
    """Run the whole benchmark; write ``bench.json``, ``bench.md`` and the PNGs to ``config.out_dir``.

    ``command`` is recorded in the result (the command line that ran it). Returns the typed result
    (:class:`~sdtm_compile.bench.BenchResult`; its ``to_dict()`` is the content of ``bench.json``).
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preset, latent = config.preset, config.latent_side
    torch.manual_seed(config.seed)
    workload = make_workload(config)
    model, probe, grid = workload.model, workload.probe, workload.grid
    n = grid[0] * grid[1]
    logger.info(
        "benchmark: %s (%s), %dx%d latent = %d image tokens, %d steps, %s, %d runs after %d warm-up",
        config.model,
        preset.description,
        latent,
        latent,
        n,
        config.steps,
        workload.description,
        config.runs,
        config.warmup,
    )
    wall_start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="sdtm_bench_") as scratch,
        compiler_caches(config.cold_caches, Path(scratch)) as engine_cache,
    ):
        # 1. compile: cold (fresh caches), then warm (same caches, Dynamo reset) - the warm ones are timed
        logger.info("compiling the Inductor baseline and the sdtm backend (cold) ...")
        cold_inductor = Compiled(model, None, config.engine, probe, engine_cache)
        cold_sdtm = Compiled(model, config.sdtm, config.engine, probe, engine_cache)
        torch._dynamo.reset()
        logger.info("compiling again with warm caches ...")
        inductor = Compiled(model, None, config.engine, probe, engine_cache)
        sdtm = Compiled(model, config.sdtm, config.engine, probe, engine_cache)
        del cold_inductor.module, cold_sdtm.module
        logger.info(
            "compile time: inductor %.1f s cold, %.1f s warm; sdtm %.1f s cold, %.1f s warm",
            cold_inductor.build_s,
            inductor.build_s,
            cold_sdtm.build_s,
            sdtm.build_s,
        )
        reference = workload.reference(config.sdtm)
        variants = {
            "eager": Variant("eager", workload.call_of(model)),
            "inductor": Variant("inductor", workload.call_of(inductor.module), cold_inductor.build_s, inductor.build_s),
            "sdtm": Variant("sdtm", workload.call_of(sdtm.module), cold_sdtm.build_s, sdtm.build_s),
            "reference": Variant("reference", workload.call_of(reference)),
        }

        # 2. timed generations, round-robin; a recompile here would be timed as part of a generation
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            timed_rounds(list(variants.values()), workload, config, config.runs, "main")
        # 2b. image measures, for a pixel-space model (the trained testbed): before the sweep, whose compiles of
        # the same model under other backends displace these variants' Dynamo cache entries
        quality = image_quality(workload, config, variants) if workload.pixel_space else None
        sdtm_steps = _steps_of(sdtm.compiled_graph, config.steps)
        reference_steps = [record.key for record in reference.history if record.new_step][-config.steps :]

        # 3. FLOPs on the bucket graphs, and the merge-op time share (op by op)
        logger.info("counting FLOPs and profiling the merge ops on the bucket graphs ...")
        graphs = CapturedBucketGraphs(model, probe)
        full = graphs.flops(FULL, config.sdtm)
        step_flops = [graphs.flops(s["key"], config.sdtm).total for s in sdtm_steps]
        linear = graphs.linear_flops(FULL, config.sdtm) * len(sdtm_steps)
        linear_ratio = linear / sum(graphs.linear_flops(s["key"], config.sdtm) for s in sdtm_steps)
        shares = {}
        for key in sorted({s["key"] for s in sdtm_steps}):
            gm = graphs.graph(key, config.sdtm)
            shares[key] = merge_time_share(gm, [*graphs.flat, graphs.li(key, config.sdtm)])
        merge_share = generation_share([s["key"] for s in sdtm_steps], shares)

        # 4. the sweep: speed-up vs fidelity over ratios (baseline re-timed beside each point)
        eager = variants[FIDELITY_REFERENCE]
        sweep = [
            sweep_point(
                config.sdtm, variants[BASELINE], variants["sdtm"], step_flops, full.total, eager, workload.pixel_space
            )
        ]
        for ratio in config.sweep:
            if abs(ratio - config.sdtm.ratio) < 1e-9:
                continue
            sweep.append(_run_sweep_point(ratio, workload, graphs, variants, full.total, config, engine_cache))
        sweep.sort(key=lambda point: point.ratio)

        # 5. merge maps from a reference generation
        logger.info("recording merge maps ...")
        maps = record_merge_maps(workload, config, config.merge_map_blocks)

    result = assemble(
        config,
        variants,
        sdtm_steps,
        reference_steps,
        step_flops,
        full,
        shares,
        merge_share,
        sweep,
        workload,
        sdtm.compiled_graph.token_counts,
        linear_ratio,
    )
    from ..bench.plots import merge_map_steps

    result.merge_maps = {
        step: {block: slot.tolist() for block, slot in maps[step].items()}
        for step in merge_map_steps(list(maps), [step.to_dict() for step in result.schedule])
    }
    result.quality = quality
    result.wall_time_s = time.perf_counter() - wall_start
    result.command = command
    render(result, out)
    logger.info("benchmark done in %.0f s; results in %s", result.wall_time_s, out)
    return result
