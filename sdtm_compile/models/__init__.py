"""The models we test and measure on: diffusers transformers built from config (real architectures, random
weights, no downloads), the trained testbed, and the sampling loops of the SD3 and Flux pipelines.

* :mod:`.specs`: the model specs and their builders (``tiny_sd3_transformer``, ``tiny_flux_transformer``, inputs);
* :mod:`.presets`: models by name (:data:`MODEL_PRESETS`, :func:`build_model`);
* :mod:`.sampling`: flow-matching Euler loops as the pipelines run them (CFG for SD3, guidance-distilled Flux);
* :mod:`.testbed`: a small SD3 in pixel space trained on images that ship with scikit-image / scikit-learn.
"""

from .presets import MODEL_PRESETS, ModelPreset, build_model
from .specs import (
    FLUX_1024,
    SD3M_1024,
    SD3M_4096,
    TESTBED,
    TESTBED12,
    TINY_FLUX,
    TINY_FLUX_SCHNELL,
    TINY_SD3,
    TINY_SD35,
    FluxSpec,
    TinySpec,
    example_inputs,
    flux_example_inputs,
    flux_image_ids,
    tiny_flux_transformer,
    tiny_sd3_transformer,
)

__all__ = [
    "FLUX_1024",
    "MODEL_PRESETS",
    "SD3M_1024",
    "SD3M_4096",
    "TESTBED",
    "TESTBED12",
    "TINY_FLUX",
    "TINY_FLUX_SCHNELL",
    "TINY_SD3",
    "TINY_SD35",
    "FluxSpec",
    "ModelPreset",
    "TinySpec",
    "build_model",
    "example_inputs",
    "flux_example_inputs",
    "flux_image_ids",
    "tiny_flux_transformer",
    "tiny_sd3_transformer",
]
