"""What exact counts cost and save: static bucket engines vs one engine per stage with a dynamic count.

    python scripts/exact_counts.py --model sd3m-1024 --out docs/results/<date>-sd3m-1024-exact-counts

Three measurements, each printed and written to ``exact_counts.json`` (and ``index.md``) in ``--out``:

1. **Build cost**, one process per build: plain Inductor, ``sdtm`` with static buckets (``counts="buckets"``) and
   ``sdtm`` with ``counts="exact"``. Each build runs in a fresh Python process with empty Inductor and engine
   caches, and its first call is timed (cold); a second process with the caches the first one left times it again
   (warm); ``--build-runs`` times, round-robin, median.
2. **FLOP ratio** of a whole generation over the unmerged model, per step's engine and counts (FlopCounterMode on
   the rewritten graphs, op by op), for both.
3. **Steady state** in one process: every static bucket engine against the exact engine at the same counts (the
   stage's engine fed the bucket's counts), called directly, round-robin, median of ``--runs``; then whole
   generations of Inductor, buckets and exact, round-robin, median of ``--runs``.
4. **Where the time goes**: plain Inductor and the exact engine at the first and the last counts of each stage,
   called directly (round-robin, median of ``--runs``): time share against FLOP share, and each call's time split
   by the profiler into matmuls, attention, GEMVs and the rest (:func:`~sdtm_compile.bench.instrument.op_times`),
   which is what says why a speed-up falls short of the FLOP ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

from sdtm_compile import SDTMConfig
from sdtm_compile.bench.config import BenchConfig
from sdtm_compile.bench.harness import Compiled
from sdtm_compile.bench.instrument import CapturedBucketGraphs, op_times
from sdtm_compile.bench.pages import Page
from sdtm_compile.bench.pages import write_page as write_page_file
from sdtm_compile.bench.record import machine_info
from sdtm_compile.bench.workload import make_workload
from sdtm_compile.core.counts import count_tensors
from sdtm_compile.core.method import method_for
from sdtm_compile.core.schedule import FULL, EngineKey, position_at_step

logger = logging.getLogger("exact_counts")

BUILDS = ("inductor", "buckets", "exact")


def method_of(build: str, args: argparse.Namespace) -> SDTMConfig | None:
    if build == "inductor":
        return None
    return SDTMConfig(ratio=args.ratio, deviation=args.deviation, counts=build)


def bench_config(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        model=args.model, steps=args.steps, runs=args.runs, layers=args.layers, dtype=args.dtype, latent=args.latent
    )


def build_once(args: argparse.Namespace) -> None:
    """Child process: compile one build, time its first call, print one JSON line."""
    torch.set_num_threads(args.threads)
    config = bench_config(args)
    workload = make_workload(config)
    method = method_of(args.build_one, args)
    start = time.perf_counter()
    compiled = Compiled(workload.model, method, "inductor", workload.probe, Path(args.cache) / "sdtm")
    first_call = time.perf_counter() - start
    engines = len(compiled.compiled_graph.engines) if compiled.compiled_graph is not None else 1
    print(json.dumps({"build": args.build_one, "first_call_s": first_call, "engines": engines}))


def run_child(build: str, cache: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}
    command = [sys.executable, __file__, "--build-one", build, "--cache", str(cache), *args.passthrough]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{build} build failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_costs(args: argparse.Namespace, scratch: Path) -> dict:
    """Each build ``--build-runs`` times, round-robin: a fresh cache folder, a cold process, then a warm one."""
    runs: dict[str, dict[str, list[float]]] = {build: {"cold": [], "warm": []} for build in BUILDS}
    engines = {}
    for number in range(args.build_runs):
        for build in BUILDS:
            cache = scratch / f"{build}-{number}"
            cache.mkdir()
            cold = run_child(build, cache, args)
            warm = run_child(build, cache, args)
            runs[build]["cold"].append(cold["first_call_s"])
            runs[build]["warm"].append(warm["first_call_s"])
            engines[build] = cold["engines"]
            logger.info(
                "run %d, %s: first call %.1f s cold, %.1f s warm, %d engines",
                number + 1,
                build,
                cold["first_call_s"],
                warm["first_call_s"],
                cold["engines"],
            )
    result = {
        build: {
            "cold_s": statistics.median(runs[build]["cold"]),
            "warm_s": statistics.median(runs[build]["warm"]),
            "cold_runs_s": runs[build]["cold"],
            "warm_runs_s": runs[build]["warm"],
            "engines": engines[build],
        }
        for build in BUILDS
    }
    base = result["inductor"]
    for build in ("buckets", "exact"):
        result[build]["cold_vs_inductor"] = result[build]["cold_s"] / base["cold_s"]
        result[build]["warm_vs_inductor"] = result[build]["warm_s"] / base["warm_s"]
    return result


def step_keys(config: SDTMConfig, steps: int) -> list[EngineKey]:
    method = method_for(config)
    return [method.engine_key_at(position_at_step(s, steps)) for s in range(steps)]


def flop_ratios(args: argparse.Namespace, captured: CapturedBucketGraphs, steps: int) -> dict:
    result = {}
    for build in ("buckets", "exact"):
        config = method_of(build, args)
        keys = step_keys(config, steps)
        full = captured.flops(FULL, config).total * steps
        per_step = [captured.flops(key, config).total for key in keys]
        merged = sum(per_step)
        result[build] = full / merged
        result[f"{build}_step_flops"] = [flops / captured.flops(FULL, config).total for flops in per_step]
        logger.info("%s: FLOP ratio %.3f over %d steps", build, result[build], steps)
    result["exact_vs_buckets"] = result["exact"] / result["buckets"]
    return result


def _once(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def timed(fn, runs: int) -> float:
    """Median seconds of ``runs`` calls of ``fn`` after one warm-up call."""
    fn()
    return statistics.median(_once(fn) for _ in range(runs))


def steady_state(
    args: argparse.Namespace,
    workload,
    config: BenchConfig,
    scratch: Path,
    captured: CapturedBucketGraphs,
    engines_only: bool = False,
) -> dict:
    """Each static engine against the exact engine at the same counts; where the time goes; then whole generations
    (not with ``engines_only``: a real architecture at full depth, where a generation takes minutes)."""
    from sdtm_compile.compiler.compiled import SDTMCompiledGraph

    recorded: dict = {}
    original = SDTMCompiledGraph.__call__

    def record(self, *call_args):  # keep the first call's flat inputs, to call engines directly
        recorded.setdefault(id(self), call_args)
        return original(self, *call_args)

    SDTMCompiledGraph.__call__ = record
    try:
        compiled = {
            build: Compiled(
                workload.model, method_of(build, args), "inductor", workload.probe, scratch / build / "sdtm"
            )
            for build in BUILDS
        }
    finally:
        SDTMCompiledGraph.__call__ = original

    per_engine = []
    static, exact = compiled["buckets"].compiled_graph, compiled["exact"].compiled_graph
    kinds = [block.kind for block in exact.sites.blocks]
    with torch.no_grad():
        for key in sorted(k for k in static.engines if k.stage is not FULL.stage):
            flat = recorded[id(static)]
            state = static.signature.engine_inputs(static.signature.fresh())
            counts = count_tensors(exact.method.plan_counts(kinds, key, exact.sites.grid), exact.sites.num_tokens)
            engine = exact.engines[exact.method.engine_of(key)]
            calls = {
                "static": lambda: static.engines[key](*flat, *state),
                "exact": lambda: engine(*flat, *state, *counts),
            }
            times: dict[str, list[float]] = {"static": [], "exact": []}
            for _ in range(args.runs):
                for name, call in calls.items():
                    times[name].append(timed(call, 1))
            row = {
                "engine": str(key),
                "counts": list(exact.method.plan_counts(kinds, key, exact.sites.grid)),
                "static_ms": 1e3 * statistics.median(times["static"]),
                "exact_ms": 1e3 * statistics.median(times["exact"]),
            }
            row["exact_vs_static"] = row["exact_ms"] / row["static_ms"]
            per_engine.append(row)
            logger.info(
                "%s counts %s: static %.1f ms, exact %.1f ms (%.3f)",
                row["engine"],
                row["counts"],
                row["static_ms"],
                row["exact_ms"],
                row["exact_vs_static"],
            )

    where = where_time_goes(args, workload, compiled, recorded, captured)
    if engines_only:
        return {"per_engine": per_engine, "where_time_goes": where}
    generation: dict[str, list[float]] = {build: [] for build in BUILDS}
    with torch.no_grad():
        for build in BUILDS:
            workload.generate(workload.call_of(compiled[build].module), config)  # warm-up
        for _ in range(args.runs):
            for build in BUILDS:
                start = time.perf_counter()
                workload.generate(workload.call_of(compiled[build].module), config)
                generation[build].append(time.perf_counter() - start)
    medians = {build: statistics.median(times) for build, times in generation.items()}
    logger.info("generation medians: %s", {b: round(t, 2) for b, t in medians.items()})
    return {
        "per_engine": per_engine,
        "where_time_goes": where,
        "generation_s": medians,
        "generation_runs_s": generation,
        "speedup": {build: medians["inductor"] / medians[build] for build in ("buckets", "exact")},
    }


def stage_ends(config: SDTMConfig, steps: int) -> list[EngineKey]:
    """The first and the last step's engine key of each merging stage, in step order."""
    keys = [key for key in step_keys(config, steps) if key.stage is not FULL.stage]
    ends = [
        key
        for i, key in enumerate(keys)
        if i in (0, len(keys) - 1) or keys[i - 1].stage is not key.stage or keys[i + 1].stage is not key.stage
    ]
    return list(dict.fromkeys(ends))


