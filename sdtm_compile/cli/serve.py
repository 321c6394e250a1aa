"""``sdtm-compile serve`` and ``sdtm-compile serve-bench``: bundle -> Triton model repository -> ``tritonserver``,
then serve, check or load-test (:mod:`sdtm_compile.deploy.triton`); the Triton arguments ``export-triton`` shares."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

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
    serve_bench.add_argument("--out", default="serve_bench", help="folder for load.json / load.md / load.png")
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table_md = load.load_markdown(results, baseline)
    meta = {
        "command": "sdtm-compile " + " ".join(sys.argv[1:]),
        "settings": settings.__dict__,
        "mix": [r.label for r in mix],
        "in_process_s_per_generation": baseline,
        "server": servers[0].distribution.origin,
        "replicas": len(servers),
    }
    load.save_results(results, out, meta)
    (out / "load.md").write_text(table_md + "\n")
    replicas = f", {len(servers)} replicas round-robin" if len(servers) > 1 else ""
    title = f"{args.model} served by tritonserver ({settings.engine_backend} engines{replicas})"
    load.plot_load(results, out / "load.png", title, baseline)
    print(table_md)
    print(f"wrote load.json, load.md, load.png to {out}")
    return 0 if all(r.ok for r in results) else 1
