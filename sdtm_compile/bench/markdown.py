"""The tables of a report, in markdown: :func:`markdown_report` for every kind of run.

Every kind shows its points in one table layout (:func:`points_table`): a column per measured quantity, shown when
some point has it. Around it each kind says what it ran; the benchmark adds its notes on FLOPs, the merge ops' time,
the targets, the sweep (the same table) and the image measures; a method comparison, the speed / fidelity front; a
variant comparison, what each variant is and what could not run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .assemble import FIDELITY_TARGET, REFERENCE_SPEED_TARGET, SPEEDUP_TARGET
from .measures import pareto_front
from .record import Measurement
from .report import BenchReport, as_report

__all__ = ["markdown_report", "points_table"]


def _fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``n/a`` for ``None``."""
    return "n/a" if value is None else format(value, spec)


def _flops(value: float) -> str:
    """``69.0 G``, ``1.93 T``, ``12.3 M``: FLOPs with an SI prefix."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.0f}"


def _steps(p: Measurement) -> str | None:
    """``merged / full / skipped`` steps, or ``None`` where not counted."""
    if p.merged_steps is None:
        return None
    return f"{p.merged_steps} / {p.unmerged_steps} / {p.skipped_steps}"


def _memory(p: Measurement) -> str | None:
    """Peak resident MiB and, in brackets, how far it rose during a generation; ``None`` where not measured."""
    if p.peak_rss_mib is None:
        return None
    return f"{p.peak_rss_mib:,.0f} (+{_fmt(p.peak_above_start_mib, ',.0f')})"


def _spread(p: Measurement) -> str | None:
    """``min-max (spread%)`` of the timed generations, or ``None`` where they were not kept."""
    if p.min_s is None or p.max_s is None or p.spread_pct is None:
        return None
    return f"{p.min_s:.2f}-{p.max_s:.2f} ({p.spread_pct:.1f}%)"


def _number(name: str, spec: str, suffix: str = "") -> Callable[[Measurement], str | None]:
    """A cell reader: the point's field ``name`` formatted with ``spec`` and ``suffix`` (``None`` stays ``None``)."""

    def cell(p: Measurement) -> str | None:
        value = getattr(p, name)
        return None if value is None else format(value, spec) + suffix

    return cell


#: The columns of :func:`points_table`, in order: header and how a point's cell reads (``None``: not measured).
COLUMNS: list[tuple[str, Callable[[Measurement], str | None]]] = [
    ("s / generation (median)", _number("median_s", ".2f")),
    ("spread", _spread),
    ("speed-up vs Inductor", _number("speedup_vs_inductor", ".2f", "x")),
    ("vs eager", _number("speedup_vs_eager", ".2f", "x")),
    ("FLOPs / generation", lambda p: None if p.flops_per_generation is None else _flops(p.flops_per_generation)),
    ("FLOP ratio", _number("flop_ratio", ".2f", "x")),
    ("speed-up / FLOP ratio", _number("speedup_over_flop_ratio", ".2f")),
    ("steps merged / full / skipped", _steps),
    ("PSNR dB", _number("psnr_db", ".2f")),
    ("cosine", _number("cosine", ".6f")),
    ("image PSNR dB", _number("image_psnr_db", ".2f")),
    ("SSIM", _number("ssim", ".4f")),
    ("peak RSS MiB (+ during generation)", _memory),
    ("state MiB", _number("state_mib", ".1f")),
    ("compile cold s", _number("build_cold_s", ".1f")),
    ("compile s", _number("build_s", ".1f")),
    ("runs", lambda p: str(p.runs) if p.runs else None),
]


def points_table(points: Sequence[Measurement], first: str = "variant") -> list[str]:
    """The markdown table of ``points``: the name (header ``first``), then every column of :data:`COLUMNS` that some
    point has (a point without it shows ``-``)."""
    cells = [[cell(p) for _, cell in COLUMNS] for p in points]
    shown = [i for i in range(len(COLUMNS)) if any(row[i] is not None for row in cells)]
    lines = [
        "| " + " | ".join([first, *(COLUMNS[i][0] for i in shown)]) + " |",
        "|---" * (1 + len(shown)) + "|",
    ]
    for p, row in zip(points, cells):
        lines.append("| " + " | ".join([p.name, *(row[i] or "-" for i in shown)]) + " |")
    return lines


def markdown_report(result: BenchReport | Mapping[str, Any]) -> str:
    """The tables of a report (any kind; a dict, e.g. a loaded JSON file of any layout, is read first)."""
    report = as_report(result)
    lines = {"bench": _bench_lines, "methods": _methods_lines, "variants": _variants_lines}[report.kind](report)
    return "\n".join(lines) + "\n"


def _calls(report: BenchReport) -> str:
    """How a generation calls the transformer (the model family's pipeline loop)."""
    if report.model.flux:
        return f"batch 1 (guidance-distilled, guidance {report.settings.guidance_scale:g} embedded)"
    return "CFG batch 2"


