"""The tuner: the fastest configuration whose quality stays within a budget the user states.

``sdtm-compile tune --model testbed-1024 --budget "psnr>=28"`` (or :func:`tune`) searches method x ratio x block
schedule x cache fusion x our first-block step cache (:func:`candidate_space`) in three rounds, cheapest first:

1. **Every candidate, quickly.** A few seeds' whole generations through the candidate's eager path (the eager
   reference, or the backend's eager engine when the step cache is on): the paired PSNR / SSIM against the unmerged
   model's images of the same seeds, which engine served each step (protected steps run unmerged, skipped steps run
   the first block only), and from those the generation's counted FLOPs (:class:`CapturedBucketGraphs`: every
   bucket graph of the candidate's own config, attention included).
2. **The fastest by FLOPs, measured properly.** In order of FLOP ratio, candidates whose quick estimate meets the
   budget (corrected by the mean gap between the full and the quick measure of those measured so far) get the full
   quality measure (``samples`` seeds in each of two seed sets: PSNR, SSIM and, on a trained
   testbed, the sliced Wasserstein distance to real held-out crops added over the unmerged model's,
   :mod:`.distribution`) until ``time_top`` of them meet the budget (at most ``shortlist`` measured).
3. **The survivors, timed.** They are compiled with the chosen engine (Inductor by default) and timed round-robin
   beside plain ``torch.compile`` (:func:`~.compare_variants.build_and_time`); the fastest measured wins.

The result is JSON (:meth:`TuneResult.to_dict`): ``options`` is a ``torch.compile(..., options=...)`` dict, also read
by ``sdtm-compile export --config FILE``, beside what was measured for it and for every other candidate. When no
candidate meets the budget the tuner says so and chooses the unmerged model (ratio 0: plain compilation).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import METHOD_CONFIGS, MethodConfig
from ..core.method import method_for
from ..runtime import FirstBlockCacheConfig
from .config import BASELINE, BenchConfig
from .instrument import CapturedBucketGraphs
from .quality import Candidate, QualitySampler, generation_flops
from .workload import make_workload

__all__ = [
    "QualityBudget",
    "Candidate",
    "Evaluation",
    "TuneResult",
    "candidate_space",
    "tune",
    "write_tune_page",
]

logger = logging.getLogger("sdtm_compile.bench")

#: The measures a budget can bound, the direction that is better, and what each means.
BUDGET_MEASURES = {
    "psnr": (">=", "paired PSNR (dB) of each image against the unmerged model's image of the same seed, averaged"),
    "ssim": (">=", "paired SSIM against the unmerged model's image of the same seed, averaged (trained testbeds)"),
    "swd": (
        "<=",
        "sliced Wasserstein distance (x 1e3) of the images to real held-out crops, added over the unmerged model's "
        "own distance (trained testbeds)",
    ),
}
_BUDGET = re.compile(r"^\s*(psnr|ssim|swd)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class QualityBudget:
    """How much quality a user gives up for speed: ``psnr>=Y`` (dB), ``ssim>=Y`` or ``swd<=X`` (see
    :data:`BUDGET_MEASURES`). :meth:`parse` reads the CLI's form."""

    measure: str
    bound: float

    def __post_init__(self) -> None:
        if self.measure not in BUDGET_MEASURES:
            raise ValueError(f"budget measure {self.measure!r}: expected one of {sorted(BUDGET_MEASURES)}")
        if not math.isfinite(self.bound):
            raise ValueError(f"budget bound {self.bound!r} is not a finite number")

    @classmethod
    def parse(cls, text: str) -> QualityBudget:
        """``"psnr>=28"``, ``"ssim>=0.95"``, ``"swd<=1.5"``; anything else is a ``ValueError`` naming the forms."""
        match = _BUDGET.match(text)
        forms = ", ".join(f"'{m}{op}VALUE'" for m, (op, _) in BUDGET_MEASURES.items())
        if match is None:
            raise ValueError(f"budget {text!r} is not one of {forms} (e.g. --budget 'psnr>=28')")
        measure, op, value = match.groups()
        if op != BUDGET_MEASURES[measure][0]:
            raise ValueError(f"budget {text!r}: {measure} is bounded with {BUDGET_MEASURES[measure][0]}, not {op}")
        try:
            return cls(measure, float(value))
        except ValueError:
            raise ValueError(f"budget {text!r}: {value!r} is not a number; use one of {forms}") from None

    def met(self, quality: dict[str, float]) -> bool:
        """Whether ``quality`` (``psnr`` / ``ssim`` / ``swd_added``) is within the budget."""
        value = quality.get("swd_added" if self.measure == "swd" else self.measure)
        if value is None or math.isnan(value):
            return False
        return value <= self.bound if self.measure == "swd" else value >= self.bound

    def __str__(self) -> str:
        return f"{self.measure}{BUDGET_MEASURES[self.measure][0]}{self.bound:g}"


