"""The benchmark: what SDTM buys on a model, measured in one run against the baselines.

``sdtm-compile bench`` (or :func:`run_benchmark`) runs whole generations (flow-matching Euler, CFG batch 2,
fixed seeds) of one model four ways:

* ``eager``: the unmodified model, op by op;
* ``inductor``: the unmodified model under ``torch.compile`` (the baseline every speed-up is taken against);
* ``sdtm``: SDTM through the ``sdtm`` backend (static-shape engines, Inductor by default);
* ``reference``: SDTM through the eager reference (:mod:`sdtm_compile.reference`), the same algorithm.

For each it reports wall time per generation (median and spread of ``runs`` timed runs after ``warmup``,
run round-robin so drift hits every variant alike), the speed-up over ``inductor``, FLOPs per step and per
generation (``FlopCounterMode`` on each bucket graph, attention included; see :mod:`sdtm_compile.flops`), the
FLOP ratio and the speed-up as a fraction of it, fidelity of the final latent against ``eager`` (PSNR,
cosine), peak resident memory during a generation (and how far above the resident memory at its start),
and compile time cold (empty caches) and warm. It also
measures the share of time the merge ops take (profiler, bucket graphs run op by op), sweeps the ratio for
a speed-up vs fidelity curve, and draws the schedule, the curve and merge maps (:mod:`sdtm_compile.plots`).

Outputs in ``out_dir``: ``bench.json`` (every number), ``bench.md`` (the tables), ``schedule.png``,
``speedup_vs_fidelity.png``, ``merge_maps.png``.

What it does not do: GPU timing (CPU only here), image-space metrics (the models have random weights, so
only the final latent is compared), and attribution of time *inside* compiled Inductor kernels (merge ops
fuse with their neighbours there; the merge share is measured on the bucket graphs run op by op).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from .buckets import BucketGraphs
from .config import SDTMConfig
from .flops import count_flops, mmdit_block_flops
from .models import MODEL_PRESETS, ModelPreset, tiny_sd3_transformer
from .ops import sdtm_merge, sdtm_plan, sdtm_unmerge
from .sampling import (
    GenerationInputs,
    cfg_batch,
    cfg_prompts,
    cosine_similarity,
    diffusers_call,
    generate,
    make_generation_inputs,
    psnr,
)
from .schedule import FULL, EngineKey, token_counts

__all__ = ["BenchConfig", "run_benchmark", "render", "VARIANTS", "markdown_report", "peak_rss", "resident_mib"]

logger = logging.getLogger(__name__)

#: The variants every benchmark runs, in table order.
VARIANTS = ("eager", "inductor", "sdtm", "reference")
_BASELINE, _FIDELITY_REFERENCE = "inductor", "eager"


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark and how (every field is validated on construction).

    Attributes:
        model: a name of :data:`~sdtm_compile.models.MODEL_PRESETS` (``sd3m-1024`` is the benchmark model).
        sdtm: the SDTM configuration of the main measurement (the defaults unless given).
        latent: latent side (image side / 8); ``None`` takes the preset's.
        steps: sampling steps per generation (28 as in SD3).
        guidance_scale: classifier-free guidance scale (every step is one batch-2 call).
        runs: timed generations per variant (after ``warmup``); the median is reported.
        warmup: untimed generations per variant before timing.
        sweep: ratios for the speed-up vs fidelity curve (besides ``sdtm.ratio``); ``()`` for none.
        sweep_runs: timed generations per sweep point (and of the baseline beside it).
        engine: engines of the ``sdtm`` backend: ``"inductor"`` (the product) or ``"eager"`` (fast, for tests).
        cold_caches: measure compile time cold, in a fresh Inductor and engine cache for this run; ``False``
            uses the caches in place (faster repeats; the "cold" number is then whatever they held).
        merge_map_blocks: blocks whose merges the merge-map picture shows.
        seed: seed of the model weights, the noise and the prompt embeddings.
        out_dir: where the JSON, markdown and pictures go.
    """

    model: str = "sd3m-1024"
    sdtm: SDTMConfig = field(default_factory=SDTMConfig)
    latent: int | None = None
    steps: int = 28
    guidance_scale: float = 7.0
    runs: int = 5
    warmup: int = 1
    sweep: tuple[float, ...] = (0.3, 0.4, 0.6, 0.7)
    sweep_runs: int = 3
    engine: str = "inductor"
    cold_caches: bool = True
    merge_map_blocks: tuple[int, ...] = (0,)
    seed: int = 0
    out_dir: str = "bench_out"

    def __post_init__(self) -> None:
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"unknown model {self.model!r}: choose one of {sorted(MODEL_PRESETS)}")
        if isinstance(self.sdtm, dict):
            object.__setattr__(self, "sdtm", SDTMConfig.from_dict(self.sdtm))
        object.__setattr__(self, "sweep", tuple(float(r) for r in self.sweep))
        checks = [
            (self.latent is None or (self.latent >= 4 and self.latent % 2 == 0), "latent", "an even side >= 4"),
            (self.steps >= 2, "steps", ">= 2"),
            (self.runs >= 1, "runs", ">= 1 (5 or more for a result worth reporting)"),
            (self.warmup >= 0, "warmup", ">= 0"),
            (self.sweep_runs >= 1, "sweep_runs", ">= 1"),
            (all(0.0 < r < 1.0 for r in self.sweep), "sweep", "ratios in (0, 1)"),
            (self.engine in ("inductor", "eager"), "engine", "'inductor' or 'eager'"),
            (self.guidance_scale >= 0, "guidance_scale", ">= 0"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"BenchConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}")
        for ratio in self.sweep:
            self.sweep_config(ratio)  # an invalid sweep point fails now, not after an hour of timing
        layers = MODEL_PRESETS[self.model].spec.num_layers
        if any(not 0 <= b < layers for b in self.merge_map_blocks):
            raise ValueError(f"merge_map_blocks {self.merge_map_blocks} must be block indices below {layers}")

    def sweep_config(self, ratio: float) -> SDTMConfig:
        """``sdtm`` at another ratio; the deviation shrinks where ``ratio`` +- deviation would leave [0, 0.75]."""
        deviation = max(0.0, min(self.sdtm.deviation, ratio, 0.75 - ratio))
        return dataclasses.replace(self.sdtm, ratio=ratio, deviation=round(deviation, 6))

    @property
    def preset(self) -> ModelPreset:
        return MODEL_PRESETS[self.model]

    @property
    def latent_side(self) -> int:
        return self.latent if self.latent is not None else self.preset.latent


# ---------------------------------------------------------------------------------------------- measuring


def peak_rss() -> Callable[[], float | None]:
    """Reset the process's peak resident set size; returns a function reading the peak since, in MiB.

    Linux only (``/proc/self/clear_refs`` + ``VmHWM``); elsewhere the reader returns ``None``.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return lambda: None

    def read() -> float | None:
        return _proc_status_mib("VmHWM")

    return read


def resident_mib() -> float | None:
    """The process's resident set size now, in MiB (Linux; ``None`` elsewhere)."""
    return _proc_status_mib("VmRSS")


def _proc_status_mib(field_name: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1]) / 1024.0
    return None


