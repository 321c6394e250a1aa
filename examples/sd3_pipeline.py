"""A real StableDiffusion3Pipeline with tiny components built from config, its transformer compiled by SDTM.

No download: transformer, VAE and scheduler are built from config with seeded random weights, and the prompt
is given as ``prompt_embeds`` / ``pooled_prompt_embeds`` so no text encoder or tokenizer is needed. The image
is noise-like (random weights); what this shows is the plumbing and the per-step token counts::

    python examples/sd3_pipeline.py --steps 28 --out sd3_tiny.png
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import sdtm_compile
from sdtm_compile import SDTMConfig
from sdtm_compile.models import TINY_SD3, tiny_sd3_transformer
from sdtm_compile.sampling import make_generation_inputs


def tiny_sd3_pipeline(seed: int = 0):
    """A ``StableDiffusion3Pipeline`` made of tiny components built from config (no text encoders)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=TINY_SD3.in_channels,
        norm_num_groups=4,
        shift_factor=0.0609,
        scaling_factor=1.5305,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 4)")
    parser.add_argument("--ratio", type=float, default=0.5)
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

    pipe = tiny_sd3_pipeline(args.seed)
    pipe.set_progress_bar_config(disable=True)
    eager_transformer = pipe.transformer
    config = SDTMConfig(ratio=args.ratio, deviation=min(0.2, args.ratio))
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
            image = generate(pipe, args.steps, args.size, args.seed)  # the first call compiles
            first = time.perf_counter() - start
            start = time.perf_counter()
            # A generation context owns this generation's SDTM state (and, here, a record of its calls)
            with sdtm_compile.generation(transformer, history=2 * args.steps) as run:
                image = generate(pipe, args.steps, args.size, args.seed)
            seconds[name] = (first, time.perf_counter() - start)

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
    print(f"\nwall time per image ({args.steps} steps, CFG batch 2); first call includes compiling:")
    for name, (first, warm) in seconds.items():
        print(f"  {name:<40} {warm:7.2f} s   (first call {first:.1f} s)")
    print(f"SDTM engines: {len(compiled.engines)} on {sorted(set(compiled.engine_names.values()))}")
    if args.out:
        image.save(args.out)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