def _name(config: MethodConfig, step_cache: float | None) -> str:
    if not config.enabled:
        name = "unmerged"
    else:
        name = f"{config.method}@{config.ratio:g}"
        if config.blocks != "all":
            blocks = config.blocks if isinstance(config.blocks, str) else ",".join(f"{f:g}" for f in config.blocks)
            name += f"[{blocks}]"
        if getattr(config, "cache_fusion", False):
            name += "+fusion"
    return name if step_cache is None else f"{name}+fbcache{step_cache:g}"


def candidate_space(
    family: str,
    num_blocks: int,
    *,
    methods: Sequence[str] = ("sdtm", "tomesd", "sito", "toma"),
    ratios: Sequence[float] = (0.3, 0.5, 0.7),
    schedules: Sequence[str] | None = None,
    cache_fusion: Sequence[bool] = (False, True),
    step_cache: Sequence[float | None] = (None, 0.1),
) -> list[Candidate]:
    """The configurations :func:`tune` searches on a model of ``family`` with ``num_blocks`` blocks.

    Each method at its defaults but for the ratio (:meth:`~sdtm_compile.core.method.TokenMethod.with_ratio`) and the
    block schedule (default: ``all``, the first quarter of the blocks unmerged, ``staggered``), SDTM with and without
    cache fusion, each with and without our step cache (SD3 / SD3.5; not beside cache fusion, which
    keeps its own step cache), and the step cache alone on the unmerged model. A ratio a method cannot reach is
    skipped. Duplicates (the same options) are kept once.
    """
    if schedules is None:
        schedules = ("all", f"first-unmerged:{max(1, num_blocks // 4)}", "staggered")
    caches = [c for c in step_cache if c is None or family == "sd3"]
    out: dict[str, Candidate] = {}

    def add(config: MethodConfig, cache: float | None) -> None:
        candidate = Candidate(_name(config, cache), config, cache)
        out.setdefault(candidate.name, candidate)

    for cache in caches:
        if cache is not None:
            add(METHOD_CONFIGS["sdtm"](ratio=0.0, deviation=0.0), cache)
    for name in methods:
        if name not in METHOD_CONFIGS:
            raise ValueError(f"unknown method {name!r}: expected some of {sorted(METHOD_CONFIGS)}")
        base = METHOD_CONFIGS[name]()
        for ratio in ratios:
            if not 0 < ratio <= base.max_ratio:
                continue
            try:
                at_ratio = method_for(base).with_ratio(ratio)
            except ValueError:
                continue
            for schedule in schedules:
                config = dataclasses.replace(at_ratio, blocks=schedule)
                fusions = cache_fusion if name == "sdtm" else (False,)
                for fusion in fusions:
                    fused = dataclasses.replace(config, cache_fusion=True) if fusion else config
                    for cache in caches:
                        if fusion and cache is not None:
                            continue
                        add(fused, cache)
    return list(out.values())


@dataclass
class Evaluation:
    """What the tuner measured of one candidate (``None``: that round did not reach it)."""

    name: str
    options: dict[str, Any]
    flop_ratio: float
    steps: dict[str, int]
    quick: dict[str, float]
    #: the full measure: single numbers (``psnr``, ``swd_added``, ...) and per-seed-set lists (``*_per_set``)
    full: dict[str, Any] | None = None
    within_budget: bool | None = None
    seconds: float | None = None
    speedup: float | None = None
    not_run: str | None = None


