"""SDTM complete and step caches side by side: eager and Inductor baselines, SDTM, its cache fusion, SDTM*, size-aware
attention, a first-block step cache alone and composed with SDTM, and the diffusers cache peers, in one run.

``sdtm-compile bench --model testbed-1024 --variants`` compiles every variant (the ``sdtm`` backend for ours,
``torch.compile`` with Inductor for the baseline and the peers), then times them round-robin in the same rounds
after one warm-up generation, so every ratio is taken in one run. Per variant: seconds per generation, speed-up over
Inductor and over eager, the FLOP ratio (full model over this variant, summed over the steps it ran: a skipped
step counts as its head, one block of ``num_blocks``), how many steps ran merged / unmerged / were skipped, peak
memory, the state each variant carries (cache fusion's cache, the step cache's residuals) and fidelity of the
final latent against the unmodified model's (PSNR, cosine; on the trained testbed image PSNR and SSIM).

A peer that cannot run on the model is not dropped silently: its error is kept in the report's ``not_run`` list.
SDTM*'s threshold is picked so that its expected ratio equals the fixed schedule's mean ratio (equal FLOPs), from
the first block's window scores in the unmodified generation (:func:`calibrate_adaptive_threshold`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.schedule import FULL, position_at_step, round_to_bucket
from ..methods.sdtm.config import SDTMConfig
from ..methods.sdtm.plans import window_score_fraction
from ..methods.sdtm.schedule import engine_key_at
from ..runtime.step_cache import FirstBlockCacheConfig
from .config import BASELINE, BenchConfig
from .harness import compiler_caches
from .instrument import CapturedBucketGraphs
from .result import MachineInfo, _fidelity, _image_fidelity, machine_info
from .run import Variant, timed_rounds
from .workload import Workload, make_workload

__all__ = ["VariantSpec", "VariantPoint", "VariantComparison", "run_variant_comparison", "variant_specs"]

logger = logging.getLogger("sdtm_compile.bench")

#: The buckets every SDTM variant of the comparison compiles (fewer engines to build than the defaults' seven).
BUCKETS = (0.3, 0.5, 0.7)


@dataclass(frozen=True)
class VariantSpec:
    """One variant: ``kind`` ``eager`` (the model itself), ``inductor`` (plain ``torch.compile``), ``sdtm`` (our
    backend with ``method`` and ``step_cache``) or ``peer`` (a diffusers cache hook applied by ``apply`` to a copy
    of the model, compiled with Inductor)."""

    name: str
    kind: str
    description: str
    method: SDTMConfig | None = None
    step_cache: FirstBlockCacheConfig | None = None
    #: a peer: hook a copy of the model and compile it with the given torch.compile backend
    apply: Callable[[torch.nn.Module, str], PeerCall] | None = None


def variant_specs(
    config: BenchConfig, family: str, adaptive_threshold: float | None, step_threshold: float
) -> list[VariantSpec]:
    """The comparison's variants. Flux: the baselines, SDTM and the peers (cache fusion, SDTM* and our step cache
    are SD3-only; size-aware attention needs merged attention, off by default on Flux)."""
    sdtm = dataclasses.replace(config.sdtm, buckets=BUCKETS)
    baselines = [
        VariantSpec("eager", "eager", "the diffusers model, uncompiled"),
        VariantSpec(BASELINE, "inductor", "torch.compile, Inductor"),
        VariantSpec("sdtm", "sdtm", f"SDTM ratio {sdtm.ratio:g} +- {sdtm.deviation:g}", sdtm),
    ]
    if family == "flux":
        return baselines + _peer_specs(config, family, step_threshold)
    assert adaptive_threshold is not None
    return (
        baselines
        + [
            VariantSpec(
                "sdtm+fusion",
                "sdtm",
                "SDTM + cache fusion as released (every 3rd step unmerged and stored, mcw 0.1)",
                dataclasses.replace(sdtm, cache_fusion=True),
            ),
            VariantSpec(
                "sdtm*",
                "sdtm",
                f"SDTM* (ratio from the window statistic, threshold {adaptive_threshold:.3f}: equal expected FLOPs)",
                dataclasses.replace(sdtm, adaptive_threshold=adaptive_threshold),
            ),
            VariantSpec(
                "sdtm+size-aware",
                "sdtm",
                "SDTM + size-aware attention (log(size) key bias)",
                dataclasses.replace(sdtm, size_aware_attention=True),
            ),
            VariantSpec(
                "fbcache",
                "sdtm",
                f"first-block cache alone (threshold {step_threshold:g}), unmerged engine",
                SDTMConfig(ratio=0.0, deviation=0.0),
                FirstBlockCacheConfig(step_threshold),
            ),
            VariantSpec(
                "sdtm+fbcache",
                "sdtm",
                f"SDTM + first-block cache (threshold {step_threshold:g})",
                sdtm,
                FirstBlockCacheConfig(step_threshold),
            ),
        ]
        + _peer_specs(config, family, step_threshold)
    )


def _peer_specs(config: BenchConfig, family: str, step_threshold: float) -> list[VariantSpec]:
    patch = family == "sd3"
    return [
        VariantSpec(
            "diffusers-fbcache",
            "peer",
            f"diffusers' FirstBlockCacheConfig(threshold={step_threshold:g}) hook, Inductor"
            + (" (last block patched: see not_run)" if patch else ""),
            apply=lambda model, backend: _diffusers_first_block_cache(model, step_threshold, patch, backend),
        ),
        VariantSpec(
            "diffusers-taylorseer",
            "peer",
            'diffusers\' TaylorSeerCacheConfig() hook (defaults: on a "skipped" step the attention outputs are '
            "forecast, the feed-forwards still run), Inductor",
            apply=_diffusers_taylorseer,
        ),
        VariantSpec(
            "cache-dit",
            "peer",
            f"cache-dit DBCache (F1B0, residual threshold {step_threshold:g}, 2 warm-up steps)"
            + (" via a BlockAdapter" if family == "sd3" else "")
            + ", Inductor",
            apply=lambda model, backend: _cache_dit(model, step_threshold, config.steps, backend),
        ),
    ]


class PeerCall:
    """A hook-based cache driven as a pipeline drives it: every call inside its cache context, its state reset
    when a generation starts (a timestep above the last one), and whether each call ran the tail recorded."""

    def __init__(self, module: Any, model: torch.nn.Module, context: Any, reset: Any, computed: Any) -> None:
        self.module, self.model = module, model
        self.context, self.reset, self.computed = context, reset, computed
        self.last: float | None = None
        self.ran_tail: list[bool] = []  #: per call of the latest generation

    def __call__(self, **kwargs: Any) -> Any:
        t = float(kwargs["timestep"].reshape(-1)[0])
        if self.last is not None and t > self.last:
            self.reset()
            self.ran_tail = []
        self.last = t
        with self.context():
            out = self.module(**kwargs)
        self.ran_tail.append(self.computed())
        return out


def _patch_sd3_last_block(model: torch.nn.Module) -> None:
    """Our workaround for diffusers' FirstBlockCache on SD3: its tail hook subtracts from the last block's
    ``encoder_hidden_states``, which a ``context_pre_only`` block returns as ``None``; return the input instead
    (SD3 discards it after the last block)."""
    last = model.transformer_blocks[-1]
    forward = last.forward

    def patched(hidden_states, encoder_hidden_states=None, temb=None, joint_attention_kwargs=None):
        context, hidden = forward(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            temb=temb,
            joint_attention_kwargs=joint_attention_kwargs,
        )
        return (encoder_hidden_states if context is None else context), hidden

    last.forward = patched


def _diffusers_context(model: torch.nn.Module) -> tuple[Any, Any]:
    from diffusers.models.cache_utils import CacheMixin

    return (lambda: CacheMixin.cache_context(model, "cond")), (lambda: CacheMixin._reset_stateful_cache(model))


def _diffusers_first_block_cache(
    model: torch.nn.Module, threshold: float, patch_last_block: bool, backend: str
) -> PeerCall:
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersFBC
    from diffusers.hooks import apply_first_block_cache

    if patch_last_block:
        _patch_sd3_last_block(model)
    apply_first_block_cache(model, DiffusersFBC(threshold=threshold))
    head = model.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook").state_manager
    context, reset = _diffusers_context(model)
    compiled = torch.compile(model, dynamic=False, backend=backend)
    return PeerCall(compiled, model, context, reset, lambda: bool(head._state_cache["cond"].should_compute))


def _diffusers_taylorseer(model: torch.nn.Module, backend: str) -> PeerCall:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    apply_taylorseer_cache(model, TaylorSeerCacheConfig())
    last = (
        model.single_transformer_blocks[-1]
        if hasattr(model, "single_transformer_blocks")
        else model.transformer_blocks[-1]
    )
    hook = last.attn._diffusers_hook.get_hook("taylorseer_cache").state_manager
    context, reset = _diffusers_context(model)

    def computed() -> bool:
        state = hook._state_cache["cond"]
        return bool(state.last_update_step == state.current_step)

    return PeerCall(torch.compile(model, dynamic=False, backend=backend), model, context, reset, computed)


def _cache_dit(model: torch.nn.Module, threshold: float, steps: int, backend: str) -> PeerCall:
    import contextlib

    import cache_dit  # optional: pip install cache-dit (not a dependency of ours)
    from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern

    logging.getLogger("cache_dit").setLevel(logging.WARNING)
    settings = DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2, residual_diff_threshold=threshold
    )
    if hasattr(model, "single_transformer_blocks"):  # Flux: cache-dit's own adapter
        cache_dit.enable_cache(model, cache_config=settings)
    else:  # SD3 is not in its registry: a BlockAdapter over the joint blocks
        blocks, pattern = model.transformer_blocks, ForwardPattern.Pattern_1
        cache_dit.enable_cache(
            BlockAdapter(transformer=model, blocks=blocks, forward_pattern=pattern), cache_config=settings
        )
    calls = {"n": 0}

    def computed() -> bool:
        calls["n"] += 1
        cached = cache_dit.summary(model, logging=False)[0].cached_steps or []
        return calls["n"] - 1 not in cached

    def reset() -> None:
        cache_dit.refresh_context(model, num_inference_steps=steps)
        calls["n"] = 0

    return PeerCall(
        torch.compile(model, dynamic=False, backend=backend), model, contextlib.nullcontext, reset, computed
    )


@dataclass
class VariantPoint:
    """One variant's measurements (all variants timed in the same rounds)."""

    name: str
    description: str
    median_s: float
    speedup_vs_inductor: float
    speedup_vs_eager: float
    flop_ratio: float | None  #: full model over this variant, over the generation (``None`` for a peer)
    merged_steps: int | None
    unmerged_steps: int | None
    skipped_steps: int | None
    psnr_db: float
    cosine: float
    runs: int
    build_s: float
    peak_rss_mib: float | None
    state_mib: float  #: what the variant carries between steps beyond ``li`` (cache fusion, step cache), MiB
    engines: list[str] = field(default_factory=list)  #: the engine of each step (``skip`` for skipped steps)
    image_psnr_db: float | None = None
    ssim: float | None = None


