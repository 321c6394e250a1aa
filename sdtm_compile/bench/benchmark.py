"""The benchmark: :func:`run_benchmark` compiles, times, counts, sweeps and records one method on one model.

The steps of a run: (1) compile the Inductor baseline and the ``sdtm`` backend cold, then warm
(:mod:`~sdtm_compile.bench.harness`); (2) time whole generations of the main variants round-robin
(:func:`~sdtm_compile.bench.timing.timed_rounds`); on a pixel-space model (the trained testbed) measure image quality
(:func:`image_quality`); (3) count FLOPs and profile the merge ops on the bucket graphs
(:mod:`~sdtm_compile.bench.instrument`); (4) sweep the ratio (``TokenMethod.with_ratio``), re-timing the baseline
beside each point; (5) record merge maps from a reference generation; then assemble the report
(:mod:`~sdtm_compile.bench.assemble`) and write its page (:mod:`~sdtm_compile.bench.render`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..core.method import method_for
from ..core.schedule import FULL
from .assemble import bench_targets, flop_summary, main_points, run_settings, schedule_steps
from .config import BASELINE, FIDELITY_REFERENCE, VARIANTS, BenchConfig
from .harness import Compiled, compiler_caches
from .instrument import CapturedBucketGraphs, generation_share, merge_time_share, record_merge_maps
from .measures import measure
from .plots import merge_map_steps
from .record import ImageQuality, Measurement, MergeTimeShare, SeedFidelity, machine_info, model_info
from .render import render
from .report import BenchReport
from .timing import TimedCall, step_records, timed_rounds
from .workload import Workload, make_workload

__all__ = ["image_quality", "run_benchmark"]

logger = logging.getLogger("sdtm_compile.bench")


def _sweep_point(
    ratio: float,
    workload: Workload,
    graphs: CapturedBucketGraphs,
    timed: dict[str, TimedCall],
    full_per_step: int,
    config: BenchConfig,
    cache_dir: Path | None,
) -> Measurement:
    """The method compiled at ``ratio`` and timed beside a fresh round of the baseline: one sweep point."""
    method = config.sweep_config(ratio)
    description = method_for(method).describe()
    logger.info("sweep: %s: compiling ...", description)
    compiled = Compiled(workload.model, method, config.engine, workload.probe, cache_dir)
    point = TimedCall(f"sdtm@{ratio:g}", workload.call_of(compiled.module), build_s=compiled.build_s)
    baseline = TimedCall(BASELINE, timed[BASELINE].call)
    with torch.no_grad():
        timed_rounds([baseline, point], workload, dataclasses.replace(config, warmup=1), config.sweep_runs, "sweep")
    records = step_records(compiled.compiled_graph, config.steps)  # type: ignore[arg-type]
    baseline_s = statistics.median(baseline.seconds)
    return measure(
        point,
        timed[FIDELITY_REFERENCE].latent,  # type: ignore[arg-type]
        workload.pixel_space,
        baseline_s,
        step_flops=[graphs.flops(record.key, method).total for record in records],
        full_per_step=full_per_step,
        description=description,
        config=method.to_dict(),
        engines=[str(record.key) for record in records],
        baseline_median_s=baseline_s,
    )


def image_quality(workload: Workload, config: BenchConfig, timed: dict[str, TimedCall]) -> ImageQuality:
    """The testbed's image measures: held-out loss merged vs unmerged per sigma (eager reference), and paired
    PSNR / SSIM of the ``sdtm`` backend's final image vs ``eager``'s over ``config.quality_seeds`` seeds."""
    from ..models.testbed.quality import image_psnr, image_ssim, merged_losses, to_image  # pixel-space models only

    logger.info("image measures: held-out loss at %d noise levels, merged vs unmerged ...", len(config.quality_sigmas))
    losses = [
        {**dataclasses.asdict(row), "increase": row.increase}
        for row in merged_losses(workload.testbed, config.method, config.quality_sigmas)
    ]
    seeds = []
    for index, seed in enumerate(range(config.seed, config.seed + config.quality_seeds)):
        if seed == config.seed:
            eager, merged = timed["eager"].latent, timed["sdtm"].latent
        else:
            other = workload.with_seed(seed)
            with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
                eager = other.generate(timed["eager"].call, config)
                merged = other.generate(timed["sdtm"].call, config)
        seeds.append(SeedFidelity(seed, image_psnr(merged, eager), image_ssim(merged, eager)))
        logger.info(
            "image measures: seed %d (%d/%d): PSNR %.2f dB, SSIM %.4f",
            seed,
            index + 1,
            config.quality_seeds,
            seeds[-1].psnr_db,
            seeds[-1].ssim,
        )
    image = (to_image(timed["eager"].latent) * 255).round().astype("uint8").tolist()
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


def run_benchmark(config: BenchConfig, command: str | None = None) -> BenchReport:
    """Run the whole benchmark and write its page (``config.out_dir``, or a folder under ``config.results_dir``).

    ``command`` is recorded in the report (the command line that ran it). Returns the report (kind ``bench``; its
    ``to_json()`` is the page's ``result.json``).
    """
    torch.manual_seed(config.seed)
    workload = make_workload(config)
    model, probe, grid = workload.model, workload.probe, workload.grid
    description = method_for(config.method).describe()
    logger.info(
        "benchmark: %s (%s), %dx%d latent = %d image tokens, %d steps, %s, %s, %d runs after %d warm-up",
        config.model,
        config.preset.description,
        config.latent_side,
        config.latent_side,
        grid[0] * grid[1],
        config.steps,
        workload.description,
        description,
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
        cold_sdtm = Compiled(model, config.method, config.engine, probe, engine_cache)
        torch._dynamo.reset()
        logger.info("compiling again with warm caches ...")
        inductor = Compiled(model, None, config.engine, probe, engine_cache)
        sdtm = Compiled(model, config.method, config.engine, probe, engine_cache)
        del cold_inductor.module, cold_sdtm.module
        logger.info(
            "compile time: inductor %.1f s cold, %.1f s warm; sdtm %.1f s cold, %.1f s warm",
            cold_inductor.build_s,
            inductor.build_s,
            cold_sdtm.build_s,
            sdtm.build_s,
        )
        reference = workload.reference(config.method)
        calls = [
            TimedCall("eager", workload.call_of(model)),
            TimedCall("inductor", workload.call_of(inductor.module), cold_inductor.build_s, inductor.build_s),
            TimedCall("sdtm", workload.call_of(sdtm.module), cold_sdtm.build_s, sdtm.build_s),
            TimedCall("reference", workload.call_of(reference)),
        ]
        timed = {call.name: call for call in calls}
        assert tuple(timed) == VARIANTS

        # 2. timed generations, round-robin; a recompile here would be timed as part of a generation
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            timed_rounds(calls, workload, config, config.runs, "main")
        # 2b. image measures, for a pixel-space model (the trained testbed): before the sweep, whose compiles of
        # the same model under other backends displace these variants' Dynamo cache entries
        quality = image_quality(workload, config, timed) if workload.pixel_space else None
        records = step_records(sdtm.compiled_graph, config.steps)  # type: ignore[arg-type]
        keys = [record.key for record in records]
        reference_keys = [record.key for record in reference.history if record.new_step][-config.steps :]  # type: ignore[misc]

        # 3. FLOPs on the bucket graphs, and the merge-op time share (op by op)
        logger.info("counting FLOPs and profiling the merge ops on the bucket graphs ...")
        graphs = CapturedBucketGraphs(model, probe)
        full = graphs.flops(FULL, config.method)
        step_flops = [graphs.flops(key, config.method).total for key in keys]
        linear = graphs.linear_flops(FULL, config.method) * len(keys)
        linear_ratio = linear / sum(graphs.linear_flops(key, config.method) for key in keys)
        shares = {}
        for key in sorted(set(keys)):
            gm = graphs.graph(key, config.method)
            shares[key] = merge_time_share(gm, [*graphs.flat, graphs.li(key, config.method)])
        engines = [str(key) for key in keys]
        points = main_points(timed, config.method, description, step_flops, full.total, engines, workload.pixel_space)

        # 4. the sweep: speed-up vs fidelity over ratios (baseline re-timed beside each point)
        main = {point.name: point for point in points}
        sweep = [
            dataclasses.replace(
                main["sdtm"],
                name=f"sdtm@{config.method.ratio:g}",
                baseline_median_s=main[BASELINE].median_s,
                speedup_vs_eager=None,  # the sweep's other points time no eager beside them
            )
        ]
        for ratio in config.sweep:
            if abs(ratio - config.method.ratio) < 1e-9:
                continue
            sweep.append(_sweep_point(ratio, workload, graphs, timed, full.total, config, engine_cache))
        sweep.sort(key=lambda point: point.ratio)  # type: ignore[arg-type,return-value]

        # 5. merge maps from a reference generation
        logger.info("recording merge maps ...")
        maps = record_merge_maps(workload, config, config.merge_map_blocks)

    schedule = schedule_steps(records, step_flops, sdtm.compiled_graph.token_counts)
    kept = merge_map_steps(list(maps), [step.to_dict() for step in schedule])
    report = BenchReport(
        format_version=2,
        kind="bench",
        measured_on=datetime.date.today().isoformat(),
        command=command,
        machine=machine_info(),
        model=model_info(config.model, config.latent_side),
        settings=run_settings(config),
        method=config.method.to_dict(),
        method_description=description,
        points=points,
        sweep=sweep,
        schedule=schedule,
        reference_schedule_matches=[str(k) for k in reference_keys] == engines,
        flops=flop_summary(full, keys, step_flops, linear_ratio),
        merge_time_share=MergeTimeShare(
            per_engine={str(k): v for k, v in shares.items()}, generation=generation_share(keys, shares)
        ),
        targets=bench_targets(main, timed["sdtm"], timed["reference"]),
        merge_maps={step: {block: slot.tolist() for block, slot in maps[step].items()} for step in kept},
        quality=quality,
        wall_time_s=time.perf_counter() - wall_start,
    )
    folder = render(report, config.results_dir, config.out_dir)
    logger.info("benchmark done in %.0f s; page in %s", report.wall_time_s, folder)
    return report
