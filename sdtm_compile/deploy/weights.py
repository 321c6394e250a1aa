"""Weights once: every bucket graph of a bundle reads one weights file, and one ONNX model holds every bucket.

``torch.onnx.export`` writes each bucket graph with its own copy of the model's weights (seven buckets: seven
copies on disk, and seven in memory for a runner with one session per graph). The graphs are one model at different
token counts, so almost every initializer of one is an initializer of every other, byte for byte; only the merge
plans' small index tables differ. Here:

* :class:`WeightsFile` keeps one copy of each distinct initializer (matched by content, since the exporter's
  constant folding names them differently from graph to graph) in one external-data file, :data:`WEIGHTS_FILE`,
  and points each graph's initializers into it;
* :func:`combine_buckets` makes one ONNX model of the bucket graphs whose :data:`ENGINE_INPUT` picks the bucket
  through nested ``If`` nodes. Every branch reads the same outer-scope initializers, and every branch returns the
  same output shapes (unmerge restores ``N`` tokens), which ``If`` requires. One file, one ONNX Runtime session, one
  copy of the weights in memory.

Initializers under :data:`INLINE_BYTES` (shapes, axes, scalars: ONNX shape inference must read them in the graph)
stay in each graph. Offsets in the weights file are aligned (4 KiB for tensors of 4 KiB and more) so that a runtime
may map it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import onnx
from onnx import helper, numpy_helper

__all__ = ["WEIGHTS_FILE", "ENGINE_INPUT", "INLINE_BYTES", "WeightsFile", "combine_buckets"]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.bin"
#: The combined model's input that picks the bucket: int64 ``[1]``, the index of the bucket graph.
ENGINE_INPUT = "engine"
#: Initializers smaller than this stay inside each graph (their copies cost nothing).
INLINE_BYTES = 1024
_ALIGN = 4096
_SMALL_ALIGN = 64


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _raw(tensor: onnx.TensorProto, base_dir: Path | None) -> bytes:
    """The tensor's bytes, read from its external-data file (relative to ``base_dir``) when it has one."""
    if _is_external(tensor):
        info = {entry.key: entry.value for entry in tensor.external_data}
        if base_dir is None:
            raise ValueError(f"initializer {tensor.name!r} is external: give the folder of its data file")
        with (base_dir / info["location"]).open("rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


class WeightsFile:
    """One external-data file shared by several ONNX graphs, each distinct initializer content written once.

    Use as a context manager; :meth:`externalize` each graph, then save the graphs beside the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = self.path.open("wb")
        self.bytes = 0  #: the file's size so far
        self._by_digest: dict[str, onnx.TensorProto] = {}
        self._names: set[str] = set()

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def tensors(self) -> int:
        """How many distinct initializers the file holds."""
        return len(self._by_digest)

    def _add(self, tensor: onnx.TensorProto, raw: bytes) -> onnx.TensorProto:
        """The external initializer holding ``raw`` (written on first sight of this content), named
        ``weights/<name where first seen>``: a namespace of its own, so that it collides with no value of any graph."""
        digest = hashlib.sha256(f"{tensor.data_type}:{tuple(tensor.dims)}:".encode() + raw).hexdigest()
        known = self._by_digest.get(digest)
        if known is not None:
            return known
        align = _ALIGN if len(raw) >= _ALIGN else _SMALL_ALIGN
        pad = -self.bytes % align
        self._file.write(b"\0" * pad)
        self._file.write(raw)
        name = f"weights/{tensor.name}"
        if name in self._names:
            name = f"{name}__{digest[:12]}"
        self._names.add(name)
        external = onnx.TensorProto(name=name, data_type=tensor.data_type, dims=tensor.dims)
        external.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self.bytes + pad), ("length", len(raw))):
            external.external_data.add(key=key, value=str(value))
        self.bytes += pad + len(raw)
        self._by_digest[digest] = external
        return external

    def externalize(self, model: onnx.ModelProto, base_dir: str | Path | None = None) -> int:
        """Point ``model``'s initializers of :data:`INLINE_BYTES` or more into this file (in place: the graph then
        names them ``weights/...``); ``base_dir``: where the model's own external data lies, if it has some.
        Returns how many bytes this graph added to the file (0 when all its weights were there already)."""
        base = Path(base_dir) if base_dir is not None else None
        before = self.bytes
        mapping: dict[str, str] = {}
        externals: list[onnx.TensorProto] = []
        inline: list[onnx.TensorProto] = []
        for tensor in model.graph.initializer:
            raw = _raw(tensor, base)
            if len(raw) < INLINE_BYTES:
                if _is_external(tensor):  # small but stored outside: bring it in
                    tensor.ClearField("external_data")
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    tensor.raw_data = raw
                inline.append(tensor)
                continue
            external = self._add(tensor, raw)
            mapping[tensor.name] = external.name
            if external not in externals:  # two initializers of one graph may hold the same content
                externals.append(external)
        _rename(model.graph, mapping)
        del model.graph.initializer[:]
        model.graph.initializer.extend([*inline, *externals])
        return self.bytes - before


def _rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename values in ``graph`` (node inputs and outputs, graph outputs, value_info), recursing into subgraphs."""
    if not mapping:
        return
    for node in graph.node:
        node.input[:] = [mapping.get(name, name) for name in node.input]
        node.output[:] = [mapping.get(name, name) for name in node.output]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename(attribute.g, mapping)
            for sub in attribute.graphs:
                _rename(sub, mapping)
    for info in (*graph.output, *graph.value_info):
        info.name = mapping.get(info.name, info.name)


