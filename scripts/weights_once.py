"""Measure the ways a bundle's runner can hold its weights, on one export (ONNX Runtime, CPU).

    python scripts/weights_once.py [--model sd3m-1024] [--runs 5] [--out /tmp/weights_once]

Exports the model's bundle with ``bucket_graphs=True`` (``model.onnx`` and each engine's own graph, all reading one
``weights.bin``), then runs each layout in a fresh process, every engine once to warm up and ``--runs`` times timed:

* ``per-bucket``: one session per engine graph, each loading the weights itself (how a runner of one file per engine
  holds them: what bundles of format 1 did, whose files also each carried a copy on disk);
* ``per-bucket-shared``: one session per engine graph, all given the same initializers from one copy in this process
  (``SessionOptions.add_initializer``);
* ``combined``: ``model.onnx``, every engine in one session, the engine picked by the ``engine`` input, with ONNX
  Runtime's default session options;
* ``combined-lean``: the same with :func:`sdtm_compile.deploy.runner.lean_session_options` (no prepacking, no memory
  arena): what :class:`sdtm_compile.deploy.OnnxTransformer` and the Triton repository's engine model run.

Prints one JSON line per layout: load seconds, resident MiB after load and peak over the run (above the process
before loading), and the median seconds per call of each engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(layout: str, bundle: Path, runs: int) -> dict:
    """Run every engine of ``bundle`` under ``layout`` in this process; what it cost."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor

    from sdtm_compile.bench.memory import peak_rss, resident_mib

    manifest = json.loads((bundle / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in manifest["inputs"]:
        feeds[spec["name"]] = rng.standard_normal(spec["shape"]).astype(spec["dtype"])
    feeds["timestep"] = np.full_like(feeds["timestep"], 500)
    for spec in manifest["state"]:
        feeds[spec["name"]] = np.zeros(spec["shape"], spec["dtype"])
    graphs = sorted({(e["graph"], e["file"]) for e in manifest["engines"]})
    before = resident_mib()
    read_peak = peak_rss()
    start = time.perf_counter()
    if layout.startswith("combined"):
        from sdtm_compile.deploy.runner import lean_session_options

        options = lean_session_options() if layout == "combined-lean" else ort.SessionOptions()
        session = ort.InferenceSession(str(bundle / manifest["model"]), options)

        def run(number: int, _file: str):
            return session.run(None, {**feeds, "engine": np.array([number], np.int64)})
    else:
        shared: dict[str, ort.OrtValue] = {}
        keep = []  # the arrays the OrtValues view
        sessions = {}
        for _, file_name in graphs:
            options = ort.SessionOptions()
            if layout == "per-bucket-shared":
                proto = onnx.load(str(bundle / file_name), load_external_data=False)
                for tensor in proto.graph.initializer:
                    if tensor.data_location != onnx.TensorProto.EXTERNAL:
                        continue
                    if tensor.name not in shared:
                        load_external_data_for_tensor(tensor, str(bundle))
                        keep.append(numpy_helper.to_array(tensor))
                        shared[tensor.name] = ort.OrtValue.ortvalue_from_numpy(keep[-1])
                    options.add_initializer(tensor.name, shared[tensor.name])
            sessions[file_name] = ort.InferenceSession(str(bundle / file_name), options)

        def run(_number: int, file_name: str):
            return sessions[file_name].run(None, feeds)

    loaded_s = time.perf_counter() - start
    loaded = resident_mib()
    per_engine = {}
    for number, file_name in graphs:
        run(number, file_name)
        times = []
        for _ in range(runs):
            tick = time.perf_counter()
            run(number, file_name)
            times.append(time.perf_counter() - tick)
        per_engine[file_name.removesuffix(".onnx")] = round(statistics.median(times), 4)
    return {
        "layout": layout,
        "load_s": round(loaded_s, 2),
        "loaded_mib": round(loaded - before),
        "peak_mib": round(read_peak() - before),
        "s_per_call": per_engine,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd3m-1024")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="/tmp/weights_once")
    parser.add_argument("--measure", nargs=2, metavar=("LAYOUT", "BUNDLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child process of one layout
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]), args.runs)))
        return 0

    import logging

    from sdtm_compile.deploy import export_onnx
    from sdtm_compile.methods.sdtm.config import SDTMConfig
    from sdtm_compile.models import MODEL_PRESETS, build_model, example_inputs

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    preset = MODEL_PRESETS[args.model]
    model = build_model(preset.spec)
    inputs = example_inputs(preset.spec, 2, (preset.latent, preset.latent), timestep=1000.0)
    bundle = Path(args.out)
    manifest = export_onnx(model, inputs, SDTMConfig(), bundle, bucket_graphs=True)
    sizes = {name: (bundle / name).stat().st_size for name in manifest["files"]}
    weights = manifest["weights"]
    print(
        json.dumps(
            {
                "model": args.model,
                "model_weights_mib": round(weights["model_bytes"] / 2**20, 1),
                "weights_bin_mib": round(sizes["weights.bin"] / 2**20, 1),
                "model_onnx_mib": round(sizes["model.onnx"] / 2**20, 1),
                "bucket_graphs_mib": round(
                    sum(v for k, v in sizes.items() if k not in ("weights.bin", "model.onnx")) / 2**20, 1
                ),
                "engines": len(manifest["engines"]),
            }
        )
    )
    for layout in ("per-bucket", "per-bucket-shared", "combined", "combined-lean"):
        command = [sys.executable, __file__, "--runs", str(args.runs), "--measure", layout, str(bundle)]
        print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
