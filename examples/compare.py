"""What the pipeline examples share: a tiny VAE, their command line, the three transformers they compare (eager,
plain Inductor, SDTM) and the timing of one pipeline call with each.

Not an example of its own: ``sd3_pipeline.py`` and ``flux_pipeline.py`` import it (they run from this folder).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

import sdtm_compile
from sdtm_compile import SDTMConfig


def tiny_vae(latent_channels: int, shift_factor: float, scaling_factor: float):
    """A tiny ``AutoencoderKL`` built from config (4x downsampling, seeded by the caller's ``torch.manual_seed``)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def compare_arguments(description: str, steps: int, size: int, size_help: str) -> argparse.ArgumentParser:
    """The examples' common options (steps, size, ratio, backend, engine, seed, out)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--size", type=int, default=size, help=size_help)
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
    return parser


def compared_transformers(transformer: torch.nn.Module, args: argparse.Namespace, config: SDTMConfig) -> dict:
    """The eager transformer, plain ``torch.compile`` (Inductor) and the SDTM backend, by label (SDTM last).

    With ``--engine eager`` (a quick check of the script's path, as the tests run it) the plain ``torch.compile``
    baseline uses Dynamo's eager backend too, so no Inductor build runs; its label says so.
    """
    plain = "inductor" if args.engine != "eager" else "eager"
    label = "Inductor" if plain == "inductor" else "Dynamo's eager backend, --engine eager"
    return {
        "baseline, eager": transformer,
        f"baseline, torch.compile ({label})": torch.compile(transformer, dynamic=False, backend=plain),
        f"SDTM ratio {args.ratio}, backend={args.backend}": torch.compile(
            transformer, backend=args.backend, options={"sdtm": config, "engine": args.engine}, dynamic=False
        ),
    }


def time_pipeline(pipe: Any, variants: dict, generate: Callable[[], Any], history: int):
    """Run ``generate()`` twice per transformer (the first call compiles), the second inside a generation context.

    Returns ``(seconds {label: (first, warm)}, the SDTM run's Generation, its image)``.
    """
    seconds: dict[str, tuple[float, float]] = {}
    with torch.no_grad():
        for name, transformer in variants.items():
            pipe.transformer = transformer
            start = time.perf_counter()
            image = generate()  # the first call compiles
            first = time.perf_counter() - start
            start = time.perf_counter()
            # A generation context owns this generation's SDTM state (and, here, a record of its calls)
            with sdtm_compile.generation(transformer, history=history) as run:
                image = generate()
            seconds[name] = (first, time.perf_counter() - start)
    return seconds, run, image


def print_times(seconds: dict[str, tuple[float, float]], what: str) -> None:
    print(f"\nwall time per image ({what}); first call includes compiling:")
    for name, (first, warm) in seconds.items():
        print(f"  {name:<40} {warm:7.2f} s   (first call {first:.1f} s)")
