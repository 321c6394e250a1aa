"""``sdtm-compile export`` (every engine to ONNX with a manifest) and ``sdtm-compile export-triton`` (a Triton model
repository from a bundle)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..deploy import BundleError, export_onnx
from ..deploy.triton import RepositoryError, export_triton
from .common import fail, load_model, model_arguments
from .serve import triton_arguments, triton_settings

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export every engine to ONNX with a manifest")
    model_arguments(export)
    export.add_argument("--out", required=True, help="bundle directory to write")
    export.add_argument(
        "--bucket-graphs",
        action="store_true",
        help="also write each engine's graph alone (<engine>.onnx, reading the same weights.bin), e.g. for trtexec",
    )
    export.set_defaults(run=run_export)
    triton = sub.add_parser("export-triton", help="a Triton Inference Server model repository from an exported bundle")
    triton.add_argument("bundle", help="a bundle folder written by `sdtm-compile export`")
    triton.add_argument("out", help="the model repository folder to write")
    triton_arguments(triton)
    triton.set_defaults(run=run_export_triton)


def run_export(args: argparse.Namespace) -> int:
    model, inputs, config = load_model(args)
    manifest = export_onnx(model, inputs, config, args.out, bucket_graphs=args.bucket_graphs)
    sizes = {name: (Path(args.out) / name).stat().st_size for name in manifest["files"]}
    weights = manifest["weights"]
    print(
        f"wrote {len(manifest['files'])} files ({sum(sizes.values()) / 2**20:.1f} MiB) + manifest.json to {args.out}: "
        f"weights.bin {sizes['weights.bin'] / 2**20:.1f} MiB (the model's weights: "
        f"{weights['model_bytes'] / 2**20:.1f} MiB), model.onnx {sizes['model.onnx'] / 2**20:.1f} MiB"
    )
    for engine in manifest["engines"]:
        print(f"  {engine['key']:<15} graph {engine['graph']:<3} tokens {engine['tokens']}")
    return 0


def run_export_triton(args: argparse.Namespace) -> int:
    try:
        out = export_triton(args.bundle, args.out, triton_settings(args, args.engine_backend or "onnxruntime"))
    except (BundleError, RepositoryError) as err:
        raise fail(args.command, err) from None
    models = sorted(p.parent.name for p in out.glob("*/config.pbtxt"))
    print(f"wrote a Triton model repository to {out}: {', '.join(models)}")
    print(f"  serve it: tritonserver --model-repository={out.resolve()}")
    return 0
