"""What the method tests share: one config per method, the model cases, and each case's Dynamo capture (made once
per test process: a capture costs ~3 s and every parity test of a case reuses it)."""

import functools

from sdtm_compile import SiToConfig, ToMAConfig, ToMeSDConfig
from sdtm_compile.core.config import DEFAULT_BUCKETS
from sdtm_compile.core.schedule import EngineKey, Stage
from sdtm_compile.models import (
    TINY_FLUX_SCHNELL,
    TINY_SD3,
    TINY_SD35,
    example_inputs,
    flux_example_inputs,
    tiny_flux_transformer,
    tiny_sd3_transformer,
)
from tests.helpers import capture_dynamo_graph

#: One config per method, defaults except where a test needs the feed-forward merged too (the Flux single blocks'
#: MLP branch: split proj_out with a merged input) - ToMA merges it by default.
METHODS = {
    "tomesd": ToMeSDConfig(),
    "tomesd-mlp": ToMeSDConfig(merge_mlp=True, use_rand=False),
    "sito": SiToConfig(prune_mlp_flag=True),
    "toma": ToMAConfig(),
}
EVERY_BUCKET = [EngineKey(Stage.MERGE, b) for b in DEFAULT_BUCKETS]
HALF = [EngineKey(Stage.MERGE, 0.5)]
#: (family, spec, batch, latent (SD3: latent side; Flux: unpacked side), keys) per case, and the cases each method
#: runs: every bucket on SD3.5 (attn2; 16x16 grid, batch 2), one bucket on a non-square batch-1 SD3 grid and on
#: Flux (double + single blocks, 12x12 grid). The eager engine costs ~1 s per bucket graph here; CI's budget
#: is why the buckets are not multiplied by every case.
CASES = {
    "sd35-b2-32x32": ("sd3", TINY_SD35, 2, (32, 32), EVERY_BUCKET),
    "sd3-b1-24x40": ("sd3", TINY_SD3, 1, (24, 40), HALF),
    "flux-b2-24x24": ("flux", TINY_FLUX_SCHNELL, 2, (24, 24), HALF),
}
PARITY = [(name, case) for name in ("tomesd", "sito", "toma") for case in CASES] + [("tomesd-mlp", "flux-b2-24x24")]


def model_and_inputs(family, spec, batch, latent):
    """A tiny model of ``spec`` (seeded) and its example inputs."""
    if family == "flux":
        return tiny_flux_transformer(spec, seed=1), flux_example_inputs(spec, batch, latent)
    return tiny_sd3_transformer(spec, seed=1), example_inputs(spec, batch, latent)


@functools.cache
def captured(case: str):
    """``(model, inputs, gm, flat)`` of a case of :data:`CASES` (captured once per process)."""
    family, spec, batch, latent, _ = CASES[case]
    model, inputs = model_and_inputs(family, spec, batch, latent)
    gm, flat = capture_dynamo_graph(model, inputs)
    return model, inputs, gm, flat
