"""The ``sdtm-compile`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def _ratios(text: str) -> tuple[float, ...]:
    if not text.strip():
        return ()
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios like 0.3,0.5, got {text!r}") from None


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="tiny-sd3",
        help="a preset (tiny-sd3, tiny-sd35, sd3m-1024, sd3m-4096, tiny-flux, flux-1024, testbed-1024) or a "
        "local diffusers SD3Transformer2DModel folder",
    )
    parser.add_argument(
        "--method", default="sdtm", help="the token-reduction method: sdtm (default), tomesd, sito, toma"
    )
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--deviation", type=float, default=0.2, help="SDTM's CRA deviation (other methods: none)")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 for SD3 (CFG), 1 for Flux")
    parser.add_argument("--latent", type=int, default=64, help="latent side (image side / 8)")
    parser.add_argument("--text-tokens", type=int, default=None, help="prompt tokens (default: the tiny spec's)")


def _load_model(args):
    """(model, example inputs, config) for the export / lint commands; never downloads."""
    import torch

    from ..core.config import config_from_dict
    from ..methods.sdtm.config import SDTMConfig
    from ..models import MODEL_PRESETS, FluxSpec, TinySpec, build_model, example_inputs, flux_example_inputs

    try:
        if args.method == "sdtm":
            config = SDTMConfig(ratio=args.ratio, deviation=args.deviation)
        else:  # an unknown name is a ValueError naming the known ones
            config = config_from_dict({"method": args.method, "ratio": args.ratio})
    except ValueError as err:
        raise SystemExit(f"sdtm-compile {args.command}: {err}") from None
    if args.model in MODEL_PRESETS:
        spec = MODEL_PRESETS[args.model].spec
        model = build_model(spec)
    else:
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel.from_pretrained(args.model, local_files_only=True).eval()
        cfg = model.config
        spec = TinySpec(
            in_channels=cfg.in_channels,
            joint_attention_dim=cfg.joint_attention_dim,
            pooled_projection_dim=cfg.pooled_projection_dim,
            text_tokens=args.text_tokens or 333,
        )
    if args.text_tokens:
        spec = type(spec)(**{**spec.__dict__, "text_tokens": args.text_tokens})
    if isinstance(spec, FluxSpec):
        inputs = flux_example_inputs(spec, args.batch or 1, (args.latent, args.latent), sigma=1.0)
    else:
        inputs = example_inputs(spec, args.batch or 2, (args.latent, args.latent), timestep=1000.0)
    return model, {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}, config, torch


def _triton_arguments(parser: argparse.ArgumentParser) -> None:
    from ..deploy.triton import TritonSettings

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


def _triton_settings(args, engine_backend: str):
    from ..deploy.triton import TritonSettings

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
        raise SystemExit(f"sdtm-compile {args.command}: {err}") from None


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.set_defaults(latent=32)
    _triton_arguments(parser)
    parser.add_argument("--bundle", default=None, help="serve this bundle (default: export --model to WORK/bundle)")
    parser.add_argument("--work", default="triton_serve", help="folder for the bundle, repository and server log")
    parser.add_argument("--http-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--grpc-port", type=int, default=None, help="default: a free port")


def _serve(args) -> int:
    """``serve`` and ``serve-bench``: bundle -> repository -> tritonserver, then serve, check or load-test."""
    import shutil
    import tempfile

    from ..deploy.triton import ServerUnavailable, find_tritonserver

    work = Path(args.work)
    scratch = Path(tempfile.mkdtemp(prefix="sdtm-triton-"))  # the server's backends folder, removed at exit
    try:
        distribution = find_tritonserver(scratch)
    except ServerUnavailable as err:
        shutil.rmtree(scratch, ignore_errors=True)
        raise SystemExit(f"sdtm-compile {args.command}: {err}") from None
    try:
        return _serve_with(args, work, distribution)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _serve_with(args, work: Path, distribution) -> int:
    from ..deploy.triton import ServerStartError, TritonServer
    from ..deploy.triton.serve import (
        check_server,
        engine_backend_for,
        load_benchmark,
        prepare_bundle,
        prepare_repository,
    )

    settings = _triton_settings(args, args.engine_backend or engine_backend_for(distribution))
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        key = {k: getattr(args, k) for k in ("model", "method", "ratio", "deviation", "batch", "latent", "text_tokens")}

        def export(folder: Path) -> None:
            from ..deploy.onnx import export_onnx

            model, inputs, config, _ = _load_model(args)
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
        raise SystemExit(f"sdtm-compile {args.command}: {err}") from None
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
        return _serve_bench(args, servers, bundle, table, settings, load_benchmark)
    finally:
        for replica in servers:
            replica.stop()


def _serve_bench(args, servers, bundle, table, settings, load_benchmark) -> int:
    from ..deploy.triton import load

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


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from ..models import MODEL_PRESETS

    parser.add_argument("--model", default="sd3m-1024", choices=sorted(MODEL_PRESETS), help="default sd3m-1024")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the model's)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--deviation", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's (SD3 28, Flux 20)")
    parser.add_argument("--runs", type=int, default=5, help="timed generations per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--sweep", type=_ratios, default=None, help="ratios (default 0.3,0.4,0.6,0.7; with --methods 0.3,0.5,0.7)"
    )
    parser.add_argument(
        "--methods",
        type=_methods,
        default=None,
        help="compare token-reduction methods instead (e.g. sdtm,tomesd,sito,toma): each at every --sweep ratio, "
        "timed beside Inductor; writes methods.json / .md / .png",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="compare SDTM's variants and step caches instead (SD3 models): eager, Inductor, SDTM, cache fusion, "
        "SDTM*, size-aware attention, a first-block cache alone and with SDTM, diffusers' cache; writes "
        "variants.json / .md / .png",
    )
    parser.add_argument(
        "--step-threshold", type=float, default=0.1, help="--variants: the first-block caches' threshold (0.1)"
    )
    parser.add_argument("--sweep-runs", type=int, default=3)
    parser.add_argument(
        "--quality-seeds", type=int, default=4, help="testbed-1024: seeds of the paired image PSNR / SSIM (default 4)"
    )
    parser.add_argument("--engine", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--warm-caches", action="store_true", help="use the existing compile caches (not cold)")
    parser.add_argument("--out", default="bench_out", help="directory for bench.json, bench.md and the PNGs")
    parser.add_argument("--from-json", default=None, help="re-render tables and pictures of a saved bench.json")
    parser.add_argument(
        "--update-readme", default=None, help="also replace the Results block of this README with the tables"
    )


def _methods(text: str) -> tuple[str, ...]:
    from ..bench.methods import method_names

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in method_names()]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown or text!r}: a comma-separated list of {', '.join(method_names())}"
        )
    return names


def _bench_config(args, sweep: tuple[float, ...]):
    """The :class:`~sdtm_compile.bench.BenchConfig` of the bench command's arguments."""
    from ..bench import BenchConfig
    from ..methods.sdtm.config import SDTMConfig

    return BenchConfig(
        model=args.model,
        sdtm=SDTMConfig(ratio=args.ratio, deviation=args.deviation),
        latent=args.latent,
        steps=args.steps,
        runs=args.runs,
        warmup=args.warmup,
        sweep=sweep,
        sweep_runs=args.sweep_runs,
        quality_seeds=args.quality_seeds,
        engine=args.engine,
        cold_caches=not args.warm_caches,
        out_dir=args.out,
    )


