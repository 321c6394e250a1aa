"""Reporting: the markdown tables (:func:`markdown_report`) and the files of a result (:func:`render`).

:func:`render` writes ``bench.json`` (every number), ``bench.md`` (the tables) and three pictures drawn by
:mod:`sdtm_compile.plots`: ``schedule.png``, ``speedup_vs_fidelity.png`` and ``merge_maps.png``. Both take a
:class:`~sdtm_compile.bench.BenchResult` or its dict (a loaded ``bench.json``), so a saved result can be
re-rendered.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .result import FIDELITY_TARGET, REFERENCE_SPEED_TARGET, SPEEDUP_TARGET, BenchResult, as_bench_result

__all__ = ["markdown_report", "render"]


def render(result: BenchResult | dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write ``bench.json``, ``bench.md`` and the three PNGs of a result into ``out_dir``; returns the files.

    Also re-renders a saved result: ``render(json.load(open("bench.json")), "out/")``. The files are recorded
    in the result (``result.files``, or ``result["files"]`` of a dict) before ``bench.json`` is written.
    """
    from ..bench.plots import plot_merge_maps, plot_schedule, plot_speedup_vs_fidelity

    typed = as_bench_result(result)
    plain = typed.to_dict()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps = {
        step: {block: torch.tensor(slot) for block, slot in blocks.items()} for step, blocks in typed.merge_maps.items()
    }
    grid = tuple(typed.model.grid)
    background = None if typed.quality is None else np.asarray(typed.quality.image, dtype=np.uint8)
    files = {
        "json": "bench.json",
        "markdown": "bench.md",
        "schedule": Path(plot_schedule(plain, out / "schedule.png")).name,
        "speedup_vs_fidelity": Path(plot_speedup_vs_fidelity(plain, out / "speedup_vs_fidelity.png")).name,
        "merge_maps": Path(plot_merge_maps(maps, plain, grid, out / "merge_maps.png", background)).name,
    }
    typed.files = files
    if isinstance(result, dict):
        result["files"] = files
    (out / "bench.json").write_text(typed.to_json())
    (out / "bench.md").write_text(markdown_report(typed))
    return files


def _fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``n/a`` for ``None``."""
    return "n/a" if value is None else format(value, spec)


def _flops(value: float) -> str:
    """``69.0 G``, ``1.93 T``, ``12.3 M``: FLOPs with an SI prefix."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.0f}"


def _calls(model: Any, bench: Any) -> str:
    """How a generation calls the transformer (the model family's pipeline loop)."""
    if "num_single_layers" in model.spec:
        return f"batch 1 (guidance-distilled, guidance {bench.guidance_scale:g} embedded)"
    return "CFG batch 2"


