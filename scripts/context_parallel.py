"""What token merging saves under context parallelism: bytes through each rank's collectives and FLOPs per rank for
a whole generation, merged against unmerged; optionally the time of a generation, against plain Inductor.

On this machine (CPU), two local ranks on gloo::

    python scripts/context_parallel.py --model tiny-flux --out docs/results/<date>-tiny-flux-context-parallel

On GPUs (NCCL), one rank per GPU, timed::

    torchrun --nproc-per-node 2 scripts/context_parallel.py --model flux-dev --time --runs 5 --dtype bfloat16

Bytes and FLOPs are read off the engines' graphs (the shapes the passes recorded; ``FlopCounterMode`` op by op on
each step's engine), so they do not depend on the interconnect; the time does, which is why it is only meaningful
on the GPUs it is meant for (CPU timings of gloo say nothing about NVLink). Every rank measures its own; rank 0
writes ``context_parallel.json`` and, with ``--out``, a result page with a picture.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sdtm_compile import SDTMBackend, SDTMConfig
from sdtm_compile.bench.config import BenchConfig
from sdtm_compile.bench.instrument import CapturedBucketGraphs
from sdtm_compile.core.schedule import FULL
from sdtm_compile.models.sampling import pipeline_timesteps
from sdtm_compile.parallel import CollectiveBytes, collective_bytes, init_ranks, spawn_ranks
from sdtm_compile.runtime import StageDispatcher

logger = logging.getLogger("context_parallel")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-flux", help="a model preset (sdtm-compile bench --list-models)")
    parser.add_argument("--layers", type=int, default=None, help="keep the first k blocks (real architectures)")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the preset's)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--deviation", type=float, default=0.2)
    parser.add_argument("--merge-attention", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--degree", type=int, default=2, help="local ranks to spawn without torchrun (gloo)")
    parser.add_argument("--time", action="store_true", help="also time generations (merged, plain Inductor)")
    parser.add_argument("--runs", type=int, default=3, help="timed generations each, after a warm-up")
    parser.add_argument("--out", type=Path, default=None, help="write the result page here")
    return parser.parse_args(argv)


def method(args: argparse.Namespace) -> SDTMConfig:
    return SDTMConfig(ratio=args.ratio, deviation=args.deviation, merge_attention=args.merge_attention)


def _parallel_workload(args: argparse.Namespace, world: int):
    from diffusers import ContextParallelConfig, ParallelConfig

    from sdtm_compile.bench.workload import make_workload
    from sdtm_compile.parallel import prepare_sd3_context_parallel

    torch.manual_seed(0)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    config = BenchConfig(model=args.model, steps=args.steps, layers=args.layers, dtype=args.dtype, latent=args.latent)
    workload = make_workload(config, device)
    if workload.family == "sd3":
        prepare_sd3_context_parallel(workload.model)
        workload = _text_in_whole_shards(workload, world)
    workload.model.enable_parallelism(
        config=ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=world))
    )
    return config, workload


def _text_in_whole_shards(workload, world: int):
    """SD3's text cut to a multiple of the degree, as a smaller ``max_sequence_length`` would (SD3-sized presets
    carry 77 + 6 = 83 tokens; the pipeline's default 333 needs max_sequence_length=255 at degree 2 or 4)."""
    import dataclasses

    from sdtm_compile.bench.harness import cfg_call_inputs

    inputs = workload.inputs
    tokens = inputs.prompt_embeds.shape[1]
    if tokens % world == 0:
        return workload
    keep = tokens - tokens % world
    logger.info("SD3 text: %d tokens kept of %d (a multiple of %d ranks)", keep, tokens, world)
    workload.text_note = f"the text cut to {keep} of its {tokens} tokens, a multiple of {world}"
    inputs = dataclasses.replace(
        inputs,
        prompt_embeds=inputs.prompt_embeds[:, :keep].contiguous(),
        negative_prompt_embeds=inputs.negative_prompt_embeds[:, :keep].contiguous(),
    )
    cut = dataclasses.replace(workload, inputs=inputs, probe=cfg_call_inputs(inputs, 1000.0))
    cut.text_note = workload.text_note
    return cut