@dataclass
class TuneResult:
    """The tuner's answer: the chosen candidate's ``options`` and what was measured (:meth:`to_dict`: JSON)."""

    model: str
    budget: str
    chosen: str
    options: dict[str, Any]
    measured: dict[str, Any]
    evaluations: list[Evaluation]
    settings: dict[str, Any]
    met_budget: bool
    wall_s: float
    measured_on: str = field(default_factory=lambda: datetime.date.today().isoformat())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tune(
    model: str,
    budget: QualityBudget | str,
    *,
    candidates: Sequence[Candidate] | None = None,
    steps: int | None = None,
    quick_seeds: int = 2,
    samples: int = 16,
    batch: int = 8,
    shortlist: int = 8,
    time_top: int = 3,
    runs: int = 3,
    engine: str = "inductor",
    progress: bool = True,
) -> TuneResult:
    """Search ``candidates`` (default: :func:`candidate_space` of the model) for the fastest configuration of
    ``model`` (an SD3 preset of :data:`~sdtm_compile.models.MODEL_PRESETS`) within ``budget``; see the module
    docstring for the three rounds. ``quick_seeds``: images per candidate in round 1; ``samples``: images per seed set
    (two disjoint sets) in round 2; ``batch``: images per generation call (CFG doubles it); ``runs``: timed
    generations per survivor in round 3 (median); ``engine``: what round 3 compiles with (``inductor``, or ``eager``
    in tests, where the "speed-up" compares eager code with eager code)."""
    from tqdm.auto import tqdm

    from .compare_variants import VariantSpec, build_and_time

    started = time.perf_counter()
    budget = QualityBudget.parse(budget) if isinstance(budget, str) else budget
    config = BenchConfig(model=model, steps=steps, engine=engine, sweep_runs=runs, warmup=1, cold_caches=False)
    workload = make_workload(config)
    if workload.family != "sd3":
        raise ValueError(f"the tuner runs SD3 / SD3.5 models; {model} is a {workload.family} model")
    if budget.measure in ("ssim", "swd") and not workload.pixel_space:
        raise ValueError(
            f"budget {budget}: {budget.measure} needs images, and {model} has random weights (its outputs are "
            "latents of no picture): use a trained testbed (testbed-1024, testbed12-1024) or a psnr budget"
        )
    if candidates is None:
        candidates = candidate_space(workload.family, workload.num_blocks)
    if not candidates:
        raise ValueError("no candidates to search")
    sampler = QualitySampler(workload, config)
    graphs = CapturedBucketGraphs(workload.model, workload.probe)
    quick_set = list(range(10_000, 10_000 + quick_seeds))
    evaluations: dict[str, Evaluation] = {}
    by_name = {c.name: c for c in candidates}

    # round 1: every candidate, a few seeds
    for candidate in tqdm(candidates, desc="tune: quick estimate", disable=not progress):
        try:
            images, records = sampler.images(candidate, quick_set, batch)
        except Exception as error:  # a candidate the model cannot run: reported, not dropped silently
            logger.warning("%s does not run on %s: %s", candidate.name, model, error)
            evaluations[candidate.name] = Evaluation(
                candidate.name, candidate.options(), 0.0, {}, {}, not_run=str(error)
            )
            continue
        ratio, counts = generation_flops(records, candidate, graphs, config.steps, workload.num_blocks)  # type: ignore[arg-type]
        evaluations[candidate.name] = Evaluation(
            candidate.name, candidate.options(), ratio, counts, sampler.paired(images, quick_set, batch)
        )
        logger.info("quick: %s FLOP ratio %.2f, %s", candidate.name, ratio, evaluations[candidate.name].quick)

    # round 2: in FLOP order, the full quality measure until time_top meet the budget. A few seeds are a noisy,
    # biased estimate (on the testbed, 2 seeds read 1.6-5.5 dB above 32): the quick value is corrected by the mean
    # gap between the full and the quick measure of the candidates measured so far before it filters the next one.
    pending = sorted((e for e in evaluations.values() if e.not_run is None), key=lambda e: -e.flop_ratio)
    sets = [list(range(i * samples, (i + 1) * samples)) for i in range(2)]
    survivors: list[Evaluation] = []
    gaps: list[float] = []
    while pending and len(survivors) < time_top and len(gaps) < shortlist:
        evaluation = pending.pop(0)
        if budget.measure != "swd":  # the quick estimate bounds the same measure: skip what already misses it
            gap = sum(gaps) / len(gaps) if gaps else 0.0
            if not budget.met({budget.measure: evaluation.quick[budget.measure] + gap}):
                continue
        evaluation.full = _full_quality(sampler, by_name[evaluation.name], sets, batch)
        evaluation.within_budget = budget.met(evaluation.full)
        full, estimate = (values.get(budget.measure, 0.0) for values in (evaluation.full, evaluation.quick))
        gaps.append(full - estimate if math.isfinite(full) and math.isfinite(estimate) else 0.0)
        logger.info("full: %s %s -> %s", evaluation.name, evaluation.full, evaluation.within_budget)
        if evaluation.within_budget:
            survivors.append(evaluation)

    # round 3: the survivors timed through the compiled backend beside plain torch.compile
    met = bool(survivors)
    if not met:
        logger.warning("no candidate met the budget %s: choosing the unmerged model (plain compilation)", budget)
    specs = [VariantSpec(BASELINE, "inductor", "torch.compile, Inductor")]
    specs += [
        VariantSpec(e.name, "backend", e.name, by_name[e.name].method, _step_cache(by_name[e.name])) for e in survivors
    ]
    not_run: dict[str, str] = {}
    timed = build_and_time("tune", specs, workload, config, None, not_run)
    seconds = timed[0][3] if timed else {}
    for evaluation in survivors:
        if evaluation.name in seconds and BASELINE in seconds:
            evaluation.seconds = seconds[evaluation.name]
            evaluation.speedup = seconds[BASELINE] / seconds[evaluation.name]
        else:
            evaluation.not_run = not_run.get(evaluation.name, "not timed")
    timed_ok = [e for e in survivors if e.speedup is not None]
    if timed_ok:
        best = max(timed_ok, key=lambda e: e.speedup)  # type: ignore[arg-type,return-value]
        chosen, options = best.name, best.options
        measured_best = {"speedup_vs_inductor": best.speedup, "flop_ratio": best.flop_ratio, **(best.full or {})}
    else:
        unmerged = METHOD_CONFIGS["sdtm"](ratio=0.0, deviation=0.0)
        chosen, options = "unmerged", Candidate("unmerged", unmerged).options()
        measured_best = {"speedup_vs_inductor": 1.0, "flop_ratio": 1.0}
    settings = {
        "steps": config.steps,
        "guidance_scale": config.guidance_scale,
        "quick_seeds": quick_set,
        "seed_sets": sets,
        "batch": batch,
        "shortlist": shortlist,
        "time_top": time_top,
        "runs": runs,
        "engine": engine,
        "candidates": len(candidates),
        "budget_measure": BUDGET_MEASURES[budget.measure][1],
    }
    return TuneResult(
        model,
        str(budget),
        chosen,
        options,
        measured_best,
        list(evaluations.values()),
        settings,
        met,
        time.perf_counter() - started,
    )


