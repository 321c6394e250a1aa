"""The benchmark of a model too large for whole generations on a CPU: first calls and per-call time per stage.

A whole 28-step generation of SD3-medium at full depth takes minutes per variant on a CPU, so for the real
architectures (``ModelPreset.real``) ``sdtm-compile bench`` measures calls instead. Per variant (``inductor``: plain
``torch.compile``, the baseline; ``sdtm``: the backend), each in its own process:

1. *cold*: a fresh process with empty Inductor and engine caches builds the model, compiles it and makes the first
   call of a generation (Dynamo, the passes and every engine built): the first-call time;
2. *warm*: a second process with the caches the first left makes the same first call, then times calls at one
   timestep of each engine the schedule reaches in a generation (the first step of each stage, median of ``runs``
   calls after one untimed call), and reads the process's peak resident memory.

The page lists first calls cold and warm, seconds per call per stage and the speed-up over Inductor, the peak memory
beside the model's own, the model (layers, dtype, tokens) and the machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.schedule import resolve_for_model
from ..models import FluxSpec
from ..models.sampling import flux_call_inputs, pipeline_timesteps
from ..runtime import StageDispatcher
from .config import BenchConfig
from .harness import cfg_call_inputs
from .memory import peak_rss
from .pages import Page, page_folder, write_page
from .record import machine_info
from .workload import make_workload

__all__ = ["CallReport", "run_call_benchmark", "call_markdown"]

logger = logging.getLogger(__name__)

VARIANTS = ("inductor", "sdtm")


@dataclass
class CallReport:
    """What :func:`run_call_benchmark` measured (``result.json`` of its page)."""

    model: str
    description: str
    layers: int
    dtype: str
    latent: int
    tokens: dict[str, int]
    method: dict[str, Any]
    machine: dict[str, Any]
    measured_on: str
    command: str | None
    steps: int = 0  #: steps of a generation
    schedule: list[str] = field(default_factory=list)  #: the engine of each step of a generation
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  #: per variant: cold, warm, per call, memory
    wall_time_s: float | None = None
    kind: str = "calls"
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def measure_in_process(config: BenchConfig, variant: str, time_calls: bool) -> dict[str, Any]:
    """One process's measurement (the child side): build, compile, first call; with ``time_calls`` the per-stage
    calls and the peak memory."""
    read_peak = peak_rss()  # this process's peak from here on: the model, the compile, the calls
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    workload = make_workload(config)
    model = workload.model
    built_s = time.perf_counter() - start
    model_mib = sum(t.nbytes for t in (*model.parameters(), *model.buffers())) / 2**20
    if variant == "inductor":  # with the eager engine (tests), the baseline skips Inductor too, as the main bench does
        compiled = torch.compile(model, backend="inductor" if config.engine == "inductor" else "eager", dynamic=False)
    else:
        options = {"method": config.method, "engine": config.engine}
        compiled = torch.compile(model, backend="sdtm", options=options, dynamic=False)
    result: dict[str, Any] = {"build_model_s": round(built_s, 1), "model_mib": round(model_mib)}
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        start = time.perf_counter()
        compiled(**workload.probe, return_dict=False)
        result["first_call_s"] = round(time.perf_counter() - start, 2)
        if not time_calls:
            return result
        per_call: dict[str, Any] = {}
        for label, timestep, call in _stage_calls(workload, config):
            compiled(**call, return_dict=False)  # untimed: the first call at this engine
            times = []
            for _ in range(config.runs):
                start = time.perf_counter()
                compiled(**call, return_dict=False)
                times.append(time.perf_counter() - start)
            per_call[label] = {"timestep": round(timestep, 4), "s": round(statistics.median(times), 3)}
            logger.info("%s %s: %.2f s per call", variant, label, per_call[label]["s"])
        result["per_call"] = per_call
    result["peak_rss_mib"] = round(read_peak())
    return result


def _generation_steps(config: BenchConfig) -> list[tuple[float, str]]:
    """``(timestep fed, engine key)`` of each step of a ``config.steps``-step generation (what the dispatcher
    picks)."""
    family = "flux" if isinstance(config.preset.spec, FluxSpec) else "sd3"
    tokens = (config.latent_side // 2) ** 2
    dispatcher = StageDispatcher(resolve_for_model(config.method, family, tokens))
    fed, _ = pipeline_timesteps(family, config.steps, tokens, dispatcher.config.timestep_shift)
    return [(float(t), str(dispatcher.key_for(t)[1])) for t in fed]


def generation_schedule(config: BenchConfig) -> list[str]:
    """The engine key of each step of a ``config.steps``-step generation."""
    return [key for _, key in _generation_steps(config)]


def _stage_calls(workload, config: BenchConfig) -> list[tuple[str, float, dict[str, Any]]]:
    """``(engine key, timestep, call inputs)``: the first step of each engine the schedule reaches in a generation
    of ``config.steps`` steps, in the order a generation meets them."""
    first = {key: t for t, key in reversed(_generation_steps(config))}  # reversed: the earliest step wins
    calls = []
    for key, t in sorted(first.items(), key=lambda item: -item[1]):  # timesteps fall as a generation goes
        if workload.family == "flux":
            inputs = workload.inputs
            sigma = torch.full((inputs.latents.shape[0],), t, dtype=inputs.latents.dtype)
            calls.append((key, t, flux_call_inputs(inputs, inputs.latents, sigma)))
        else:
            calls.append((key, t, cfg_call_inputs(workload.inputs, t)))
    return calls


def _child(config: BenchConfig, variant: str, caches: str, time_calls: bool) -> dict[str, Any]:
    env = dict(os.environ, SDTM_CACHE_DIR=f"{caches}/sdtm", TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor")
    payload = json.dumps({"config": _config_dict(config), "variant": variant, "time_calls": time_calls})
    command = [sys.executable, "-m", "sdtm_compile.bench.calls", payload]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} ({'warm' if time_calls else 'cold'}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    values["method"] = config.method.to_dict()
    return values


def run_call_benchmark(config: BenchConfig, command: str | None = None) -> CallReport:
    """Measure first calls cold and warm and per-call time per stage of ``inductor`` and ``sdtm``, one process per
    build (see the module docstring)."""
    preset = config.preset
    spec = preset.spec if config.layers is None else preset.spec.truncated(config.layers)
    grid = config.latent_side // 2
    tokens = {"image": grid * grid, "text": spec.text_tokens}
    report = CallReport(
        model=config.model,
        description=preset.description,
        layers=spec.num_blocks,
        dtype=config.dtype,
        latent=config.latent_side,
        tokens=tokens,
        method=config.method.to_dict(),
        machine=dataclasses.asdict(machine_info()),
        measured_on=time.strftime("%Y-%m-%d"),
        command=command,
    )
    report.steps = config.steps
    report.schedule = generation_schedule(config)
    started = time.perf_counter()
    for variant in VARIANTS:
        with tempfile.TemporaryDirectory(prefix="sdtm_calls_") as caches:
            logger.info("%s: first call, cold caches (a fresh process) ...", variant)
            cold = _child(config, variant, caches, time_calls=False)
            logger.info("%s: %.1f s cold; warm caches, then per-call times ...", variant, cold["first_call_s"])
            warm = _child(config, variant, caches, time_calls=True)
        report.rows[variant] = {"cold_first_call_s": cold["first_call_s"], **warm}
        logger.info("%s: %.1f s warm", variant, warm["first_call_s"])
    report.wall_time_s = round(time.perf_counter() - started, 1)
    return report


def call_markdown(report: CallReport) -> str:
    """The page's tables."""
    base = report.rows["inductor"]
    lines = [
        f"Model `{report.model}` ({report.description}), first {report.layers} blocks, {report.dtype}, "
        f"{report.tokens['image']} image + {report.tokens['text']} text tokens (latent {report.latent}), "
        "batch 2 (CFG; Flux: 1). "
        f"Method: `{report.method.get('method')}` ratio {report.method.get('ratio')}. One process per build; cold = "
        "empty Inductor and engine caches, warm = a second process with what the first left.",
        "",
        "| variant | first call cold s | first call warm s | cold vs Inductor | warm vs Inductor | peak RSS MiB | "
        "model MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report.rows.items():
        lines.append(
            f"| {name} | {row['cold_first_call_s']:.1f} | {row['first_call_s']:.1f} | "
            f"{row['cold_first_call_s'] / base['cold_first_call_s']:.2f}x | "
            f"{row['first_call_s'] / base['first_call_s']:.2f}x | {row['peak_rss_mib']:,} | {row['model_mib']:,} |"
        )
    stages = list(report.rows["sdtm"]["per_call"])
    lines += [
        "",
        "Seconds per call at the first step of each engine a generation reaches (median of the timed calls); "
        "Inductor at the same timesteps.",
        "",
        "| engine (timestep) | Inductor s | sdtm s | speed-up |",
        "|---|---|---|---|",
    ]
    for stage in stages:
        mine = report.rows["sdtm"]["per_call"][stage]
        theirs = base["per_call"][stage]  # both processes time the same schedule's engines
        speedup = theirs["s"] / mine["s"]
        lines.append(f"| {stage} (t={mine['timestep']:g}) | {theirs['s']:.2f} | {mine['s']:.2f} | {speedup:.2f}x |")
    if report.schedule and all(key in base["per_call"] for key in report.schedule):
        # every step of a generation costs what a call of its engine costs: the sum is a generation's transformer time
        inductor = sum(base["per_call"][key]["s"] for key in report.schedule)
        sdtm = sum(report.rows["sdtm"]["per_call"][key]["s"] for key in report.schedule)
        counts = ", ".join(f"{key} x{report.schedule.count(key)}" for key in dict.fromkeys(report.schedule))
        lines += [
            "",
            f"A {report.steps}-step generation ({counts}), estimated as the sum of its steps' per-call times: "
            f"Inductor {inductor:.0f} s, sdtm {sdtm:.0f} s, **{inductor / sdtm:.2f}x** (transformer calls only; "
            "not a timed generation).",
        ]
    return "\n".join(lines) + "\n"


def write_call_page(report: CallReport, results_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """The result page of ``report`` (``index.md`` + ``result.json``) under ``results_dir``; returns its folder."""
    folder = (
        Path(out_dir)
        if out_dir
        else page_folder(results_dir, report.measured_on, report.model, "calls", report.command)
    )
    folder.mkdir(parents=True, exist_ok=True)
    report.files = {"result.json": "every number of this page"}
    (folder / "result.json").write_text(report.to_json())
    page = Page(
        title=f"{report.model}: first calls and per-call time per stage, sdtm against Inductor",
        kind="calls",
        model=report.model,
        measured_on=report.measured_on,
        machine=report.machine,
        command=report.command,
        body=call_markdown(report),
        files=report.files,
        wall_time_s=report.wall_time_s,
    )
    write_page(page, folder, results_dir)
    return folder


def _main() -> None:
    """The child process: ``python -m sdtm_compile.bench.calls '<json>'`` prints its measurement as a JSON line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    payload = json.loads(sys.argv[1])
    config = BenchConfig(**payload["config"])
    print(json.dumps(measure_in_process(config, payload["variant"], payload["time_calls"])))


if __name__ == "__main__":
    _main()