def measure(rank: int, world: int, args: argparse.Namespace) -> dict:
    """This rank's bytes and FLOPs per generation (and times with ``--time``)."""
    config, workload = _parallel_workload(args, world)
    graphs = CapturedBucketGraphs(workload.model, workload.probe)
    buckets = graphs.buckets(method(args))
    sites = buckets.sites
    fed, _ = pipeline_timesteps(sites.family, config.steps, sites.total_tokens)
    plan = [key for key, _ in StageDispatcher(buckets.config).plan([float(t) for t in fed])]
    per_key: dict[str, dict] = {}
    for key in dict.fromkeys([FULL, *plan]):
        traffic = collective_bytes(buckets.graph(key).gm, world)
        logger.info("rank %d: %s: counting FLOPs", rank, key)
        flops = graphs.flops(key, buckets.config).total
        counts = buckets.counts(key)
        per_key[str(key)] = {"bytes": traffic.__dict__, "flops": flops, "attention_tokens": counts.attention}
    calls = workload.probe["hidden_states"].shape[0]

    def total(keys: list) -> dict:
        moved = sum((CollectiveBytes(**per_key[str(k)]["bytes"]) for k in keys), CollectiveBytes(0, 0, 0, 0))
        return {"bytes": moved.__dict__, "flops": sum(per_key[str(k)]["flops"] for k in keys)}

    result = {
        "rank": rank,
        "degree": world,
        "model": args.model,
        "layers": args.layers,
        "blocks": {kind: [b.kind for b in sites.blocks].count(kind) for kind in ("joint", "double", "single")},
        "family": sites.family,
        "grid": list(sites.grid),
        "image_tokens": sites.num_tokens,
        "text_tokens": sites.text_tokens,
        "text_note": getattr(workload, "text_note", ""),
        "batch": calls,
        "steps": config.steps,
        "dtype": args.dtype,
        "config": repr(buckets.config),
        "plan": [str(k) for k in plan],
        "per_engine": per_key,
        "merged": total(plan),
        "unmerged": total([FULL] * len(plan)),
    }
    if args.time:
        result["seconds"] = time_generations(workload, config, args)
    return result


def time_generations(workload, config: BenchConfig, args: argparse.Namespace) -> dict:
    """Median seconds of ``--runs`` generations each (after one warm-up), merged and plain Inductor, round-robin;
    every rank waits for the others at the end of each generation (a generation is as slow as its slowest rank)."""
    compiled = {}
    for name, backend in (("inductor", "inductor"), ("sdtm", SDTMBackend({"method": method(args)}))):
        compiled[name] = torch.compile(workload.model, backend=backend, dynamic=False)
        run_generation(workload, compiled[name], config)  # warm-up, and the build
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(args.runs):
        for name, model in compiled.items():
            start = time.perf_counter()
            run_generation(workload, model, config)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run_generation(workload, model, config: BenchConfig) -> None:
    with torch.no_grad():
        workload.generate(workload.call_of(model), config)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()


