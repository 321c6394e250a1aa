"""The variant comparison: a method, its variants and step caches side by side, in one run.

``sdtm-compile bench --model testbed-1024 --variants`` measures the eager and Inductor baselines, the method through
the ``sdtm`` backend, the variants the method names (:meth:`~sdtm_compile.core.method.TokenMethod.variants`; SDTM:
cache fusion, SDTM*, size-aware attention), our first-block step cache alone and composed with the method, and the
other libraries' step caches (:mod:`~sdtm_compile.bench.peers`). Everything is compiled first (the ``sdtm`` backend
for ours, ``torch.compile`` with Inductor for the baseline and the peers), then timed round-robin in the same rounds
after one warm-up generation, so every ratio is taken in one run. Each variant is a
:class:`~sdtm_compile.bench.record.Measurement`: seconds per generation, speed-up over Inductor and over eager, the
FLOP ratio (a skipped step counts as its head, one block of ``num_blocks``), how many steps ran merged / unmerged /
were skipped, peak memory, the state it carries between steps, and fidelity against the unmodified model's.

A variant that cannot run on the model is not dropped silently: its error is kept in the report's ``not_run``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import logging
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.config import METHOD_CONFIGS, MethodConfig
from ..core.method import VariantCalibration, method_for
from ..core.schedule import FULL
from ..passes import HIDDEN_STATE
from ..runtime import FirstBlockCacheConfig
from .assemble import run_settings
from .config import BASELINE, FIDELITY_REFERENCE, BenchConfig
from .harness import compiler_caches
from .instrument import CapturedBucketGraphs
from .measures import measure
from .peers import PeerCall, PeerSpec, peer_specs, unpatched_first_block_cache_error
from .record import Measurement, machine_info, model_info
from .render import render
from .report import BenchReport
from .timing import TimedCall, step_records, timed_rounds
from .workload import Workload, make_workload

__all__ = [
    "BUCKETS",
    "VariantSpec",
    "build_and_time",
    "carried_state_mib",
    "run_variant_comparison",
    "variant_specs",
    "variant_state_mib",
]

logger = logging.getLogger("sdtm_compile.bench")

#: The buckets every variant of the method compiles (fewer engines to build than the defaults' seven).
BUCKETS = (0.3, 0.5, 0.7)


@dataclass(frozen=True)
class VariantSpec:
    """One variant: ``kind`` ``eager`` (the model itself), ``inductor`` (plain ``torch.compile``), ``backend`` (the
    ``sdtm`` backend with ``method`` and ``step_cache``) or ``peer`` (another library's cache hook, ``peer``)."""

    name: str
    kind: str
    description: str
    method: MethodConfig | None = None
    step_cache: FirstBlockCacheConfig | None = None
    peer: PeerSpec | None = None


def variant_specs(config: BenchConfig, workload: Workload, step_threshold: float) -> list[VariantSpec]:
    """The comparison's variants, in table order: the baselines, the method (at :data:`BUCKETS`), its variants,
    our first-block step cache alone and with the method (SD3 models), and the peers."""
    base = dataclasses.replace(config.method, buckets=BUCKETS)
    method = method_for(base)
    calibration = VariantCalibration(
        workload.family,
        workload.grid,
        config.steps,
        lambda: workload.first_block_plan_inputs(config),  # type: ignore[arg-type]
    )
    specs = [
        VariantSpec("eager", "eager", "the diffusers model, uncompiled"),
        VariantSpec(BASELINE, "inductor", "torch.compile, Inductor"),
        VariantSpec(base.method, "backend", method.describe(), base),
        *(VariantSpec(v.name, "backend", v.description, v.config) for v in method.variants(calibration)),
    ]
    if workload.family == "sd3":  # our step cache runs on SD3 models only
        cache = FirstBlockCacheConfig(step_threshold)
        unmerged = method_for(METHOD_CONFIGS[base.method]()).with_ratio(0.0)  # the method off: the unmerged engine
        alone = f"first-block cache alone (threshold {step_threshold:g}), unmerged engine"
        composed = f"{method.describe()} + first-block cache (threshold {step_threshold:g})"
        specs += [
            VariantSpec("fbcache", "backend", alone, unmerged, cache),
            VariantSpec(f"{base.method}+fbcache", "backend", composed, base, cache),
        ]
    peers = peer_specs(workload.family, step_threshold, config.steps)  # type: ignore[arg-type]
    return specs + [VariantSpec(peer.name, "peer", peer.description, peer=peer) for peer in peers]


def variant_state_mib(compiled: Any) -> float:
    """MiB a backend variant carries between steps besides the method's state (:func:`carried_state_mib`); 0 for
    the others."""
    if compiled is None or isinstance(compiled, PeerCall):
        return 0.0
    return carried_state_mib(compiled.signature)


def carried_state_mib(signature: Any) -> float:
    """MiB an engine contract carries between steps besides the method's state (e.g. the fusion cache ``[K, B, N,
    C]``), plus the step cache's two residuals ``[B, N, C]`` per call when it has the ``hidden`` output."""

    def nbytes(tensor: Any) -> int:
        return math.prod(tensor.shape) * tensor.dtype.itemsize

    total = sum(nbytes(t) for t in signature.inputs[1:])
    if HIDDEN_STATE in signature:
        total += 2 * nbytes(signature[HIDDEN_STATE])
    return total / 2**20


def _plain_backend(config: BenchConfig) -> str:
    """The baseline's and the peers' torch.compile backend: Inductor, except in a test run of eager engines
    (Dynamo's eager backend: no Inductor build; its "speed-ups" then compare eager code with eager code)."""
    return "inductor" if config.engine == "inductor" else "eager"


def _compile(spec: VariantSpec, workload: Workload, config: BenchConfig, engine_cache: Path | None) -> tuple[Any, Any]:
    """``spec``'s module (what a generation calls) and what reports its steps (the backend's compiled graph, the
    peer's call, or ``None``), after a first call and one generation without a recompile."""
    from ..compiler.backend import SDTMBackend  # the compiler stack: loaded only when something is compiled

    compiled = None
    if spec.kind == "eager":
        module = workload.model
    elif spec.kind == "inductor":
        module = torch.compile(workload.model, dynamic=False, backend=_plain_backend(config))
    elif spec.kind == "peer":
        module = compiled = spec.peer.apply(copy.deepcopy(workload.model), _plain_backend(config))  # type: ignore[union-attr]
    else:
        options = {"method": spec.method, "engine": config.engine, "history": 4096, "cache_dir": engine_cache}
        if spec.step_cache is not None:
            options["step_cache"] = spec.step_cache
        backend = SDTMBackend(options, name="sdtm")
        module = torch.compile(workload.model, backend=backend, dynamic=False)
    with torch.no_grad():
        if spec.kind == "peer":  # a hook-based cache compiles block by block: let it settle (or fail)
            workload.generate(workload.call_of(module), config)
        else:  # one whole generation without a recompile
            module(**workload.probe, return_dict=False)
            with torch._dynamo.config.patch(error_on_recompile=spec.kind != "eager"):
                workload.generate(workload.call_of(module), config)
    if spec.kind == "backend":
        if not backend.compiled:  # Dynamo ran the frame without the backend (e.g. its recompile limit was hit)
            raise RuntimeError(f"{spec.name}: Dynamo never called the sdtm backend; see its warnings above")
        compiled = backend.compiled[-1]
    return module, compiled


def build_and_time(
    phase: str,
    specs: list[VariantSpec],
    workload: Workload,
    config: BenchConfig,
    engine_cache: Path | None,
    not_run: dict[str, str],
) -> list[tuple[VariantSpec, Any, TimedCall, dict[str, float]]]:
    """Compile ``specs`` (a variant that fails goes to ``not_run``), then time them round-robin. Returns per variant
    ``(spec, compiled graph or peer call, its timings, median seconds of every variant of the phase)``.

    Every variant compiles the same model's ``forward``: each is one more Dynamo cache entry of that code object, so
    the recompile limit (8 by default) is raised for the phase, or Dynamo would run the ninth variant's frame without
    its backend.
    """
    with torch._dynamo.config.patch(recompile_limit=max(64, 4 * len(specs))):
        torch._dynamo.reset()
        built: list[tuple[VariantSpec, Any, TimedCall]] = []
        for number, spec in enumerate(specs, 1):
            logger.info("[%s %d/%d] %s: compiling ...", phase, number, len(specs), spec.name)
            start = time.perf_counter()
            try:
                module, compiled = _compile(spec, workload, config, engine_cache)
            except Exception as err:  # a peer that breaks on this model: reported, not dropped
                not_run[spec.name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                logger.warning("%s does not run on %s: %s", spec.name, config.model, not_run[spec.name])
                continue
            timed = TimedCall(spec.name, workload.call_of(module), build_s=time.perf_counter() - start)
            built.append((spec, compiled, timed))
        with torch.no_grad():
            calls = [timed for _, _, timed in built]
            timed_rounds(calls, workload, dataclasses.replace(config, warmup=1), config.sweep_runs, phase)
        torch._dynamo.reset()
        seconds = {timed.name: statistics.median(timed.seconds) for _, _, timed in built}
        return [(spec, compiled, timed, seconds) for spec, compiled, timed in built]


def _point(
    spec: VariantSpec,
    compiled: Any,
    timed: TimedCall,
    seconds: dict[str, float],
    graphs: CapturedBucketGraphs,
    base: MethodConfig,
    full_per_step: int,
    unmodified: torch.Tensor,
    workload: Workload,
    steps: int,
) -> Measurement:
    """The measurement of one variant; its speed-ups against the eager and Inductor runs of the same phase. The
    FLOPs of a step are those of its engine's bucket graph under the plain method (``base``): a variant's extension
    adds element-wise work only, which FLOP counting leaves out, and its extra state inputs need no graphs of their
    own here."""
    flops: list[float] | None = None
    counts: dict[str, Any] = {}
    if spec.kind == "backend":
        records = step_records(compiled, steps)
        skipped = sum(r.skipped for r in records)
        unmerged = sum(r.key == FULL and not r.skipped for r in records)
        counts = {"merged_steps": len(records) - skipped - unmerged, "unmerged_steps": unmerged}
        counts |= {"skipped_steps": skipped, "engines": ["skip" if r.skipped else str(r.key) for r in records]}
        head = full_per_step / workload.num_blocks  # a skipped step ran the head only: one block of the model's
        flops = [head if r.skipped else graphs.flops(r.key, base).total for r in records]
    elif spec.kind in ("eager", "inductor"):
        flops = [full_per_step] * steps
        counts = {"merged_steps": 0, "unmerged_steps": steps, "skipped_steps": 0}
    else:  # a peer: which calls ran the tail (no FLOPs: its engines are not ours to count)
        ran = compiled.ran_tail[-steps:]
        counts = {"merged_steps": 0, "unmerged_steps": sum(ran), "skipped_steps": len(ran) - sum(ran)}
        counts["engines"] = ["full" if r else "skip" for r in ran]
    return measure(
        timed,
        unmodified,
        workload.pixel_space,
        seconds[BASELINE],
        eager_s=seconds[FIDELITY_REFERENCE],
        step_flops=flops,
        full_per_step=full_per_step if flops is not None else None,
        description=spec.description,
        config=None if spec.method is None else spec.method.to_dict(),
        state_mib=variant_state_mib(compiled),
        **counts,
    )


def run_variant_comparison(
    config: BenchConfig,
    step_threshold: float = 0.1,
    command: str | None = None,
    only: tuple[str, ...] | None = None,
) -> BenchReport:
    """Compile and time every variant of :func:`variant_specs` on ``config.model`` and write the page (``only``:
    just these variants, besides the baselines). Returns the report (kind ``variants``)."""
    torch.manual_seed(config.seed)
    workload = make_workload(config)
    started = time.perf_counter()
    specs = variant_specs(config, workload, step_threshold)
    with torch.no_grad():
        unmodified = workload.generate(workload.call_of(workload.model), config)
    if only is not None:  # the baselines always run: every speed-up is taken against them
        specs = [spec for spec in specs if spec.kind in ("eager", "inductor") or spec.name in only]
    base = dataclasses.replace(config.method, buckets=BUCKETS)
    graphs = CapturedBucketGraphs(workload.model, workload.probe)
    full_per_step = graphs.flops(FULL, base).total
    not_run: dict[str, str] = {}
    # Two phases, each timed round-robin beside its own eager and Inductor runs: ours, then the peers. A hook-based
    # peer compiles the model's frames piecewise, which would disturb our compiled models in the same Dynamo cache.
    ours = [spec for spec in specs if spec.kind != "peer"]
    peers = [spec for spec in specs if spec.kind in ("eager", "inductor", "peer")]
    measured: list[tuple[VariantSpec, Any, TimedCall, dict[str, float]]] = []
    with (
        tempfile.TemporaryDirectory(prefix="sdtm_variants_") as scratch,
        compiler_caches(config.cold_caches, Path(scratch)) as engine_cache,
    ):
        for phase, phase_specs in (("ours", ours), ("peers", peers)):
            if phase == "peers" and not any(spec.kind == "peer" for spec in phase_specs):
                continue  # no peer asked for (``only``): the baselines were timed with ours
            measured += build_and_time(phase, phase_specs, workload, config, engine_cache, not_run)
            if phase == "peers" and any(spec.name == "diffusers-fbcache" for spec, *_ in measured):
                not_run["diffusers-fbcache (unpatched)"] = unpatched_first_block_cache_error(
                    workload.model, workload.probe, step_threshold
                )
    points: dict[str, Measurement] = {}
    for spec, compiled, timed, seconds in measured:
        if spec.name not in points:  # the peers' phase times eager and Inductor again, as their reference only
            points[spec.name] = _point(
                spec,
                compiled,
                timed,
                seconds,
                graphs,
                base,
                full_per_step,
                unmodified,
                workload,
                config.steps,  # type: ignore[arg-type]
            )
    report = BenchReport(
        format_version=2,
        kind="variants",
        measured_on=datetime.date.today().isoformat(),
        command=command,
        machine=machine_info(),
        model=model_info(config.model, config.latent_side),
        settings=run_settings(config, comparison=True, step_threshold=step_threshold),
        method=base.to_dict(),
        method_description=method_for(base).describe(),
        points=list(points.values()),
        not_run=not_run,
        wall_time_s=time.perf_counter() - started,
    )
    render(report, config.results_dir, config.out_dir)
    return report
