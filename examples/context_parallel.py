"""A real FluxPipeline (or StableDiffusion3Pipeline) on several ranks with diffusers' context parallelism, its
transformer compiled by SDTM: each rank merges its own band of the image tokens.

On this machine, two local processes on gloo (tiny components built from config, no download)::

    python examples/context_parallel.py --family flux --steps 8 --out cp_flux.png

On GPUs, one rank per GPU (NCCL)::

    torchrun --nproc-per-node 2 examples/context_parallel.py --family flux --engine inductor

Every rank runs the same pipeline call; diffusers splits the transformer's sequence across the ranks (Ulysses), and
the ``sdtm`` backend finds that split in the graph Dynamo traces: each rank plans and merges its own band of grid
rows, its all-to-alls carry the merged tokens, and the output is gathered unmerged. SD3 needs
:func:`sdtm_compile.parallel.prepare_sd3_context_parallel` first (diffusers has no plan for it). Rank 0 prints each
step's engine and how many tokens of each attention's joint sequence it sends through the all-to-alls, and saves
the image; ``scripts/context_parallel.py`` measures the bytes and FLOPs per rank of whole generations.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

import sdtm_compile
from sdtm_compile import SDTMConfig
from sdtm_compile.parallel import init_ranks, spawn_ranks


def run(rank: int, world: int, args: argparse.Namespace) -> None:
    from diffusers import ContextParallelConfig, ParallelConfig

    if args.family == "flux":
        from flux_pipeline import generate, tiny_flux_pipeline

        pipe = tiny_flux_pipeline(args.seed)
        make_image = lambda: generate(pipe, args.steps, args.size, args.size, args.seed)  # noqa: E731
    else:
        from sd3_pipeline import generate, tiny_sd3_pipeline

        from sdtm_compile.parallel import prepare_sd3_context_parallel

        pipe = tiny_sd3_pipeline(args.seed)
        prepare_sd3_context_parallel(pipe.transformer)
        make_image = lambda: generate(pipe, args.steps, args.size, args.seed)  # noqa: E731
    if torch.cuda.is_available():
        pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_parallelism(
        config=ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=world))
    )
    config = SDTMConfig(ratio=args.ratio, deviation=min(0.2, args.ratio), merge_attention=True)
    backend = sdtm_compile.SDTMBackend({"method": config, "engine": args.engine, "history": 4 * args.steps})
    pipe.transformer = torch.compile(pipe.transformer, backend=backend, dynamic=False)
    with torch.no_grad():
        image = make_image()
    if rank != 0:
        return
    (compiled,) = backend.compiled
    sites = compiled.sites
    print(
        f"rank 0 of {world}: a {sites.grid[0]}x{sites.grid[1]} band of the image tokens "
        f"({sites.num_tokens} of {sites.total_tokens}), {sites.text_tokens} text tokens"
    )
    text = sites.text_tokens or 0
    print(f"{'step':>4} {'engine':<15} {'image tokens in attention':>26} {'all-to-all tokens (unmerged)':>29}")
    for step, record in enumerate(r for r in compiled.dispatcher.history if r.new_step):
        tokens = compiled.token_counts(record.key).attention
        print(f"{step:>4} {str(record.key):<15} {tokens:>26} {f'{text + tokens} ({text + sites.num_tokens})':>29}")
    if args.out:
        image.save(args.out)
        print(f"saved {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("flux", "sd3"), default="flux")
    parser.add_argument("--degree", type=int, default=2, help="local ranks to spawn without torchrun (gloo)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--engine", default="eager", help="eager, inductor or tensorrt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="save rank 0's image here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if "RANK" in os.environ:  # torchrun
        rank, world = init_ranks()
        run(rank, world, args)
    else:
        spawn_ranks(run, args.degree, args)


if __name__ == "__main__":
    main()
