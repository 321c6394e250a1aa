"""What a benchmark run measures and how: :class:`BenchConfig` (validated on construction) and the main variants.

The main variants, in table order: ``eager`` (the unmodified model op by op), ``inductor`` (the unmodified model
under ``torch.compile``, the baseline every speed-up is taken against), ``sdtm`` (the method through the ``sdtm``
backend) and ``reference`` (the method through the eager reference, the same algorithm).
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from .. import methods as _methods  # noqa: F401  (registers every method's config by name)
from ..core.config import DEFAULT_METHOD, METHOD_CONFIGS, MethodConfig, config_from_dict
from ..core.method import method_for
from ..models import MODEL_PRESETS, ModelPreset

__all__ = [
    "BASELINE",
    "BenchConfig",
    "FIDELITY_REFERENCE",
    "RESULTS_DIR",
    "VARIANTS",
    "variant_description",
]

#: The dtypes a benchmark runs in.
DTYPES = ("float32", "bfloat16", "float16")
#: The main variants every benchmark runs, in table order.
VARIANTS = ("eager", "inductor", "sdtm", "reference")
#: The variant every speed-up is taken against.
BASELINE = "inductor"
#: The variant whose final latent every fidelity number (PSNR, cosine) is measured against.
FIDELITY_REFERENCE = "eager"
#: Where result pages go (one folder per page, and ``index.md`` listing them), relative to the working directory.
RESULTS_DIR = "docs/results"


def variant_description(name: str, method_description: str) -> str:
    """What the main variant ``name`` is, in a line (``method_description``: the method's ``describe()``)."""
    return {
        "eager": "the model, uncompiled: op by op",
        "inductor": "the model under torch.compile (Inductor): the baseline",
        "sdtm": f"{method_description}, through the sdtm backend",
        "reference": f"{method_description}, in the eager reference",
    }.get(name, name)


def _default_method() -> MethodConfig:
    """The default method's config with its defaults."""
    return METHOD_CONFIGS[DEFAULT_METHOD]()


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark and how (every field is validated on construction).

    Attributes:
        model: a name of :data:`~sdtm_compile.models.MODEL_PRESETS` (``sd3m-1024`` is the benchmark model).
        method: the token-reduction method's config of the main measurement (a ``MethodConfig``, or its
            ``to_dict()``); SDTM with its defaults unless given.
        latent: latent side (image side / 8); ``None`` takes the preset's.
        layers: keep only the model's first ``layers`` blocks (a real architecture on a CPU); ``None``: all.
        dtype: the model's and the generation's dtype: ``float32``, ``bfloat16`` or ``float16`` (the weights are
            created in it).
        steps: sampling steps per generation; ``None``: the preset's (SD3 28, FLUX.1-dev 20).
        guidance_scale: SD3: classifier-free guidance scale (every step is one batch-2 call); Flux: the
            distilled guidance the model embeds (one batch-1 call per step). ``None``: the preset's (7.0 / 3.5).
        runs: timed generations per variant (after ``warmup``); the median is reported.
        warmup: untimed generations per variant before timing.
        sweep: ratios for the speed-up vs fidelity curve (besides ``method.ratio``); ``()`` for none.
        sweep_runs: timed generations per sweep point (and of the baseline beside it); also per point of a method
            or variant comparison.
        engine: engines of the ``sdtm`` backend: ``"inductor"`` (the product) or ``"eager"`` (fast, for tests: the
            ``inductor`` baseline is then compiled with Dynamo's eager backend too, so no Inductor build runs).
        cold_caches: measure compile time cold, in a fresh Inductor and engine cache for this run; ``False``
            uses the caches in place (faster repeats; the "cold" number is then whatever they held).
        merge_map_blocks: blocks whose merges the merge-map picture shows.
        quality_seeds: pixel-space models (the trained testbed): seeds of the paired PSNR / SSIM of final images
            (``sdtm`` vs ``eager``), starting at ``seed``.
        quality_sigmas: pixel-space models: noise levels of the held-out loss, merged vs unmerged.
        seed: seed of the model weights, the noise and the prompt embeddings.
        results_dir: the folder of result pages (:mod:`~sdtm_compile.bench.pages`): a page goes into a folder
            under it named by date, model and kind, and its ``index.md`` lists every page.
        out_dir: the page's folder instead of the one under ``results_dir`` (the index is then updated only when
            the folder is directly under ``results_dir``).
        sdtm: the old name of ``method`` (still accepted when building a config).
    """

    model: str = "sd3m-1024"
    method: MethodConfig = field(default_factory=_default_method)
    latent: int | None = None
    layers: int | None = None
    dtype: str = "float32"
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
    results_dir: str = RESULTS_DIR
    out_dir: str | None = None
    sdtm: InitVar[MethodConfig | dict[str, Any] | None] = None

    def __post_init__(self, sdtm: MethodConfig | dict[str, Any] | None) -> None:
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"unknown model {self.model!r}: choose one of {sorted(MODEL_PRESETS)}")
        if sdtm is not None:
            object.__setattr__(self, "method", sdtm)
        if isinstance(self.method, dict):
            object.__setattr__(self, "method", config_from_dict(self.method))
        if self.steps is None:
            object.__setattr__(self, "steps", self.preset.steps)
        if self.guidance_scale is None:
            object.__setattr__(self, "guidance_scale", self.preset.guidance_scale)
        object.__setattr__(self, "sweep", tuple(float(r) for r in self.sweep))
        object.__setattr__(self, "quality_sigmas", tuple(float(s) for s in self.quality_sigmas))
        checks = [
            (self.latent is None or (self.latent >= 4 and self.latent % 2 == 0), "latent", "an even side >= 4"),
            (self.steps >= 2, "steps", ">= 2"),
            (self.dtype in DTYPES, "dtype", f"one of {', '.join(DTYPES)}"),
            (
                self.layers is None or 1 <= self.layers <= self.preset.spec.num_blocks,
                "layers",
                f"1..{self.preset.spec.num_blocks} (the model's blocks)",
            ),
            (
                self.layers is None or getattr(self.preset.spec, "weights", None) is None,
                "layers",
                "None for a model with trained weights",
            ),
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
        layers = self.layers or MODEL_PRESETS[self.model].spec.num_blocks
        if any(not 0 <= b < layers for b in self.merge_map_blocks):
            raise ValueError(f"merge_map_blocks {self.merge_map_blocks} must be block indices below {layers}")

    def sweep_config(self, ratio: float) -> MethodConfig:
        """``method`` at another ratio (the method narrows what the ratio bounds: :meth:`TokenMethod.with_ratio`)."""
        return method_for(self.method).with_ratio(ratio)

    @property
    def preset(self) -> ModelPreset:
        """The model preset named by ``model``."""
        return MODEL_PRESETS[self.model]

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``."""
        return getattr(torch, self.dtype)

    @property
    def latent_side(self) -> int:
        """The latent side in use: ``latent`` or the preset's."""
        return self.latent if self.latent is not None else self.preset.latent
