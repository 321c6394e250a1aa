"""The ``serve`` and ``serve-bench`` commands: bundle -> repository -> a running ``tritonserver``, checked.

``sdtm-compile serve`` with no arguments exports the tiny SD3 model (built from config, seeded, no downloads) to
a bundle, writes its repository, starts ``tritonserver`` and serves until Ctrl-C; ``--check`` instead sends one
request over HTTP and one over gRPC, compares them with the in-process reference and stops.
``sdtm-compile serve-bench`` runs the load test (:func:`~sdtm_compile.deploy.triton.load.run_load`) at several client
counts over both protocols; the command (:mod:`sdtm_compile.cli.serve`) writes the result page (``index.md``, its
numbers in ``result.json`` and its picture ``load.png``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..bundle import read_bundle
from ..runner import OnnxTransformer
from . import load
from .repository import TritonSettings, export_triton
from .server import ServerDistribution, TritonServer
from .step_logic import StepTable

__all__ = ["engine_backend_for", "prepare_bundle", "prepare_repository", "check_server", "load_benchmark"]

logger = logging.getLogger(__name__)


def engine_backend_for(distribution: ServerDistribution) -> str:
    """Triton's ONNX Runtime backend where the server has it, else our Python runner (said loudly)."""
    if distribution.has_onnxruntime_backend:
        return "onnxruntime"
    logger.warning(
        "this tritonserver (%s) has no onnxruntime backend: the engines are served by our Python-backend runner of "
        "the same ONNX files (engine_backend='python'); a stock tritonserver image serves them with its own",
        distribution.origin,
    )
    return "python"


def prepare_bundle(work: Path, key: dict[str, Any], export) -> Path:
    """``work/bundle``: reused when an earlier run exported it with the same ``key`` (model, method, shapes) and
    it still checks out, else exported again by ``export(folder)``."""
    bundle = work / "bundle"
    stamp = bundle / "serve_key.json"
    if stamp.exists() and json.loads(stamp.read_text()) == key:
        try:
            read_bundle(bundle)
            logger.info("reusing the bundle in %s (same model and settings)", bundle)
            return bundle
        except ValueError as err:
            logger.warning("re-exporting the bundle in %s: %s", bundle, err)
    started = time.perf_counter()
    export(bundle)
    stamp.write_text(json.dumps(key))
    logger.info("exported the bundle to %s in %.0f s", bundle, time.perf_counter() - started)
    return bundle


def prepare_repository(bundle: Path, repository: Path, settings: TritonSettings) -> StepTable:
    export_triton(bundle, repository, settings)
    return StepTable.load(repository / settings.name / "1")


def check_server(server: TritonServer, bundle: Path, table: StepTable, name: str, seed: int = 0) -> list[str]:
    """One request over HTTP and one over gRPC, each compared with the in-process reference; returns report
    lines (raises ``AssertionError`` on a mismatch)."""
    runner = OnnxTransformer(bundle)
    request = load.make_request(table, seed, min(8, table.max_steps))
    reference = load.reference_output(runner, table, request)
    lines = []
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        started = time.perf_counter()
        output = load.infer(protocol, load.client(protocol, url), name, request.arrays)
        elapsed = time.perf_counter() - started
        difference = float(abs(output - reference).max())
        lines.append(f"{protocol:<5} {request.label}: {elapsed * 1e3:.0f} ms, max |diff| vs reference {difference:.2g}")
        if not difference <= 1e-5:
            raise AssertionError(f"{protocol}: the served latent differs from the reference by {difference:.3g}")
    return lines


def load_benchmark(
    servers: Sequence[TritonServer],
    bundle: Path,
    table: StepTable,
    name: str,
    concurrencies: Sequence[int],
    total: int,
    protocols: Sequence[str] = ("grpc", "http"),
    step_counts: Sequence[int] = (8, 16),
    seeds: int = 4,
) -> tuple[list[load.LoadResult], float, list[load.ServedRequest]]:
    """The fixed request mix (``seeds`` x ``step_counts``, CFG 7.0 / 4.5 alternating), its references, then every
    (protocol, concurrency) point against ``servers`` (replicas of one repository, round-robin). Returns the points,
    the in-process seconds per generation of the mix and the mix."""
    runner = OnnxTransformer(bundle)
    mix = [
        load.make_request(table, seed, steps, 7.0 if seed % 2 == 0 else 4.5)
        for steps in step_counts
        for seed in range(seeds)
    ]
    started = time.perf_counter()
    references = [load.reference_output(runner, table, request) for request in mix]
    baseline = (time.perf_counter() - started) / len(mix)
    logger.info("references of %d requests: %.2f s per generation in-process", len(mix), baseline)
    urls = {"grpc": [s.grpc_url for s in servers], "http": [s.http_url for s in servers]}
    # warm every engine instance of every replica once, untimed (an ONNX Runtime session's first calls are slow)
    pipelines = sum(server_pipelines(server, name) for server in servers)
    load.run_load("grpc", urls["grpc"], name, mix, references, pipelines, len(mix) * len(servers))
    memory = [_rss(servers)]
    results = []
    for protocol in protocols:
        for concurrency in concurrencies:
            logger.info("%s, %d replicas, %d clients, %d requests ...", protocol, len(servers), concurrency, total)
            result = load.run_load(protocol, urls[protocol], name, mix, references, concurrency, total)
            logger.info(
                "  %.2f gen/s, p50 %.0f ms, p95 %.0f ms, %d errors, %d mismatched",
                result.throughput,
                result.p50_s * 1e3,
                result.p95_s * 1e3,
                len(result.errors),
                len(result.mismatches),
            )
            results.append(result)
            memory.append(_rss(servers))
            result.server_rss_mib = memory[-1]
    if memory[0] is not None:
        logger.info("servers + stubs resident memory: %s MiB", " -> ".join(f"{m:.0f}" for m in memory if m))
    return results, baseline, mix


def _rss(servers: Sequence[TritonServer]) -> float | None:
    readings = [server.rss_mib() for server in servers]
    return None if None in readings else sum(readings)  # type: ignore[arg-type]


def server_pipelines(server: TritonServer, name: str) -> int:
    """How many instances of the pipeline model the server runs (its config, as loaded)."""
    config = load.client("http", server.http_url).get_model_config(name)
    return sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