def where_time_goes(args: argparse.Namespace, workload, compiled: dict, recorded: dict, captured) -> dict:
    """Plain Inductor and the exact engine at each stage's first and last counts: call time (direct calls,
    round-robin, median of ``--runs``), time and FLOP shares, and the profiler's split of each call
    (:class:`~sdtm_compile.bench.instrument.OpTimes`); matmul and attention rates (ms per GFLOP) of plain Inductor."""
    exact = compiled["exact"].compiled_graph
    config = method_of("exact", args)
    kinds = [block.kind for block in exact.sites.blocks]
    flat = recorded[id(exact)]
    state = exact.signature.engine_inputs(exact.signature.fresh())
    calls = {"inductor": lambda: compiled["inductor"].module(**workload.probe, return_dict=False)}
    keys, counts = {"inductor": FULL}, {"inductor": []}
    for key in stage_ends(config, args.steps):
        plan_counts = exact.method.plan_counts(kinds, key, exact.sites.grid)
        engine, tensors = exact.engines[exact.method.engine_of(key)], count_tensors(plan_counts, exact.sites.num_tokens)
        calls[str(key)] = lambda engine=engine, tensors=tensors: engine(*flat, *state, *tensors)
        keys[str(key)], counts[str(key)] = key, list(plan_counts)
    # (total, outside attention) FLOPs of one call of each
    flops = {
        name: (captured.flops(key, config).total, captured.linear_flops(key, config)) for name, key in keys.items()
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()
        for _ in range(args.runs):
            for name, call in calls.items():
                times[name].append(_once(call))
    split = {name: op_times(call, calls=2) for name, call in calls.items()}

    base_ms = 1e3 * statistics.median(times["inductor"])
    (base_total, base_linear), base_split = flops["inductor"], split["inductor"]
    rows = []
    for name in calls:
        ms, (total, linear), times_of = 1e3 * statistics.median(times[name]), flops[name], split[name]
        row = {
            "engine": name,
            "counts": counts[name],
            "ms": ms,
            "time_share": ms / base_ms,
            "flop_share": total / base_total,
            **{key: round(value, 3) for key, value in times_of.to_dict().items()},
            "matmul_flop_share": linear / base_linear,
            "attention_flop_share": (total - linear) / (base_total - base_linear),
        }
        row["flops_per_time"] = row["flop_share"] / row["time_share"]
        rows.append(row)
        logger.info(
            "%s: %.1f ms, time share %.3f, FLOP share %.3f; matmul %.1f, attention %.1f, GEMV %.1f, other %.1f ms",
            name,
            ms,
            row["time_share"],
            row["flop_share"],
            times_of.matmul_ms,
            times_of.attention_ms,
            times_of.gemv_ms,
            times_of.other_ms,
        )
    rates = {
        "matmul_ms_per_gflop": base_split.matmul_ms / (base_linear / 1e9),
        "attention_ms_per_gflop": base_split.attention_ms / ((base_total - base_linear) / 1e9),
    }
    return {"rows": rows, "inductor_rates": rates}


def write_page(out: Path, result: dict) -> None:
    """The page (``index.md``, ``page.json``), ``exact_counts.json`` and the picture in ``out``; the results index
    is rebuilt when ``out`` is a folder of it (:mod:`sdtm_compile.bench.pages`)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "exact_counts.json").write_text(json.dumps(result, indent=2) + "\n")
    b = result["builds"]
    runs = len(b["inductor"]["cold_runs_s"])
    lines = [
        f"{result['steps']} steps, CFG, SDTM ratio {result['ratio']} +- {result['deviation']}, "
        f"{result.get('dtype', 'float32')}, {result['threads']} torch threads.",
        "",
        "## Build cost: one process per build, empty caches, first call",
        "",
        (f"Median of {runs} runs each (round-robin)" if runs > 1 else "One run each")
        + "; every run's seconds are in `exact_counts.json`."
        + (f" Measured by an earlier command: `{result['builds_command']}`." if "builds_command" in result else ""),
        "",
        "| build | engines | cold s | warm s | cold / Inductor | warm / Inductor |",
        "|---|---|---|---|---|---|",
    ]
    for build in BUILDS:
        row = b[build]
        ratio = ("-", "-")
        if build != "inductor":
            ratio = (f"{row['cold_vs_inductor']:.2f}x", f"{row['warm_vs_inductor']:.2f}x")
        times = f"{row['cold_s']:.1f} | {row['warm_s']:.1f}"
        lines.append(f"| {build} | {row['engines']} | {times} | {ratio[0]} | {ratio[1]} |")
    if "flops" not in result:  # --builds-only
        lines += [
            "",
            "`--builds-only`: the build costs and each engine's calls (with their FLOP shares); no generation's FLOP "
            "ratio, no whole generations.",
        ]
        lines += _engine_table(result.get("steady", {}).get("per_engine", []))
        lines += _where_table(result.get("steady", {}).get("where_time_goes"))
        if "steady_command" in result:  # the engine calls measured by a second command
            took = f" ({result['steady_wall_time_s'] / 60:.0f} min)" if "steady_wall_time_s" in result else ""
            lines += ["", f"The engine calls{took}: `{result['steady_command']}`."]
        pictures = {}
        if result.get("steady", {}).get("where_time_goes"):
            draw_where(out / "where_time_goes.png", result)
            pictures["where the time of a call goes"] = "where_time_goes.png"
        _publish(out, result, lines, pictures=pictures)
        return
    f, s = result["flops"], result["steady"]
    lines += [
        "",
        "## FLOP ratio of a generation over the unmerged model",
        "",
        f"buckets {f['buckets']:.3f}, exact {f['exact']:.3f} (exact / buckets {f['exact_vs_buckets']:.3f}).",
    ]
    lines += _engine_table(s["per_engine"])
    lines += _where_table(s.get("where_time_goes"))
    speed = s["speedup"]
    lines += [
        "",
        "## Whole generations (median, round-robin)",
        "",
        "| build | s | speed-up over Inductor | FLOP ratio | speed-up / FLOP ratio |",
        "|---|---|---|---|---|",
        f"| inductor | {s['generation_s']['inductor']:.2f} | 1.00x | 1.00 | - |",
    ]
    for build in ("buckets", "exact"):
        lines.append(
            f"| {build} | {s['generation_s'][build]:.2f} | {speed[build]:.2f}x | {f[build]:.2f} | "
            f"{speed[build] / f[build]:.2f} |"
        )
    if "generation_runs_s" in s:  # each round's builds ran one after another: their ratio pairs them
        runs = s["generation_runs_s"]
        spread = []
        for build in ("buckets", "exact"):
            kept = [i / b / f[build] for i, b in zip(runs["inductor"], runs[build], strict=True)]
            spread.append(f"{build} {min(kept):.2f}-{max(kept):.2f}")
        lines += ["", f"Speed-up / FLOP ratio round by round: {', '.join(spread)}."]
    draw(out / "exact_counts.png", result)
    pictures = {"every step's FLOPs and the build cost": "exact_counts.png"}
    if s.get("where_time_goes"):
        draw_where(out / "where_time_goes.png", result)
        pictures["where the time of a call goes"] = "where_time_goes.png"
    _publish(out, result, lines, pictures=pictures)


def _engine_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        "## Steady state: each static bucket engine vs the stage's exact engine at the same counts",
        "",
        "| engine | counts | static ms | exact ms | exact / static |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['engine']} | {row['counts']} | {row['static_ms']:.1f} | {row['exact_ms']:.1f} | "
            f"{row['exact_vs_static']:.3f} |"
        )
    return lines


def _where_table(where: dict | None) -> list[str]:
    if not where:
        return []
    rates = where["inductor_rates"]
    lines = [
        "",
        "## Where the time goes: time share against FLOP share",
        "",
        "Plain Inductor and the exact engine at the first and the last counts of each stage, called directly "
        "(round-robin, median). Each call's time is split by the profiler (self time per op, 2 calls): matmuls, "
        "attention, GEMVs (matmuls of at most 16 rows: AdaLN modulation and the embeddings, next to no FLOPs) and "
        "the rest (Inductor's fused kernels: norms, GELU, plans, merges; copies; call overhead). In brackets: the "
        "class's FLOP share over its time share against plain Inductor (1.00: that class runs at its FLOP share).",
        "",
        "| engine | counts | ms | time share | FLOP share | FLOP share / time share | matmul ms | attention ms "
        "| GEMV ms | other ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = where["rows"][0]
    for row in where["rows"]:
        matmul = row["matmul_flop_share"] / (row["matmul_ms"] / base["matmul_ms"])
        attention = row["attention_flop_share"] / (row["attention_ms"] / base["attention_ms"])
        lines.append(
            f"| {row['engine']} | {row['counts'] or '-'} | {row['ms']:.1f} | {row['time_share']:.3f} | "
            f"{row['flop_share']:.3f} | {row['flops_per_time']:.3f} | {row['matmul_ms']:.1f} ({matmul:.2f}) | "
            f"{row['attention_ms']:.1f} ({attention:.2f}) | {row['gemv_ms']:.1f} | {row['other_ms']:.1f} |"
        )
    lines += [
        "",
        f"Plain Inductor's rates: matmuls {rates['matmul_ms_per_gflop']:.2f} ms per GFLOP, attention "
        f"{rates['attention_ms_per_gflop']:.2f} ms per GFLOP.",
    ]
    return lines


def _publish(out: Path, result: dict, lines: list[str], pictures: dict[str, str]) -> None:
    page = Page(
        title=f"{result['model']}: exact counts (one engine per stage) against static buckets",
        kind="exact-counts",
        model=result["model"],
        measured_on=result["date"],
        machine=result.get("machine"),
        command=result["command"],
        body="\n".join(lines),
        pictures=pictures,
        files={"exact_counts.json": "every number of this page, each build run's seconds"},
        wall_time_s=result.get("wall_time_s"),
    )
    write_page_file(page, out, out.parent)


def draw(path: Path, result: dict) -> None:
    """Left: each step's FLOPs over the unmerged model's, buckets vs exact; right: first-call seconds per build."""
    from sdtm_compile._pyplot import pyplot

    plt = pyplot()
    f, b = result["flops"], result["builds"]
    figure, (steps, builds) = plt.subplots(1, 2, figsize=(11, 4))
    for build, style in (("buckets", "o-"), ("exact", "s-")):
        fractions = f[f"{build}_step_flops"]
        steps.plot(range(len(fractions)), fractions, style, ms=3, label=f"{build} (FLOP ratio {f[build]:.2f})")
    steps.set_xlabel("step")
    steps.set_ylabel("FLOPs / unmerged model's")
    steps.set_title(f"{result['model']}: every step's FLOPs")
    steps.legend()
    names = list(BUILDS)
    x = range(len(names))
    builds.bar([i - 0.2 for i in x], [b[n]["cold_s"] for n in names], width=0.4, label="cold (empty caches)")
    builds.bar([i + 0.2 for i in x], [b[n]["warm_s"] for n in names], width=0.4, label="warm")
    builds.set_xticks(list(x), [f"{n}\n{b[n]['engines']} engines" for n in names])
    builds.set_ylabel("first call, s (one process per build)")
    builds.set_title("build cost")
    builds.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def draw_where(path: Path, result: dict) -> None:
    """Each engine's call split into matmuls, attention, GEMVs and the rest (ms), beside what its FLOP share of the
    plain Inductor call would take."""
    from sdtm_compile._pyplot import pyplot

    plt = pyplot()
    rows = result["steady"]["where_time_goes"]["rows"]
    base_ms = rows[0]["ms"]
    figure, axes = plt.subplots(figsize=(9, 0.6 * len(rows) + 2.2))
    names = [row["engine"] for row in rows][::-1]
    left = [0.0] * len(rows)
    for part, colour in (("matmul_ms", "C0"), ("attention_ms", "C1"), ("gemv_ms", "C3"), ("other_ms", "C7")):
        widths = [row[part] for row in rows][::-1]
        axes.barh(names, widths, left=left, color=colour, label=part.removesuffix("_ms"))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    shares = [row["flop_share"] * base_ms for row in rows][::-1]
    axes.plot(shares, names, "k|", ms=22, mew=2, label="FLOP share x plain Inductor's ms")
    axes.set_xlabel("ms per call (profiler self time)")
    axes.set_title(f"{result['model']}: where the time of a call goes")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=5, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd3m-1024")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--layers", type=int, default=None, help="keep the model's first k blocks (presets)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the model's)")
    parser.add_argument("--builds-only", action="store_true", help="only the build costs (a page of them with --out)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--deviation", type=float, default=0.2)
    parser.add_argument("--runs", type=int, default=3, help="timed generations / engine calls (median)")
    parser.add_argument("--build-runs", type=int, default=2, help="cold + warm processes per build (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder for exact_counts.json and index.md")
    parser.add_argument("--skip-builds", action="store_true", help="only FLOPs and steady state")
    parser.add_argument("--from-json", default=None, help="draw the page in --out again from its exact_counts.json")
    parser.add_argument(
        "--builds-from",
        default=None,
        metavar="JSON",
        help="with --skip-builds: the build costs of an earlier run's exact_counts.json (its command is recorded)",
    )
    parser.add_argument("--build-one", choices=BUILDS, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.passthrough = [
        f"--model={args.model}",
        f"--steps={args.steps}",
        f"--ratio={args.ratio}",
        f"--deviation={args.deviation}",
        f"--threads={args.threads}",
    ]
    args.passthrough += [f"--layers={args.layers}"] if args.layers is not None else []
    args.passthrough += [f"--dtype={args.dtype}"] + ([f"--latent={args.latent}"] if args.latent else [])
    if args.build_one:
        logging.basicConfig(level=logging.WARNING)
        build_once(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.from_json:
        write_page(Path(args.out or Path(args.from_json).parent), json.loads(Path(args.from_json).read_text()))
        return
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    config = bench_config(args)
    workload = make_workload(config)
    result = {
        "model": args.model,
        "steps": args.steps,
        "ratio": args.ratio,
        "deviation": args.deviation,
        "threads": args.threads,
        "dtype": args.dtype,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info().to_dict(),
        "command": "python scripts/exact_counts.py " + " ".join(sys.argv[1:]),
    }
    if args.builds_from:
        if not args.skip_builds:
            raise SystemExit("--builds-from takes the build costs of an earlier run: give --skip-builds too")
        earlier = json.loads(Path(args.builds_from).read_text())
        result["builds"], result["builds_command"] = earlier["builds"], earlier["command"]
    with tempfile.TemporaryDirectory() as scratch:
        if not args.skip_builds:
            result["builds"] = build_costs(args, Path(scratch))
        captured = CapturedBucketGraphs(workload.model, workload.probe)
        if args.builds_only:  # a real architecture at full depth: builds and engine calls are what fit here
            with temporary_cache_dir(str(Path(scratch) / "steady-inductor")):
                result["steady"] = steady_state(args, workload, config, Path(scratch), captured, engines_only=True)
            result["wall_time_s"] = time.perf_counter() - started
            print(json.dumps(result, indent=2))
            if args.out:
                write_page(Path(args.out), result)
            return
        result["flops"] = flop_ratios(args, captured, args.steps)
        with temporary_cache_dir(str(Path(scratch) / "steady-inductor")):
            result["steady"] = steady_state(args, workload, config, Path(scratch), captured)
    result["wall_time_s"] = time.perf_counter() - started
    print(json.dumps(result, indent=2))
    if args.out and "builds" in result:
        write_page(Path(args.out), result)


if __name__ == "__main__":
    main()