@dataclass
class VariantComparison:
    """Every variant of one comparison run, what did not run and why, and where it ran."""

    model: str
    latent: int
    steps: int
    engine: str
    points: list[VariantPoint]
    not_run: dict[str, str]  #: variant -> why it did not run (the error)
    machine: MachineInfo
    command: str | None = None
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path: str | Path) -> VariantComparison:
        """Read a ``variants.json`` back (to re-render its table and picture)."""
        data = json.loads(Path(path).read_text())
        points = [VariantPoint(**point) for point in data.pop("points")]
        machine = MachineInfo.from_dict(data.pop("machine"))
        return cls(points=points, machine=machine, **data)

    @property
    def pixel_space(self) -> bool:
        return any(point.image_psnr_db is not None for point in self.points)


def calibrate_adaptive_threshold(workload: Workload, config: BenchConfig, sdtm: SDTMConfig) -> float:
    """The SDTM* threshold whose expected mean ratio is the fixed schedule's, from the unmodified generation.

    Hooks the first block's ``norm1`` during one unmodified generation to read its plan input each step, then picks,
    among the scores seen, the threshold for which ``mean_s round(0.75 * fraction_{s-1})`` (step 0 from the CRA
    schedule, as the dispatcher does) is closest to the fixed schedule's mean bucket. ``li`` is 0 there (no merging
    ran), so the ``a_s`` term is absent: an approximation that the measured FLOP ratios then report.
    """
    scores: list[torch.Tensor] = []
    block = workload.model.transformer_blocks[0]
    handle = block.norm1.register_forward_hook(lambda module, args, out: scores.append(out[0].detach()))
    try:
        with torch.no_grad():
            workload.generate(workload.call_of(workload.model), config)
    finally:
        handle.remove()
    grid = workload.grid
    steps = config.steps
    fixed = [engine_key_at(position_at_step(s, steps), sdtm).bucket for s in range(steps)]
    target = statistics.mean(fixed)
    li = torch.zeros(scores[0].shape[:2], dtype=torch.int32)
    candidates = torch.linspace(-0.2, 1.0, 121).tolist()
    best, best_gap = candidates[0], float("inf")
    for threshold in candidates:
        fractions = [float(window_score_fraction(x, li, *grid, 0.0, threshold).min()) for x in scores]
        picked = [fixed[0]] + [round_to_bucket(0.75 * f, sdtm.buckets) for f in fractions[:-1]]
        gap = abs(statistics.mean(picked) - target)
        if gap < best_gap:
            best, best_gap = threshold, gap
    logger.info(
        "SDTM* threshold %.3f: expected mean ratio within %.3f of the fixed schedule's %.3f", best, best_gap, target
    )
    return round(best, 3)


