"""``sdtm-compile bench``: speed, FLOPs, fidelity and pictures (:mod:`sdtm_compile.bench`), as a result page.

One command for the three kinds of run: the benchmark (default), a method comparison (``--methods``) and a variant
comparison (``--variants``). Each writes its page into a folder under ``--results`` (``docs/results``) named by the
date, model and kind, or into ``--out``, and rebuilds the results index. ``--from-json`` draws the page of a saved
result again (any layout saved so far; ``--measured-on`` gives the date of one that did not record it).
"""

from __future__ import annotations

import argparse
import sys

from ..bench import BenchConfig, markdown_report, rerender, run_benchmark
from ..bench.calls import call_markdown, run_call_benchmark, write_call_page
from ..bench.compare_methods import run_method_comparison
from ..bench.compare_variants import run_variant_comparison
from ..bench.config import DTYPES, RESULTS_DIR
from ..bench.render import page_of
from ..core.config import DEFAULT_METHOD, config_from_dict
from ..methods import method_names
from ..models import MODEL_PRESETS
from .common import fail, ratios

__all__ = ["register", "results_arguments"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` command to ``sub``."""
    bench = sub.add_parser(
        "bench", help="speed, FLOPs, fidelity and pictures: eager / Inductor / sdtm / eager reference, as a page"
    )
    _bench_arguments(bench)
    bench.set_defaults(run=_bench)


def results_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--results``, ``--out``, ``--from-json`` and ``--measured-on``: where a measuring command's page goes, and
    re-rendering a saved result (``what``: the command's saved file, for the help)."""
    parser.add_argument(
        "--results", default=RESULTS_DIR, help=f"folder of result pages and their index.md (default {RESULTS_DIR})"
    )
    parser.add_argument(
        "--out", default=None, help="the page's folder (default: RESULTS/<date>-<model>-<kind>, indexed)"
    )
    parser.add_argument("--from-json", default=None, help=f"draw the page of a saved result again ({what})")
    parser.add_argument(
        "--measured-on",
        default=None,
        metavar="YYYY-MM-DD",
        help="with --from-json: the date a saved result was measured, where it did not record it",
    )


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench command's arguments (the flags users know, and where the page goes)."""
    parser.add_argument("--model", default="sd3m-1024", choices=sorted(MODEL_PRESETS), help="default sd3m-1024")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the model's)")
    parser.add_argument(
        "--layers", type=int, default=None, help="keep the model's first k blocks (e.g. a real architecture on a CPU)"
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="the model's dtype (default float32)")
    parser.add_argument(
        "--generations",
        action="store_true",
        help="a real architecture (sd3-medium, flux-dev, ...): time whole generations instead of first calls and "
        "calls per stage (hours on a CPU at full depth)",
    )
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
        "timed beside Inductor",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="compare the method's variants and step caches instead: eager, Inductor, the method, the variants it "
        "names (SDTM: cache fusion, SDTM*, size-aware attention), a first-block cache alone and with it (SD3 "
        "models), diffusers' and cache-dit's caches",
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
    results_arguments(parser, "a result.json, or a bench.json, methods.json or variants.json of before")
    # gone: a page under --results replaces the README block it rewrote; the flag stays only to say so
    parser.add_argument("--update-readme", dest="readme_to_rewrite", default=None, help=argparse.SUPPRESS)


def _methods(text: str) -> tuple[str, ...]:
    """``"sdtm,toma"`` -> ``("sdtm", "toma")``, every name a registered method (an argparse type)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in method_names()]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown or text!r}: a comma-separated list of {', '.join(method_names())}"
        )
    return names


def _bench_config(args: argparse.Namespace, sweep: tuple[float, ...]) -> BenchConfig:
    """The :class:`~sdtm_compile.bench.BenchConfig` of the bench command's arguments."""
    try:
        method = config_from_dict({"method": DEFAULT_METHOD, "ratio": args.ratio, "deviation": args.deviation})
        return BenchConfig(
            model=args.model,
            method=method,
            latent=args.latent,
            layers=args.layers,
            dtype=args.dtype,
            steps=args.steps,
            runs=args.runs,
            warmup=args.warmup,
            sweep=sweep,
            sweep_runs=args.sweep_runs,
            quality_seeds=args.quality_seeds,
            engine=args.engine,
            cold_caches=not args.warm_caches,
            results_dir=args.results,
            out_dir=args.out,
        )
    except ValueError as err:
        raise fail("bench", err) from None


def _bench(args: argparse.Namespace) -> int:
    """Run (or re-render) the kind of run the arguments name; print its tables and where its page went."""
    if args.readme_to_rewrite is not None:
        raise fail(
            "bench",
            "--update-readme is gone: no command rewrites the README any more. Every run writes a result page under "
            f"--results ({RESULTS_DIR}/<date>-<model>-<kind>/index.md, listed in {RESULTS_DIR}/index.md): link to it.",
        )
    if args.measured_on is not None and args.from_json is None:
        raise fail("bench", "--measured-on dates a saved result: use it with --from-json")
    if args.from_json:
        try:
            report = rerender(args.from_json, args.results, args.out, args.measured_on)
        except (OSError, ValueError) as err:
            raise fail("bench", err) from None
    else:
        command = "sdtm-compile " + " ".join(args.argv if args.argv is not None else sys.argv[1:])
        if args.methods:
            config = _bench_config(args, ())
            method_ratios = args.sweep if args.sweep else (0.3, 0.5, 0.7)
            report = run_method_comparison(config, args.methods, method_ratios, command=command)
        elif args.variants:
            report = run_variant_comparison(_bench_config(args, ()), args.step_threshold, command=command)
        elif MODEL_PRESETS[args.model].real and not args.generations:
            config = _bench_config(args, ())
            calls = run_call_benchmark(config, command=command)
            folder = write_call_page(calls, args.results, args.out)
            print(call_markdown(calls))
            print(f"wrote index.md, result.json to {folder}")
            return 0
        else:
            sweep = args.sweep if args.sweep is not None else (0.3, 0.4, 0.6, 0.7)
            report = run_benchmark(_bench_config(args, sweep), command=command)
    folder = page_of(report, args.results, args.out)
    print(markdown_report(report))
    print(f"wrote {', '.join(report.files.values())} to {folder}")
    return 0
