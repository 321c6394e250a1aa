"""ONNX export of every engine with a manifest (:func:`export_onnx`); :class:`~.runner.OnnxTransformer` runs it.

The exported graphs are the backend's own per-bucket graphs (:class:`~sdtm_compile.compiler.BucketGraphs` of
the graph Dynamo traces, whole). A bundle holds the model's weights once (:mod:`.weights`)::

    bundle/
      model.onnx       every engine: nested If branches picked by the int64 input ``engine`` (the graph index)
      weights.bin      every distinct initializer once, the external data of model.onnx (and of the graphs below)
      <engine>.onnx    only with ``bucket_graphs=True``: each engine's graph alone (trtexec, tools), same weights.bin
      manifest.json    format, engines (stage, bucket, graph index, token counts), inputs, outputs, the engine
                       contract's state, the method's config, the sha256 of every file

ONNX Runtime loads ``model.onnx`` as one session: one copy of the weights whichever engines a generation runs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import fx, nn

from .._version import __version__
from ..compiler import BucketGraphs, capture_dynamo_graph
from ..core.config import MethodConfig
from ..core.counts import example_count_tensor, served_lengths, size_only_inputs
from ..core.schedule import EngineKey, Stage
from ..engines import sha256_file
from .bundle import FORMAT_VERSION, MANIFEST, MODEL_FILE, manifest_state
from .weights import ENGINE_INPUT, WEIGHTS_FILE, WeightsFile, combine_buckets

__all__ = ["export_onnx"]

logger = logging.getLogger(__name__)


def _input_name(placeholder: str) -> str:
    """``L_kwargs_hidden_states_`` -> ``hidden_states``."""
    return re.sub(r"^[lL]_(kwargs_)?", "", placeholder).rstrip("_")


class _BucketModule(nn.Module):
    """A rewritten bucket graph with its weights as buffers:
    ``(model inputs..., state..., count inputs...) -> (sample, state...)``.

    With exact counts every graph of a bundle takes the same ``counts`` count inputs (their ONNX graphs must have
    the same inputs to be combined); a graph that plans with fewer (the unmerged one: none) ignores the rest.
    """

    def __init__(
        self, gm: fx.GraphModule, flat: list[torch.Tensor], input_positions: list[int], state: int, counts: int = 0
    ) -> None:
        super().__init__()
        self.gm = gm
        self.input_positions = input_positions
        self.state = state  # carried state inputs after the model's
        self.counts = counts  # count inputs after the state
        self.used_counts = len(size_only_inputs(gm))
        self.constant_positions = [i for i in range(len(flat)) if i not in input_positions]
        for number, position in enumerate(self.constant_positions):
            self.register_buffer(f"w{number}", flat[position].detach(), persistent=True)

    def forward(self, *inputs: torch.Tensor):
        args: list[Any] = [None] * (len(self.constant_positions) + len(self.input_positions))
        for number, position in enumerate(self.constant_positions):
            args[position] = getattr(self, f"w{number}")
        model_inputs = len(self.input_positions)
        for value, position in zip(inputs[:model_inputs], self.input_positions):
            args[position] = value
        state = inputs[model_inputs : model_inputs + self.state]
        counts = inputs[model_inputs + self.state :][: self.used_counts]
        return tuple(self.gm(*args, *state, *counts))


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
    bucket_graphs: bool = False,
) -> dict[str, Any]:
    """Export every engine (full + each (stage, bucket)) to ``out_dir``: ``model.onnx``, ``weights.bin`` (the
    weights once, in the model's dtype) and ``manifest.json``.

    Args:
        transformer: a diffusers ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` (eval mode), in the dtype
            to deploy (fp16 for TensorRT; ONNX Runtime's CPU provider runs float32 best).
        example_inputs: the transformer's keyword inputs with the batch size and resolution to deploy (shapes
            are static, as in the compiled backend): ``hidden_states``, ``encoder_hidden_states``,
            ``pooled_projections``, ``timestep``; for Flux also ``img_ids``, ``txt_ids`` and (FLUX.1-dev)
            ``guidance``. Every tensor input becomes an input of every ONNX graph. With ``counts="exact"`` every
            graph also takes the count inputs ``count_<j>`` (``uint8``, length ``N - count``, a dynamic axis;
            :mod:`sdtm_compile.core.counts`): the manifest's ``count_inputs``, and each engine's ``plan_counts``.
        config: the method's configuration (SDTM's or another method's); its schedule decides which engines are
            exported. The manifest stores it (with its ``method`` name) with the model's timestep mapping filled in
            (``resolve_for_model``). Every carried entry of the engine contract is an input and an output of
            every graph (SDTM's cache fusion: its cache, which the unmerged graph writes and the merged ones read);
            an extension that chooses engines from run-time readings (SDTM*) is refused.
        out_dir: created if missing; existing files of the same names are overwritten.
        bucket_graphs: also write each engine's graph as its own ``<engine>.onnx`` reading the same
            ``weights.bin`` (for tools that take one graph per engine, e.g. ``trtexec`` per bucket).

    Graphs of any size: each graph is exported with its weights outside the protobuf (no 2 GB limit) into a scratch
    folder, and its weights are moved into ``weights.bin`` one tensor at a time.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).
    """
    gm, flat = capture_dynamo_graph(transformer, example_inputs)
    buckets = BucketGraphs(gm, flat, config, include_full=True)
    if buckets.sites.context_parallel > 1:
        raise NotImplementedError(
            f"this model runs under context parallelism ({buckets.sites.context_parallel} ranks): its graphs hold "
            "the collectives of one rank. A bundle is one model per GPU (Triton runs replicas): export the model "
            "without enable_parallelism"
        )
    signature = buckets.signature
    refused = [ext.name for ext in buckets.method.extensions() if not ext.exportable]
    if refused:
        raise NotImplementedError(
            f"ONNX bundles cannot run {refused}: its engine choice depends on readings taken while a generation runs, "
            "which a bundle's step table cannot hold; export without it, or run it in the compiled backend "
            "(torch.compile(..., backend='sdtm'))"
        )
    count_inputs = _count_inputs(buckets)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    constants = {id(t) for t in (*transformer.parameters(), *transformer.buffers())}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    input_positions = [i for i, t in enumerate(flat) if id(t) not in constants]
    input_names = [_input_name(placeholders[i].name) for i in input_positions]
    weight_bytes = sum(t.nbytes for i, t in enumerate(flat) if i not in input_positions)

    engines: list[dict[str, Any]] = []
    graphs: list[onnx.ModelProto] = []
    slugs: list[str] = []
    started = time.perf_counter()
    groups = buckets.groups()
    with WeightsFile(out / WEIGHTS_FILE) as weights, tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        for number, keys in enumerate(groups):
            bucket = buckets.distinct_graph(keys)
            logger.info("exporting %d/%d: %s ...", number + 1, len(groups), ", ".join(map(str, keys)))
            start = time.perf_counter()
            module = _BucketModule(
                bucket.graph.gm, flat, input_positions, len(signature.inputs), len(count_inputs)
            ).eval()
            counts = _count_examples(buckets, keys[0], count_inputs)
            args = tuple(flat[i] for i in input_positions) + tuple(buckets.new_state()) + tuple(counts)
            dynamic = [None] * (len(args) - len(counts)) + [
                {0: torch.export.Dim(spec["name"], min=min(lengths), max=max(lengths))} if len(lengths) > 1 else None
                for spec, lengths in zip(count_inputs, map(served_lengths, counts))
            ]
            scratch = Path(tmp) / f"{number}.onnx"
            with _quiet("onnx_ir", "onnxscript", "torch.onnx"):
                torch.onnx.export(
                    module,
                    args,
                    str(scratch),
                    dynamo=True,
                    opset_version=opset,
                    input_names=[*input_names, *(t.name for t in signature.inputs), *(c["name"] for c in count_inputs)],
                    dynamic_shapes=(tuple(dynamic),) if count_inputs else None,  # forward(*inputs): one tuple
                    output_names=["sample", *(spec["output"] for spec in manifest_state(signature))],
                    external_data=True,
                    verbose=False,
                )
            graph = onnx.load(str(scratch), load_external_data=False)
            _name_count_axes(graph, count_inputs)
            added = weights.externalize(graph, base_dir=Path(tmp))
            for path in Path(tmp).iterdir():  # the scratch copy of the weights: gone before the next graph
                path.unlink()
            graphs.append(graph)
            slugs.append(keys[0].slug)
            logger.info(
                "  graph %d exported in %.1f s (%.1f MiB new in %s)",
                number,
                time.perf_counter() - start,
                added / 2**20,
                WEIGHTS_FILE,
            )
            token_counts = bucket.counts
            for key in keys:
                engine = {"key": str(key), "stage": key.stage.value, "bucket": key.bucket, "graph": number}
                if count_inputs and key.stage is not Stage.FULL:  # the counts this engine serves, per input
                    low, high = buckets.count_range(key)
                    engine["plan_counts"] = [[lo, hi] for lo, hi in zip(low, high)]
                if bucket_graphs:
                    engine["file"] = f"{keys[0].slug}.onnx"
                engine["tokens"] = {
                    "image": token_counts.tokens,
                    "attention": token_counts.attention,
                    "feed_forward": token_counts.feed_forward,
                }
                engines.append(engine)
        stored = weights.bytes
        tensors = weights.tensors
    if bucket_graphs:
        for slug, graph in zip(slugs, graphs):
            onnx.save_model(graph, str(out / f"{slug}.onnx"))
    if len(graphs) > 1:
        combined = combine_buckets([copy.deepcopy(g) for g in graphs] if bucket_graphs else graphs)
    else:  # one engine (a schedule that never merges): the graph itself, its engine input unused
        combined = graphs[0]
        combined.graph.input.append(onnx.helper.make_tensor_value_info(ENGINE_INPUT, onnx.TensorProto.INT64, [1]))
    onnx.save_model(combined, str(out / MODEL_FILE))
    logger.info(
        "%s: %.1f MiB of weights once (%d tensors; the model holds %.1f MiB)",
        WEIGHTS_FILE,
        stored / 2**20,
        tensors,
        weight_bytes / 2**20,
    )
    sample = transformer(**example_inputs, return_dict=False)[0]
    files = [MODEL_FILE, WEIGHTS_FILE, *(f"{slug}.onnx" for slug in slugs if bucket_graphs)]
    manifest = {
        "format_version": FORMAT_VERSION,
        "producer": {"sdtm_compile": __version__, "torch": torch.__version__},
        "config": buckets.config.to_dict(),
        "transformer_class": type(transformer).__name__,
        "transformer_config": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
        "grid": list(buckets.sites.grid),
        "inputs": [_spec(name, flat[i]) for name, i in zip(input_names, input_positions)],
        "outputs": [_spec("sample", sample)],
        "state": manifest_state(signature),
        "model": MODEL_FILE,
        "engine_input": ENGINE_INPUT,
        "weights": {"file": WEIGHTS_FILE, "bytes": stored, "tensors": tensors, "model_bytes": weight_bytes},
        "engines": engines,
        "files": {name: sha256_file(out / name) for name in files},
    }
    if count_inputs:
        manifest["count_inputs"] = count_inputs
        manifest["block_kinds"] = buckets.kinds
    text = json.dumps(manifest, indent=1, default=str)
    (out / MANIFEST).write_text(text)
    manifest = json.loads(text)  # what a reader of the file sees (tuples become lists)
    logger.info(
        "exported %d engines (%d graphs) to %s in %.1f s",
        len(engines),
        len(graphs),
        out,
        time.perf_counter() - started,
    )
    return manifest


def _count_inputs(buckets: BucketGraphs) -> list[dict[str, Any]]:
    """With exact counts: the bundle's count inputs, as the manifest records them (``count_<j>``: a ``uint8``
    tensor of length ``tokens - count``, :mod:`sdtm_compile.core.counts`); none with static buckets."""
    if not buckets.method.dynamic_counts:
        return []
    number = max((len(buckets.plan_counts(key)) for key in buckets.keys), default=0)
    tokens = buckets.sites.num_tokens
    return [
        {"name": f"count_{j}", "dtype": "uint8", "length": f"{tokens} - count", "tokens": tokens} for j in range(number)
    ]


def _count_examples(buckets: BucketGraphs, key: EngineKey, count_inputs: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Example count inputs of ``key``'s graph, each naming the lengths it serves; inputs the graph does not read
    (the unmerged graph reads none) take every length from 2 to the image tokens."""
    given = buckets.count_inputs(key)
    tokens = buckets.sites.num_tokens
    rest = [example_count_tensor(0, range(0, tokens - 1), tokens) for _ in count_inputs[len(given) :]]
    return [*given, *rest]


def _name_count_axes(graph: onnx.ModelProto, count_inputs: list[dict[str, Any]]) -> None:
    """Every count input's axis is the dynamic axis named after it, in every graph (their inputs must match to be
    combined). A graph whose count input serves one length was exported with that length baked in: its axis is
    then only a name, the graph computes nothing from it."""
    names = {spec["name"] for spec in count_inputs}
    for value in graph.graph.input:
        if value.name in names:
            (axis,) = value.type.tensor_type.shape.dim
            axis.ClearField("dim_value")
            axis.dim_param = value.name


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
