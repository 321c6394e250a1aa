"""Final latents of many configurations, to show that a change keeps every output (a refactor's check).

    python scripts/final_latents.py OUT.pt [--quick]       # record (--quick: the tiny models only)
    python scripts/final_latents.py --compare OLD.pt NEW.pt

Records one whole generation per case: every method and SDTM extension on tiny SD3.5 and tiny Flux through the
``sdtm`` backend with eager engines and through the eager reference, the first-block step cache, and the default
SDTM config with Inductor engines on ``sd3m-1024``, ``testbed-1024`` and ``flux-1024``. Each compiled case runs two
generations and says when they differ (Inductor may reorder float sums). ``--compare`` prints, per case, the largest
difference and the PSNR of the new latent against the old one.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from sdtm_compile import FirstBlockCacheConfig, SDTMBackend, SDTMConfig, SiToConfig, ToMAConfig, ToMeSDConfig
from sdtm_compile.models import MODEL_PRESETS, build_model
from sdtm_compile.models.sampling import (
    diffusers_call,
    flux_generate,
    generate,
    make_flux_generation_inputs,
    make_generation_inputs,
    psnr,
)
from sdtm_compile.models.testbed.model import load_testbed
from sdtm_compile.models.testbed.quality import generation_inputs
from sdtm_compile.reference import ReferenceTransformer


def _model_and_inputs(name: str, seed: int = 0):
    preset = MODEL_PRESETS[name]
    spec, latent = preset.spec, preset.latent
    if getattr(spec, "weights", None):
        testbed = load_testbed()
        return testbed.transformer, generation_inputs(testbed, seed, latent), preset
    model = build_model(spec, seed=0)
    if hasattr(spec, "num_single_layers"):
        return model, make_flux_generation_inputs(spec, (latent, latent), seed=seed), preset
    return model, make_generation_inputs(spec, (latent, latent), seed=seed), preset


def _generate(name: str, transformer) -> torch.Tensor:
    model, inputs, preset = _model_and_inputs(name)
    with torch.no_grad():
        if hasattr(preset.spec, "num_single_layers"):
            return flux_generate(transformer, inputs, num_steps=preset.steps)
        call = diffusers_call(transformer)
        return generate(call, inputs, num_steps=preset.steps, guidance_scale=preset.guidance_scale, shift=None)


def compiled(name: str, config, engine: str, step_cache=None) -> torch.Tensor:
    """Two generations through ``torch.compile(backend=SDTMBackend(...))``; the second's latent."""
    model, _, _ = _model_and_inputs(name)
    torch._dynamo.reset()
    options = {"method": config, "engine": engine, "cache_dir": False, "step_cache": step_cache}
    module = torch.compile(model, backend=SDTMBackend(options), dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = _generate(name, module)
        latent = _generate(name, module)
    if not torch.equal(first, latent):
        print(f"  {name}: two generations differ by {(first - latent).abs().max().item():.3g}", flush=True)
    return latent


def reference(name: str, config) -> torch.Tensor:
    model, _, _ = _model_and_inputs(name)
    return _generate(name, ReferenceTransformer(model, config))


def cases(quick: bool) -> dict:
    sdtm = SDTMConfig()
    sd3 = {
        "sdtm": sdtm,
        "fusion": dataclasses.replace(sdtm, cache_fusion=True),
        "adaptive": dataclasses.replace(sdtm, adaptive_threshold=0.3),
        "size_aware": dataclasses.replace(sdtm, size_aware_attention=True),
        "tomesd": ToMeSDConfig(),
        "sito": SiToConfig(),
        "toma": ToMAConfig(),
    }
    flux = {
        "sdtm": sdtm,
        "attn": dataclasses.replace(sdtm, merge_attention=True),
        "adaptive": dataclasses.replace(sdtm, adaptive_threshold=0.3),
        "tomesd": ToMeSDConfig(merge_mlp=True),
        "sito": SiToConfig(),
        "toma": ToMAConfig(),
    }
    found = {}
    for label, config in sd3.items():
        found[f"tiny-sd35/{label}/eager"] = lambda c=config: compiled("tiny-sd35", c, "eager")
        found[f"tiny-sd35/{label}/reference"] = lambda c=config: reference("tiny-sd35", c)
    found["tiny-sd35/sdtm+fbcache/eager"] = lambda: compiled("tiny-sd35", sdtm, "eager", FirstBlockCacheConfig(0.1))
    for label, config in flux.items():
        found[f"tiny-flux/{label}/eager"] = lambda c=config: compiled("tiny-flux", c, "eager")
        found[f"tiny-flux/{label}/reference"] = lambda c=config: reference("tiny-flux", c)
    if not quick:
        for name in ("sd3m-1024", "testbed-1024", "flux-1024"):
            found[f"{name}/sdtm/inductor"] = lambda n=name: compiled(n, sdtm, "inductor")
    return found


def compare(old_path: str, new_path: str) -> None:
    old, new = torch.load(old_path), torch.load(new_path)
    for name in old:
        if name not in new:
            print(f"{name:<32} missing from {new_path}")
            continue
        a, b = old[name], new[name]
        same = "  (identical)" if torch.equal(a, b) else ""
        print(f"{name:<32} max|old-new| {(a - b).abs().max().item():.3g}  PSNR {psnr(b, a):.1f} dB{same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", help="where to save the latents (a .pt file)")
    parser.add_argument("--quick", action="store_true", help="the tiny models only")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two saved files")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    results = {}
    for name, run in cases(args.quick).items():
        start = time.perf_counter()
        results[name] = run()
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        torch.save(results, args.out)
    print(f"saved {len(results)} latents to {args.out}")


if __name__ == "__main__":
    main()