def _rank(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    """Measure on this rank; rank 0 writes every rank's measurement to ``out/ranks.json``."""
    gathered: list = [None] * world
    dist.all_gather_object(gathered, measure(rank, world, args))
    if rank == 0:
        Path(out, "ranks.json").write_text(json.dumps(gathered))


def write_page(results: list[dict], args: argparse.Namespace, seconds: float) -> None:
    from sdtm_compile._pyplot import pyplot
    from sdtm_compile.bench.pages import write_run_page

    first = results[0]
    same = all(
        {k: v for k, v in r.items() if k not in ("rank", "seconds")}
        == {k: v for k, v in first.items() if k not in ("rank", "seconds")}
        for r in results
    )
    merged, unmerged = first["merged"], first["unmerged"]
    mib = 1024**2
    rows = [
        "| per rank, whole generation | unmerged | merged | merged / unmerged |",
        "|---|---|---|---|",
    ]
    for label, path, scale, unit in (
        ("all-to-all: bytes sent to other ranks", ("bytes", "sent"), mib, "MiB"),
        ("all-to-all: tensors handed over (own part included)", ("bytes", "all_to_all"), mib, "MiB"),
        ("all-gather (the output, unmerged either way)", ("bytes", "all_gather"), mib, "MiB"),
        ("collective calls", ("bytes", "calls"), 1, ""),
        ("FLOPs", ("flops",), 1e9, "GFLOP"),
    ):

        def value(side: dict) -> float:
            for part in path:
                side = side[part]
            return side / scale  # type: ignore[operator]

        a, b = value(unmerged), value(merged)
        rows.append(f"| {label} | {a:,.2f} {unit} | {b:,.2f} {unit} | {b / a if a else float('nan'):.3f} |")
    engines = [
        "| engine | attention tokens per rank (image) | all-to-all MiB sent per call | GFLOP per call | steps |",
        "|---|---|---|---|---|",
    ]
    for key, entry in first["per_engine"].items():
        steps = first["plan"].count(key)
        engines.append(
            f"| {key} | {entry['attention_tokens']} | {entry['bytes']['sent'] / mib:.3f} | "
            f"{entry['flops'] / 1e9:.3f} | {steps} |"
        )
    blocks = ", ".join(f"{count} {kind}" for kind, count in first["blocks"].items() if count)
    depth = f" (first {first['layers']} blocks: {blocks})" if first["layers"] else f" ({blocks} blocks)"
    body = [
        f"{first['model']}{depth}: {first['family']}, Ulysses degree {first['degree']}, batch {first['batch']}, "
        f"{first['steps']} steps, {first['dtype']}; each rank holds a {first['grid'][0]}x{first['grid'][1]} band of "
        f"the image tokens ({first['image_tokens']}) and {first['text_tokens']} text tokens"
        + (f" ({first['text_note']})" if first.get("text_note") else "")
        + ". Method: "
        f"`{first['config']}`.",
        "",
        "\n".join(rows),
        "",
        "Every rank measured the same numbers." if same else "**The ranks measured different numbers** (see the json).",
        "",
        "\n".join(engines),
    ]
    if "seconds" in first:
        slowest = {name: max(r["seconds"][name] for r in results) for name in first["seconds"]}
        body += [
            "",
            f"Time of a generation (median of {args.runs} after a warm-up, slowest rank): plain Inductor "
            f"{slowest['inductor']:.2f} s, sdtm {slowest['sdtm']:.2f} s, "
            f"{slowest['inductor'] / slowest['sdtm']:.2f}x. On a CPU with gloo this times local processes, not an "
            "interconnect.",
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 3.2))
    steps = range(1, len(first["plan"]) + 1)
    per_step = [first["per_engine"][k]["bytes"]["sent"] / mib for k in first["plan"]]
    axis.bar(
        steps, [first["per_engine"]["full"]["bytes"]["sent"] / mib] * len(per_step), color="#bbbbbb", label="unmerged"
    )
    axis.bar(steps, per_step, color="#3b7dd8", label="merged (sdtm)")
    axis.set_xlabel("denoising step")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_ylabel("MiB sent per rank")
    axis.set_title(f"{first['model']}: all-to-all bytes per step, degree {first['degree']}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "bytes_per_step.png", dpi=120)
    (args.out / "context_parallel.json").write_text(json.dumps(results, indent=1) + "\n")
    write_run_page(
        args.out,
        seconds,
        title=f"Token merging under context parallelism: {first['model']}{depth}, degree {first['degree']}",
        kind="context-parallel",
        model=first["model"],
        body="\n".join(body),
        pictures={"All-to-all bytes each rank sends per step": "bytes_per_step.png"},
        files={"context_parallel.json": "every rank's measurement"},
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        if "RANK" in os.environ:  # torchrun: this process is one rank
            rank, world = init_ranks()
            _rank(rank, world, args, out)
            dist.destroy_process_group()
            if rank != 0:
                return
        else:  # local ranks on gloo
            spawn_ranks(_rank, args.degree, args, out)
        world_results = json.loads(Path(out, "ranks.json").read_text())
    first = world_results[0]
    print(json.dumps({"merged": first["merged"], "unmerged": first["unmerged"], "seconds": first.get("seconds")}))
    if args.out is not None:
        write_page(world_results, args, time.perf_counter() - start)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