def _step_cache(candidate: Candidate) -> FirstBlockCacheConfig | None:
    return None if candidate.step_cache is None else FirstBlockCacheConfig(candidate.step_cache)


def _full_quality(sampler: QualitySampler, candidate: Candidate, sets: list[list[int]], batch: int) -> dict[str, float]:
    """:meth:`QualitySampler.quality` of ``candidate``'s images of both seed sets."""
    return sampler.quality([sampler.images(candidate, seeds, batch)[0] for seeds in sets], sets, batch)


def write_tune_page(result: dict[str, Any], out_dir: str | Path, command: str | None = None) -> Path:
    """A results page for a tuner result (:meth:`TuneResult.to_dict`): ``tuned.json`` and ``index.md`` (every
    candidate's FLOP ratio, quick and full quality, speed-up) in ``out_dir``, listed in its parent's results index."""
    import json

    from .pages import Page, write_page
    from .record import machine_info

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuned.json").write_text(json.dumps(result, indent=2) + "\n")
    settings = result["settings"]

    def fmt(values: dict[str, Any] | None, key: str, digits: int = 2) -> str:
        value = None if values is None else values.get(key)
        if value is None:
            return "-"
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"

    verdict = "met" if result["met_budget"] else "NOT met by any candidate: the unmerged model"
    lines = [
        f"Budget `{result['budget']}` ({settings['budget_measure']}): {verdict}. **Chosen: {result['chosen']}** "
        f"({', '.join(f'{k} {v:.3g}' for k, v in result['measured'].items() if isinstance(v, float))}).",
        "",
        f"{settings['candidates']} candidates, {settings['steps']} steps; quick round: seeds "
        f"{settings['quick_seeds']}; "
        f"full measure: 2 seed sets of {len(settings['seed_sets'][0])} images; timed: {settings['runs']} runs "
        f"({settings['engine']}). Options: `{json.dumps(result['options'])}`.",
        "",
        "| candidate | FLOP ratio | quick PSNR | PSNR | SSIM | SWD added | spread | within budget | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in sorted(result["evaluations"], key=lambda e: -e["flop_ratio"]):
        within = "" if e["within_budget"] is None else ("yes" if e["within_budget"] else "no")
        speed = "-" if e["speedup"] is None else f"{e['speedup']:.2f}x"
        lines.append(
            f"| {e['name']} | {e['flop_ratio']:.2f} | {fmt(e['quick'], 'psnr')} | {fmt(e['full'], 'psnr')} | "
            f"{fmt(e['full'], 'ssim', 3)} | {fmt(e['full'], 'swd_added', 1)} | {fmt(e['full'], 'swd_added_spread', 1)} "
            f"| {within} | {speed} |"
        )
    page = Page(
        title=f"{result['model']}: the tuner's search for the fastest configuration within {result['budget']}",
        kind="tune",
        model=result["model"],
        measured_on=result.get("measured_on"),
        machine=machine_info().to_dict(),
        command=command,
        body="\n".join(lines),
        files={"tuned.json": "the result: options for torch.compile and export, every candidate's measures"},
        wall_time_s=result.get("wall_s"),
    )
    write_page(page, out, out.parent)
    return out
