"""``sdtm-compile bench``: speed, FLOPs, fidelity and pictures (:mod:`sdtm_compile.bench`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..bench import BenchConfig, BenchResult, markdown_report, render, run_benchmark, update_readme
from ..bench.methods import (
    MethodComparison,
    comparison_markdown,
    method_names,
    render_comparison,
    run_method_comparison,
    update_readme_methods,
)
from ..bench.variants import VariantComparison, render_variants, run_variant_comparison, variants_markdown
from ..methods.sdtm.config import SDTMConfig
from ..models import MODEL_PRESETS
from .common import ratios

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench", help="speed, FLOPs, fidelity and pictures: eager / Inductor / sdtm / eager reference"
    )
    _bench_arguments(bench)
    bench.set_defaults(run=_bench)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="sd3m-1024", choices=sorted(MODEL_PRESETS), help="default sd3m-1024")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the model's)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--deviation", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's (SD3 28, Flux 20)")
    parser.add_argument("--runs", type=int, default=5, help="timed generations per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--sweep", type=ratios, default=None, help="ratios (default 0.3,0.4,0.6,0.7; with --methods 0.3,0.5,0.7)"
    )
    parser.add_argument(
        "--methods",
        type=_methods,
        default=None,
        help="compare token-reduction methods instead (e.g. sdtm,tomesd,sito,toma): each at every --sweep ratio, "
        "timed beside Inductor; writes methods.json / .md / .png",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="compare SDTM's variants and step caches instead (SD3 models): eager, Inductor, SDTM, cache fusion, "
        "SDTM*, size-aware attention, a first-block cache alone and with SDTM, diffusers' cache; writes "
        "variants.json / .md / .png",
    )
    parser.add_argument(
        "--step-threshold", type=float, default=0.1, help="--variants: the first-block caches' threshold (0.1)"
    )
    parser.add_argument("--sweep-runs", type=int, default=3)
    parser.add_argument(
        "--quality-seeds", type=int, default=4, help="testbed-1024: seeds of the paired image PSNR / SSIM (default 4)"
    )
    parser.add_argument("--engine", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--warm-caches", action="store_true", help="use the existing compile caches (not cold)")
    parser.add_argument("--out", default="bench_out", help="directory for bench.json, bench.md and the PNGs")
    parser.add_argument("--from-json", default=None, help="re-render tables and pictures of a saved bench.json")
    parser.add_argument(
        "--update-readme", default=None, help="also replace the Results block of this README with the tables"
    )


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in method_names()]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown or text!r}: a comma-separated list of {', '.join(method_names())}"
        )
    return names


def _bench_config(args, sweep: tuple[float, ...]):
    """The :class:`~sdtm_compile.bench.BenchConfig` of the bench command's arguments."""
    return BenchConfig(
        model=args.model,
        sdtm=SDTMConfig(ratio=args.ratio, deviation=args.deviation),
        latent=args.latent,
        steps=args.steps,
        runs=args.runs,
        warmup=args.warmup,
        sweep=sweep,
        sweep_runs=args.sweep_runs,
        quality_seeds=args.quality_seeds,
        engine=args.engine,
        cold_caches=not args.warm_caches,
        out_dir=args.out,
    )


def _bench(args: argparse.Namespace) -> int:
    argv = args.argv
    if args.methods:
        return _bench_methods(args, argv)
    if args.variants:
        if args.from_json:
            result = VariantComparison.load(args.from_json)
            render_variants(result, Path(args.out))
        else:
            command = "sdtm-compile " + " ".join(argv if argv is not None else sys.argv[1:])
            result = run_variant_comparison(_bench_config(args, ()), args.step_threshold, command=command)
        print(variants_markdown(result))
        print(f"wrote variants.json, variants.md and variants.png to {args.out}")
        return 0
    if args.from_json:
        result = BenchResult.load(args.from_json)
        render(result, args.out)
    else:
        config = _bench_config(args, args.sweep if args.sweep is not None else (0.3, 0.4, 0.6, 0.7))
        result = run_benchmark(config, command="sdtm-compile " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(markdown_report(result))
    print(f"wrote {', '.join(result.files.values())} to {args.out}")
    if args.update_readme:
        try:
            update_readme(args.update_readme, result, args.out)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        print(f"updated the Results block of {Path(args.update_readme)}")
    return 0


def _bench_methods(args, argv) -> int:
    """``bench --methods``: the method comparison (:mod:`sdtm_compile.bench.methods`)."""
    if args.from_json:
        result = MethodComparison.load(args.from_json)
        render_comparison(result, args.out)
    else:
        config = _bench_config(args, ())
        ratios = args.sweep if args.sweep else (0.3, 0.5, 0.7)
        command = "sdtm-compile " + " ".join(argv if argv is not None else sys.argv[1:])
        result = run_method_comparison(config, args.methods, ratios, command=command)
    print(comparison_markdown(result))
    print(f"wrote {', '.join(result.files.values())} to {args.out}")
    if args.update_readme:
        try:
            update_readme_methods(args.update_readme, result, args.out)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        print(f"updated the method comparison block of {Path(args.update_readme)}")
    return 0
