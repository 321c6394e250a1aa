"""A real FluxPipeline with tiny components built from config, its transformer compiled by SDTM.

No download: transformer (FLUX.1-dev's layout: double- and single-stream blocks, RoPE, guidance embedding), VAE
and scheduler (FLUX.1-dev's config: dynamic shifting) are built from config with seeded random weights, and the
prompt is given as ``prompt_embeds`` / ``pooled_prompt_embeds`` so no text encoder or tokenizer is needed. The
image is noise-like (random weights); what this shows is the plumbing and the per-step engines and token
counts::

    python examples/flux_pipeline.py --steps 20 --out flux_tiny.png

SDTM on Flux merges the feed-forward of every block (the double blocks' image FF, the single blocks' image MLP)
in both stages and leaves attention unmerged, as the authors did for RoPE models; ``--merge-attention`` also
merges every block's attention in the structure stage.
"""

from __future__ import annotations

import logging

import torch
from compare import compare_arguments, compared_transformers, print_times, time_pipeline, tiny_vae

import sdtm_compile
from sdtm_compile import SDTMConfig
from sdtm_compile.models import TINY_FLUX, tiny_flux_transformer
from sdtm_compile.models.sampling import FLUX_SCHEDULER_CONFIG, make_flux_generation_inputs


def tiny_flux_pipeline(seed: int = 0):
    """A ``FluxPipeline`` made of tiny components built from config (no text encoders)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(seed)
    vae = tiny_vae(TINY_FLUX.latent_channels, shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE factors
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tiny_flux_transformer(TINY_FLUX, seed=seed),
    )


def generate(pipe, steps: int, height: int, width: int, seed: int):
    inputs = make_flux_generation_inputs(TINY_FLUX, seed=seed)
    return pipe(
        prompt_embeds=inputs.prompt_embeds,
        pooled_prompt_embeds=inputs.pooled_prompt_embeds,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="pil",
    ).images[0]


def main(argv: list[str] | None = None) -> None:
    parser = compare_arguments(__doc__.splitlines()[0], 20, 128, "image side in pixels (packed grid = size / 8)")
    parser.add_argument("--merge-attention", action="store_true", help="also merge attention (structure stage)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    pipe = tiny_flux_pipeline(args.seed)
    pipe.set_progress_bar_config(disable=True)
    config = SDTMConfig(
        ratio=args.ratio, deviation=min(0.2, args.ratio), merge_attention=True if args.merge_attention else None
    )
    variants = compared_transformers(pipe.transformer, args, config)
    seconds, run, image = time_pipeline(
        pipe, variants, lambda: generate(pipe, args.steps, args.size, args.size, args.seed), args.steps
    )

    (compiled,) = sdtm_compile.compiled_graphs(list(variants.values())[-1])
    grid = compiled.sites.grid
    print(
        f"\nimage {args.size}x{args.size}, {grid[0]}x{grid[1]} = {grid[0] * grid[1]} image tokens, {args.steps} steps, "
        f"timestep shift e^mu = {compiled.config.timestep_shift:.3f} (from the token count)"
    )
    print(f"{'step':>4} {'sigma':>6} {'position':>8}  {'engine':<15} {'attn tok':>8} {'ff tok':>6}")
    for step, rec in enumerate(rec for rec in run.history if rec.new_step):
        counts = compiled.token_counts(rec.key)
        print(
            f"{step:>4} {rec.timestep:>6.3f} {rec.position:>8.3f}  {str(rec.key):<15} {counts.attention:>8} "
            f"{counts.feed_forward:>6}"
        )
    print_times(seconds, f"{args.steps} steps, batch 1, guidance-distilled")
    print(f"SDTM engines: {len(compiled.engines)} on {sorted(set(compiled.engine_names.values()))}")
    if args.out:
        image.save(args.out)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
