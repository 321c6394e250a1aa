"""``sdtm-compile serve`` and ``sdtm-compile serve-bench``: bundle -> Triton model repository -> ``tritonserver``,
then serve, check or load-test (:mod:`sdtm_compile.deploy.triton`); the Triton arguments ``export-triton`` shares.

``serve-bench`` writes a result page (:mod:`sdtm_compile.bench.pages`) like ``bench`` does: the load table, its
picture and ``result.json``, under ``--results`` (``docs/results/<date>-<model>-serve/``), indexed; ``--from-json``
draws the page of a saved ``load.json`` / ``result.json`` again without starting a server.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..bench.pages import PAGE_FILE, Page, page_folder, write_page
from ..bench.record import machine_info
from ..deploy import export_onnx
from ..deploy.triton import (
    ServerStartError,
    ServerUnavailable,
    TritonServer,
    TritonSettings,
    find_tritonserver,
    load,
)
from ..deploy.triton.serve import check_server, engine_backend_for, load_benchmark, prepare_bundle, prepare_repository
from .bench import results_arguments
from .common import fail, load_model, model_arguments

__all__ = ["register", "triton_arguments", "triton_settings"]


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve", help="bundle -> Triton repository -> tritonserver (default: the tiny SD3 model, no downloads)"
    )
    _serve_arguments(serve)
    serve.add_argument(
        "--check", action="store_true", help="send one HTTP and one gRPC request, compare with the reference, stop"
    )
    serve.set_defaults(run=_serve)
    serve_bench = sub.add_parser(
        "serve-bench", help="load test of the served pipeline: clients x protocols, p50/p95, every response checked"
    )
    _serve_arguments(serve_bench)
    serve_bench.add_argument("--concurrency", default="1,4,16", help="client counts (default 1,4,16)")
    serve_bench.add_argument("--requests", type=int, default=48, help="requests per (protocol, clients) point")
    serve_bench.add_argument("--protocols", default="grpc,http")
    serve_bench.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="servers on the same repository, taking requests round-robin (a load balancer's job, done by the client)",
    )
    results_arguments(serve_bench, "a result.json, or a load.json of before")
    serve_bench.set_defaults(run=_serve)


def triton_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TritonSettings()
    parser.add_argument("--name", default=defaults.name, help="the pipeline model's name (default sdtm)")
    parser.add_argument(
        "--engine-backend",
        default=None,
        choices=["onnxruntime", "python"],
        help="onnxruntime: Triton's ONNX Runtime backend (export-triton default); python: our Python-backend "
        "runner of the same ONNX files, for servers with the Python backend only (serve: picked from the server)",
    )
    parser.add_argument("--kind", default=defaults.kind, choices=["cpu", "gpu"], help="engine instance kind")
    parser.add_argument(
        "--tensorrt", action="store_true", help="GPU: run the ONNX engines through ONNX Runtime's TensorRT provider"
    )
    parser.add_argument(
        "--tensorrt-plans",
        default=None,
        help="GPU: a folder of prebuilt TensorRT plans named after the bundle's ONNX files (full.plan, ...)",
    )
    parser.add_argument("--pipeline-instances", type=int, default=defaults.pipeline_instances)
    parser.add_argument("--engine-instances", type=int, default=defaults.engine_instances)
    parser.add_argument("--engine-threads", type=int, default=defaults.engine_threads, help="0: ONNX Runtime's")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="largest num_inference_steps")


def triton_settings(args, engine_backend: str):
    try:
        return TritonSettings(
            name=args.name,
            engine_backend=engine_backend,
            kind=args.kind,
            tensorrt=args.tensorrt,
            tensorrt_plans=args.tensorrt_plans,
            pipeline_instances=args.pipeline_instances,
            engine_instances=args.engine_instances,
            engine_threads=args.engine_threads,
            max_steps=args.max_steps,
        )
    except ValueError as err:
        raise fail(args.command, err) from None


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    parser.set_defaults(latent=32)
    triton_arguments(parser)
    parser.add_argument("--bundle", default=None, help="serve this bundle (default: export --model to WORK/bundle)")
    parser.add_argument("--work", default="triton_serve", help="folder for the bundle, repository and server log")
    parser.add_argument("--http-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--grpc-port", type=int, default=None, help="default: a free port")


def _serve(args) -> int:
    """``serve`` and ``serve-bench``: bundle -> repository -> tritonserver, then serve, check or load-test."""
    if args.command == "serve-bench" and args.from_json:
        return _rerender_load(args)
    if args.command == "serve-bench" and args.measured_on:
        raise fail(args.command, "--measured-on dates a saved result: use it with --from-json")
    work = Path(args.work)
    scratch = Path(tempfile.mkdtemp(prefix="sdtm-triton-"))  # the server's backends folder, removed at exit
    try:
        distribution = find_tritonserver(scratch)
    except ServerUnavailable as err:
        shutil.rmtree(scratch, ignore_errors=True)
        raise fail(args.command, err) from None
    try:
        return _serve_with(args, work, distribution)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _serve_with(args, work: Path, distribution) -> int:
    settings = triton_settings(args, args.engine_backend or engine_backend_for(distribution))
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        names = ("model", "method", "ratio", "deviation", "set", "batch", "latent", "text_tokens")
        key = {k: getattr(args, k) for k in names}

        def export(folder: Path) -> None:
            model, inputs, config = load_model(args)
            export_onnx(model, inputs, config, folder)

        bundle = prepare_bundle(work, key, export)
    table = prepare_repository(bundle, work / "repository", settings)
    replicas = getattr(args, "replicas", 1)
    if replicas < 1:
        raise SystemExit(f"sdtm-compile {args.command}: --replicas must be >= 1, got {replicas}")
    if replicas > 1 and (args.http_port or args.grpc_port):
        raise SystemExit(f"sdtm-compile {args.command}: --replicas > 1 takes free ports; leave out the port options")
    servers = [
        TritonServer(
            work / "repository",
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            log_path=work / f"tritonserver{'' if replicas == 1 else number}.log",  # appended to across runs
            distribution=distribution,
        )
        for number in range(replicas)
    ]
    server = servers[0]
    try:
        for replica in servers:
            replica.start()
    except ServerStartError as err:
        for replica in servers:
            replica.stop()
        raise fail(args.command, err) from None
    try:
        if args.command == "serve" and args.check:
            for line in check_server(server, bundle, table, settings.name):
                print(line)
            return 0
        if args.command == "serve":
            print(f"serving {settings.name!r}: HTTP {server.http_url}, gRPC {server.grpc_url} (Ctrl-C stops)")
            shapes = ", ".join(f"{k} {list(v)}" for k, v in table.inputs.items())
            print(f"  inputs: latents {list(table.latent_shape)}, {shapes}")
            try:
                code = server.process.wait()  # type: ignore[union-attr]
            except KeyboardInterrupt:
                return 0
            print(f"sdtm-compile serve: tritonserver exited with code {code} (log: {server.log_path})", file=sys.stderr)
            return 1
        return _serve_bench(args, servers, bundle, table, settings)
    finally:
        for replica in servers:
            replica.stop()


def _serve_bench(args, servers, bundle, table, settings) -> int:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    protocols = [p.strip() for p in args.protocols.split(",")]
    results, baseline, mix = load_benchmark(
        servers, bundle, table, settings.name, concurrencies, args.requests, protocols
    )
    meta = {
        "command": "sdtm-compile " + " ".join(args.argv if args.argv is not None else sys.argv[1:]),
        "model": args.model,
        "measured_on": datetime.date.today().isoformat(),
        "machine": machine_info().to_dict(),
        "settings": settings.__dict__,
        "mix": [r.label for r in mix],
        "in_process_s_per_generation": baseline,
        "server": servers[0].distribution.origin,
        "replicas": len(servers),
    }
    folder = _write_load_page(results, meta, args)
    print(load.load_markdown(results, baseline))
    print(f"wrote {PAGE_FILE}, {LOAD_RESULT}, load.png to {folder}")
    return 0 if all(r.ok for r in results) else 1


#: The load run's JSON in its page folder.
LOAD_RESULT = "result.json"


def _saved_model(meta: dict[str, Any], default: str) -> str:
    """The model of a saved load run: recorded, else named by ``--model`` in its command line, else ``default``."""
    if meta.get("model"):
        return meta["model"]
    words = shlex.split(meta.get("command") or "")
    for index, word in enumerate(words):
        if word == "--model" and index + 1 < len(words):
            return words[index + 1]
        if word.startswith("--model="):
            return word.split("=", 1)[1]
    return default


def _write_load_page(results: list[load.LoadResult], meta: dict[str, Any], args: argparse.Namespace) -> Path:
    """Write a load run's page (table, picture, ``result.json``) into ``--out`` or its folder under ``--results``
    (indexed); returns the folder."""
    replicas = meta.get("replicas", 1)
    kind = "serve" if replicas == 1 else f"serve-{replicas}-replicas"
    folder = (
        Path(args.out)
        if args.out
        else page_folder(args.results, meta.get("measured_on"), meta["model"], kind, meta.get("command"))
    )
    folder.mkdir(parents=True, exist_ok=True)
    baseline = meta.get("in_process_s_per_generation")
    if meta.get("source") and Path(meta["source"]).resolve().parent == folder.resolve():
        meta["source"] = Path(meta["source"]).name
    load.save_results(results, folder, meta, LOAD_RESULT)
    backend = (meta.get("settings") or {}).get("engine_backend", "?")
    round_robin = f", {replicas} replicas round-robin" if replicas > 1 else ""
    title = f"{meta['model']} served by tritonserver ({backend} engines{round_robin})"
    load.plot_load(results, folder / "load.png", title, baseline)
    mix = "; ".join(meta.get("mix", []))
    body = (
        f"Load test of the served pipeline: every (protocol, clients) point sends its requests cycling through a mix "
        f"({mix}); each response is checked against the in-process reference of the same bundle. Server: "
        f"{meta.get('server', 'not recorded')}.\n\n{load.load_markdown(results, baseline)}\n"
    )
    files = {LOAD_RESULT: "every number of this page"}
    if meta.get("source") and (folder / meta["source"]).exists() and meta["source"] != LOAD_RESULT:
        files[meta["source"]] = "the measurement as it was first saved"
    page = Page(
        title=f"{title}: load test",
        kind=kind,
        model=meta["model"],
        measured_on=meta.get("measured_on"),
        machine=meta.get("machine"),
        command=meta.get("command"),
        body=body,
        pictures={"load": "load.png"},
        files=files,
        rerendered_on=meta.get("rerendered_on"),
        source=meta.get("source"),
    )
    write_page(page, folder, args.results)
    return folder


def _rerender_load(args: argparse.Namespace) -> int:
    """``serve-bench --from-json``: the page of a saved load run, drawn again (no server is started)."""
    try:
        results, meta = load.read_results(args.from_json)
        if args.measured_on is not None:
            datetime.date.fromisoformat(args.measured_on)
            if meta.get("measured_on") not in (None, args.measured_on):
                raise ValueError(f"{args.from_json} was measured on {meta['measured_on']}, not {args.measured_on}")
            meta["measured_on"] = args.measured_on
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise fail(args.command, f"cannot read {args.from_json}: {err}") from None
    meta.setdefault("measured_on", None)
    meta.setdefault("machine", None)
    meta["model"] = _saved_model(meta, args.model)
    meta["rerendered_on"] = datetime.date.today().isoformat()
    meta["source"] = str(args.from_json)
    folder = _write_load_page(results, meta, args)
    print(load.load_markdown(results, meta.get("in_process_s_per_generation")))
    print(f"wrote {PAGE_FILE}, {LOAD_RESULT}, load.png to {folder}")
    return 0
