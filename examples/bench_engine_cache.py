"""Benchmark: engine build time with a cold cache vs a warm one (a second process loading, not rebuilding).

Each measurement is a fresh Python process that compiles the tiny SD3 transformer with the ``sdtm`` backend
(Inductor engines) and makes one call, so Dynamo tracing, the passes and the engines are all in it::

    python examples/bench_engine_cache.py --runs 3 --latent 64

Cold runs start from an empty engine cache and an empty Inductor cache (TORCHINDUCTOR_CACHE_DIR). Warm runs load
the engines the first cold run stored, once with an empty Inductor cache (our cache alone: the loaded engines
still rebuild their C++ kernels on CPU) and once with Inductor's own kernel cache kept between runs, as it is
by default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import sys, time, torch
from sdtm_compile.backend import SDTMBackend
from sdtm_compile.models import TINY_SD3, example_inputs, tiny_sd3_transformer
latent = int(sys.argv[1])
model = tiny_sd3_transformer(TINY_SD3)
inputs = example_inputs(TINY_SD3, 2, (latent, latent), timestep=1000.0)
start = time.perf_counter()
with torch.no_grad():
    torch.compile(model, backend=SDTMBackend({"engine": "inductor"}), dynamic=False)(**inputs, return_dict=False)
print(f"SECONDS {time.perf_counter() - start:.3f}")
"""


def run_child(latent: int, cache_dir: str, inductor_cache: str | None = None) -> float:
    with tempfile.TemporaryDirectory() as fresh:
        env = dict(os.environ, SDTM_CACHE_DIR=cache_dir, TORCHINDUCTOR_CACHE_DIR=inductor_cache or fresh)
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(latent)], env=env, capture_output=True, text=True, check=True
        )
    return float(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("SECONDS")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind (median reported)")
    parser.add_argument("--latent", type=int, default=64, help="latent side: 64 -> 1024 image tokens")
    args = parser.parse_args(argv)
    cold, warm, warm_both = [], [], []
    with tempfile.TemporaryDirectory() as shared, tempfile.TemporaryDirectory() as inductor_dir:
        for run in range(args.runs):
            with tempfile.TemporaryDirectory() as empty:
                cold.append(run_child(args.latent, empty if run else shared))
            print(f"cold run {run + 1}/{args.runs}: {cold[-1]:.1f} s", flush=True)
        for run in range(args.runs):
            warm.append(run_child(args.latent, shared))
            print(f"warm run {run + 1}/{args.runs}: {warm[-1]:.1f} s", flush=True)
        run_child(args.latent, shared, inductor_dir)  # fills Inductor's own cache (kernels) once
        for run in range(args.runs):
            warm_both.append(run_child(args.latent, shared, inductor_dir))
            print(f"warm run with Inductor's cache {run + 1}/{args.runs}: {warm_both[-1]:.1f} s", flush=True)
    tokens = (args.latent // 2) ** 2
    print(f"\ntiny SD3, {tokens} image tokens, batch 2, 6 SDTM engines (first call: trace + passes + engines)")
    print(f"cold build: median {statistics.median(cold):.1f} s  (runs: {', '.join(f'{s:.1f}' for s in cold)})")
    print(
        f"warm, engine cache only:  median {statistics.median(warm):.1f} s  "
        f"(runs: {', '.join(f'{s:.1f}' for s in warm)})"
    )
    print(
        f"warm, engine cache + Inductor's kernel cache: median {statistics.median(warm_both):.1f} s  "
        f"(runs: {', '.join(f'{s:.1f}' for s in warm_both)})"
    )
    print(
        f"first-call speed-up: {statistics.median(cold) / statistics.median(warm):.1f}x (engine cache only), "
        f"{statistics.median(cold) / statistics.median(warm_both):.1f}x (with Inductor's cache)"
    )


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"(benchmark wall time {time.perf_counter() - start:.0f} s)")