def _bench(args, argv) -> int:
    from ..bench import BenchResult, markdown_report, render, run_benchmark, update_readme

    if args.methods:
        return _bench_methods(args, argv)
    if args.variants:
        from ..bench.variants import VariantComparison, render_variants, run_variant_comparison, variants_markdown

        if args.from_json:
            result = VariantComparison.load(args.from_json)
            render_variants(result, Path(args.out))
        else:
            command = "sdtm-compile " + " ".join(argv if argv is not None else sys.argv[1:])
            result = run_variant_comparison(_bench_config(args, ()), args.step_threshold, command=command)
        print(variants_markdown(result))
        print(f"wrote variants.json, variants.md and variants.png to {args.out}")
        return 0
    if args.from_json:
        result = BenchResult.load(args.from_json)
        render(result, args.out)
    else:
        config = _bench_config(args, args.sweep if args.sweep is not None else (0.3, 0.4, 0.6, 0.7))
        result = run_benchmark(config, command="sdtm-compile " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(markdown_report(result))
    print(f"wrote {', '.join(result.files.values())} to {args.out}")
    if args.update_readme:
        try:
            update_readme(args.update_readme, result, args.out)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        print(f"updated the Results block of {Path(args.update_readme)}")
    return 0


def _bench_methods(args, argv) -> int:
    """``bench --methods``: the method comparison (:mod:`sdtm_compile.bench.methods`)."""
    from ..bench.methods import (
        MethodComparison,
        comparison_markdown,
        render_comparison,
        run_method_comparison,
        update_readme_methods,
    )

    if args.from_json:
        result = MethodComparison.load(args.from_json)
        render_comparison(result, args.out)
    else:
        config = _bench_config(args, ())
        ratios = args.sweep if args.sweep else (0.3, 0.5, 0.7)
        command = "sdtm-compile " + " ".join(argv if argv is not None else sys.argv[1:])
        result = run_method_comparison(config, args.methods, ratios, command=command)
    print(comparison_markdown(result))
    print(f"wrote {', '.join(result.files.values())} to {args.out}")
    if args.update_readme:
        try:
            update_readme_methods(args.update_readme, result, args.out)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        print(f"updated the method comparison block of {Path(args.update_readme)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdtm-compile", description="SDTM token merging for diffusion transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="tiny SD3 model, eager SDTM reference, per-step merge schedule")
    demo.add_argument("--ratios", type=_ratios, default=(0.3, 0.5), help="comma-separated, default 0.3,0.5")
    demo.add_argument("--steps", type=int, default=28)
    demo.add_argument("--latent", type=int, default=64, help="latent side (tokens = (side/2)^2), default 64")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model", default="tiny-sd3", help="an SD3 preset: tiny-sd3 (default) or testbed-1024")
    export = sub.add_parser("export", help="export every engine to ONNX with a manifest")
    _model_arguments(export)
    export.add_argument("--out", required=True, help="bundle directory to write")
    lint = sub.add_parser("lint", help="TensorRT-readiness lint of every bucket graph")
    _model_arguments(lint)
    bench = sub.add_parser(
        "bench", help="speed, FLOPs, fidelity and pictures: eager / Inductor / sdtm / eager reference"
    )
    _bench_arguments(bench)
    train = sub.add_parser("train-testbed", help="train the testbed model (resumes from OUT_DIR/checkpoint.pt)")
    from ..models.testbed.train import TrainConfig

    defaults = TrainConfig()
    train.add_argument("--out-dir", default=defaults.out_dir, help="checkpoint and loss log (default testbed_run)")
    train.add_argument(
        "--weights",
        default=None,
        help="final weights (default OUT_DIR/testbed-1024.safetensors; the package's: "
        "sdtm_compile/testbed/weights/testbed-1024.safetensors)",
    )
    train.add_argument("--steps-low", type=int, default=defaults.steps_low, help="steps on 32x32 crops")
    train.add_argument("--steps-full", type=int, default=defaults.steps_full, help="steps on 64x64 crops")
    train.add_argument("--batch-low", type=int, default=defaults.batch_low)
    train.add_argument("--batch-full", type=int, default=defaults.batch_full)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    triton = sub.add_parser("export-triton", help="a Triton Inference Server model repository from an exported bundle")
    triton.add_argument("bundle", help="a bundle folder written by `sdtm-compile export`")
    triton.add_argument("out", help="the model repository folder to write")
    _triton_arguments(triton)
    serve = sub.add_parser(
        "serve", help="bundle -> Triton repository -> tritonserver (default: the tiny SD3 model, no downloads)"
    )
    _serve_arguments(serve)
    serve.add_argument(
        "--check", action="store_true", help="send one HTTP and one gRPC request, compare with the reference, stop"
    )
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
    samples = sub.add_parser("testbed-samples", help="picture: testbed samples next to real held-out crops")
    samples.add_argument("--out", default="testbed_samples.png")
    samples.add_argument("--seeds", type=int, default=8)
    samples.add_argument("--steps", type=int, default=28)
    samples.add_argument("--guidance-scale", type=float, default=3.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )

    if args.command == "export":
        from ..deploy.onnx import export_onnx

        model, inputs, config, torch = _load_model(args)
        manifest = export_onnx(model, inputs, config, args.out)
        total = sum((Path(args.out) / name).stat().st_size for name in manifest["files"])
        print(f"wrote {len(manifest['files'])} ONNX files ({total / 2**20:.1f} MiB) + manifest.json to {args.out}")
        for engine in manifest["engines"]:
            print(f"  {engine['key']:<15} {engine['file']:<22} tokens {engine['tokens']}")
        return 0
    if args.command == "export-triton":
        from ..deploy.bundle import BundleError
        from ..deploy.triton import RepositoryError, export_triton

        try:
            out = export_triton(args.bundle, args.out, _triton_settings(args, args.engine_backend or "onnxruntime"))
        except (BundleError, RepositoryError) as err:
            raise SystemExit(f"sdtm-compile export-triton: {err}") from None
        models = sorted(p.parent.name for p in out.glob("*/config.pbtxt"))
        print(f"wrote a Triton model repository to {out}: {', '.join(models)}")
        print(f"  serve it: tritonserver --model-repository={out.resolve()}")
        return 0
    if args.command in ("serve", "serve-bench"):
        return _serve(args)
    if args.command == "lint":
        from ..compiler.buckets import BucketGraphs
        from ..compiler.capture import capture_dynamo_graph
        from ..passes import lint_report, to_aten

        model, inputs, config, torch = _load_model(args)
        buckets = BucketGraphs(*capture_dynamo_graph(model, inputs), config, include_full=True)
        errors, engine_inputs = 0, buckets.engine_inputs()
        for bucket in buckets.distinct():
            aten_graph = to_aten(bucket.graph.gm, engine_inputs)
            findings = lint_report(aten_graph)
            errors += sum(f.severity == "error" for f in findings)
            ops = len([n for n in aten_graph.graph.nodes if n.op == "call_function"])
            name = ", ".join(map(str, bucket.keys))
            print(f"{name:<15} {ops:>5} aten ops: " + ("OK" if not findings else f"{len(findings)} findings"))
            for finding in findings:
                print(f"    {finding}")
        return 1 if errors else 0
    if args.command == "bench":
        return _bench(args, argv)
    if args.command == "train-testbed":
        from ..models.testbed.train import train_testbed

        manifest = train_testbed(
            TrainConfig(
                out_dir=args.out_dir,
                weights=args.weights,
                steps_low=args.steps_low,
                steps_full=args.steps_full,
                batch_low=args.batch_low,
                batch_full=args.batch_full,
                seed=args.seed,
                threads=args.threads,
            )
        )
        training = manifest["training"]
        print(
            f"trained {training['steps']} steps in {training['wall_s']:.0f} s: held-out loss "
            f"{training['final_heldout_loss']} (random init {training['random_init_heldout_loss']}), train loss "
            f"{training['final_train_loss']}; wrote {manifest['weights']} (sha256 {manifest['sha256'][:16]}...)"
        )
        return 0
    if args.command == "testbed-samples":
        from ..models.testbed.model import load_testbed
        from ..models.testbed.quality import plot_samples

        path = plot_samples(load_testbed(), args.out, tuple(range(args.seeds)), args.steps, args.guidance_scale)
        print(f"wrote {path}")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        try:
            run_demo(args.ratios, args.steps, (args.latent, args.latent), args.seed, model_name=args.model)
        except ValueError as err:
            print(f"sdtm-compile demo: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
