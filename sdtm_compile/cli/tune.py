"""``sdtm-compile tune``: the fastest configuration within a quality budget (:mod:`sdtm_compile.bench.tune`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..bench.pages import page_folder
from ..bench.tune import BUDGET_MEASURES, Evaluation, QualityBudget, candidate_space, tune, write_tune_page
from ..core.blocks import NAMED_SCHEDULES
from ..models import MODEL_PRESETS, FluxSpec
from .common import fail, ratios

__all__ = ["register", "summary_table"]


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(";" if ";" in text else ",") if part.strip())


def _thresholds(text: str) -> tuple[float | None, ...]:
    """``"off,0.05,0.1"`` -> ``(None, 0.05, 0.1)``."""
    out: list[float | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            out.append(None if part in ("off", "none", "") else float(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'off' or thresholds like 0.05, got {part!r}") from None
    return tuple(out)


def _values(measures: dict[str, Any] | None) -> str:
    """``"psnr 31.8 ssim 0.955"``: the single numbers of a measure dict (per-set lists and spreads left out)."""
    numbers = {k: v for k, v in (measures or {}).items() if isinstance(v, (int, float)) and not k.endswith("_spread")}
    return " ".join(f"{k} {v:.3g}" for k, v in numbers.items())


def summary_table(evaluations: list[Evaluation]) -> list[str]:
    """The lines the command prints: every candidate in FLOP order, its quick and full measures and speed-up."""
    lines = [f"{'candidate':<40} {'FLOP ratio':>10} {'quick':>18} {'measured':>28} {'speed-up':>9}"]
    for e in sorted(evaluations, key=lambda e: -e.flop_ratio):
        speed = "" if e.speedup is None or math.isnan(e.speedup) else f"{e.speedup:.2f}x"
        lines.append(
            f"{e.name:<40} {e.flop_ratio:>10.2f} {_values(e.quick):>18} {_values(e.full)[:28]:>28} {speed:>9}"
            + (" (not run)" if e.not_run else "")
        )
    return lines


def register(sub: argparse._SubParsersAction) -> None:
    sd3 = sorted(name for name, preset in MODEL_PRESETS.items() if not isinstance(preset.spec, FluxSpec))
    tune_parser = sub.add_parser(
        "tune",
        help="the fastest configuration within a quality budget (writes JSON for torch.compile options and export)",
    )
    tune_parser.add_argument("--model", default="testbed-1024", choices=sd3, help="an SD3 preset (default testbed)")
    budgets = "; ".join(f"{m}{op}VALUE: {what}" for m, (op, what) in BUDGET_MEASURES.items())
    tune_parser.add_argument("--budget", required=True, help=f"the quality budget, one of: {budgets}")
    tune_parser.add_argument("--methods", type=_names, default=("sdtm", "tomesd", "sito", "toma"))
    tune_parser.add_argument("--ratios", type=ratios, default=(0.3, 0.5, 0.7))
    tune_parser.add_argument(
        "--schedules",
        type=_names,
        default=None,
        help=f"block schedules, ';'-separated when a form has commas ({', '.join(NAMED_SCHEDULES)}); default: all, "
        "the first quarter of the blocks unmerged, staggered",
    )
    tune_parser.add_argument("--no-fusion", action="store_true", help="leave SDTM's cache fusion out of the search")
    tune_parser.add_argument(
        "--step-cache", type=_thresholds, default=(None, 0.1), help="first-block cache thresholds (default off,0.1)"
    )
    tune_parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    tune_parser.add_argument("--quick-seeds", type=int, default=2, help="images per candidate in the quick round")
    tune_parser.add_argument("--samples", type=int, default=16, help="images per seed set (two sets) when measured")
    tune_parser.add_argument("--batch", type=int, default=8, help="images per generation call")
    tune_parser.add_argument("--shortlist", type=int, default=8, help="most candidates measured in full")
    tune_parser.add_argument("--time-top", type=int, default=3, help="candidates within budget that are timed")
    tune_parser.add_argument("--runs", type=int, default=3, help="timed generations per candidate (median)")
    tune_parser.add_argument("--engine", default="inductor", choices=["inductor", "eager"])
    tune_parser.add_argument("--out", default=None, help="the result JSON (default tuned-MODEL.json)")
    tune_parser.add_argument(
        "--page", default=None, metavar="RESULTS", help="also write a results page under RESULTS/<date>-MODEL-tune/"
    )
    tune_parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        budget = QualityBudget.parse(args.budget)
        family = "sd3"
        candidates = candidate_space(
            family,
            MODEL_PRESETS[args.model].spec.num_blocks,
            methods=args.methods,
            ratios=args.ratios,
            schedules=args.schedules,
            cache_fusion=(False,) if args.no_fusion else (False, True),
            step_cache=args.step_cache,
        )
        result = tune(
            args.model,
            budget,
            candidates=candidates,
            steps=args.steps,
            quick_seeds=args.quick_seeds,
            samples=args.samples,
            batch=args.batch,
            shortlist=args.shortlist,
            time_top=args.time_top,
            runs=args.runs,
            engine=args.engine,
        )
    except ValueError as error:
        raise fail("tune", error) from None
    out = Path(args.out or f"tuned-{args.model}.json")
    out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if args.page is not None:
        command = "sdtm-compile " + " ".join(args.argv if args.argv is not None else sys.argv[1:])
        # another budget's page of the same day is kept: page_folder numbers a second command's folder
        folder = page_folder(args.page, result.measured_on, args.model, "tune", command)
        print(f"wrote the page {write_tune_page(result.to_dict(), folder, command)}")
    print(f"{len(candidates)} candidates on {args.model}, budget {budget}, in {result.wall_s:.0f} s:")
    print("\n".join(summary_table(result.evaluations)))
    verdict = "within the budget" if result.met_budget else "NO candidate met the budget; the unmerged model"
    print(f"chosen: {result.chosen} ({verdict}): {result.measured}")
    print(
        f"wrote {out}: torch.compile(..., backend='sdtm', options=sdtm_compile.load_tuned_options('{out}')), "
        f"or sdtm-compile export --config {out}"
    )
    return 0
