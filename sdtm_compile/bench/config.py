"""What a benchmark run measures and how: :class:`BenchConfig` (validated on construction) and the variants.

The variants, in table order: ``eager`` (the unmodified model op by op), ``inductor`` (the unmodified model
under ``torch.compile``, the baseline every speed-up is taken against), ``sdtm`` (SDTM through the ``sdtm``
backend) and ``reference`` (SDTM through the eager reference, the same algorithm).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..methods.sdtm.config import SDTMConfig
from ..models import MODEL_PRESETS, ModelPreset

__all__ = ["BenchConfig", "VARIANTS", "BASELINE", "FIDELITY_REFERENCE"]

#: The variants every benchmark runs, in table order.
VARIANTS = ("eager", "inductor", "sdtm", "reference")
#: The variant every speed-up is taken against.
BASELINE = "inductor"
#: The variant whose final latent every fidelity number (PSNR, cosine) is measured against.
FIDELITY_REFERENCE = "eager"


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark and how (every field is validated on construction).

    Attributes:
        model: a name of :data:`~sdtm_compile.models.MODEL_PRESETS` (``sd3m-1024`` is the benchmark model).
        sdtm: the SDTM configuration of the main measurement (the defaults unless given).
        latent: latent side (image side / 8); ``None`` takes the preset's.
        steps: sampling steps per generation; ``None``: the preset's (SD3 28, FLUX.1-dev 20).
        guidance_scale: SD3: classifier-free guidance scale (every step is one batch-2 call); Flux: the
            distilled guidance the model embeds (one batch-1 call per step). ``None``: the preset's (7.0 / 3.5).
        runs: timed generations per variant (after ``warmup``); the median is reported.
        warmup: untimed generations per variant before timing.
        sweep: ratios for the speed-up vs fidelity curve (besides ``sdtm.ratio``); ``()`` for none.
        sweep_runs: timed generations per sweep point (and of the baseline beside it).
        engine: engines of the ``sdtm`` backend: ``"inductor"`` (the product) or ``"eager"`` (fast, for tests: the
            ``inductor`` baseline is then compiled with Dynamo's eager backend too, so no Inductor build runs).
        cold_caches: measure compile time cold, in a fresh Inductor and engine cache for this run; ``False``
            uses the caches in place (faster repeats; the "cold" number is then whatever they held).
        merge_map_blocks: blocks whose merges the merge-map picture shows.
        quality_seeds: pixel-space models (the trained testbed): seeds of the paired PSNR / SSIM of final images
            (``sdtm`` vs ``eager``), starting at ``seed``.
        quality_sigmas: pixel-space models: noise levels of the held-out loss, merged vs unmerged.
        seed: seed of the model weights, the noise and the prompt embeddings.
        out_dir: where the JSON, markdown and pictures go.
    """

    model: str = "sd3m-1024"
    sdtm: SDTMConfig = field(default_factory=SDTMConfig)
    latent: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    runs: int = 5
    warmup: int = 1
    sweep: tuple[float, ...] = (0.3, 0.4, 0.6, 0.7)
    sweep_runs: int = 3
    engine: str = "inductor"
    cold_caches: bool = True
    merge_map_blocks: tuple[int, ...] = (0,)
    quality_seeds: int = 4
    quality_sigmas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    seed: int = 0
    out_dir: str = "bench_out"

    def __post_init__(self) -> None:
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"unknown model {self.model!r}: choose one of {sorted(MODEL_PRESETS)}")
        if isinstance(self.sdtm, dict):
            object.__setattr__(self, "sdtm", SDTMConfig.from_dict(self.sdtm))
        if self.steps is None:
            object.__setattr__(self, "steps", self.preset.steps)
        if self.guidance_scale is None:
            object.__setattr__(self, "guidance_scale", self.preset.guidance_scale)
        object.__setattr__(self, "sweep", tuple(float(r) for r in self.sweep))
        object.__setattr__(self, "quality_sigmas", tuple(float(s) for s in self.quality_sigmas))
        checks = [
            (self.latent is None or (self.latent >= 4 and self.latent % 2 == 0), "latent", "an even side >= 4"),
            (self.steps >= 2, "steps", ">= 2"),
            (self.runs >= 1, "runs", ">= 1 (5 or more for a result worth reporting)"),
            (self.warmup >= 0, "warmup", ">= 0"),
            (self.sweep_runs >= 1, "sweep_runs", ">= 1"),
            (all(0.0 < r < 1.0 for r in self.sweep), "sweep", "ratios in (0, 1)"),
            (self.engine in ("inductor", "eager"), "engine", "'inductor' or 'eager'"),
            (self.guidance_scale >= 0, "guidance_scale", ">= 0"),
            (self.quality_seeds >= 1, "quality_seeds", ">= 1"),
            (all(0.0 < s <= 1.0 for s in self.quality_sigmas), "quality_sigmas", "noise levels in (0, 1]"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"BenchConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}")
        for ratio in self.sweep:
            self.sweep_config(ratio)  # an invalid sweep point fails now, not after an hour of timing
        layers = MODEL_PRESETS[self.model].spec.num_blocks
        if any(not 0 <= b < layers for b in self.merge_map_blocks):
            raise ValueError(f"merge_map_blocks {self.merge_map_blocks} must be block indices below {layers}")

    def sweep_config(self, ratio: float) -> SDTMConfig:
        """``sdtm`` at another ratio; the deviation shrinks where ``ratio`` +- deviation would leave [0, 0.75]."""
        deviation = max(0.0, min(self.sdtm.deviation, ratio, 0.75 - ratio))
        return dataclasses.replace(self.sdtm, ratio=ratio, deviation=round(deviation, 6))

    @property
    def preset(self) -> ModelPreset:
        """The model preset named by ``model``."""
        return MODEL_PRESETS[self.model]

    @property
    def latent_side(self) -> int:
        """The latent side in use: ``latent`` or the preset's."""
        return self.latent if self.latent is not None else self.preset.latent