def _state_mib(spec: VariantSpec, compiled_graph: Any) -> float:
    """MiB carried between steps besides ``li`` (the engine contract's other carried state, e.g. the fusion cache),
    plus the step cache's two residuals ``[B, N, C]`` per call."""
    if compiled_graph is None or isinstance(compiled_graph, PeerCall):
        return 0.0

    def nbytes(tensor: Any) -> int:
        return math.prod(tensor.shape) * tensor.dtype.itemsize

    signature = compiled_graph.signature
    total = sum(nbytes(t) for t in signature.inputs[1:])
    if "hidden" in signature:
        total += 2 * nbytes(signature["hidden"])
    return total / 2**20


def _plain_backend(config: BenchConfig) -> str:
    """The baseline's and the peers' torch.compile backend: Inductor, except in a test run of eager engines
    (Dynamo's eager backend: no Inductor build; its "speed-ups" then compare eager code with eager code)."""
    return "inductor" if config.engine == "inductor" else "eager"


def _build_and_time(
    phase: str,
    specs: list[VariantSpec],
    workload: Workload,
    config: BenchConfig,
    engine_cache: Path | None,
    not_run: dict[str, str],
) -> list[tuple[VariantSpec, Any, float, Variant, dict[str, float]]]:
    """Compile ``specs`` (a variant that fails goes to ``not_run``), then time them round-robin. Returns per variant
    ``(spec, compiled graph or peer call, build seconds, timings, median seconds of every variant of the phase)``."""
    from ..compiler.backend import SDTMBackend

    torch._dynamo.reset()
    built: list[tuple[VariantSpec, Any, float]] = []
    variants: list[Variant] = []
    for number, spec in enumerate(specs, 1):
        logger.info("[%s %d/%d] %s: compiling ...", phase, number, len(specs), spec.name)
        start = time.perf_counter()
        compiled_graph = None
        try:
            if spec.kind == "eager":
                module = workload.model
            elif spec.kind == "inductor":
                module = torch.compile(workload.model, dynamic=False, backend=_plain_backend(config))
            elif spec.kind == "peer":
                import copy

                module = spec.apply(copy.deepcopy(workload.model), _plain_backend(config))  # type: ignore[misc]
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
            if spec.kind == "sdtm":
                compiled_graph = backend.compiled[-1]
        except Exception as err:  # a peer that breaks on this model: reported, not dropped
            not_run[spec.name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            logger.warning("%s does not run on %s: %s", spec.name, config.model, not_run[spec.name])
            continue
        built.append((spec, module if spec.kind == "peer" else compiled_graph, time.perf_counter() - start))
        variants.append(Variant(spec.name, workload.call_of(module)))
    with torch.no_grad():
        timed_rounds(variants, workload, dataclasses.replace(config, warmup=1), config.sweep_runs, phase)
    torch._dynamo.reset()
    seconds = {v.name: statistics.median(v.seconds) for v in variants}
    return [(spec, graph, build_s, variant, seconds) for (spec, graph, build_s), variant in zip(built, variants)]


def _unpatched_first_block_cache_error(workload: Workload, threshold: float) -> str:
    """What diffusers' FirstBlockCache does on an SD3 model as it ships (one eager call)."""
    import copy

    model = copy.deepcopy(workload.model)
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersFBC
    from diffusers.hooks import apply_first_block_cache

    apply_first_block_cache(model, DiffusersFBC(threshold=threshold))
    context, _ = _diffusers_context(model)
    try:
        with torch.no_grad(), context():
            model(**workload.probe, return_dict=False)
    except Exception as err:
        return (
            f"{type(err).__name__}: {str(err).splitlines()[0][:300]} (diffusers' FBCBlockHook on SD3's last, "
            "context_pre_only block, which returns encoder_hidden_states=None)"
        )
    return "ran (no error)"


def _steps(compiled_graph: Any, steps: int) -> list[Any]:
    return [r for r in compiled_graph.dispatcher.history if r.new_step][-steps:]


def run_variant_comparison(
    config: BenchConfig,
    step_threshold: float = 0.1,
    command: str | None = None,
    only: tuple[str, ...] | None = None,
) -> VariantComparison:
    """Compile and time every variant of :func:`variant_specs` on ``config.model``; write ``variants.json``,
    ``variants.md`` and ``variants.png`` to ``config.out_dir``."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    workload = make_workload(config)
    started = time.perf_counter()
    sdtm = dataclasses.replace(config.sdtm, buckets=BUCKETS)
    threshold = calibrate_adaptive_threshold(workload, config, sdtm) if workload.family == "sd3" else None
    with torch.no_grad():
        unmodified = workload.generate(workload.call_of(workload.model), config)
    specs = variant_specs(config, workload.family, threshold, step_threshold)
    if only is not None:  # the baselines always run: every speed-up is taken against them
        specs = [spec for spec in specs if spec.kind in ("eager", "inductor") or spec.name in only]
    graphs = CapturedBucketGraphs(workload.model, workload.probe)
    full_flops = graphs.flops(FULL, sdtm).total
    not_run: dict[str, str] = {}
    # Two phases, each timed round-robin beside its own eager and Inductor runs: ours, then the peers. A hook-based
    # peer compiles the model's frames piecewise, which would disturb our compiled models in the same Dynamo cache.
    ours = [spec for spec in specs if spec.kind != "peer"]
    peers = [spec for spec in specs if spec.kind in ("eager", "inductor", "peer")]
    measured: list[tuple[VariantSpec, Any, float, Variant, dict[str, float]]] = []
    with (
        tempfile.TemporaryDirectory(prefix="sdtm_variants_") as scratch,
        compiler_caches(config.cold_caches, Path(scratch)) as engine_cache,
    ):
        for phase, phase_specs in (("ours", ours), ("peers", peers)):
            if phase == "peers" and not any(spec.kind == "peer" for spec in phase_specs):
                continue  # no peer asked for (``only``): the baselines were timed with ours
            measured += _build_and_time(phase, phase_specs, workload, config, engine_cache, not_run)
            if phase == "peers" and any(spec.name == "diffusers-fbcache" for spec, *_ in measured):
                not_run["diffusers-fbcache (unpatched)"] = _unpatched_first_block_cache_error(workload, step_threshold)
    seen: set[str] = set()
    points = []
    for spec, compiled_graph, build_s, variant, seconds in measured:
        if spec.name in seen:  # the peers' phase times eager and Inductor again, as their reference only
            continue
        seen.add(spec.name)
        steps = _steps(compiled_graph, config.steps) if spec.kind == "sdtm" else []
        flops = None
        merged = unmerged = skipped = None
        engines: list[str] = []
        if steps:
            skipped = sum(r.skipped for r in steps)
            unmerged = sum(r.key == FULL and not r.skipped for r in steps)
            merged = len(steps) - skipped - unmerged
            step_flops = [
                full_flops / workload.num_blocks if r.skipped else graphs.flops(r.key, sdtm).total for r in steps
            ]
            flops = full_flops * len(steps) / sum(step_flops)
            engines = ["skip" if r.skipped else str(r.key) for r in steps]
        elif spec.kind in ("eager", "inductor"):
            flops, merged, unmerged, skipped = 1.0, 0, config.steps, 0
        elif isinstance(compiled_graph, PeerCall):
            ran = compiled_graph.ran_tail[-config.steps :]
            merged, unmerged, skipped = 0, sum(ran), len(ran) - sum(ran)
            engines = ["full" if r else "skip" for r in ran]
        assert variant.latent is not None
        image = _image_fidelity(variant.latent, unmodified) if workload.pixel_space else {}
        points.append(
            VariantPoint(
                name=spec.name,
                description=spec.description,
                median_s=seconds[spec.name],  # speed-ups: against the eager and Inductor runs of the same phase
                speedup_vs_inductor=seconds[BASELINE] / seconds[spec.name],
                speedup_vs_eager=seconds["eager"] / seconds[spec.name],
                flop_ratio=flops,
                merged_steps=merged,
                unmerged_steps=unmerged,
                skipped_steps=skipped,
                runs=len(variant.seconds),
                build_s=build_s,
                peak_rss_mib=variant.peak_rss_mib,
                state_mib=_state_mib(spec, compiled_graph),
                engines=engines,
                **_fidelity(variant.latent, unmodified),
                **image,
            )
        )
    result = VariantComparison(
        model=config.model,
        latent=config.latent_side,
        steps=config.steps,  # type: ignore[arg-type]
        engine=config.engine,
        points=points,
        not_run=not_run,
        machine=machine_info(),
        command=command,
        wall_time_s=time.perf_counter() - started,
    )
    render_variants(result, out)
    return result


def variants_markdown(result: VariantComparison) -> str:
    """The table of every variant, and the variants that did not run with their errors."""
    image = result.pixel_space
    header = (
        "| variant | s / gen | vs Inductor | vs eager | FLOP ratio | steps merged / full / skipped | state | PSNR |"
    )
    rule = "|---|---|---|---|---|---|---|---|"
    if image:
        header += " image PSNR | SSIM |"
        rule += "---|---|"
    lines = [
        f"{result.model}, {result.latent}x{result.latent} latent, {result.steps} steps, `{result.engine}` engines "
        f"({result.machine.cores} cores); every variant timed in the same rounds, median of "
        f"{result.points[0].runs if result.points else 0} after a warm-up. Fidelity: final latent vs the unmodified "
        "model's (same seed).",
        "",
        header,
        rule,
    ]
    for p in result.points:
        steps = "-" if p.merged_steps is None else f"{p.merged_steps} / {p.unmerged_steps} / {p.skipped_steps}"
        flops = "-" if p.flop_ratio is None else f"{p.flop_ratio:.2f}x"
        psnr = "exact" if p.psnr_db == float("inf") else f"{p.psnr_db:.1f} dB"
        row = (
            f"| {p.name} | {p.median_s:.2f} | {p.speedup_vs_inductor:.2f}x | {p.speedup_vs_eager:.2f}x | {flops} | "
            f"{steps} | {p.state_mib:.1f} MiB | {psnr} |"
        )
        if image:
            row += f" {p.image_psnr_db:.2f} dB | {p.ssim:.3f} |" if p.ssim is not None else " - | - |"
        lines.append(row)
    lines.append("")
    lines += [f"- **{p.name}**: {p.description}" for p in result.points]
    for name, error in result.not_run.items():
        lines.append(f"- **{name}** did not run on this model: `{error}`")
    return "\n".join(lines) + "\n"


def render_variants(result: VariantComparison, out: Path) -> None:
    """``variants.json``, ``variants.md`` and ``variants.png`` (speed-up over Inductor against fidelity)."""
    (out / "variants.json").write_text(json.dumps(result.to_dict(), indent=2, default=float))
    (out / "variants.md").write_text(variants_markdown(result))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in result.points:
        fidelity = p.image_psnr_db if result.pixel_space else p.psnr_db
        if fidelity is None or fidelity > 100:  # the unmodified model up to float rounding (eager, Inductor)
            continue
        ax.scatter(p.speedup_vs_inductor, fidelity, s=40)
        ax.annotate(p.name, (p.speedup_vs_inductor, fidelity), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("speed-up over Inductor (same rounds)")
    ax.set_ylabel("image PSNR vs unmodified (dB)" if result.pixel_space else "latent PSNR vs unmodified (dB)")
    ax.set_title(f"{result.model}: merging, its variants and step caches ({result.steps} steps)", fontsize=10)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")  # Inductor (and every variant that equals the model: not drawn)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "variants.png", dpi=120)
    plt.close(fig)