def _bench_lines(report: BenchReport) -> list[str]:
    """The benchmark's lines: what ran, the main table, notes, merge-op share, targets, sweep, image measures."""
    model, settings = report.model, report.settings
    lines = [
        f"Model `{model.name}`: {model.description}; {model.image_tokens} image + {model.text_tokens} text tokens, "
        f"hidden {model.hidden}. {settings.steps} steps, {_calls(report)}, {report.method_description}, `sdtm` "
        f"engines: {settings.engine}. Median of {settings.runs} runs after {settings.warmup} warm-up, every variant "
        "in the same rounds.",
        "",
        *points_table(report.points),
        "",
        "PSNR and cosine: final latent against `eager` with the same seed (inf = identical). FLOPs: "
        "`FlopCounterMode` on each step's bucket graph, attention included, element-wise work not counted."
        + (
            f" Linear layers alone (attention excluded, the paper's W-MACs): FLOP ratio "
            f"{report.flops.linear_ratio:.2f}x."
            if report.flops is not None and report.flops.linear_ratio is not None
            else ""
        ),
    ]
    if report.merge_time_share is not None:
        share = report.merge_time_share.generation
        lines += [
            "",
            f"Merge ops (bucket graphs run op by op): plan {100 * share['plan_share']:.1f}%, merge "
            f"{100 * share['merge_share']:.1f}%, unmerge {100 * share['unmerge_share']:.1f}% of a generation's "
            "transformer time.",
        ]
    if report.targets:
        lines += _target_lines(report)
    if report.sweep:
        lines += [
            "",
            f"The ratio sweep: each point timed beside a fresh round of `inductor`, median of "
            f"{settings.sweep_runs} runs after a warm-up (the main ratio: the main rounds).",
            "",
            *points_table(report.sweep, first="point"),
        ]
    if report.quality is not None:
        lines += _quality_lines(report)
    return lines


def _target_lines(report: BenchReport) -> list[str]:
    """The targets' table."""
    t1, t2, t3 = (report.targets[name] for name in (SPEEDUP_TARGET, REFERENCE_SPEED_TARGET, FIDELITY_TARGET))
    m1, m2, m3 = t1.measured, t2.measured, t3.measured
    flop_ratio = report.point("sdtm").flop_ratio
    return [
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| `sdtm` speed-up >= 0.9 x its FLOP ratio | {m1['speedup']:.2f}x vs 0.9 x {flop_ratio:.2f} = "
        f"{m1['target']:.2f}x ({m1['fraction_of_flop_ratio']:.2f} of the FLOP ratio) | {'yes' if t1.met else 'no'} |",
        f"| `sdtm` faster than the eager reference | {m2['sdtm_median_s']:.2f} s vs {m2['reference_median_s']:.2f} s "
        f"({m2['speedup']:.2f}x) | {'yes' if t2.met else 'no'} |",
        f"| `sdtm` fidelity = reference's | PSNR {_fmt(m3['sdtm_psnr_db'], '.2f')} vs "
        f"{_fmt(m3['reference_psnr_db'], '.2f')} dB; `sdtm` vs reference {_fmt(m3['sdtm_vs_reference_psnr_db'], '.1f')}"
        f" dB | {'yes' if t3.met else 'no'} |",
    ]


def _quality_lines(report: BenchReport) -> list[str]:
    """The image measures of a pixel-space model (the trained testbed)."""
    quality = report.quality
    assert quality is not None
    lines = [
        "",
        f"Image measures (the model works in pixel space, so the final latent is the image): the `sdtm` backend's "
        f"final image vs `eager`'s with the same seed, over {len(quality.seeds)} seeds: PSNR "
        f"{_fmt(quality.psnr_db_mean, '.2f')} dB mean ({_fmt(quality.psnr_db_min, '.2f')} worst), SSIM "
        f"{quality.ssim_mean:.4f} mean ({quality.ssim_min:.4f} worst).",
        "",
        "| seed | PSNR dB | SSIM |",
        "|---|---|---|",
        *(f"| {row.seed} | {_fmt(row.psnr_db, '.2f')} | {row.ssim:.4f} |" for row in quality.seeds),
        "",
        "Held-out flow-matching loss at fixed (x0, eps, sigma), unmodified vs merged (eager reference, a fresh "
        "generation's engine at that sigma):",
        "",
        "| sigma | engine | loss unmerged | loss merged | increase |",
        "|---|---|---|---|---|",
    ]
    for row in quality.losses:
        lines.append(
            f"| {row['sigma']:g} | {row['engine']} | {row['unmerged']:.4f} | {row['merged']:.4f} | "
            f"{row['increase']:+.4f} ({100 * row['increase'] / row['unmerged']:+.1f}%) |"
        )
    return lines


def _comparison_intro(report: BenchReport, what: str) -> str:
    """The sentence above a comparison's table: the model, steps, engines, how it was timed (``what``)."""
    model, settings = report.model, report.settings
    return (
        f"{model.name}, {model.latent}x{model.latent} latent, {settings.steps} steps, `{settings.engine}` engines; "
        f"{what}, median of {settings.sweep_runs} runs after a warm-up. Fidelity: the final latent against the "
        "unmodified model's (same seed)."
    )


def _methods_lines(report: BenchReport) -> list[str]:
    """A method comparison's lines: what ran, the table, the speed / fidelity front."""
    image = report.pixel_space
    front = pareto_front(report.points, image)
    return [
        _comparison_intro(report, "every point timed beside a fresh Inductor baseline")
        + " The same ratio means different things per method: compare at equal speed-up or equal FLOPs.",
        "",
        *points_table(report.points, first="method@ratio"),
        "",
        "On the speed / fidelity front (no other point is both faster and closer to the unmodified model): "
        + ", ".join(f"{p.name} ({p.speedup_vs_inductor:.2f}x, {p.fidelity(image):.1f} dB)" for p in front)
        + ".",
    ]


def _variants_lines(report: BenchReport) -> list[str]:
    """A variant comparison's lines: what ran, the table, what each variant is and what did not run."""
    lines = [
        _comparison_intro(report, "every variant timed in the same rounds"),
        "",
        *points_table(report.points),
        "",
        *(f"- **{p.name}**: {p.description}" for p in report.points),
    ]
    lines += [f"- **{name}** did not run on this model: `{error}`" for name, error in report.not_run.items()]
    return lines
