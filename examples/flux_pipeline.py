"""A real FluxPipeline with tiny components built from config, its transformer compiled by SDTM.

No download: transformer (FLUX.1-dev's layout: double- and single-stream blocks, RoPE, guidance embedding), VAE
and scheduler (FLUX.1-dev's config: dynamic shifting) are built from config with seeded random weights, and the
prompt is given as ``prompt_embeds`` / ``pooled_prompt_embeds`` so no text encoder or tokenizer is needed. The
image is noise-like (random weights); what this shows is the plumbing and the per-step engines and token
counts::

    python examples/flux_pipeline.py --steps 20 --out flux_tiny.png

SDTM on Flux merges the feed-forward of every block (the double blocks' image FF, the single blocks' image MLP)
in both stages and leaves attention unmerged, as the authors did for RoPE models; ``--merge-attention`` also
merges the double blocks' attention in the structure stage.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import sdtm_compile
from sdtm_compile import SDTMConfig
from sdtm_compile.models import TINY_FLUX, tiny_flux_transformer
from sdtm_compile.sampling import FLUX_SCHEDULER_CONFIG, make_flux_generation_inputs


def tiny_flux_pipeline(seed: int = 0):
    """A ``FluxPipeline`` made of tiny components built from config (no text encoders)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=TINY_FLUX.latent_channels,
        norm_num_groups=4,
        shift_factor=0.1159,  # FLUX.1's VAE
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (packed grid = size / 8)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--merge-attention", action="store_true", help="also merge attention (structure stage)")
    parser.add_argument("--backend", default="sdtm_trt", choices=["sdtm_trt", "sdtm"])
    parser.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "tensorrt", "inductor", "eager"],
        help="the backend's engine option (auto: TensorRT where possible, else Inductor)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="save the SDTM image here (PNG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    pipe = tiny_flux_pipeline(args.seed)
    pipe.set_progress_bar_config(disable=True)
    eager_transformer = pipe.transformer
    config = SDTMConfig(
        ratio=args.ratio, deviation=min(0.2, args.ratio), merge_attention=True if args.merge_attention else None
    )
    variants = {
        "baseline, eager": eager_transformer,
        "baseline, torch.compile (Inductor)": torch.compile(eager_transformer, dynamic=False),
        f"SDTM ratio {args.ratio}, backend={args.backend}": torch.compile(
            eager_transformer, backend=args.backend, options={"sdtm": config, "engine": args.engine}, dynamic=False
        ),
    }
    seconds: dict[str, tuple[float, float]] = {}
    with torch.no_grad():
        for name, transformer in variants.items():
            pipe.transformer = transformer
            start = time.perf_counter()
            image = generate(pipe, args.steps, args.size, args.size, args.seed)  # the first call compiles
            first = time.perf_counter() - start
            start = time.perf_counter()
            with sdtm_compile.generation(transformer, history=args.steps) as run:
                image = generate(pipe, args.steps, args.size, args.size, args.seed)
            seconds[name] = (first, time.perf_counter() - start)

    sdtm_transformer = list(variants.values())[-1]
    (compiled,) = sdtm_compile.compiled_graphs(sdtm_transformer)
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
    print(f"\nwall time per image ({args.steps} steps, batch 1, guidance-distilled); first call includes compiling:")
    for name, (first, warm) in seconds.items():
        print(f"  {name:<40} {warm:7.2f} s   (first call {first:.1f} s)")
    print(f"SDTM engines: {len(compiled.engines)} on {sorted(set(compiled.engine_names.values()))}")
    if args.out:
        image.save(args.out)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
