"""The method comparison: SDTM, ToMeSD, SiTo and ToMA on one model, one machine, one compiler, in one run.

``sdtm-compile bench --methods sdtm,tomesd,sito,toma --sweep 0.3,0.5,0.7`` compiles every (method, ratio) point
with the ``sdtm`` backend (the same passes and engines for every method) and times it beside a fresh round of the
plain Inductor baseline, like a sweep point of the main benchmark. Per point: speed-up over Inductor, the FLOP
ratio (full model over merged, summed over the generation's steps), the fraction of it the speed-up keeps
(``speed-up / FLOP ratio``), and fidelity of the final latent against the unmodified model's (PSNR, cosine; on
the trained testbed also image PSNR and SSIM). Out come ``methods.json``, ``methods.md`` and ``methods.png``
(speed-up against fidelity, a curve per method).

The same ratio means different things per method (SDTM's is the centre of its CRA schedule and its detail stage
merges only the feed-forward; ToMeSD and SiTo reduce the attention only; ToMA the attention and the Flux single
blocks' MLP), which is why the FLOP ratio is reported beside it: compare methods at equal speed-up or equal FLOPs,
not at equal ratio. Every method runs with its authors' defaults; nothing is tuned here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._pyplot import pyplot
from ..core.config import METHOD_CONFIGS, MethodConfig
from ..core.schedule import FULL
from ..methods.sdtm.config import SDTMConfig
from .config import BASELINE, BenchConfig
from .harness import Compiled, compiler_caches
from .instrument import CapturedBucketGraphs
from .result import MachineInfo, _fidelity, _image_fidelity, machine_info
from .run import Variant, _steps_of, timed_rounds
from .workload import make_workload

__all__ = [
    "method_names",
    "MethodPoint",
    "MethodComparison",
    "method_config",
    "run_method_comparison",
    "render_comparison",
    "comparison_markdown",
    "update_readme_methods",
]

logger = logging.getLogger("sdtm_compile.bench")


def method_names() -> tuple[str, ...]:
    """Every registered method's name (``--methods`` takes any of them; a new method module adds its own)."""
    import sdtm_compile.methods  # noqa: F401  (registers every method's config)

    return tuple(METHOD_CONFIGS)


def method_config(name: str, ratio: float, sdtm: SDTMConfig | None = None) -> MethodConfig:
    """The config of method ``name`` at ``ratio`` with its authors' defaults otherwise (SDTM: ``sdtm``'s settings
    with the deviation shrunk where ``ratio`` +- deviation would leave [0, 0.75], as the main bench's sweep)."""
    if name not in method_names():
        raise ValueError(f"unknown method {name!r} in --methods: choose from {', '.join(method_names())}")
    if name == "sdtm":
        base = sdtm or SDTMConfig()
        deviation = max(0.0, min(base.deviation, ratio, 0.75 - ratio))
        return dataclasses.replace(base, ratio=ratio, deviation=round(deviation, 6))
    return METHOD_CONFIGS[name](ratio=ratio)


@dataclass
class MethodPoint:
    """One (method, ratio) point, timed beside the Inductor baseline in the same rounds."""

    method: str
    ratio: float
    config: dict[str, Any]  #: the method's config (``to_dict``)
    engines: list[str]  #: the engine of each step of the last generation
    median_s: float  #: seconds per generation (median)
    baseline_median_s: float  #: the Inductor baseline's, in the same rounds
    speedup_vs_inductor: float
    flop_ratio: float  #: FLOPs of the unmodified generation over this one's
    flop_ratio_kept: float  #: speed-up / FLOP ratio: how much of the FLOP cut the engines turn into time
    psnr_db: float  #: final latent vs the unmodified model's (eager)
    cosine: float
    runs: int
    build_s: float  #: compile time of the point (Dynamo capture, rewrite, engine builds)
    image_psnr_db: float | None = None  #: pixel-space models (the testbed): final image vs the unmodified one's
    ssim: float | None = None


@dataclass
class MethodComparison:
    """Every point of one comparison run, with what was run and where."""

    model: str
    latent: int
    steps: int
    engine: str
    points: list[MethodPoint]
    machine: MachineInfo
    command: str | None = None
    wall_time_s: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodComparison:
        values = dict(data)
        values["points"] = [MethodPoint(**point) for point in data["points"]]
        values["machine"] = MachineInfo.from_dict(data["machine"])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> MethodComparison:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def pixel_space(self) -> bool:
        return any(point.image_psnr_db is not None for point in self.points)


