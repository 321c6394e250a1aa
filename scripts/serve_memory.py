"""Resident memory of a Triton server under the load test: the server and its Python-backend stubs, summed.

    python scripts/serve_memory.py BUNDLE [--concurrency 2] [--requests 8] [--steps 4]

Writes a repository for ``BUNDLE`` (Python-backend engines: what this machine's PyTriton ``tritonserver`` runs),
starts the server, runs the load test (every response checked against the bundle's reference) while sampling the
resident memory of the server's process tree every 0.2 s, and prints one JSON line: the bundle's weight bytes, the
peak of the summed RSS and of the summed PSS (shared pages counted once), and each process's RSS at that peak.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            children = task / "children"
            if children.exists():
                todo += [int(c) for c in children.read_text().split()]
    return found


def _memory(pid: int) -> tuple[float, float, str]:
    """``(rss MiB, pss MiB, command)`` of one process (zeros when it is gone)."""
    try:
        rss = pss = 0.0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1024
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        return rss, pss, command
    except OSError:
        return 0.0, 0.0, ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads of the engine model and of the reference (0: all cores); 1 makes both "
        "deterministic",
    )
    args = parser.parse_args()

    from sdtm_compile.deploy import OnnxTransformer
    from sdtm_compile.deploy.bundle import read_bundle
    from sdtm_compile.deploy.triton import TritonSettings, export_triton, load
    from sdtm_compile.deploy.triton.server import TritonServer
    from sdtm_compile.deploy.triton.step_logic import StepTable

    manifest = read_bundle(args.bundle)
    repository = Path(tempfile.mkdtemp()) / "repo"
    settings = TritonSettings(
        engine_backend="python",
        pipeline_instances=args.concurrency,
        max_steps=args.steps,
        engine_threads=args.threads,
    )
    export_triton(args.bundle, repository, settings)
    table = StepTable.load(repository / settings.name / "1")
    from sdtm_compile.deploy.runner import lean_session_options

    options = lean_session_options()  # as the engine model runs it
    options.intra_op_num_threads = args.threads
    runner = OnnxTransformer(args.bundle, session_options=options)
    mix = [load.make_request(table, seed, args.steps) for seed in range(2)]
    references = [load.reference_output(runner, table, request) for request in mix]
    del runner

    peak = {"rss": 0.0, "pss": 0.0, "processes": []}
    stop = threading.Event()
    with TritonServer(repository) as server:

        def sample() -> None:
            while not stop.is_set():
                rows = [_memory(pid) for pid in _children(server.process.pid)]
                rss, pss = sum(r[0] for r in rows), sum(r[1] for r in rows)
                if pss > peak["pss"]:
                    peak.update(rss=rss, pss=pss, processes=[(round(r[0]), r[2]) for r in rows if r[0]])
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = load.run_load("grpc", server.grpc_url, settings.name, mix, references, args.concurrency, args.requests)
        stop.set()
        sampler.join()
    print(
        json.dumps(
            {
                "weights_mib": round(manifest["weights"]["bytes"] / 2**20, 1),
                "load_ok": result.ok,
                "errors": result.errors[:2],
                "mismatches": result.mismatches[:2],
                "max_abs_error": result.max_abs_error,
                "requests": args.requests,
                "concurrency": args.concurrency,
                "peak_rss_mib": round(peak["rss"]),
                "peak_pss_mib": round(peak["pss"]),
                "processes_at_peak": peak["processes"],
            }
        )
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
