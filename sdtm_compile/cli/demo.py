"""``sdtm-compile demo``: a tiny SD3 transformer, a whole CFG generation through the eager reference.

Run it with ``sdtm-compile demo`` (or ``python -m sdtm_compile demo``). It needs no download: the model is
built from config with seeded random weights (or, with ``--model testbed-1024``, the trained testbed that ships
in the package). For each ratio of the method (SDTM by default) it prints, per step, the engine the schedule
picked and how many image tokens attention and the feed-forward saw, then the fidelity of the final latent against
the unmerged model with the same seed (on the testbed, also image PSNR and SSIM).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ..core.config import config_from_dict
from ..core.method import method_for
from ..methods import method_names
from ..models import MODEL_PRESETS, TinySpec, build_model
from ..models.sampling import cosine_similarity, diffusers_call, generate, make_generation_inputs, psnr
from ..models.testbed.model import load_testbed
from ..models.testbed.quality import generation_inputs, image_psnr, image_ssim
from ..reference import reference_dispatcher, token_grid
from .common import ratios as parse_ratios

__all__ = ["run_demo", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="tiny SD3 model, eager reference, per-step merge schedule")
    demo.add_argument("--ratios", type=parse_ratios, default=(0.3, 0.5), help="comma-separated, default 0.3,0.5")
    demo.add_argument("--steps", type=int, default=28)
    demo.add_argument("--latent", type=int, default=64, help="latent side (tokens = (side/2)^2), default 64")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model", default="tiny-sd3", help="an SD3 preset: tiny-sd3 (default) or testbed-1024")
    demo.add_argument("--method", default="sdtm", help=f"the method: {', '.join(method_names())} (default sdtm)")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        run_demo(
            args.ratios, args.steps, (args.latent, args.latent), args.seed, model_name=args.model, method=args.method
        )
    except ValueError as err:
        print(f"sdtm-compile demo: {err}", file=sys.stderr)
        return 2
    return 0


def run_demo(
    ratios: tuple[float, ...] = (0.3, 0.5),
    num_steps: int = 28,
    latent_hw: tuple[int, int] = (64, 64),
    seed: int = 0,
    print_fn=print,
    model_name: str = "tiny-sd3",
    method: str = "sdtm",
) -> dict[float, dict[str, object]]:
    """Generate once unmerged and once per ratio; print the per-step merge schedule and the fidelity.

    ``model_name``: an SD3 preset of :data:`~sdtm_compile.models.MODEL_PRESETS` (``tiny-sd3``, ``testbed-1024``);
    ``method``: a registered method's name, at its defaults but for the ratio
    (:meth:`~sdtm_compile.core.method.TokenMethod.with_ratio`).
    """
    preset = MODEL_PRESETS.get(model_name)
    if preset is None or not isinstance(preset.spec, TinySpec):
        sd3 = sorted(name for name, p in MODEL_PRESETS.items() if isinstance(p.spec, TinySpec))
        raise ValueError(f"the demo runs SD3 presets: got {model_name!r}, choose one of {sd3}")
    torch.manual_seed(seed)
    spec, testbed = preset.spec, None
    if spec.weights is not None:
        testbed = load_testbed(name=spec.weights)
        model, inputs = testbed.transformer, generation_inputs(testbed, seed, latent_hw[0])
    else:
        model, inputs = build_model(spec, seed=seed), make_generation_inputs(spec, latent_hw, seed=seed)
    grid = token_grid(model, inputs.latents)
    n = grid[0] * grid[1]
    print_fn(
        f"{model_name} ({preset.description}): latent {latent_hw[0]}x{latent_hw[1]} -> {grid[0]}x{grid[1]} = {n} "
        f"image tokens; {num_steps} steps, CFG batch 2, guidance {preset.guidance_scale}"
    )
    results: dict[float, dict[str, object]] = {}
    baseline = None
    base = method_for(config_from_dict({"method": method}))
    for ratio in (0.0, *ratios):
        config = base.with_ratio(ratio)
        dispatcher = reference_dispatcher(model, config)
        start = time.perf_counter()
        call = diffusers_call(dispatcher)
        latent = generate(call, inputs, num_steps, preset.guidance_scale, shift=config.timestep_shift)
        seconds = time.perf_counter() - start
        if baseline is None:
            baseline = latent
            print_fn(f"\nratio 0 (unmodified model): {seconds:.2f} s")
            continue
        print_fn(f"\n{method_for(config).describe()}: {seconds:.2f} s")
        print_fn(f"{'step':>4} {'timestep':>8} {'pos':>5}  {'engine':<15} {'attn tok':>8} {'ff tok':>6} {'merged':>6}")
        steps = [rec for rec in dispatcher.history if rec.new_step]
        tokens_used = 0
        for step, rec in enumerate(steps):
            counts = dispatcher.method.token_counts(rec.key, *grid, "sd3")
            tokens_used += counts.attention + counts.feed_forward
            print_fn(
                f"{step:>4} {rec.timestep:>8.1f} {rec.position:>5.2f}  {str(rec.key):<15} "
                f"{counts.attention:>8} {counts.feed_forward:>6} {counts.removed:>6}"
            )
        share = tokens_used / (2 * n * len(steps))
        fidelity = {"psnr_db": psnr(latent, baseline), "cosine": cosine_similarity(latent, baseline)}
        print_fn(
            f"image tokens through attention+FF: {100 * share:.1f}% of the unmerged model; final latent vs "
            f"unmerged: PSNR {fidelity['psnr_db']:.2f} dB, cosine {fidelity['cosine']:.5f}"
        )
        if testbed is not None:  # pixel space: the final latent is the image
            fidelity.update(image_psnr_db=image_psnr(latent, baseline), ssim=image_ssim(latent, baseline))
            print_fn(f"final image vs unmerged: PSNR {fidelity['image_psnr_db']:.2f} dB, SSIM {fidelity['ssim']:.4f}")
        results[ratio] = {"seconds": seconds, "token_share": share, **fidelity, "steps": steps}
    return results