def run_method_comparison(
    config: BenchConfig, methods: tuple[str, ...], ratios: tuple[float, ...], command: str | None = None
) -> MethodComparison:
    """Time and measure every (method, ratio) point on ``config.model``; write the report to ``config.out_dir``.

    ``config``: the model, steps, guidance, ``sweep_runs`` (timed generations per point), ``warmup``, ``engine``,
    ``cold_caches``, ``seed``. Each point compiles afresh (``torch._dynamo.reset()``) next to a recompiled baseline,
    so no point inherits another's Dynamo cache entries; both are timed round-robin after one warm-up generation.
    """
    configs = [(name, ratio, method_config(name, ratio, config.sdtm)) for name in methods for ratio in ratios]
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    full_flops = graphs.flops(FULL, configs[0][2]).total
    points = []
    with (
        tempfile.TemporaryDirectory(prefix="sdtm_methods_") as scratch,
        compiler_caches(config.cold_caches, Path(scratch)) as engine_cache,
    ):
        for number, (name, ratio, method) in enumerate(configs, 1):
            logger.info("[%d/%d] %s at ratio %g: compiling ...", number, len(configs), name, ratio)
            torch._dynamo.reset()
            baseline = Compiled(workload.model, None, config.engine, workload.probe, engine_cache)
            compiled = Compiled(workload.model, method, config.engine, workload.probe, engine_cache)
            variants = [
                Variant(BASELINE, workload.call_of(baseline.module)),
                Variant(f"{name}@{ratio:g}", workload.call_of(compiled.module)),
            ]
            with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
                timed_rounds(variants, workload, dataclasses.replace(config, warmup=1), config.sweep_runs, name)
            points.append(
                _point(name, ratio, method, compiled, variants, graphs, full_flops, unmodified, workload, config.steps)
            )
            logger.info(
                "[%d/%d] %s at ratio %g: %.2fx over Inductor, FLOP ratio %.2fx, PSNR %.2f dB",
                number,
                len(configs),
                name,
                ratio,
                points[-1].speedup_vs_inductor,
                points[-1].flop_ratio,
                points[-1].psnr_db,
            )
        torch._dynamo.reset()
    result = MethodComparison(
        model=config.model,
        latent=config.latent_side,
        steps=config.steps,  # type: ignore[arg-type]
        engine=config.engine,
        points=points,
        machine=machine_info(),
        command=command,
        wall_time_s=time.perf_counter() - started,
    )
    render_comparison(result, out)
    return result


def _point(
    name: str,
    ratio: float,
    method: MethodConfig,
    compiled: Compiled,
    variants: list[Variant],
    graphs: CapturedBucketGraphs,
    full_flops: int,
    unmodified: torch.Tensor,
    workload: Any,
    num_steps: int,
) -> MethodPoint:
    baseline, point = variants
    steps = _steps_of(compiled.compiled_graph, num_steps)  # the engine of each step of the last generation
    step_flops = [graphs.flops(step["key"], method).total for step in steps]
    speedup = statistics.median(baseline.seconds) / statistics.median(point.seconds)
    flop_ratio = full_flops * len(step_flops) / sum(step_flops)
    assert point.latent is not None
    image = _image_fidelity(point.latent, unmodified) if workload.pixel_space else {}
    return MethodPoint(
        method=name,
        ratio=ratio,
        config=method.to_dict(),
        engines=[str(step["key"]) for step in steps],
        median_s=statistics.median(point.seconds),
        baseline_median_s=statistics.median(baseline.seconds),
        speedup_vs_inductor=speedup,
        flop_ratio=flop_ratio,
        flop_ratio_kept=speedup / flop_ratio,
        runs=len(point.seconds),
        build_s=compiled.build_s,
        **_fidelity(point.latent, unmodified),
        **image,
    )