def _summary(seconds: list[float]) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "seconds": seconds,
        "median_s": median,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "spread_pct": 100.0 * (max(seconds) - min(seconds)) / median,
    }


def _cfg_call_inputs(inputs: GenerationInputs, timestep: float) -> dict[str, torch.Tensor]:
    """The batch-2 transformer inputs of one CFG step, laid out exactly as :func:`generate` passes them (a
    probe laid out differently would make the first generation recompile)."""
    latent, expanded = cfg_batch(inputs.latents, torch.tensor(float(timestep)))
    prompt, pooled = cfg_prompts(inputs)
    return {
        "hidden_states": latent,
        "encoder_hidden_states": prompt,
        "pooled_projections": pooled,
        "timestep": expanded,
    }


@contextlib.contextmanager
def _compiler_caches(cold: bool, scratch: Path) -> Iterator[None]:
    """Fresh Inductor and engine caches under ``scratch`` (``cold``), or the user's caches as they are."""
    if not cold:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    saved = os.environ.get("SDTM_CACHE_DIR")
    os.environ["SDTM_CACHE_DIR"] = str(scratch / "sdtm")
    try:
        with temporary_cache_dir(str(scratch / "inductor")):
            yield
    finally:
        if saved is None:
            os.environ.pop("SDTM_CACHE_DIR", None)
        else:
            os.environ["SDTM_CACHE_DIR"] = saved


