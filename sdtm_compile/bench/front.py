"""The speed / quality front of one model: every method, extension, block schedule and step cache (ours and the
other libraries'), each point's speed-up over plain ``torch.compile`` against what it costs in quality.

:func:`run_front` times every configuration as the variant comparison does (compiled, then timed round-robin beside
the Inductor baseline of its phase: :func:`~.compare_variants.build_and_time`) and measures its quality on two seed
sets of ``samples`` images each, generated through its eager path (the eager reference; the backend's eager engine
when our step cache is on; a peer's hooks on the eager model): paired PSNR / SSIM against the unmerged model's image
of each seed and, on a trained testbed, the sliced Wasserstein distance to real held-out crops added over the
unmerged model's own (:mod:`.distribution`). A point is *on the front* when no other point is at least as fast and
better. :func:`write_front` writes the JSON, the picture and a page saying which configuration sits on the front at
1.2x, 1.5x and 2x.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._pyplot import pyplot
from ..core.config import METHOD_CONFIGS
from ..core.method import method_for
from ..models.sampling import diffusers_call
from ..runtime import FirstBlockCacheConfig
from .compare_variants import VariantSpec, build_and_time, carried_state_mib, variant_state_mib
from .config import BASELINE, FIDELITY_REFERENCE, BenchConfig
from .instrument import CapturedBucketGraphs
from .peers import peer_specs
from .quality import Candidate, QualitySampler, generation_flops
from .record import machine_info, model_info
from .timing import step_records
from .workload import Workload, make_workload

__all__ = ["front_specs", "run_front", "write_front", "fill_state_mib", "front_points", "TARGETS"]

logger = logging.getLogger("sdtm_compile.bench")

#: The speed-ups the results page names the front's configuration at.
TARGETS = (1.2, 1.5, 2.0)


def front_specs(workload: Workload, config: BenchConfig, step_threshold: float = 0.1) -> list[VariantSpec]:
    """The configurations of the front, in table order: the baselines; SDTM at its default, at the release's
    evaluation point, with cache fusion, with block schedules (first quarter unmerged, staggered); ToMeSD (also
    staggered, the SDTM paper's adaptation), SiTo, ToMA at their defaults; our step cache alone and composed with
    SDTM (at its default, and at ratio 0.3 with the staggered schedule) and with ToMA (ratio 0.3, staggered), and at
    twice the threshold alone and with SDTM at 0.3 staggered; with cache fusion (at SDTM's default and at the
    release's evaluation point); the peers' step caches (at ``step_threshold``)."""
    sdtm = METHOD_CONFIGS["sdtm"]()
    skip = f"first-unmerged:{max(1, workload.num_blocks // 4)}"
    ours: list[tuple[str, Any, float | None]] = [
        ("sdtm", sdtm, None),
        ("sdtm+fusion", dataclasses.replace(sdtm, cache_fusion=True), None),
        ("sdtm-release-eval", sdtm.release_eval(), None),  # type: ignore[attr-defined]
        ("sdtm@0.3", method_for(sdtm).with_ratio(0.3), None),
        ("sdtm@0.7", method_for(sdtm).with_ratio(0.7), None),
        (f"sdtm[{skip}]", dataclasses.replace(sdtm, blocks=skip), None),
        ("sdtm[staggered]", dataclasses.replace(sdtm, blocks="staggered"), None),
        ("tomesd", METHOD_CONFIGS["tomesd"](), None),
        ("tomesd[staggered]", METHOD_CONFIGS["tomesd"](blocks="staggered"), None),
        ("sito", METHOD_CONFIGS["sito"](), None),
        ("toma", METHOD_CONFIGS["toma"](), None),
    ]
    if workload.family == "sd3":
        off = METHOD_CONFIGS["sdtm"](ratio=0.0, deviation=0.0)
        low = dataclasses.replace(method_for(sdtm).with_ratio(0.3), blocks="staggered")
        toma = METHOD_CONFIGS["toma"](ratio=0.3, blocks="staggered")
        looser = 2 * step_threshold  # the same rule skipping more steps: where the step cache's front goes next
        ours += [
            ("fbcache", off, step_threshold),
            (f"fbcache{looser:g}", off, looser),
            ("sdtm+fbcache", sdtm, step_threshold),
            ("sdtm@0.3[staggered]+fbcache", low, step_threshold),
            (f"sdtm@0.3[staggered]+fbcache{looser:g}", low, looser),
            ("toma@0.3[staggered]+fbcache", toma, step_threshold),
            # cache fusion and the step cache together: protected steps always compute, skipped ones touch no cache
            ("sdtm+fusion+fbcache", dataclasses.replace(sdtm, cache_fusion=True), step_threshold),
            ("sdtm-release-eval+fbcache", sdtm.release_eval(), step_threshold),  # type: ignore[attr-defined]
        ]
    else:  # our step cache is SD3-only, and the release's evaluation point is its SD3 scripts'
        ours = [entry for entry in ours if "release-eval" not in entry[0]]
    specs = [
        VariantSpec(FIDELITY_REFERENCE, "eager", "the diffusers model, uncompiled"),
        VariantSpec(BASELINE, "inductor", "torch.compile, Inductor"),
    ]
    for name, method, cache in ours:
        description = method_for(method).describe() + ("" if cache is None else f" + first-block cache {cache:g}")
        step_cache = None if cache is None else FirstBlockCacheConfig(cache)
        specs.append(VariantSpec(name, "backend", description, method, step_cache))
    peers = peer_specs(workload.family, step_threshold, config.steps)  # type: ignore[arg-type]
    return specs + [VariantSpec(p.name, "peer", p.description, peer=p) for p in peers]


def _quality_call(spec: VariantSpec, sampler: QualitySampler) -> Any:
    """``spec``'s transformer call for quality sampling (eager paths, any batch)."""
    if spec.kind in ("eager", "inductor"):
        return sampler.call(None)[0]
    if spec.kind == "peer":
        torch._dynamo.reset()
        return diffusers_call(spec.peer.apply(copy.deepcopy(sampler.workload.model), "eager"))  # type: ignore[union-attr]
    cache = None if spec.step_cache is None else spec.step_cache.threshold
    return sampler.call(Candidate(spec.name, spec.method, cache))[0]  # type: ignore[arg-type]


def _quality(sampler: QualitySampler, spec: VariantSpec, sets: list[list[int]], batch: int) -> dict[str, Any]:
    """:meth:`~.quality.QualitySampler.quality` of ``spec``'s images of both seed sets."""
    if spec.kind in ("eager", "inductor"):
        images = [sampler.unmerged(seeds, batch) for seeds in sets]
    else:
        call = _quality_call(spec, sampler)
        images = [sampler.run(call, seeds, batch) for seeds in sets]
    return sampler.quality(images, sets, batch)


def front_points(points: list[dict[str, Any]], measure: str) -> list[dict[str, Any]]:
    """Mark each point ``on_front``: no other point is at least as fast and better in ``measure`` (``swd_added``:
    lower is better; ``psnr``: higher)."""
    lower = measure == "swd_added"

    def better(a: float, b: float) -> bool:
        return a < b if lower else a > b

    for point in points:
        mine = point["quality"].get(measure)
        point["on_front"] = (
            point.get("speedup") is not None
            and mine is not None
            and not any(
                other is not point
                and other.get("speedup") is not None
                and other["speedup"] >= point["speedup"]
                and other["quality"].get(measure) is not None
                and better(other["quality"][measure], mine)
                for other in points
            )
        )
    return points


def run_front(
    config: BenchConfig,
    *,
    samples: int = 64,
    batch: int = 8,
    step_threshold: float = 0.1,
    only: Sequence[str] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Time and measure every configuration of :func:`front_specs` (``only``: just these, besides the baselines) on
    ``config.model``. Returns the report (JSON-ready); :func:`write_front` draws and writes it."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    workload = make_workload(config)
    specs = front_specs(workload, config, step_threshold)
    if only is not None:
        unknown = sorted(set(only) - {s.name for s in specs})
        if unknown:
            raise ValueError(f"unknown front configurations {unknown}: expected some of {[s.name for s in specs]}")
        specs = [s for s in specs if s.kind in ("eager", "inductor") or s.name in only]
    not_run: dict[str, str] = {}
    ours = [s for s in specs if s.kind != "peer"]
    peers = [s for s in specs if s.kind in ("eager", "inductor", "peer")]
    measured = build_and_time("front: ours", ours, workload, config, None, not_run)
    if any(s.kind == "peer" for s in peers):
        measured += build_and_time("front: peers", peers, workload, config, None, not_run)
    graphs = CapturedBucketGraphs(workload.model, workload.probe)
    sampler = QualitySampler(workload, config)
    sets = [list(range(i * samples, (i + 1) * samples)) for i in range(2)]
    points: dict[str, dict[str, Any]] = {}
    for number, (spec, compiled, _, seconds) in enumerate(measured, 1):
        if spec.name in points:  # the peers' phase times the baselines again, as their reference only
            continue
        logger.info("[quality %d/%d] %s: %d images ...", number, len(measured), spec.name, 2 * samples)
        start = time.perf_counter()
        try:
            quality = _quality(sampler, spec, sets, batch)
        except Exception as error:  # reported, not dropped
            not_run[spec.name] = f"quality: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
            logger.warning("%s: %s", spec.name, not_run[spec.name])
            continue
        flop_ratio, steps = None, None
        if spec.kind == "backend":
            cache = None if spec.step_cache is None else spec.step_cache.threshold
            candidate = Candidate(spec.name, spec.method, cache)  # type: ignore[arg-type]
            records = step_records(compiled, config.steps)  # type: ignore[arg-type]
            flop_ratio, steps = generation_flops(records, candidate, graphs, config.steps, workload.num_blocks)  # type: ignore[arg-type]
        elif spec.kind in ("eager", "inductor"):
            flop_ratio = 1.0
        points[spec.name] = {
            "name": spec.name,
            "kind": spec.kind,
            "description": spec.description,
            "config": None if spec.method is None else spec.method.to_dict(),
            "step_cache": None if spec.step_cache is None else spec.step_cache.threshold,
            "seconds": seconds[spec.name],
            "speedup": seconds[BASELINE] / seconds[spec.name],
            "flop_ratio": flop_ratio,
            "steps": steps,
            "quality": quality,
            "quality_seconds": time.perf_counter() - start,
            "state_mib": variant_state_mib(compiled),
        }
        logger.info("%s: %.2fx, %s", spec.name, points[spec.name]["speedup"], quality)
    measure = "swd_added" if workload.pixel_space else "psnr"
    return {
        "kind": "front",
        "format_version": 1,
        "measured_on": datetime.date.today().isoformat(),
        "command": command,
        "machine": machine_info().to_dict(),
        "model": model_info(config.model, config.latent_side).to_dict(),
        "settings": {
            "steps": config.steps,
            "guidance_scale": config.guidance_scale,
            "runs": config.sweep_runs,
            "samples_per_set": samples,
            "seed_sets": [[s[0], s[-1]] for s in sets],
            "batch": batch,
            "step_threshold": step_threshold,
            "front_measure": measure,
        },
        "points": front_points(list(points.values()), measure),
        "not_run": not_run,
        "wall_time_s": time.perf_counter() - started,
    }


def _at_targets(points: list[dict[str, Any]], measure: str) -> list[tuple[float, dict[str, Any] | None]]:
    """Per target speed-up: the best point (in ``measure``) at least that fast, or ``None``."""
    lower = measure == "swd_added"
    out = []
    for target in TARGETS:
        fast = [p for p in points if p["speedup"] >= target and p["quality"].get(measure) is not None]
        best = min(fast, key=lambda p: p["quality"][measure] * (1 if lower else -1)) if fast else None
        out.append((target, best))
    return out


def _draw(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    points = report["points"]
    measures = [("swd_added", "SWD to real crops, added over the unmerged model's (x 1e3; lower is better)")]
    if report["settings"]["front_measure"] != "swd_added":
        measures = []
    measures.append(("psnr", "paired PSNR vs the unmerged model (dB; higher is better)"))
    fig, axes = plt.subplots(1, len(measures), figsize=(6.2 * len(measures), 4.8), squeeze=False)
    colours = {"backend": "#1f3b73", "peer": "#a0451b", "eager": "#777777", "inductor": "#000000"}
    for ax, (measure, label) in zip(axes[0], measures):
        # each panel's front by its own measure (the report's ``on_front`` is by the front measure)
        on_front = {p["name"]: p["on_front"] for p in front_points(copy.deepcopy(points), measure)}
        front = sorted((p for p in points if on_front[p["name"]]), key=lambda p: p["speedup"])
        # identical images (PSNR inf) are drawn on a line above every finite value (the PSNR panel only)
        values = [q["quality"].get(measure, math.nan) for q in points] if measure == "psnr" else []
        identical = max((v for v in values if math.isfinite(v)), default=0) + 2
        if any(math.isinf(v) for v in values):
            ax.axhline(identical, color="#bbbbbb", ls="--", lw=1, zorder=0)
            ax.annotate(
                "identical to the unmerged model (PSNR inf)", (1.0, identical), xycoords=("axes fraction", "data"),
                xytext=(-3, -9), textcoords="offset points", ha="right", fontsize=6, color="#777777",
            )  # fmt: skip
        for p in points:
            value = p["quality"].get(measure)
            if value is None or math.isinf(value):
                value = identical if measure == "psnr" else value
            ax.scatter(p["speedup"], value, color=colours[p["kind"]], marker="o" if p["kind"] != "peer" else "s",
                       edgecolor="gold" if on_front[p["name"]] else "none", linewidths=1.5, zorder=3)  # fmt: skip
            ax.annotate(p["name"], (p["speedup"], value), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if measure == "swd_added":
            spread = max((p["quality"].get("swd_added_spread", 0.0) for p in points), default=0.0)
            ax.axhspan(-spread, spread, color="#dddddd", alpha=0.5, zorder=0, label="largest spread between seed sets")
            ax.legend(fontsize=7, loc="upper left")
        finite = [p for p in front if math.isfinite(p["quality"][measure])]
        if finite:
            ax.plot([p["speedup"] for p in finite], [p["quality"][measure] for p in finite], color="gold", lw=1)
        for target in TARGETS:
            ax.axvline(target, color="#bbbbbb", ls=":", lw=1)
        ax.set_xlabel("speed-up over torch.compile (Inductor), whole generations")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    model = report["model"].get("name", "")
    settings = report["settings"]
    fig.suptitle(
        f"{model}: speed vs quality ({settings['samples_per_set']} images x 2 seed sets, {settings['steps']} steps)\n"
        "blue: ours, red squares: other libraries, gold edge: on the front",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fill_state_mib(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with ``state_mib`` on every point that lacks it (a report written before the column existed),
    computed from each point's method config and step cache on the report's model, as :func:`run_front` records
    it (no engine is built)."""
    from ..core.config import config_from_dict
    from ..passes import hidden_state
    from ..reference import model_layout
    from .workload import make_workload

    missing = [p for p in report["points"] if "state_mib" not in p]
    if not missing:
        return report
    workload = make_workload(BenchConfig(model=report["model"]["name"]))
    probe = workload.probe
    layout = model_layout(workload.model, probe["hidden_states"], probe["encoder_hidden_states"], probe.get("img_ids"))
    for point in missing:
        if point["kind"] != "backend":
            point["state_mib"] = 0.0
            continue
        extra = (hidden_state(layout),) if point["step_cache"] is not None else ()
        signature = method_for(config_from_dict(point["config"])).signature(layout, extra)
        point["state_mib"] = carried_state_mib(signature)
    return report


def write_front(report: dict[str, Any], out_dir: str | Path, results_dir: str | Path | None = None) -> Path:
    """``front.json``, ``front.png`` and the page (``index.md``: a table and the front at :data:`TARGETS`) in
    ``out_dir``; the results index of ``results_dir`` (default: ``out_dir``'s parent) lists it."""
    from .pages import Page, write_page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "front.json").write_text(json.dumps(report, indent=2) + "\n")
    _draw(report, out / "front.png")
    measure = report["settings"]["front_measure"]
    settings = report["settings"]
    lines = [
        f"{settings['steps']} steps, guidance {settings['guidance_scale']}; speed: median of {settings['runs']} timed "
        "generations after a warm-up, round-robin with plain torch.compile (Inductor) in the same phase (ours, then "
        f"the peers); quality: {settings['samples_per_set']} images in each of 2 seed sets (seeds "
        f"{' and '.join(f'{first}-{last}' for first, last in settings['seed_sets'])}), generated through each "
        "configuration's eager path. SWD: sliced Wasserstein "
        "distance (x 1e3) on Laplacian-pyramid patches to as many real held-out crops; *added* is the "
        "configuration's minus the unmerged model's, per seed set, averaged; *spread* is how far the two seed sets "
        "disagree on it. *State MiB*: what the engines carry from step to step besides the merging state (cache "
        "fusion's cache `K x B x N x C`, the step cache's two residuals per call), in the model's dtype.",
        "",
        "| configuration | speed-up | FLOP ratio | SWD to real | (unmerged) | SWD added | spread | PSNR dB | SSIM "
        "| state MiB | front |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value: Any, digits: int = 2) -> str:
        if value is None:
            return "-"
        return "inf" if isinstance(value, float) and math.isinf(value) else f"{value:.{digits}f}"

    for p in sorted(report["points"], key=lambda p: -p["speedup"]):
        q = p["quality"]
        lines.append(
            f"| {p['name']} | {p['speedup']:.2f}x | {fmt(p['flop_ratio'])} | {fmt(q.get('swd_real'), 1)} | "
            f"{fmt(q.get('unmerged_swd_real'), 1)} | {fmt(q.get('swd_added'), 1)} | "
            f"{fmt(q.get('swd_added_spread'), 1)} | {fmt(q.get('psnr'))} | {fmt(q.get('ssim'), 3)} | "
            f"{fmt(p.get('state_mib'), 1)} | {'yes' if p['on_front'] else ''} |"
        )
    lines += ["", f"On the front (by {measure}):", ""]
    for target, best in _at_targets(report["points"], measure):
        if best is None:
            lines.append(f"- at {target:g}x: no configuration reaches {target:g}x")
        else:
            value = best["quality"][measure]
            speed = f"{best['speedup']:.2f}x"
            lines.append(f"- at {target:g}x or more: **{best['name']}** ({speed}, {measure} {value:.2f})")
    if report["not_run"]:
        lines += ["", "Not run:", ""] + [f"- {name}: {why}" for name, why in report["not_run"].items()]
    model = report["model"].get("name", "")
    page = Page(
        title=f"{model}: the speed / quality front of every method, extension and step cache",
        kind="front",
        model=model,
        measured_on=report.get("measured_on"),
        machine=report.get("machine"),
        command=report.get("command"),
        body="\n".join(lines),
        pictures={"speed vs quality": "front.png"},
        files={"front.json": "every point: speed, FLOPs, steps, quality per seed set"},
        wall_time_s=report.get("wall_time_s"),
    )
    write_page(page, out, results_dir if results_dir is not None else out.parent)
    return out
