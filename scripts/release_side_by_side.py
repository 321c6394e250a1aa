"""The authors' release (eager ``apply_SDTM``) beside our compiled backend, same model, schedule and noise.

    python scripts/release_side_by_side.py --release /path/to/TR_SDTM.py --model sd3m-1024 --out DIR

``TR_SDTM.py`` is the user's copy of the authors' file (fetch it from their SDTM repository; it is never committed
here; it imports ``tabulate``). Every configuration runs whole generations of ``--steps`` steps from the same
noise, round-robin, ``--runs`` times after one warm-up each (median reported):

* ``eager``: the unmodified model (the fidelity reference);
* ``release``: the same model with ``apply_SDTM`` at the same ratio, deviation, switch and ``a_s``
  (:mod:`sdtm_compile.bench.release`);
* ``inductor``: plain ``torch.compile``;
* ``sdtm buckets`` and ``sdtm exact``: our backend with Inductor engines, ``counts="buckets"`` / ``"exact"``.

Fidelity is each final latent's PSNR against the unmodified model's, and the release's against our eager reference
at exact counts (the same algorithm: how close the two implementations are). Compile time is not in the timings
(``scripts/exact_counts.py`` measures it).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.bench.config import BenchConfig
from sdtm_compile.bench.harness import Compiled
from sdtm_compile.bench.measures import fidelity
from sdtm_compile.bench.pages import Page
from sdtm_compile.bench.pages import write_page as write_page_file
from sdtm_compile.bench.record import machine_info
from sdtm_compile.bench.release import load_release, release_applied, release_switch_step
from sdtm_compile.bench.workload import make_workload

logger = logging.getLogger("release_side_by_side")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--release", help="path of the authors' TR_SDTM.py (never committed here)")
    parser.add_argument("--from-json", default=None, help="draw the page again from a saved release.json")
    parser.add_argument("--model", default="sd3m-1024")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--deviation", type=float, default=0.2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder for release.json and index.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.from_json:
        redraw(args.from_json)
        return
    if not args.release:
        parser.error("--release PATH is required (the authors' TR_SDTM.py)")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    release = load_release(args.release)
    config = BenchConfig(model=args.model, steps=args.steps)
    workload = make_workload(config)
    model = workload.model
    buckets = SDTMConfig(ratio=args.ratio, deviation=args.deviation)
    exact = SDTMConfig(ratio=args.ratio, deviation=args.deviation, counts="exact")

    def run(call) -> torch.Tensor:
        with torch.no_grad():
            return workload.generate(call, config)

    compiled = {
        name: Compiled(model, method, "inductor", workload.probe)
        for name, method in (("inductor", None), ("sdtm buckets", buckets), ("sdtm exact", exact))
    }
    calls = {
        "eager": lambda: run(workload.call_of(model)),
        "inductor": lambda: run(workload.call_of(compiled["inductor"].module)),
        "sdtm buckets": lambda: run(workload.call_of(compiled["sdtm buckets"].module)),
        "sdtm exact": lambda: run(workload.call_of(compiled["sdtm exact"].module)),
    }

    def with_release() -> torch.Tensor:
        with release_applied(release, model, lambda steps: run(workload.call_of(model)), exact, args.steps) as pipe:
            return pipe(num_inference_steps=args.steps)

    calls["release"] = with_release
    latents = {name: call() for name, call in calls.items()}  # warm-up, and the latents fidelity is read from
    latents["reference (ours, eager, exact counts)"] = run(workload.call_of(workload.reference(exact)))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for number in range(args.runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
        logger.info("run %d: %s", number + 1, {name: round(t[-1], 2) for name, t in times.items()})
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = latents["eager"]
    result = {
        "model": args.model,
        "steps": args.steps,
        "ratio": args.ratio,
        "deviation": args.deviation,
        "switch_step": release_switch_step(exact, args.steps),
        "release": str(args.release),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info().to_dict(),
        "command": "python scripts/release_side_by_side.py " + " ".join(sys.argv[1:]),
        "seconds": times,
        "median_s": medians,
        "speedup_over_release": {name: medians["release"] / t for name, t in medians.items()},
        "speedup_over_inductor": {name: medians["inductor"] / t for name, t in medians.items()},
        "psnr_vs_unmerged_db": {
            name: fidelity(latent, reference, False)["psnr_db"] for name, latent in latents.items() if name != "eager"
        },
        "release_vs_our_reference_psnr_db": fidelity(
            latents["release"], latents["reference (ours, eager, exact counts)"], False
        )["psnr_db"],
    }
    result["wall_time_s"] = time.perf_counter() - started
    print(json.dumps(result, indent=2))
    if args.out:
        write_page(Path(args.out), result)


def write_page(out: Path, result: dict) -> None:
    """The page (``index.md``, ``page.json``) and ``release.json`` in ``out`` (:mod:`sdtm_compile.bench.pages`)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "release.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"{result['steps']} steps, CFG, SDTM ratio {result['ratio']} +- {result['deviation']}; the release's "
        f"`switch_step` {result['switch_step']} puts its switch where ours is (0.4 of the trajectory). The release is "
        "the user's copy of the authors' `TR_SDTM.py`, run eagerly as they ship it (`apply_SDTM`, no compilation); it "
        "is not committed here. Every configuration starts from the same noise; median of "
        f"{len(result['seconds']['eager'])} round-robin generations after one warm-up.",
        "",
        "| configuration | median s | speed-up over the release | over Inductor | latent PSNR vs unmerged, dB |",
        "|---|---|---|---|---|",
    ]
    psnr = result["psnr_vs_unmerged_db"]
    for name, seconds in result["median_s"].items():
        value = psnr.get(name)
        shown = "-" if name == "eager" else ("inf" if value == float("inf") else f"{value:.2f}")
        lines.append(
            f"| {name} | {seconds:.2f} | {result['speedup_over_release'][name]:.2f}x | "
            f"{result['speedup_over_inductor'][name]:.2f}x | {shown} |"
        )
    lines += [
        "",
        "The release against our eager reference at exact counts (the same algorithm, two implementations): "
        f"{result['release_vs_our_reference_psnr_db']:.2f} dB.",
    ]
    page = Page(
        title=f"{result['model']}: the authors' release (eager) beside the compiled backend",
        kind="release",
        model=result["model"],
        measured_on=result["date"],
        machine=result.get("machine"),
        command=result["command"],
        body="\n".join(lines),
        files={"release.json": "every generation's seconds and every PSNR"},
        wall_time_s=result.get("wall_time_s"),
    )
    write_page_file(page, out, out.parent)


def redraw(path: str) -> None:
    """``--from-json``: the page again from a saved ``release.json``."""
    write_page(Path(path).parent, json.loads(Path(path).read_text()))


if __name__ == "__main__":
    main()
