"""A real StableDiffusion3Pipeline with tiny components built from config, its transformer compiled by SDTM.

No download: transformer, VAE and scheduler are built from config with seeded random weights, and the prompt
is given as ``prompt_embeds`` / ``pooled_prompt_embeds`` so no text encoder or tokenizer is needed. The image
is noise-like (random weights); what this shows is the plumbing and the per-step token counts::

    python examples/sd3_pipeline.py --steps 28 --out sd3_tiny.png
"""

from __future__ import annotations

import logging

import torch
from compare import compare_arguments, compared_transformers, print_times, time_pipeline, tiny_vae

import sdtm_compile
from sdtm_compile import SDTMConfig
from sdtm_compile.models import TINY_SD3, tiny_sd3_transformer
from sdtm_compile.models.sampling import make_generation_inputs


def tiny_sd3_pipeline(seed: int = 0):
    """A ``StableDiffusion3Pipeline`` made of tiny components built from config (no text encoders)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    vae = tiny_vae(TINY_SD3.in_channels, shift_factor=0.0609, scaling_factor=1.5305)
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(TINY_SD3, seed=seed),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def prompt_kwargs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random "prompt embeddings" shaped for the tiny transformer (the pipeline skips its text encoders)."""
    inputs = make_generation_inputs(TINY_SD3, seed=seed)
    return {
        "prompt_embeds": inputs.prompt_embeds,
        "pooled_prompt_embeds": inputs.pooled_prompt_embeds,
        "negative_prompt_embeds": inputs.negative_prompt_embeds,
        "negative_pooled_prompt_embeds": inputs.negative_pooled_prompt_embeds,
    }


def generate(pipe, steps: int, size: int, seed: int):
    return pipe(
        **prompt_kwargs(seed),
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=7.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pil",
    ).images[0]


def main(argv: list[str] | None = None) -> None:
    parser = compare_arguments(__doc__.splitlines()[0], 28, 256, "image side in pixels (latent = size / 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    pipe = tiny_sd3_pipeline(args.seed)
    pipe.set_progress_bar_config(disable=True)
    config = SDTMConfig(ratio=args.ratio, deviation=min(0.2, args.ratio))
    variants = compared_transformers(pipe.transformer, args, config)
    seconds, run, image = time_pipeline(
        pipe, variants, lambda: generate(pipe, args.steps, args.size, args.seed), 2 * args.steps
    )

    sdtm_transformer = list(variants.values())[-1]
    (compiled,) = sdtm_compile.compiled_graphs(sdtm_transformer)  # what the backend built for this model
    grid = compiled.sites.grid
    print(
        f"\nimage {args.size}x{args.size}, {grid[0]}x{grid[1]} = {grid[0] * grid[1]} image tokens, {args.steps} steps"
    )
    print(f"{'step':>4} {'timestep':>8}  {'engine':<15} {'attn tok':>8} {'ff tok':>6}")
    steps = [rec for rec in run.history if rec.new_step]
    for step, rec in enumerate(steps):
        counts = compiled.token_counts(rec.key)
        print(f"{step:>4} {rec.timestep:>8.1f}  {str(rec.key):<15} {counts.attention:>8} {counts.feed_forward:>6}")
    print_times(seconds, f"{args.steps} steps, CFG batch 2")
    print(f"SDTM engines: {len(compiled.engines)} on {sorted(set(compiled.engine_names.values()))}")
    if args.out:
        image.save(args.out)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
