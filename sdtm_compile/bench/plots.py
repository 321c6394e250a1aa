"""Pictures of a benchmark report: the per-step schedule, speed-up vs fidelity, merge maps, and the comparisons.

Each function takes a :class:`~sdtm_compile.bench.report.BenchReport` (or its dict, e.g. a loaded JSON file),
writes one PNG and returns its path. matplotlib is needed (``pip install 'sdtm-compile[examples]'``) and runs
headless (Agg).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._pyplot import pyplot
from .report import BenchReport, as_report

__all__ = [
    "merge_map_steps",
    "plot_merge_maps",
    "plot_methods",
    "plot_schedule",
    "plot_speedup_vs_fidelity",
    "plot_variants",
]

_STAGE_COLORS = {"structure": "#4C72B0", "detail": "#DD8452", "merge": "#55A868", "full": "#999999"}


def _save(fig: Any, path: str | Path, dpi: int = 110) -> str:
    """Save and close ``fig``; returns the path as a string."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return str(path)


def plot_schedule(result: BenchReport | Mapping[str, Any], path: str | Path) -> str:
    """Image tokens through attention and FF per step, stage as background colour, bucket per step; returns the
    PNG's path."""
    report = as_report(result)
    plt = pyplot()
    steps = report.schedule
    n = report.model.image_tokens
    edges = [s.step - 0.5 for s in steps] + [steps[-1].step + 0.5]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for s in steps:
        ax.axvspan(s.step - 0.5, s.step + 0.5, color=_STAGE_COLORS.get(s.stage, "#999999"), alpha=0.15, lw=0)
    ax.stairs([s.attention_tokens for s in steps], edges, color="#1f3b73", lw=2, label="attention")
    ax.stairs([s.ff_tokens for s in steps], edges, color="#a0451b", lw=2, ls="--", label="feed-forward")
    ax.axhline(n, color="black", lw=0.8, ls=":", label=f"unmerged ({n})")
    for s in steps:
        offset = {"textcoords": "offset points", "xytext": (0, -12), "ha": "center", "fontsize": 7}
        ax.annotate(f"{s.bucket:g}", (s.step, s.ff_tokens), color="#444444", **offset)
    ax.set_xlabel("sampling step")
    ax.set_ylabel("image tokens per block")
    ax.set_ylim(0, n * 1.08)
    ax.set_xlim(-0.5, len(steps) - 0.5)
    ax.set_xticks([s.step for s in steps][:: max(1, len(steps) // 14)])
    handles, labels = ax.get_legend_handles_labels()
    from matplotlib.patches import Patch

    stages = [stage for stage in _STAGE_COLORS if stage != "full" and any(s.stage == stage for s in steps)]
    handles += [Patch(color=_STAGE_COLORS[stage], alpha=0.3) for stage in stages]
    labels += [f"{stage} stage" for stage in stages]
    ax.legend(handles, labels, loc="lower right", fontsize=8, ncol=2)
    ax.set_title(
        f"schedule: {report.method_description} ({report.model.name}, {len(steps)} steps; numbers = ratio bucket)"
    )
    return _save(fig, path)


def plot_speedup_vs_fidelity(result: BenchReport | Mapping[str, Any], path: str | Path) -> str:
    """Speed-up over the Inductor baseline against PSNR of the final latent, one point per swept ratio; returns the
    PNG's path."""
    report = as_report(result)
    plt = pyplot()
    sweep = sorted(report.sweep, key=lambda p: p.ratio)  # type: ignore[arg-type,return-value]
    # a pixel-space model (the trained testbed) has image PSNR: its final latent is the image
    image = all(p.image_psnr_db is not None for p in sweep)
    measures = [p.fidelity(image) for p in sweep]
    finite = [m for m in measures if m != float("inf")]
    cap = (max(finite) + 5.0) if finite else 60.0
    psnrs = [min(m, cap) for m in measures]  # type: ignore[type-var]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.plot(psnrs, [p.speedup_vs_inductor for p in sweep], "o-", color="#1f3b73", label="measured speed-up")
    ax.plot(psnrs, [p.flop_ratio for p in sweep], "s--", color="#999999", mfc="none", label="FLOP ratio (limit)")
    for p, y in zip(sweep, psnrs):
        label = f"r={p.ratio:g}" + (f", SSIM {p.ssim:.3f}" if image else "")
        ax.annotate(label, (y, p.speedup_vs_inductor), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    eager = report.point("eager").speedup_vs_inductor
    ax.axhline(eager, color="#a0451b", lw=0.8, ls="-.", label=f"unmodified eager ({eager:.2f}x)")
    what = "image" if image else "latent"
    ax.set_xlabel(f"PSNR of the final {what} vs the unmerged model (dB, higher = closer)")
    ax.set_ylabel("speed-up over torch.compile (Inductor)")
    name = (report.method or {}).get("method", "method")
    ax.set_title(f"{name} speed vs fidelity ({report.model.name}, {report.settings.steps} steps)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _merge_image(slot: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[H, W, 3]`` colours: tokens sharing a merged slot get one colour, unmerged tokens light grey."""
    counts = torch.bincount(slot, minlength=int(slot.max()) + 1)
    merged = counts[slot] > 1
    g = torch.Generator().manual_seed(0)
    palette = 0.15 + 0.75 * torch.rand(int(slot.max()) + 1, 3, generator=g)
    colours = torch.where(merged[:, None], palette[slot], torch.full((slot.numel(), 3), 0.93))
    return colours.reshape(grid[0], grid[1], 3)


def merge_map_steps(steps: list[int], schedule: list[dict[str, Any]]) -> list[int]:
    """Up to five of ``steps`` spread over a generation: the first, the last structure step, the first and
    the middle detail step, and the last (``schedule``: the report's schedule rows as dicts)."""
    steps = sorted(steps)
    if not steps:
        return []
    stage = {s["step"]: s["stage"] for s in schedule}
    structure = [s for s in steps if stage.get(s) == "structure"]
    detail = [s for s in steps if stage.get(s) == "detail"]
    middle = [detail[len(detail) // 2]] if detail else []
    return sorted({steps[0], *structure[-1:], *detail[:1], *middle, steps[-1]})


def plot_merge_maps(result: BenchReport | Mapping[str, Any], path: str | Path) -> str:
    """Which tokens were merged (same colour = averaged into one token) at a few steps, on the token grid.

    Draws the report's ``merge_maps`` (``{step: {block: slot [N]}}``): up to five steps spread over the generation
    (:func:`merge_map_steps`). On a pixel-space model the maps are drawn on its generated image (the image
    measures' ``image``): merged tokens tinted with their slot's colour, kept tokens left clear. Returns the PNG's
    path.
    """
    report = as_report(result)
    plt = pyplot()
    maps = {step: {b: torch.tensor(slot) for b, slot in blocks.items()} for step, blocks in report.merge_maps.items()}
    grid = (report.model.grid[0], report.model.grid[1])
    background = None if report.quality is None else np.asarray(report.quality.image, dtype=np.uint8)
    schedule = {s.step: s for s in report.schedule}
    chosen = merge_map_steps(list(maps), [s.to_dict() for s in report.schedule])
    if not chosen:
        raise ValueError("no merge was recorded: the method merged nothing in this generation")
    blocks = sorted({b for s in chosen for b in maps[s]})
    fig, axes = plt.subplots(len(blocks), len(chosen), figsize=(2.6 * len(chosen), 2.8 * len(blocks)), squeeze=False)
    for row, block in enumerate(blocks):
        for col, step in enumerate(chosen):
            ax = axes[row][col]
            slot = maps[step][block]
            if background is None:
                ax.imshow(_merge_image(slot, grid).numpy(), interpolation="nearest")
            else:
                merged = (torch.bincount(slot)[slot] > 1).reshape(grid).float()
                tint = torch.cat([_merge_image(slot, grid), 0.6 * merged[..., None]], dim=-1)
                extent = (0, grid[1], grid[0], 0)
                ax.imshow(background, extent=extent, interpolation="nearest")
                ax.imshow(tint.numpy(), extent=extent, interpolation="nearest")
            removed = slot.numel() - (int(slot.max()) + 1)
            title = f"step {step}: {schedule[step].engine}\nblock {block}, {removed} tokens merged away"
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    kept = "clear" if background is not None else "grey"
    fig.suptitle(f"merge maps: tokens of one colour are averaged into one token ({kept} = kept as is)", fontsize=9)
    return _save(fig, path)


def plot_methods(result: BenchReport | Mapping[str, Any], path: str | Path) -> str:
    """Speed-up over Inductor against fidelity, one curve per method, each point labelled with its ratio; returns the
    PNG's path."""
    report = as_report(result)
    plt = pyplot()
    image = report.pixel_space
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(p.method for p in report.points):
        points = sorted((p for p in report.points if p.method == name), key=lambda p: p.ratio)  # type: ignore[arg-type,return-value]
        xs = [p.fidelity(image) for p in points]
        ys = [p.speedup_vs_inductor for p in points]
        ax.plot(xs, ys, marker="o", label=name)
        for p, x, y in zip(points, xs, ys):
            ax.annotate(f"{p.ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("image PSNR vs unmodified model (dB)" if image else "latent PSNR vs unmodified model (dB)")
    ax.set_ylabel("speed-up over Inductor")
    ax.set_title(f"{report.model.name}: speed-up vs fidelity per method (labels: ratio)")
    ax.legend()
    return _save(fig, path, dpi=120)


def plot_variants(result: BenchReport | Mapping[str, Any], path: str | Path) -> str:
    """Speed-up over Inductor against fidelity, one labelled point per variant (the ones equal to the unmodified
    model up to float rounding, eager and Inductor, are left out: their PSNR is off the scale); returns the PNG's
    path."""
    report = as_report(result)
    plt = pyplot()
    image = report.pixel_space
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in report.points:
        quality = p.fidelity(image)
        if quality is None or quality > 100:
            continue
        ax.scatter(p.speedup_vs_inductor, quality, s=40)
        ax.annotate(p.name, (p.speedup_vs_inductor, quality), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("speed-up over Inductor (same rounds)")
    ax.set_ylabel("image PSNR vs unmodified (dB)" if image else "latent PSNR vs unmodified (dB)")
    ax.set_title(
        f"{report.model.name}: merging, its variants and step caches ({report.settings.steps} steps)", fontsize=10
    )
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")  # Inductor (and every variant that equals the model: not drawn)
    ax.grid(alpha=0.3)
    return _save(fig, path, dpi=120)
