"""Pictures of a benchmark result: the per-step schedule, speed-up vs fidelity, and merge maps.

Each function takes a benchmark result as a dict (:meth:`sdtm_compile.bench.BenchResult.to_dict`, or a loaded
``bench.json``; and, for merge maps, the recorded plans), writes one PNG and returns its path. matplotlib is
needed (``pip install 'sdtm-compile[examples]'``) and runs headless (Agg).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._pyplot import pyplot

__all__ = ["plot_schedule", "plot_speedup_vs_fidelity", "plot_merge_maps", "merge_map_steps"]

_STAGE_COLORS = {"structure": "#4C72B0", "detail": "#DD8452", "full": "#999999"}


def plot_schedule(result: dict[str, Any], path: str | Path) -> str:
    """Image tokens through attention and FF per step, stage as background colour, bucket per step."""
    plt = pyplot()
    steps = result["schedule"]
    n = result["model"]["image_tokens"]
    edges = [s["step"] - 0.5 for s in steps] + [steps[-1]["step"] + 0.5]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for s in steps:
        ax.axvspan(s["step"] - 0.5, s["step"] + 0.5, color=_STAGE_COLORS[s["stage"]], alpha=0.15, lw=0)
    ax.stairs([s["attention_tokens"] for s in steps], edges, color="#1f3b73", lw=2, label="attention")
    ax.stairs([s["ff_tokens"] for s in steps], edges, color="#a0451b", lw=2, ls="--", label="feed-forward")
    ax.axhline(n, color="black", lw=0.8, ls=":", label=f"unmerged ({n})")
    for s in steps:
        ax.annotate(
            f"{s['bucket']:g}",
            (s["step"], s["ff_tokens"]),
            textcoords="offset points",
            xytext=(0, -12),
            ha="center",
            fontsize=7,
            color="#444444",
        )
    ax.set_xlabel("sampling step")
    ax.set_ylabel("image tokens per block")
    ax.set_ylim(0, n * 1.08)
    ax.set_xlim(-0.5, len(steps) - 0.5)
    ax.set_xticks([s["step"] for s in steps][:: max(1, len(steps) // 14)])
    handles, labels = ax.get_legend_handles_labels()
    from matplotlib.patches import Patch

    handles += [Patch(color=_STAGE_COLORS[k], alpha=0.3) for k in ("structure", "detail")]
    labels += ["structure stage (SSM)", "detail stage (IDM)"]
    ax.legend(handles, labels, loc="lower right", fontsize=8, ncol=2)
    config = result["sdtm"]
    ax.set_title(
        f"SDTM schedule: ratio {config['ratio']}, deviation {config['deviation']}, switch at {config['switch_at']} "
        f"({result['model']['name']}, {len(steps)} steps; numbers = ratio bucket)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_speedup_vs_fidelity(result: dict[str, Any], path: str | Path) -> str:
    """Speed-up over the Inductor baseline against PSNR of the final latent, one point per swept ratio."""
    plt = pyplot()
    sweep = sorted(result["sweep"], key=lambda p: p["ratio"])
    # a pixel-space model (the trained testbed) has image PSNR: its final latent is the image
    image = all(p.get("image_psnr_db") is not None for p in sweep)
    measure = "image_psnr_db" if image else "psnr_db"
    finite = [p[measure] for p in sweep if p[measure] != float("inf")]
    cap = (max(finite) + 5.0) if finite else 60.0
    psnrs = [min(p[measure], cap) for p in sweep]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.plot(psnrs, [p["speedup_vs_inductor"] for p in sweep], "o-", color="#1f3b73", label="measured speed-up")
    ax.plot(psnrs, [p["flop_ratio"] for p in sweep], "s--", color="#999999", mfc="none", label="FLOP ratio (limit)")
    for p, y in zip(sweep, psnrs):
        label = f"r={p['ratio']:g}" + (f", SSIM {p['ssim']:.3f}" if image else "")
        ax.annotate(label, (y, p["speedup_vs_inductor"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    eager = result["variants"]["eager"]["speedup_vs_inductor"]
    ax.axhline(eager, color="#a0451b", lw=0.8, ls="-.", label=f"unmodified eager ({eager:.2f}x)")
    what = "image" if image else "latent"
    ax.set_xlabel(f"PSNR of the final {what} vs the unmerged model (dB, higher = closer)")
    ax.set_ylabel("speed-up over torch.compile (Inductor)")
    ax.set_title(f"SDTM speed vs fidelity ({result['model']['name']}, {result['bench']['steps']} steps)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


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
    the middle detail step, and the last."""
    steps = sorted(steps)
    if not steps:
        return []
    stage = {s["step"]: s["stage"] for s in schedule}
    structure = [s for s in steps if stage.get(s) == "structure"]
    detail = [s for s in steps if stage.get(s) == "detail"]
    middle = [detail[len(detail) // 2]] if detail else []
    return sorted({steps[0], *structure[-1:], *detail[:1], *middle, steps[-1]})


def plot_merge_maps(
    maps: dict[int, dict[int, torch.Tensor]],
    result: dict[str, Any],
    grid: tuple[int, int],
    path: str | Path,
    background: Any = None,
) -> str:
    """Which tokens were merged (same colour = averaged into one token) at a few steps, on the token grid.

    ``maps`` is ``{step: {block: slot [N]}}``; up to five steps are drawn, spread over the generation (the
    first, the last structure step, the first detail step, the middle and the last). ``background``: an image
    ``[H, W, 3]`` (uint8) to draw the maps on, e.g. the generated image of a pixel-space model; merged tokens
    are then tinted with their slot's colour and kept tokens left clear.
    """
    plt = pyplot()
    schedule = {s["step"]: s for s in result["schedule"]}
    chosen = merge_map_steps(list(maps), result["schedule"])
    if not chosen:
        raise ValueError("no merge was recorded: SDTM merged nothing in this generation")
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
            s = schedule[step]
            removed = slot.numel() - (int(slot.max()) + 1)
            ax.set_title(f"step {step}: {s['engine']}\nblock {block}, {removed} tokens merged away", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    kept = "clear" if background is not None else "grey"
    fig.suptitle(f"merge maps: tokens of one colour are averaged into one token ({kept} = kept as is)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