def markdown_report(result: BenchResult | Mapping[str, Any]) -> str:
    """The tables of ``bench.md`` (and of the README's Results section) from a :func:`run_benchmark` result."""
    result = as_bench_result(result)
    model, bench, machine, sdtm = result.model, result.bench, result.machine, result.sdtm
    lines = [
        f"Model `{model.name}`: {model.description}; {model.image_tokens} image + {model.text_tokens} "
        f"text tokens, hidden {model.hidden}. {bench.steps} steps, {_calls(model, bench)}, SDTM ratio "
        f"{sdtm['ratio']} (deviation {sdtm['deviation']}), `sdtm` engines: {bench.engine}. "
        f"Median of {bench.runs} runs after {bench.warmup} warm-up. Machine: {machine.cpu}, "
        f"{machine.torch_threads} threads, torch {machine.torch}.",
        "",
        "| variant | s / generation (median) | spread | speed-up vs Inductor | FLOPs / generation | FLOP ratio "
        "| speed-up / FLOP ratio | PSNR dB | cosine | peak RSS MiB (+ during generation) | compile cold s "
        "| compile warm s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result.variants.items():
        lines.append(
            f"| {name} | {row.median_s:.2f} | {row.min_s:.2f}-{row.max_s:.2f} "
            f"({row.spread_pct:.1f}%) | {row.speedup_vs_inductor:.2f}x | "
            f"{_flops(row.flops_per_generation)} | {row.flop_ratio:.2f}x | "
            f"{row.speedup_over_flop_ratio:.2f} | {_fmt(row.psnr_db, '.2f')} | {row.cosine:.6f} | "
            f"{_fmt(row.peak_rss_mib, ',.0f')} (+{_fmt(row.peak_above_start_mib, ',.0f')}) | "
            f"{_fmt(row.build_cold_s, '.1f')} | "
            f"{_fmt(row.build_warm_s, '.1f')} |"
        )
    share = result.merge_time_share.generation
    t1, t2, t3 = (
        result.targets[SPEEDUP_TARGET],
        result.targets[REFERENCE_SPEED_TARGET],
        result.targets[FIDELITY_TARGET],
    )
    m1, m2, m3 = t1.measured, t2.measured, t3.measured
    lines += [
        "",
        "PSNR and cosine: final latent against `eager` with the same seed (inf = identical). FLOPs: "
        "`FlopCounterMode` on each step's bucket graph, attention included, element-wise work not counted."
        + (
            f" Linear layers alone (attention excluded, the paper's W-MACs): FLOP ratio "
            f"{result.flops.linear_ratio:.2f}x."
            if result.flops.linear_ratio is not None
            else ""
        ),
        "",
        f"Merge ops (bucket graphs run op by op): plan {100 * share['plan_share']:.1f}%, merge "
        f"{100 * share['merge_share']:.1f}%, unmerge {100 * share['unmerge_share']:.1f}% of a generation's "
        "transformer time.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| `sdtm` speed-up >= 0.9 x its FLOP ratio | {m1['speedup']:.2f}x vs 0.9 x "
        f"{result.variants['sdtm'].flop_ratio:.2f} = {m1['target']:.2f}x "
        f"({m1['fraction_of_flop_ratio']:.2f} of the FLOP ratio) | {'yes' if t1.met else 'no'} |",
        f"| `sdtm` faster than the eager reference | {m2['sdtm_median_s']:.2f} s vs {m2['reference_median_s']:.2f} s "
        f"({m2['speedup']:.2f}x) | {'yes' if t2.met else 'no'} |",
        f"| `sdtm` fidelity = reference's | PSNR {_fmt(m3['sdtm_psnr_db'], '.2f')} vs "
        f"{_fmt(m3['reference_psnr_db'], '.2f')} dB; `sdtm` vs reference {_fmt(m3['sdtm_vs_reference_psnr_db'], '.1f')}"
        f" dB | {'yes' if t3.met else 'no'} |",
    ]
    image = result.quality is not None
    if result.sweep:
        columns = "| ratio | speed-up vs Inductor | FLOP ratio | speed-up / FLOP ratio | PSNR dB | cosine | runs |"
        lines += ["", columns + (" image PSNR dB | SSIM |" if image else ""), "|---" * (7 + 2 * image) + "|"]
        for point in result.sweep:
            lines.append(
                f"| {point.ratio:g} | {point.speedup_vs_inductor:.2f}x | {point.flop_ratio:.2f}x | "
                f"{point.speedup_vs_inductor / point.flop_ratio:.2f} | {_fmt(point.psnr_db, '.2f')} | "
                f"{point.cosine:.6f} | {point.runs} |"
                + (f" {_fmt(point.image_psnr_db, '.2f')} | {_fmt(point.ssim, '.4f')} |" if image else "")
            )
    if result.quality is not None:
        lines += _quality_lines(result)
    return "\n".join(lines) + "\n"


def _quality_lines(result: BenchResult) -> list[str]:
    """The image measures of a pixel-space model (the trained testbed)."""
    quality = result.quality
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
