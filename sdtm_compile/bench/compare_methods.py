"""The method comparison: token-reduction methods on one model, one machine, one compiler, in one run.

``sdtm-compile bench --methods sdtm,tomesd,sito,toma --sweep 0.3,0.5,0.7`` compiles every (method, ratio) point
with the ``sdtm`` backend (the same passes and engines for every method) and times it beside a fresh round of the
plain Inductor baseline, like a sweep point of the benchmark. Each point is a
:class:`~sdtm_compile.bench.record.Measurement`: speed-up over Inductor, the FLOP ratio (full model over merged,
summed over the generation's steps), the fraction of it the speed-up keeps, and fidelity of the final latent against
the unmodified model's (PSNR, cosine; on the trained testbed also image PSNR and SSIM).

The same ratio means different things per method (SDTM's is the centre of its ratio schedule; some methods reduce
the attention only, others the feed-forward too), which is why the FLOP ratio is reported beside it: compare methods
at equal speed-up or equal FLOPs, not at equal ratio. Every method runs with its authors' defaults; nothing is tuned
here.
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

from ..core.config import METHOD_CONFIGS, MethodConfig
from ..core.method import method_for
from ..core.schedule import FULL
from ..methods import method_names
from .assemble import run_settings
from .config import BASELINE, BenchConfig
from .harness import Compiled, compiler_caches
from .instrument import CapturedBucketGraphs
from .measures import measure
from .record import Measurement, machine_info, model_info
from .render import render
from .report import BenchReport
from .timing import TimedCall, step_records, timed_rounds
from .workload import Workload, make_workload

__all__ = ["method_config", "run_method_comparison"]

logger = logging.getLogger("sdtm_compile.bench")


def method_config(name: str, ratio: float, base: MethodConfig | None = None) -> MethodConfig:
    """The config of method ``name`` at ``ratio`` (:meth:`TokenMethod.with_ratio`): from ``base`` when it is that
    method's config (its other settings kept), else from the method's defaults (its authors')."""
    if name not in method_names():
        raise ValueError(f"unknown method {name!r} in --methods: choose from {', '.join(method_names())}")
    start = base if base is not None and base.method == name else METHOD_CONFIGS[name]()
    return method_for(start).with_ratio(ratio)


def _point(
    name: str,
    method: MethodConfig,
    workload: Workload,
    graphs: CapturedBucketGraphs,
    full_per_step: int,
    unmodified: torch.Tensor,
    config: BenchConfig,
    engine_cache: Path | None,
) -> Measurement:
    """Compile ``method`` next to a recompiled baseline (after a Dynamo reset, so no point inherits another's cache
    entries), time both round-robin after one warm-up generation, and measure the point."""
    torch._dynamo.reset()
    baseline = Compiled(workload.model, None, config.engine, workload.probe, engine_cache)
    compiled = Compiled(workload.model, method, config.engine, workload.probe, engine_cache)
    calls = [
        TimedCall(BASELINE, workload.call_of(baseline.module)),
        TimedCall(name, workload.call_of(compiled.module), build_s=compiled.build_s),
    ]
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        timed_rounds(calls, workload, dataclasses.replace(config, warmup=1), config.sweep_runs, method.method)
    records = step_records(compiled.compiled_graph, config.steps)  # type: ignore[arg-type]
    baseline_s = statistics.median(calls[0].seconds)
    return measure(
        calls[1],
        unmodified,
        workload.pixel_space,
        baseline_s,
        step_flops=[graphs.flops(record.key, method).total for record in records],
        full_per_step=full_per_step,
        description=method_for(method).describe(),
        config=method.to_dict(),
        engines=[str(record.key) for record in records],
        baseline_median_s=baseline_s,
    )


def run_method_comparison(
    config: BenchConfig, methods: tuple[str, ...], ratios: tuple[float, ...], command: str | None = None
) -> BenchReport:
    """Time and measure every (method, ratio) point on ``config.model`` and write the page.

    ``config``: the model, steps, guidance, ``sweep_runs`` (timed generations per point), ``engine``,
    ``cold_caches``, ``seed``, ``method`` (the settings of its own method's points), where the page goes. Every
    config is built (and validated) before anything is compiled. Returns the report (kind ``methods``).
    """
    configs = [(f"{name}@{ratio:g}", method_config(name, ratio, config.method)) for name in methods for ratio in ratios]
    torch.manual_seed(config.seed)
    workload = make_workload(config)
    started = time.perf_counter()
    logger.info(
        "method comparison on %s: %d points (%s at %s), %d steps, %d timed runs each",
        config.model,
        len(configs),
        ",".join(methods),
        ",".join(f"{r:g}" for r in ratios),
        config.steps,
        config.sweep_runs,
    )
    with torch.no_grad():
        unmodified = workload.generate(workload.call_of(workload.model), config)
    graphs = CapturedBucketGraphs(workload.model, workload.probe)
    full_per_step = graphs.flops(FULL, configs[0][1]).total
    points = []
    with (
        tempfile.TemporaryDirectory(prefix="sdtm_methods_") as scratch,
        compiler_caches(config.cold_caches, Path(scratch)) as engine_cache,
    ):
        for number, (name, method) in enumerate(configs, 1):
            logger.info("[%d/%d] %s: compiling ...", number, len(configs), name)
            point = _point(name, method, workload, graphs, full_per_step, unmodified, config, engine_cache)
            points.append(point)
            logger.info(
                "[%d/%d] %s: %.2fx over Inductor, FLOP ratio %.2fx, PSNR %.2f dB",
                number,
                len(configs),
                name,
                point.speedup_vs_inductor,
                point.flop_ratio,
                point.psnr_db,
            )
        torch._dynamo.reset()
    report = BenchReport(
        format_version=2,
        kind="methods",
        measured_on=datetime.date.today().isoformat(),
        command=command,
        machine=machine_info(),
        model=model_info(config.model, config.latent_side),
        settings=run_settings(config, comparison=True),
        method=None,
        method_description="methods " + ", ".join(methods),
        points=points,
        wall_time_s=time.perf_counter() - started,
    )
    render(report, config.results_dir, config.out_dir)
    return report