def comparison_markdown(result: MethodComparison) -> str:
    """The comparison table and who is on the speed/fidelity front, computed from the points."""
    image = result.pixel_space
    header = "| method | ratio | s / gen | speed-up vs Inductor | FLOP ratio | kept | PSNR | cosine |"
    rule = "|---|---|---|---|---|---|---|---|"
    if image:
        header += " image PSNR | SSIM |"
        rule += "---|---|"
    lines = [
        f"{result.model}, {result.latent}x{result.latent} latent, {result.steps} steps, `{result.engine}` engines "
        f"({result.machine.cores} cores); every point timed beside a fresh Inductor baseline, median of "
        f"{result.points[0].runs if result.points else 0} after a warm-up.",
        "",
        header,
        rule,
    ]
    for p in result.points:
        row = (
            f"| {p.method} | {p.ratio:g} | {p.median_s:.2f} | {p.speedup_vs_inductor:.2f}x | {p.flop_ratio:.2f}x "
            f"| {p.flop_ratio_kept:.0%} | {p.psnr_db:.1f} dB | {p.cosine:.4f} |"
        )
        if image:
            row += f" {p.image_psnr_db:.2f} dB | {p.ssim:.3f} |"
        lines.append(row)
    front = pareto_front(result)
    lines += [
        "",
        "On the speed / fidelity front (no other point is both faster and closer to the unmodified model): "
        + ", ".join(
            f"{p.method}@{p.ratio:g} ({p.speedup_vs_inductor:.2f}x, {_quality(p, image):.1f} dB)" for p in front
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def _quality(point: MethodPoint, image: bool) -> float:
    return point.image_psnr_db if image and point.image_psnr_db is not None else point.psnr_db


def pareto_front(result: MethodComparison) -> list[MethodPoint]:
    """Points no other point beats on both speed-up and fidelity (image PSNR on the testbed), fastest first."""
    image = result.pixel_space
    front = [
        p
        for p in result.points
        if not any(
            q.speedup_vs_inductor >= p.speedup_vs_inductor
            and _quality(q, image) >= _quality(p, image)
            and (q.speedup_vs_inductor, _quality(q, image)) != (p.speedup_vs_inductor, _quality(p, image))
            for q in result.points
        )
    ]
    return sorted(front, key=lambda p: -p.speedup_vs_inductor)


def plot_methods(result: MethodComparison, path: str | Path) -> str:
    """Speed-up over Inductor against fidelity, one curve per method, each point labelled with its ratio."""
    plt = pyplot()
    image = result.pixel_space
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(p.method for p in result.points):
        points = sorted((p for p in result.points if p.method == name), key=lambda p: p.ratio)
        xs = [_quality(p, image) for p in points]
        ys = [p.speedup_vs_inductor for p in points]
        ax.plot(xs, ys, marker="o", label=name)
        for p, x, y in zip(points, xs, ys):
            ax.annotate(f"{p.ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("image PSNR vs unmodified model (dB)" if image else "latent PSNR vs unmodified model (dB)")
    ax.set_ylabel("speed-up over Inductor")
    ax.set_title(f"{result.model}: speed-up vs fidelity per method (labels: ratio)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def render_comparison(result: MethodComparison, out_dir: str | Path) -> dict[str, str]:
    """Write ``methods.json``, ``methods.md`` and ``methods.png`` to ``out_dir``; record them in ``result.files``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.files = {"json": "methods.json", "markdown": "methods.md", "plot": "methods.png"}
    plot_methods(result, out / "methods.png")
    (out / "methods.md").write_text(comparison_markdown(result))
    (out / "methods.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    return result.files


def readme_markers(model: str) -> tuple[str, str]:
    """The README block of a comparison on ``model``: ``<!-- bench-methods-MODEL:start/end -->``."""
    return f"<!-- bench-methods-{model}:start -->", f"<!-- bench-methods-{model}:end -->"


def update_readme_methods(readme: str | Path, result: MethodComparison, out_dir: str | Path) -> None:
    """Replace the README's comparison block for ``result.model`` with the table and the plot."""
    import os

    readme = Path(readme)
    text = readme.read_text()
    start, end = readme_markers(result.model)
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} block to replace")
    picture = (Path(os.path.relpath(out_dir, readme.parent)) / result.files["plot"]).as_posix()
    block = (
        f"{start}\n`{result.command or 'sdtm-compile bench --methods ...'}` ({result.wall_time_s / 60:.0f} min):\n\n"
        f"{comparison_markdown(result)}\n![methods]({picture})\n{end}"
    )
    head, rest = text.split(start, 1)
    readme.write_text(head + block + rest.split(end, 1)[1])