def _prefix_local_values(graph: onnx.GraphProto, prefix: str) -> None:
    """Prefix every value that stays local to ``graph`` as an ``If`` branch (what its nodes compute, its inline
    initializers) so that it shadows no outer name; its inputs and shared weights keep theirs (the branch reads
    them from the outer graph)."""
    mapping = {name: prefix + name for node in graph.node for name in node.output if name}
    for tensor in graph.initializer:
        if not _is_external(tensor):
            mapping[tensor.name] = prefix + tensor.name
            tensor.name = prefix + tensor.name
    _rename(graph, mapping)


def _io_signature(model: onnx.ModelProto) -> tuple:
    def names_and_types(values) -> tuple:
        return tuple((v.name, v.type.SerializeToString()) for v in values)

    return names_and_types(model.graph.input), names_and_types(model.graph.output)


def combine_buckets(models: Sequence[onnx.ModelProto]) -> onnx.ModelProto:
    """One ONNX model that runs ``models[i]`` when its :data:`ENGINE_INPUT` is ``[i]``.

    ``models``: the bucket graphs of one export, externalized into one :class:`WeightsFile` (so their weights are
    the same outer-scope initializers); they must have the same inputs and outputs (names, types, shapes). They are
    modified (their local values prefixed ``e<i>/``: ONNX forbids a branch shadowing an outer name). An index
    outside ``0..len(models)-1`` runs the last graph: callers pass indices from the manifest.
    """
    if len(models) < 2:
        raise ValueError("combine_buckets needs two or more bucket graphs (one graph needs no engine input)")
    first = models[0]
    signature = _io_signature(first)
    outputs = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in first.graph.output]  # before renaming
    inputs = list(first.graph.input)
    shared: dict[str, onnx.TensorProto] = {}
    branches = []
    for number, model in enumerate(models):
        if _io_signature(model) != signature:
            raise ValueError(
                f"bucket graph {number} has other inputs or outputs than graph 0; only the graphs of one export "
                "(same model, inputs and engine contract) can be combined"
            )
        graph = model.graph
        _prefix_local_values(graph, f"e{number}/")
        local = [t for t in graph.initializer if not _is_external(t)]
        shared.update({t.name: t for t in graph.initializer if _is_external(t)})
        branches.append(
            helper.make_graph(
                list(graph.node),
                f"engine_{number}",
                [],
                list(graph.output),
                initializer=local,
                value_info=list(graph.value_info),
            )
        )

    def renamed(suffix: str) -> list[onnx.ValueInfoProto]:
        infos = []
        for info in outputs:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(info)
            copy.name = f"{info.name}{suffix}"
            infos.append(copy)
        return infos

    # engine == 0 ? graph 0 : (engine == 1 ? graph 1 : ... graph n-1), built from the innermost choice out
    otherwise = branches[-1]
    for number in range(len(branches) - 2, -1, -1):
        suffix = "" if number == 0 else f"@{number}"
        index = helper.make_tensor(f"engine_index_{number}", onnx.TensorProto.INT64, [1], [number])
        nodes = [
            helper.make_node("Constant", [], [f"engine_index_{number}"], value=index),
            helper.make_node("Equal", [ENGINE_INPUT, f"engine_index_{number}"], [f"is_engine_{number}"]),
            helper.make_node(
                "If",
                [f"is_engine_{number}"],
                [f"{info.name}{suffix}" for info in outputs],
                then_branch=branches[number],
                else_branch=otherwise,
            ),
        ]
        if number:
            otherwise = helper.make_graph(nodes, f"engines_from_{number}", [], renamed(suffix))
    graph = helper.make_graph(
        nodes,
        "sdtm_engines",
        [*inputs, helper.make_tensor_value_info(ENGINE_INPUT, onnx.TensorProto.INT64, [1])],
        outputs,
        initializer=list(shared.values()),
    )
    combined = helper.make_model(graph, opset_imports=list(first.opset_import), producer_name="sdtm-compile")
    combined.ir_version = first.ir_version
    return combined