class _Compiled:
    """One ``torch.compile`` of the model (baseline or SDTM) and the time its first call took."""

    def __init__(self, model: torch.nn.Module, sdtm: SDTMConfig | None, engine: str, probe: dict[str, Any]):
        from .backend import SDTMBackend

        # history: the step table reads the engines of the last generation's calls
        options = {"sdtm": sdtm, "engine": engine, "history": 1024}
        self.backend = None if sdtm is None else SDTMBackend(options, name="sdtm")
        if self.backend is None:
            self.module = torch.compile(model, dynamic=False)
        else:
            self.module = torch.compile(model, backend=self.backend, dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            self.module(**probe, return_dict=False)
        self.build_s = time.perf_counter() - start
        self.call = diffusers_call(self.module)

    @property
    def compiled_graph(self):
        return self.backend.compiled[-1] if self.backend is not None else None


# -------------------------------------------------------------------------------------------- FLOPs, share


class _BucketGraphs:
    """The model's Dynamo graph and its :class:`~sdtm_compile.buckets.BucketGraphs` per SDTM config (for FLOPs
    and the merge profile)."""

    def __init__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        from .capture import capture_dynamo_graph

        self.gm, self.flat = capture_dynamo_graph(model, inputs)
        self._buckets: dict[SDTMConfig, BucketGraphs] = {}
        self._flops: dict[tuple[EngineKey, SDTMConfig], Any] = {}

    def buckets(self, config: SDTMConfig) -> BucketGraphs:
        if config not in self._buckets:
            self._buckets[config] = BucketGraphs(self.gm, self.flat, config)
        return self._buckets[config]

    def graph(self, key: EngineKey, config: SDTMConfig) -> fx.GraphModule:
        return self.buckets(config).graph(key).gm

    def li(self, key: EngineKey, config: SDTMConfig) -> torch.Tensor:
        return self.buckets(config).new_li()

    def flops(self, key: EngineKey, config: SDTMConfig):
        """FLOPs of one call of ``key``'s bucket graph (a :class:`~sdtm_compile.flops.FlopCount`)."""
        if (key, config) not in self._flops:
            with torch.no_grad():
                count, _ = count_flops(self.graph(key, config), *self.flat, self.li(key, config))
            self._flops[(key, config)] = count
        return self._flops[(key, config)]


_MERGE_OPS = {sdtm_plan: "plan", sdtm_merge: "merge", sdtm_unmerge: "unmerge"}


def _labelled(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(f"sdtm::{label}"):
            return fn(*args, **kwargs)

    run.__name__ = f"{fn.__name__}_labelled"
    return run


def merge_time_share(gm: fx.GraphModule, inputs: list[torch.Tensor], calls: int = 3) -> dict[str, float]:
    """Seconds per call spent in ``sdtm_plan`` / ``sdtm_merge`` / ``sdtm_unmerge`` and in all, op by op.

    Runs a copy of the bucket graph whose merge ops are wrapped in ``record_function`` under the profiler.
    """
    from .passes import copy_graph_module

    labelled = copy_graph_module(gm)
    for node in labelled.graph.nodes:
        if node.op == "call_function" and node.target in _MERGE_OPS:
            node.target = _labelled(node.target, _MERGE_OPS[node.target])
    labelled.recompile()
    with torch.no_grad():
        labelled(*inputs)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                labelled(*inputs)
            total = (time.perf_counter() - start) / calls
    share = {"total_s": total}
    for label in _MERGE_OPS.values():
        share[f"{label}_s"] = sum(e.cpu_time_total for e in prof.key_averages() if e.key == f"sdtm::{label}") / (
            1e6 * calls
        )
    return share


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class _Variant:
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
        if peak is None or start is None:
            return
        self.peak_rss_mib = max(self.peak_rss_mib or 0.0, peak)
        self.peak_above_start_mib = max(self.peak_above_start_mib or 0.0, peak - start)


def _generate(variant: _Variant, inputs: GenerationInputs, config: BenchConfig) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    latent = generate(
        variant.call,
        inputs,
        num_steps=config.steps,
        guidance_scale=config.guidance_scale,
        shift=config.sdtm.timestep_shift,
    )
    return latent, time.perf_counter() - start


def _timed_rounds(variants: list[_Variant], inputs: GenerationInputs, config: BenchConfig, runs: int, what: str):
    """``warmup`` then ``runs`` generations per variant, round-robin; keeps latents, times and peak memory."""
    total = len(variants) * (config.warmup + runs)
    done = 0
    for round_index in range(config.warmup + runs):
        timed = round_index >= config.warmup
        for variant in variants:
            start, read_peak = (resident_mib(), peak_rss()) if not timed else (None, None)
            latent, seconds = _generate(variant, inputs, config)
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
            _generate(variant, inputs, config)
            variant.record_peak(start, read_peak())


def _steps_of(compiled_graph, num_steps: int) -> list[dict[str, Any]]:
    """The last generation's engine per step, from the dispatcher's history."""
    steps = [record for record in compiled_graph.dispatcher.history if record.new_step][-num_steps:]
    return [{"step": i, "timestep": r.timestep, "position": r.position, "key": r.key} for i, r in enumerate(steps)]


def _merge_maps(
    model: torch.nn.Module, inputs: GenerationInputs, config: BenchConfig, blocks: tuple[int, ...]
) -> dict[int, dict[int, torch.Tensor]]:
    """``{step: {block: slot [N]}}`` of the conditional batch row, from one reference generation."""
    from .reference import ReferenceTransformer, reference_engine

    reference = ReferenceTransformer(model, config.sdtm)
    current: dict[str, int] = {"step": 0}
    maps: dict[int, dict[int, torch.Tensor]] = {}

    def record(block: int, plan) -> None:
        if block in blocks:
            maps.setdefault(current["step"], {})[block] = plan.slot[-1].clone()

    reference.engine_for = lambda key: reference_engine(model, key, config.sdtm, on_plan=record)

    def on_step(step: int, timestep: float) -> None:
        current["step"] = step + 1

    generate(
        reference,
        inputs,
        num_steps=config.steps,
        guidance_scale=config.guidance_scale,
        shift=config.sdtm.timestep_shift,
        on_step=on_step,
    )
    return maps


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _key_record(key: EngineKey, grid: tuple[int, int]) -> dict[str, Any]:
    counts = token_counts(key, *grid)
    return {
        "engine": str(key),
        "stage": key.stage.value,
        "bucket": key.bucket,
        "attention_tokens": counts.attention,
        "ff_tokens": counts.feed_forward,
    }


def run_benchmark(config: BenchConfig, command: str | None = None) -> dict[str, Any]:
    """Run the whole benchmark; write ``bench.json``, ``bench.md`` and the PNGs to ``config.out_dir``.

    ``command`` is recorded in the result (the command line that ran it). Returns the JSON-able result (the
    content of ``bench.json``).
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preset, latent = config.preset, config.latent_side
    spec = preset.spec
    torch.manual_seed(config.seed)
    model = tiny_sd3_transformer(spec, seed=config.seed)
    inputs = make_generation_inputs(spec, (latent, latent), seed=config.seed)
    grid = (latent // 2, latent // 2)
    n = grid[0] * grid[1]
    probe = _cfg_call_inputs(inputs, config.sdtm.num_train_timesteps)
    logger.info(
        "benchmark: %s (%s), %dx%d latent = %d image tokens, %d steps, CFG batch 2, %d runs after %d warm-up",
        config.model,
        preset.description,
        latent,
        latent,
        n,
        config.steps,
        config.runs,
        config.warmup,
    )
    wall_start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="sdtm_bench_") as scratch,
        _compiler_caches(config.cold_caches, Path(scratch)),
    ):
        # 1. compile: cold (fresh caches), then warm (same caches, Dynamo reset) - the warm ones are timed
        logger.info("compiling the Inductor baseline and the sdtm backend (cold) ...")
        cold_inductor = _Compiled(model, None, config.engine, probe)
        cold_sdtm = _Compiled(model, config.sdtm, config.engine, probe)
        torch._dynamo.reset()
        logger.info("compiling again with warm caches ...")
        inductor = _Compiled(model, None, config.engine, probe)
        sdtm = _Compiled(model, config.sdtm, config.engine, probe)
        del cold_inductor.module, cold_sdtm.module
        logger.info(
            "compile time: inductor %.1f s cold, %.1f s warm; sdtm %.1f s cold, %.1f s warm",
            cold_inductor.build_s,
            inductor.build_s,
            cold_sdtm.build_s,
            sdtm.build_s,
        )
        from .reference import ReferenceTransformer

        reference = ReferenceTransformer(model, config.sdtm)
        variants = {
            "eager": _Variant("eager", diffusers_call(model)),
            "inductor": _Variant("inductor", inductor.call, cold_inductor.build_s, inductor.build_s),
            "sdtm": _Variant("sdtm", sdtm.call, cold_sdtm.build_s, sdtm.build_s),
            "reference": _Variant("reference", reference),
        }

        # 2. timed generations, round-robin; a recompile here would be timed as part of a generation
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            _timed_rounds(list(variants.values()), inputs, config, config.runs, "main")
        sdtm_steps = _steps_of(sdtm.compiled_graph, config.steps)
        reference_steps = [record.key for record in reference.history if record.new_step][-config.steps :]

        # 3. FLOPs on the bucket graphs, and the merge-op time share (op by op)
        logger.info("counting FLOPs and profiling the merge ops on the bucket graphs ...")
        graphs = _BucketGraphs(model, probe)
        full = graphs.flops(FULL, config.sdtm)
        step_flops = [graphs.flops(s["key"], config.sdtm).total for s in sdtm_steps]
        shares = {}
        for key in sorted({s["key"] for s in sdtm_steps}):
            gm = graphs.graph(key, config.sdtm)
            shares[key] = merge_time_share(gm, [*graphs.flat, graphs.li(key, config.sdtm)])
        merge_share = _generation_share([s["key"] for s in sdtm_steps], shares)

        # 4. the sweep: speed-up vs fidelity over ratios (baseline re-timed beside each point)
        eager = variants[_FIDELITY_REFERENCE]
        sweep = [_sweep_point(config.sdtm, variants[_BASELINE], variants["sdtm"], step_flops, full.total, eager)]
        for ratio in config.sweep:
            if abs(ratio - config.sdtm.ratio) < 1e-9:
                continue
            sweep.append(_run_sweep_point(ratio, model, inputs, probe, graphs, variants, full.total, config))
        sweep.sort(key=lambda point: point["ratio"])

        # 5. merge maps from a reference generation
        logger.info("recording merge maps ...")
        maps = _merge_maps(model, inputs, config, config.merge_map_blocks)

    result = _assemble(
        config, variants, sdtm_steps, reference_steps, step_flops, full, shares, merge_share, sweep, grid, spec
    )
    from .plots import merge_map_steps

    result["merge_maps"] = {
        step: {block: slot.tolist() for block, slot in maps[step].items()}
        for step in merge_map_steps(list(maps), result["schedule"])
    }
    result["wall_time_s"] = time.perf_counter() - wall_start
    result["command"] = command
    render(result, out)
    logger.info("benchmark done in %.0f s; results in %s", result["wall_time_s"], out)
    return result


def render(result: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write ``bench.json``, ``bench.md`` and the three PNGs of a result into ``out_dir``; returns the files.

    Also re-renders a saved result: ``render(json.load(open("bench.json")), "out/")``.
    """
    from .plots import plot_merge_maps, plot_schedule, plot_speedup_vs_fidelity

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps = {
        int(step): {int(block): torch.tensor(slot) for block, slot in blocks.items()}
        for step, blocks in result.get("merge_maps", {}).items()
    }
    grid = tuple(result["model"]["grid"])
    files = {
        "json": "bench.json",
        "markdown": "bench.md",
        "schedule": Path(plot_schedule(result, out / "schedule.png")).name,
        "speedup_vs_fidelity": Path(plot_speedup_vs_fidelity(result, out / "speedup_vs_fidelity.png")).name,
        "merge_maps": Path(plot_merge_maps(maps, result, grid, out / "merge_maps.png")).name,
    }
    result["files"] = files
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "bench.md").write_text(markdown_report(result))
    return files


def _generation_share(step_keys: list[EngineKey], shares: dict[EngineKey, dict[str, float]]) -> dict[str, float]:
    """Merge-op seconds and shares over one generation's calls (each step's bucket graph, op by op)."""
    total = sum(shares[key]["total_s"] for key in step_keys)
    result = {"generation_total_s": total}
    for label in _MERGE_OPS.values():
        seconds = sum(shares[key][f"{label}_s"] for key in step_keys)
        result[f"{label}_s"] = seconds
        result[f"{label}_share"] = seconds / total
    result["all_merge_ops_share"] = sum(result[f"{label}_share"] for label in _MERGE_OPS.values())
    return result


def _fidelity(latent: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    return {"psnr_db": psnr(latent, reference), "cosine": cosine_similarity(latent, reference)}


def _sweep_point(
    sdtm_config: SDTMConfig, baseline: _Variant, point: _Variant, step_flops: list[int], full_total: int, eager
) -> dict[str, Any]:
    """One point of the speed-up vs fidelity curve: ``point`` timed beside ``baseline`` in the same rounds."""
    return {
        "ratio": sdtm_config.ratio,
        "deviation": sdtm_config.deviation,
        "speedup_vs_inductor": statistics.median(baseline.seconds) / statistics.median(point.seconds),
        "flop_ratio": full_total * len(step_flops) / sum(step_flops),
        "runs": len(point.seconds),
        **_fidelity(point.latent, eager.latent),
    }


def _run_sweep_point(ratio, model, inputs, probe, graphs, variants, full_total, config) -> dict[str, Any]:
    sdtm_config = config.sweep_config(ratio)
    logger.info("sweep: ratio %.2f (deviation %.2f): compiling ...", ratio, sdtm_config.deviation)
    compiled = _Compiled(model, sdtm_config, config.engine, probe)
    point = _Variant(f"sdtm@{ratio:g}", compiled.call)
    baseline = _Variant(_BASELINE, variants[_BASELINE].call)
    with torch.no_grad():
        sweep_config = dataclasses.replace(config, warmup=1)
        _timed_rounds([baseline, point], inputs, sweep_config, config.sweep_runs, f"sweep {ratio:g}")
    step_flops = [graphs.flops(s["key"], sdtm_config).total for s in _steps_of(compiled.compiled_graph, config.steps)]
    return _sweep_point(sdtm_config, baseline, point, step_flops, full_total, variants[_FIDELITY_REFERENCE])


def _assemble(config, variants, steps, reference_steps, step_flops, full, shares, merge_share, sweep, grid, spec):
    n = grid[0] * grid[1]
    base = variants[_BASELINE]
    base_median = statistics.median(base.seconds)
    full_generation = full.total * len(steps)
    sdtm_generation = sum(step_flops)
    table = {}
    for name, variant in variants.items():
        merged = name in ("sdtm", "reference")
        flops = sdtm_generation if merged else full_generation
        speedup = base_median / statistics.median(variant.seconds)
        flop_ratio = full_generation / flops
        table[name] = {
            **_summary(variant.seconds),
            "speedup_vs_inductor": speedup,
            "flops_per_generation": flops,
            "flop_ratio": flop_ratio,
            "speedup_over_flop_ratio": speedup / flop_ratio,
            **_fidelity(variant.latent, variants[_FIDELITY_REFERENCE].latent),
            "peak_rss_mib": variant.peak_rss_mib,
            "peak_above_start_mib": variant.peak_above_start_mib,
            "build_cold_s": variant.build_cold_s,
            "build_warm_s": variant.build_warm_s,
            "deterministic": variant.deterministic,
        }
    sdtm, reference = table["sdtm"], table["reference"]
    same_fidelity = _fidelity(variants["sdtm"].latent, variants["reference"].latent)
    targets = {
        "sdtm_speedup_reaches_0.9x_flop_ratio": {
            "speedup": sdtm["speedup_vs_inductor"],
            "target": 0.9 * sdtm["flop_ratio"],
            "fraction_of_flop_ratio": sdtm["speedup_over_flop_ratio"],
            "met": sdtm["speedup_over_flop_ratio"] >= 0.9,
        },
        "sdtm_faster_than_eager_reference": {
            "sdtm_median_s": sdtm["median_s"],
            "reference_median_s": reference["median_s"],
            "speedup": reference["median_s"] / sdtm["median_s"],
            "met": sdtm["median_s"] < reference["median_s"],
        },
        "sdtm_fidelity_equals_reference": {
            "sdtm_psnr_db": sdtm["psnr_db"],
            "reference_psnr_db": reference["psnr_db"],
            "sdtm_vs_reference_psnr_db": same_fidelity["psnr_db"],
            "sdtm_vs_reference_cosine": same_fidelity["cosine"],
            # "within noise": the two paths differ by float rounding only, far below SDTM's own effect
            "met": same_fidelity["psnr_db"] >= max(sdtm["psnr_db"], reference["psnr_db"]) + 20.0,
        },
    }
    blocks = mmdit_block_flops(n, spec.text_tokens, spec.inner_dim)
    return {
        "format_version": 1,
        "machine": _machine(),
        "command": None,
        "model": {
            "name": config.model,
            "description": config.preset.description,
            "spec": dataclasses.asdict(spec),
            "latent": config.latent_side,
            "grid": list(grid),
            "image_tokens": n,
            "text_tokens": spec.text_tokens,
            "hidden": spec.inner_dim,
            "block_flop_shares": {k: v / sum(blocks.values()) for k, v in blocks.items()},
        },
        "sdtm": config.sdtm.to_dict(),
        "bench": {
            "steps": config.steps,
            "guidance_scale": config.guidance_scale,
            "runs": config.runs,
            "warmup": config.warmup,
            "sweep_runs": config.sweep_runs,
            "engine": config.engine,
            "cold_caches": config.cold_caches,
            "seed": config.seed,
            "baseline": _BASELINE,
            "fidelity_reference": _FIDELITY_REFERENCE,
        },
        "variants": table,
        "flops": {
            "full_per_step": full.total,
            "full_by_op": full.by_op,
            "per_generation": {"full": full_generation, "sdtm": sdtm_generation},
            "by_engine": {
                str(key): graphs_flops
                for key, graphs_flops in sorted({s["key"]: f for s, f in zip(steps, step_flops)}.items())
            },
        },
        "schedule": [
            {**_key_record(s["key"], grid), "step": s["step"], "timestep": s["timestep"], "flops": f}
            for s, f in zip(steps, step_flops)
        ],
        "reference_schedule_matches": [str(k) for k in reference_steps] == [str(s["key"]) for s in steps],
        "merge_time_share": {"per_engine": {str(k): v for k, v in shares.items()}, "generation": merge_share},
        "targets": targets,
        "sweep": sweep,
    }


# ---------------------------------------------------------------------------------------------- reporting


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _flops(value: float) -> str:
    """``69.0 G``, ``1.93 T``, ``12.3 M``: FLOPs with an SI prefix."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.0f}"


def markdown_report(result: dict[str, Any]) -> str:
    """The tables of ``bench.md`` (and of the README's Results section) from a :func:`run_benchmark` result."""
    model, bench, machine = result["model"], result["bench"], result["machine"]
    lines = [
        f"Model `{model['name']}`: {model['description']}; {model['image_tokens']} image + {model['text_tokens']} "
        f"text tokens, hidden {model['hidden']}. {bench['steps']} steps, CFG batch 2, SDTM ratio "
        f"{result['sdtm']['ratio']} (deviation {result['sdtm']['deviation']}), `sdtm` engines: {bench['engine']}. "
        f"Median of {bench['runs']} runs after {bench['warmup']} warm-up. Machine: {machine['cpu']}, "
        f"{machine['torch_threads']} threads, torch {machine['torch']}.",
        "",
        "| variant | s / generation (median) | spread | speed-up vs Inductor | FLOPs / generation | FLOP ratio "
        "| speed-up / FLOP ratio | PSNR dB | cosine | peak RSS MiB (+ during generation) | compile cold s "
        "| compile warm s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["variants"].items():
        lines.append(
            f"| {name} | {row['median_s']:.2f} | {row['min_s']:.2f}-{row['max_s']:.2f} "
            f"({row['spread_pct']:.1f}%) | {row['speedup_vs_inductor']:.2f}x | "
            f"{_flops(row['flops_per_generation'])} | {row['flop_ratio']:.2f}x | "
            f"{row['speedup_over_flop_ratio']:.2f} | {_fmt(row['psnr_db'], '.2f')} | {row['cosine']:.6f} | "
            f"{_fmt(row['peak_rss_mib'], ',.0f')} (+{_fmt(row.get('peak_above_start_mib'), ',.0f')}) | "
            f"{_fmt(row['build_cold_s'], '.1f')} | "
            f"{_fmt(row['build_warm_s'], '.1f')} |"
        )
    share = result["merge_time_share"]["generation"]
    targets = result["targets"]
    t1, t2, t3 = (
        targets["sdtm_speedup_reaches_0.9x_flop_ratio"],
        targets["sdtm_faster_than_eager_reference"],
        targets["sdtm_fidelity_equals_reference"],
    )
    lines += [
        "",
        "PSNR and cosine: final latent against `eager` with the same seed (inf = identical). FLOPs: "
        "`FlopCounterMode` on each step's bucket graph, attention included, element-wise work not counted.",
        "",
        f"Merge ops (bucket graphs run op by op): plan {100 * share['plan_share']:.1f}%, merge "
        f"{100 * share['merge_share']:.1f}%, unmerge {100 * share['unmerge_share']:.1f}% of a generation's "
        "transformer time.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| `sdtm` speed-up >= 0.9 x its FLOP ratio | {t1['speedup']:.2f}x vs 0.9 x "
        f"{result['variants']['sdtm']['flop_ratio']:.2f} = {t1['target']:.2f}x "
        f"({t1['fraction_of_flop_ratio']:.2f} of the FLOP ratio) | {'yes' if t1['met'] else 'no'} |",
        f"| `sdtm` faster than the eager reference | {t2['sdtm_median_s']:.2f} s vs {t2['reference_median_s']:.2f} s "
        f"({t2['speedup']:.2f}x) | {'yes' if t2['met'] else 'no'} |",
        f"| `sdtm` fidelity = reference's | PSNR {_fmt(t3['sdtm_psnr_db'], '.2f')} vs "
        f"{_fmt(t3['reference_psnr_db'], '.2f')} dB; `sdtm` vs reference {_fmt(t3['sdtm_vs_reference_psnr_db'], '.1f')}"
        f" dB | {'yes' if t3['met'] else 'no'} |",
    ]
    if result["sweep"]:
        lines += [
            "",
            "| ratio | speed-up vs Inductor | FLOP ratio | speed-up / FLOP ratio | PSNR dB | cosine | runs |",
            "|---|---|---|---|---|---|---|",
        ]
        for point in result["sweep"]:
            lines.append(
                f"| {point['ratio']:g} | {point['speedup_vs_inductor']:.2f}x | {point['flop_ratio']:.2f}x | "
                f"{point['speedup_vs_inductor'] / point['flop_ratio']:.2f} | {_fmt(point['psnr_db'], '.2f')} | "
                f"{point['cosine']:.6f} | {point['runs']} |"
            )
    return "\n".join(lines) + "\n"
