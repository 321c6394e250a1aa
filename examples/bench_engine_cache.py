"""Benchmark: how long the first call takes - engine builds cold and warm - for plain Inductor and for SDTM.

Every measurement is a fresh Python process that builds a model from config, compiles it and makes one call
(Dynamo tracing, the passes and every engine are in it)::

    python examples/bench_engine_cache.py --models tiny-sd3 sd3m-1024 sd3m-4096

Per model and variant: *cold* starts with an empty engine cache and an empty Inductor cache
(``SDTM_CACHE_DIR``, ``TORCHINDUCTOR_CACHE_DIR``); *warm* is a second process with the caches the cold one left
(what a user's second run sees). Variants: ``inductor`` (plain ``torch.compile``, the baseline), ``sdtm`` (the
backend as shipped: regional engines, :mod:`sdtm_compile.compiler.regions`) and, with ``--whole``, ``sdtm-whole``
(``regional=False``: every bucket graph compiled whole, as before regional engines). Batch 2 (CFG), the
model's default latent. Writes the table as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import sys, time, torch
from sdtm_compile import SDTMBackend
from sdtm_compile.models import MODEL_PRESETS, example_inputs, tiny_sd3_transformer
name, variant = sys.argv[1:3]
preset = MODEL_PRESETS[name]
model = tiny_sd3_transformer(preset.spec)
inputs = example_inputs(preset.spec, 2, (preset.latent, preset.latent), timestep=1000.0)
if variant == "inductor":
    compiled = torch.compile(model, dynamic=False)
else:
    backend = SDTMBackend({"engine": "inductor", "regional": variant == "sdtm"})
    compiled = torch.compile(model, backend=backend, dynamic=False)
start = time.perf_counter()
with torch.no_grad():
    compiled(**inputs, return_dict=False)
print(f"SECONDS {time.perf_counter() - start:.3f}")
"""


def run_child(model: str, variant: str, caches: str) -> float:
    env = dict(os.environ, SDTM_CACHE_DIR=f"{caches}/sdtm", TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, model, variant], env=env, capture_output=True, text=True, timeout=3600
    )
    if result.returncode != 0:
        raise RuntimeError(f"{model} {variant} failed:\n{result.stderr[-3000:]}")
    return float(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("SECONDS")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd3", "sd3m-1024"], help="model presets")
    parser.add_argument("--whole", action="store_true", help="also time sdtm with regional=False")
    parser.add_argument("--json", default=None, help="write the table here")
    args = parser.parse_args(argv)
    variants = ["inductor", "sdtm", *(["sdtm-whole"] if args.whole else [])]
    rows = []
    for model in args.models:
        row: dict[str, float | str] = {"model": model}
        for variant in variants:
            with tempfile.TemporaryDirectory() as caches:
                row[f"{variant} cold"] = run_child(model, variant, caches)
                print(f"{model:<10} {variant:<11} cold {row[f'{variant} cold']:7.1f} s", flush=True)
                row[f"{variant} warm"] = run_child(model, variant, caches)
                print(f"{model:<10} {variant:<11} warm {row[f'{variant} warm']:7.1f} s", flush=True)
        rows.append(row)
    print("\nfirst call (trace + passes + every engine built or loaded), one process per build, batch 2:\n")
    print("| model | " + " | ".join(f"{v} cold s | {v} warm s" for v in variants) + " | sdtm/inductor cold | warm |")
    print("|---" * (2 * len(variants) + 3) + "|")
    for row in rows:
        cells = " | ".join(f"{row[f'{v} cold']:.1f} | {row[f'{v} warm']:.1f}" for v in variants)
        cold = row["sdtm cold"] / row["inductor cold"]  # type: ignore[operator]
        warm = row["sdtm warm"] / row["inductor warm"]  # type: ignore[operator]
        print(f"| {row['model']} | {cells} | {cold:.2f}x | {warm:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "command": " ".join(sys.argv)}, f, indent=1)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"(benchmark wall time {time.perf_counter() - start:.0f} s)")
