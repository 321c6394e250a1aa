"""Models by name (the CLI's and the benchmark's ``--model``): :data:`MODEL_PRESETS` and :func:`build_model`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .specs import (
    FLUX_1024,
    FLUX_DEV,
    FLUX_SCHNELL,
    SD3_MEDIUM,
    SD3M_1024,
    SD3M_4096,
    SD35_LARGE,
    SD35_MEDIUM,
    TESTBED,
    TESTBED12,
    TINY_FLUX,
    TINY_SD3,
    TINY_SD35,
    FluxSpec,
    TinySpec,
    tiny_flux_transformer,
    tiny_sd3_transformer,
)
from .testbed.model import load_testbed

__all__ = ["ModelPreset", "MODEL_PRESETS", "build_model"]


@dataclass(frozen=True)
class ModelPreset:
    """A named model built from config and the latent side it runs at (image side / 8)."""

    spec: TinySpec | FluxSpec
    latent: int
    description: str
    steps: int = 28  #: sampling steps of a benchmark generation (SD3: 28; FLUX.1-dev: 20)
    guidance_scale: float = 7.0  #: SD3: CFG scale; Flux: the embedded (distilled) guidance
    real: bool = False  #: a published architecture at full size (build it truncated with ``layers`` on a CPU)


#: Models the CLI and the benchmark know by name.
MODEL_PRESETS: dict[str, ModelPreset] = {
    "tiny-sd3": ModelPreset(TINY_SD3, 64, "tiny SD3 (2 blocks, hidden 32)"),
    "tiny-sd35": ModelPreset(TINY_SD35, 64, "tiny SD3.5 (3 blocks, dual attention, RMS q/k norm)"),
    "sd3m-1024": ModelPreset(SD3M_1024, 64, "SD3-medium's block proportions at 1024^2, scaled: 6 blocks, hidden 384"),
    "sd3m-4096": ModelPreset(SD3M_4096, 128, "SD3-medium's blocks at 1024^2: 2 blocks, hidden 1536"),
    "testbed-1024": ModelPreset(
        TESTBED,
        64,
        "trained testbed: SD3 architecture in pixel space, 64x64 RGB (1024 tokens), 4 blocks, hidden 192",
        guidance_scale=3.0,
    ),
    "testbed12-1024": ModelPreset(
        TESTBED12,
        64,
        "trained deep testbed: testbed-1024 with 12 blocks (SD3-medium's depth / 2), hidden 192",
        guidance_scale=3.0,
    ),
    "tiny-flux": ModelPreset(
        TINY_FLUX, 32, "tiny FLUX.1-dev layout (2 double + 2 single blocks, hidden 32)", steps=20, guidance_scale=3.5
    ),
    "flux-1024": ModelPreset(
        FLUX_1024,
        64,
        "FLUX.1-dev's proportions at 1024^2, scaled: 2 double + 4 single blocks, hidden 768",
        steps=20,
        guidance_scale=3.5,
    ),
    # Published architectures (random weights): 1024^2 images by default; --layers keeps the first k blocks.
    "sd3-medium": ModelPreset(SD3_MEDIUM, 128, "SD3-medium: 24 blocks, hidden 1536, 2.0 B parameters", real=True),
    "sd3.5-medium": ModelPreset(
        SD35_MEDIUM, 128, "SD3.5-medium: 24 blocks (dual attention in 0-12), hidden 1536, 2.2 B parameters", real=True
    ),
    "sd3.5-large": ModelPreset(
        SD35_LARGE, 128, "SD3.5-large: 38 blocks, hidden 2432, 8.1 B parameters", guidance_scale=3.5, real=True
    ),
    "flux-dev": ModelPreset(
        FLUX_DEV,
        128,
        "FLUX.1-dev: 19 double + 38 single blocks, hidden 3072, 11.9 B parameters",
        steps=28,
        guidance_scale=3.5,
        real=True,
    ),
    "flux-schnell": ModelPreset(
        FLUX_SCHNELL,
        128,
        "FLUX.1-schnell: FLUX.1-dev without guidance embedding, 4 steps",
        steps=4,
        guidance_scale=0.0,
        real=True,
    ),
}


def build_model(
    spec: TinySpec | FluxSpec, seed: int = 0, dtype: torch.dtype = torch.float32, layers: int | None = None
):
    """The diffusers transformer of ``spec`` (SD3 or Flux) in ``dtype``: its shipped trained weights when it has some
    (``spec.weights``; ``seed`` is then unused), else seeded random weights created in ``dtype``. ``layers``: keep
    only the first ``layers`` blocks (Flux: double-stream blocks first), e.g. to run a real architecture on a CPU."""
    if layers is not None:
        if isinstance(spec, TinySpec) and spec.weights is not None:
            raise ValueError("layers: a model with trained weights is built whole")
        spec = spec.truncated(layers)
    if isinstance(spec, TinySpec) and spec.weights is not None:
        return load_testbed(dtype=dtype, name=spec.weights).transformer
    if isinstance(spec, FluxSpec):
        return tiny_flux_transformer(spec, seed, dtype)
    return tiny_sd3_transformer(spec, seed, dtype)
