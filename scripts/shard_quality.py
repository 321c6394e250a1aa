"""What merging each context-parallel shard on its own costs in image quality, on the trained testbeds.

Under context parallelism every rank merges its own band of grid rows (no window, pair or tile crosses a band's
edge). This compares, per method, the images of whole-sequence plans and of shard-local plans (``shards`` bands)
against the unmerged model's, on the same seeds. It runs the eager reference in one process: a rank's compiled
engines equal it to float noise (``tests/parallel``), and a single process needs no process group::

    python scripts/shard_quality.py --model testbed-1024 --samples 16 \
        --out docs/results/<date>-testbed-1024-shard-quality

Prints, and writes with ``--out`` (a result page, ``shard_quality.json`` and a picture), the mean image PSNR / SSIM
against the unmerged generation and the paired change from whole-sequence to shard-local plans (mean and spread over
seeds).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from sdtm_compile import SDTMConfig, ToMeSDConfig
from sdtm_compile.bench.config import BenchConfig
from sdtm_compile.bench.workload import make_workload
from sdtm_compile.models.testbed.quality import image_psnr, image_ssim
from sdtm_compile.reference import ReferenceTransformer

logger = logging.getLogger("shard_quality")

#: name -> method config measured
CONFIGS = {
    "sdtm": SDTMConfig(),  # on SD3-architecture testbeds SDTM merges attention too (merge_attention's default)
    "sdtm+fusion": SDTMConfig(cache_fusion=True),
    "tomesd": ToMeSDConfig(),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed-1024", help="a trained testbed preset")
    parser.add_argument("--samples", type=int, default=16, help="seeds 0 .. samples-1")
    parser.add_argument("--shards", type=int, nargs="+", default=[2], help="context-parallel degrees to compare")
    parser.add_argument("--only", default=None, help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    bench = BenchConfig(model=args.model)
    workload = make_workload(bench)
    if workload.testbed is None:
        raise SystemExit(f"{args.model} is not a trained testbed: its images would not mean anything")
    names = args.only.split(",") if args.only else list(CONFIGS)
    results: dict = {name: {str(s): {"psnr": [], "ssim": []} for s in [1, *args.shards]} for name in names}
    for seed in range(args.samples):
        run = workload.with_seed(seed)
        with torch.no_grad():
            unmerged = run.generate(run.call_of(run.model), bench)
            for name in names:
                for shards in [1, *args.shards]:
                    reference = ReferenceTransformer(run.model, CONFIGS[name], shards=shards)
                    image = run.generate(run.call_of(reference), bench)
                    results[name][str(shards)]["psnr"].append(image_psnr(image, unmerged))
                    results[name][str(shards)]["ssim"].append(image_ssim(image, unmerged))
        logger.info("seed %d of %d done", seed + 1, args.samples)
    return results


def summary(results: dict, shards: list[int]) -> list[str]:
    rows = [
        "| method | plans | PSNR dB (mean) | SSIM (mean) | PSNR change vs whole (mean, spread) "
        "| SSIM change vs whole |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_shards in results.items():
        whole = by_shards["1"]
        for count in [1, *shards]:
            values = by_shards[str(count)]
            label = "whole sequence" if count == 1 else f"{count} shards (bands of rows)"
            change = ""
            if count != 1:
                dpsnr = [a - b for a, b in zip(values["psnr"], whole["psnr"])]
                dssim = [a - b for a, b in zip(values["ssim"], whole["ssim"])]
                change = (
                    f"{statistics.mean(dpsnr):+.2f} ({statistics.pstdev(dpsnr):.2f}) | {statistics.mean(dssim):+.4f}"
                )
            else:
                change = "- | -"
            rows.append(
                f"| {name} | {label} | {statistics.mean(values['psnr']):.2f} | {statistics.mean(values['ssim']):.4f} "
                f"| {change} |"
            )
    return rows


def write_page(results: dict, args: argparse.Namespace, seconds: float) -> None:
    from sdtm_compile._pyplot import pyplot
    from sdtm_compile.bench.pages import write_run_page

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shard_quality.json").write_text(json.dumps(results, indent=1) + "\n")
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, by_shards in results.items():
        for count in args.shards:
            axis.scatter(by_shards["1"]["psnr"], by_shards[str(count)]["psnr"], s=14, label=f"{name}, {count} shards")
    low = min(min(v["psnr"]) for r in results.values() for v in r.values())
    high = max(max(v["psnr"]) for r in results.values() for v in r.values())
    axis.plot([low, high], [low, high], color="#999999", linewidth=1)
    axis.set_xlabel("PSNR dB, whole-sequence plans")
    axis.set_ylabel("PSNR dB, shard-local plans")
    axis.set_title(f"{args.model}: each seed, against the unmerged image")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.out / "psnr_whole_vs_shards.png", dpi=120)
    body = [
        f"{args.model}, {args.samples} seeds (0 .. {args.samples - 1}), every method at its default config; images "
        "against the unmerged model's on the same seed. Eager reference, one process: shard-local plans are what "
        "each rank of a context-parallel run computes (its compiled engines match them to float noise).",
        "",
        "\n".join(summary(results, args.shards)),
    ]
    write_run_page(
        args.out,
        seconds,
        title=f"Shard-local merging under context parallelism: quality on {args.model}",
        kind="shard-quality",
        model=args.model,
        body="\n".join(body),
        pictures={"Each seed's PSNR, whole-sequence against shard-local plans": "psnr_whole_vs_shards.png"},
        files={"shard_quality.json": "every seed's PSNR and SSIM"},
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    results = measure(args)
    print("\n".join(summary(results, args.shards)))
    if args.out is not None:
        write_page(results, args, time.perf_counter() - start)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
