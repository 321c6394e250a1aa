"""What is computed from a timed thing, the same way for every kind of run: :func:`measure` makes its
:class:`~sdtm_compile.bench.record.Measurement`.

* time: the median of the timed generations (``timing_fields``); a speed-up is a baseline's median over this
  median, both timed in the same rounds;
* FLOPs: the FLOPs of each step's engine (``FlopCounterMode`` on its bucket graph, :mod:`~sdtm_compile.bench.flops`)
  summed over the generation; the FLOP ratio is the unmodified model's generation over that sum;
* fidelity: the final latent against the unmodified model's (PSNR, cosine), and on a pixel-space model the final
  image too (PSNR with peak 1, SSIM).

:func:`pareto_front` picks the points no other point beats on both speed and fidelity.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from ..models.sampling import cosine_similarity, psnr
from .record import Measurement
from .timing import TimedCall

__all__ = ["fidelity", "flop_ratio", "measure", "pareto_front", "timing_fields"]


def timing_fields(seconds: list[float]) -> dict[str, Any]:
    """The timed generations, their count, median, min, max and spread (max - min, % of the median)."""
    median = statistics.median(seconds)
    return {
        "seconds": list(seconds),
        "median_s": median,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "spread_pct": 100.0 * (max(seconds) - min(seconds)) / median,
        "runs": len(seconds),
    }


def fidelity(latent: torch.Tensor, reference: torch.Tensor, pixel_space: bool) -> dict[str, float]:
    """PSNR (dB) and cosine similarity of a final latent against the reference's; with ``pixel_space`` (the latent is
    the image) also the image PSNR (peak 1) and SSIM."""
    values = {"psnr_db": psnr(latent, reference), "cosine": cosine_similarity(latent, reference)}
    if pixel_space:
        from ..models.testbed.quality import image_psnr, image_ssim  # scikit-image: only for pixel-space models

        values.update(image_psnr_db=image_psnr(latent, reference), ssim=image_ssim(latent, reference))
    return values


def flop_ratio(full_per_step: float, step_flops: Sequence[float]) -> float:
    """The unmodified model's FLOPs over a generation whose steps took ``step_flops``."""
    return full_per_step * len(step_flops) / sum(step_flops)


def measure(
    timed: TimedCall,
    reference: torch.Tensor,
    pixel_space: bool,
    baseline_s: float,
    *,
    eager_s: float | None = None,
    step_flops: Sequence[float] | None = None,
    full_per_step: int | None = None,
    **fields: Any,
) -> Measurement:
    """The measurement of ``timed`` after its timed rounds.

    Args:
        reference: the unmodified model's final latent (the fidelity reference).
        pixel_space: the final latent is an image (the testbed): image PSNR and SSIM are added.
        baseline_s: the Inductor baseline's median in the same rounds (``speedup_vs_inductor``).
        eager_s: eager's median in the same rounds, where eager was timed (``speedup_vs_eager``).
        step_flops: FLOPs of each step of the generation, with ``full_per_step`` those of an unmodified step
            (the FLOP fields); ``None`` where not counted (a peer's cache hook).
        fields: the other :class:`Measurement` fields (``description``, ``config``, ``engines``, ...).
    """
    assert timed.latent is not None, f"{timed.name} was never run"
    median = statistics.median(timed.seconds)
    speedup = baseline_s / median
    flop_fields: dict[str, Any] = {}
    if step_flops is not None and full_per_step is not None:
        ratio = flop_ratio(full_per_step, step_flops)
        flop_fields = {
            "flops_per_generation": int(round(sum(step_flops))),
            "flop_ratio": ratio,
            "speedup_over_flop_ratio": speedup / ratio,
        }
    return Measurement(
        name=timed.name,
        **timing_fields(timed.seconds),
        speedup_vs_inductor=speedup,
        speedup_vs_eager=None if eager_s is None else eager_s / median,
        **flop_fields,
        **fidelity(timed.latent, reference, pixel_space),
        build_cold_s=timed.build_cold_s,
        build_s=timed.build_s,
        peak_rss_mib=timed.peak_rss_mib,
        peak_above_start_mib=timed.peak_above_start_mib,
        deterministic=timed.deterministic,
        **fields,
    )


def pareto_front(points: Sequence[Measurement], image: bool) -> list[Measurement]:
    """The points no other point beats on both speed-up over Inductor and fidelity (image PSNR with ``image``, else
    latent PSNR), fastest first; points without both numbers are left out."""
    ranked = [p for p in points if p.speedup_vs_inductor is not None and p.fidelity(image) is not None]

    def score(p: Measurement) -> tuple[float, float]:
        return p.speedup_vs_inductor, p.fidelity(image)  # type: ignore[return-value]

    def beaten(p: Measurement) -> bool:
        (speed, quality) = score(p)
        return any(s >= speed and q >= quality and (s, q) != (speed, quality) for s, q in map(score, ranked))

    return sorted((p for p in ranked if not beaten(p)), key=lambda p: -score(p)[0])
