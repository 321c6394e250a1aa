"""The speed / quality front of one model (:mod:`sdtm_compile.bench.front`): every method, extension, block schedule
and step cache, ours and the peers', timed against plain torch.compile and measured for quality on two seed sets.

    python scripts/front.py --model testbed-1024 --samples 64          # ~1 h on 2 cores
    python scripts/front.py --model sd3m-1024 --samples 8              # random weights: paired PSNR only

Writes ``docs/results/<date>-<model>-front/`` (``front.json``, ``front.png``, ``index.md``).
``--redraw DIR`` writes the picture and the page of ``DIR`` again from its ``front.json`` (nothing is re-measured).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path

from sdtm_compile.bench.config import BenchConfig
from sdtm_compile.bench.front import fill_state_mib, run_front, write_front


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed-1024")
    parser.add_argument("--samples", type=int, default=64, help="images per seed set (two sets)")
    parser.add_argument("--batch", type=int, default=8, help="images per generation when measuring quality")
    parser.add_argument("--runs", type=int, default=3, help="timed generations per configuration (median)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--engine", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--only", default=None, help="comma-separated configurations (besides the baselines)")
    parser.add_argument("--out", default=None, help="default docs/results/<date>-<model>-front")
    parser.add_argument("--redraw", default=None, metavar="DIR", help="re-write DIR's page from its front.json")
    args = parser.parse_args()
    if args.redraw is not None:
        stored = Path(args.redraw) / "front.json"
        if not stored.is_file():
            parser.error(f"{stored} does not exist: --redraw takes a directory a previous run wrote")
        print(f"wrote {write_front(fill_state_mib(json.loads(stored.read_text())), args.redraw)}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = BenchConfig(
        model=args.model, steps=args.steps, engine=args.engine, sweep_runs=args.runs, warmup=1, cold_caches=False
    )
    only = None if args.only is None else tuple(name.strip() for name in args.only.split(","))
    report = run_front(config, samples=args.samples, batch=args.batch, only=only, command=" ".join(sys.argv))
    out = args.out or f"docs/results/{datetime.date.today().isoformat()}-{args.model}-front"
    print(f"wrote {write_front(report, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
