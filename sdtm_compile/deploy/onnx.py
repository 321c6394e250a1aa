"""ONNX export of every engine with a manifest (:func:`export_onnx`); :class:`~.runner.OnnxTransformer` runs it.

The exported graphs are the backend's own per-bucket graphs (:class:`~sdtm_compile.compiler.BucketGraphs` of
the graph Dynamo traces, whole: ONNX Runtime and TensorRT's ONNX parser want one graph per engine), with the
weights stored in the ONNX files. ``manifest.json`` (:mod:`.bundle`) says which file serves which (stage, bucket),
the inputs, outputs and the engine contract's state, the method's config (whose schedule picks the engines), and
the sha256 of every file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .._version import __version__
from ..compiler import BucketGraphs, capture_dynamo_graph
from ..core.config import MethodConfig
from ..engines import sha256_file
from .bundle import FORMAT_VERSION, MANIFEST, manifest_state

__all__ = ["export_onnx"]

logger = logging.getLogger(__name__)


def _input_name(placeholder: str) -> str:
    """``L_kwargs_hidden_states_`` -> ``hidden_states``."""
    return re.sub(r"^[lL]_(kwargs_)?", "", placeholder).rstrip("_")


class _BucketModule(nn.Module):
    """A rewritten bucket graph with its weights as buffers: ``(model inputs..., state...) -> (sample, state...)``."""

    def __init__(self, gm: fx.GraphModule, flat: list[torch.Tensor], input_positions: list[int], state: int) -> None:
        super().__init__()
        self.gm = gm
        self.input_positions = input_positions
        self.state = state  # carried state inputs after the model's
        self.constant_positions = [i for i in range(len(flat)) if i not in input_positions]
        for number, position in enumerate(self.constant_positions):
            self.register_buffer(f"w{number}", flat[position].detach(), persistent=True)

    def forward(self, *model_inputs_and_state: torch.Tensor):
        args: list[Any] = [None] * (len(self.constant_positions) + len(self.input_positions))
        for number, position in enumerate(self.constant_positions):
            args[position] = getattr(self, f"w{number}")
        for value, position in zip(model_inputs_and_state[: -self.state], self.input_positions):
            args[position] = value
        return tuple(self.gm(*args, *model_inputs_and_state[-self.state :]))


def _spec(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", "")}


@torch.no_grad()
def export_onnx(
    transformer: nn.Module,
    example_inputs: dict[str, torch.Tensor],
    config: MethodConfig,
    out_dir: str | Path,
    *,
    opset: int | None = None,
    external_data: bool | None = None,
) -> dict[str, Any]:
    """Export one ONNX model per engine (full + each (stage, bucket)) and ``manifest.json`` to ``out_dir``.

    Args:
        transformer: a diffusers ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` (eval mode).
        example_inputs: the transformer's keyword inputs with the batch size and resolution to deploy (shapes
            are static, as in the compiled backend): ``hidden_states``, ``encoder_hidden_states``,
            ``pooled_projections``, ``timestep``; for Flux also ``img_ids``, ``txt_ids`` and (FLUX.1-dev)
            ``guidance``. Every tensor input becomes an input of every ONNX graph.
        config: the method's configuration (SDTM's or another method's); its schedule decides which engines are
            exported. The manifest stores it (with its ``method`` name) with the model's timestep mapping filled in
            (``resolve_for_model``). Bundles carry the method's state only: a configuration whose extensions add
            engine state (SDTM's cache fusion, SDTM*) is refused.
        out_dir: created if missing; existing files of the same names are overwritten.
        external_data: passed to ``torch.onnx.export``: the weights go to a ``<file>.onnx.data`` file beside
            each graph (needed past ONNX's 2 GB protobuf limit, e.g. SD3.5-large). Default: only when the
            weights exceed 1.5 GB. Every ``.data`` file is listed and checksummed in the manifest, and
            :class:`OnnxTransformer` checks it on load. Tested on a tiny model with the flag forced on, not on a
            model past 2 GB.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).
    """
    gm, flat = capture_dynamo_graph(transformer, example_inputs)
    buckets = BucketGraphs(gm, flat, config, include_full=True)
    signature = buckets.signature
    extra = [t.name for t in signature.tensors if t.name != signature.tensors[0].name]
    if extra:
        extensions = ", ".join(ext.name for ext in buckets.method.extensions())
        raise NotImplementedError(
            f"ONNX bundles carry li only: this configuration's engines also carry {extra} (from {extensions}); "
            "export without those options, or run them in the compiled backend (torch.compile(..., "
            "backend='sdtm'))"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    constants = {id(t) for t in (*transformer.parameters(), *transformer.buffers())}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    input_positions = [i for i, t in enumerate(flat) if id(t) not in constants]
    input_names = [_input_name(placeholders[i].name) for i in input_positions]
    sites = buckets.sites
    if external_data is None:
        external_data = sum(flat[i].nbytes for i in range(len(flat)) if i not in input_positions) > 1.5 * 2**30

    engines: list[dict[str, Any]] = []
    files: list[str] = []
    started = time.perf_counter()
    groups = buckets.groups()
    for number, keys in enumerate(groups, 1):
        bucket = buckets.distinct_graph(keys)
        file_name = f"{keys[0].slug}.onnx"
        logger.info("exporting %d/%d: %s -> %s ...", number, len(groups), ", ".join(map(str, keys)), file_name)
        start = time.perf_counter()
        module = _BucketModule(bucket.graph.gm, flat, input_positions, len(signature.inputs)).eval()
        args = tuple(flat[i] for i in input_positions) + tuple(buckets.new_state())
        (out / f"{file_name}.data").unlink(missing_ok=True)  # a stale one from an earlier export
        with _quiet("onnx_ir", "onnxscript", "torch.onnx"):
            torch.onnx.export(
                module,
                args,
                str(out / file_name),
                dynamo=True,
                opset_version=opset,
                input_names=[*input_names, *(t.name for t in signature.inputs)],
                output_names=["sample", *(spec["output"] for spec in manifest_state(signature))],
                external_data=external_data,
                verbose=False,
            )
        files.append(file_name)
        logger.info("  %s written in %.1f s", file_name, time.perf_counter() - start)
        counts = bucket.counts
        for key in keys:
            engines.append(
                {
                    "key": str(key),
                    "stage": key.stage.value,
                    "bucket": key.bucket,
                    "file": file_name,
                    "tokens": {
                        "image": counts.tokens,
                        "attention": counts.attention,
                        "feed_forward": counts.feed_forward,
                    },
                }
            )
    sample = transformer(**example_inputs, return_dict=False)[0]
    manifest = {
        "format_version": FORMAT_VERSION,
        "producer": {"sdtm_compile": __version__, "torch": torch.__version__},
        "config": buckets.config.to_dict(),
        "transformer_class": type(transformer).__name__,
        "transformer_config": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
        "grid": list(sites.grid),
        "inputs": [_spec(name, flat[i]) for name, i in zip(input_names, input_positions)],
        "outputs": [_spec("sample", sample)],
        "state": manifest_state(signature),
        "engines": engines,
        "external_data": bool(external_data),
        "files": {
            path.name: sha256_file(path)
            for name in sorted(files)
            for path in (out / name, out / f"{name}.data")
            if path.exists()
        },
    }
    text = json.dumps(manifest, indent=1, default=str)
    (out / MANIFEST).write_text(text)
    manifest = json.loads(text)  # what a reader of the file sees (tuples become lists)
    logger.info(
        "exported %d engines (%d files) to %s in %.1f s",
        len(engines),
        len(manifest["files"]),
        out,
        time.perf_counter() - started,
    )
    return manifest


@contextlib.contextmanager
def _quiet(*names: str):
    """The ONNX exporter's own INFO chatter (per-initializer logs) drowns our progress lines: raise its level."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
