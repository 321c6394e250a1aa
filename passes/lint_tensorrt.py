"""TensorRT-readiness lint: every aten op of a bucket graph against torch-tensorrt 2.13's converters.

A check on an aten graph, not a pass: it changes nothing. TensorRT cannot be installed on our CI machines,
so this is how we know a bucket graph will convert: lower it to aten ops exactly as torch-tensorrt's backend sees
them (``make_fx`` with node metadata preserved, so every finding names its source module; a count input's length
symbolic within its range, as a TensorRT shape profile) and check each op against the rules below, read from
torch-tensorrt 2.13's ``aten_ops_converters.py`` and ``lowering/_decompositions.py``. The ops a dynamic count adds
(``aten.sym_size.int``, ``operator.sub`` / ``mul`` / ``add`` / ``floordiv`` on sizes) have converters there.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from sdtm_compile.core.counts import size_only_inputs, trace_with_symbolic_counts

from ._graph import module_stack

__all__ = ["LintFinding", "TensorRTLintError", "lint_tensorrt", "lint_report", "to_aten", "TOPK_LIMIT"]

logger = logging.getLogger(__name__)

#: torch-tensorrt 2.13 converts topk / sort only for a static k (sorted size) <= 3840 (topk_sort_validator).
TOPK_LIMIT = 3840

aten = torch.ops.aten


@dataclass(frozen=True)
class LintFinding:
    node: str
    op: str
    severity: str  #: "error": will not convert (or converts wrongly); "warning": converts within limits
    message: str
    module: str  #: the source module path, from nn_module_stack ("" if unknown)

    def __str__(self) -> str:
        where = f" in {self.module}" if self.module else ""
        return f"{self.severity}: {self.node} ({self.op}){where}: {self.message}"


class TensorRTLintError(RuntimeError):
    """A bucket graph uses ops torch-tensorrt 2.13 cannot convert; ``findings`` lists them."""

    def __init__(self, findings: list[LintFinding]) -> None:
        self.findings = findings
        super().__init__("TensorRT lint failed:\n  " + "\n  ".join(map(str, findings)))


def _shape(node: object) -> tuple[int, ...] | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _int_arg(node: fx.Node, index: int, name: str, default: int) -> int:
    if len(node.args) > index:
        return node.args[index]  # type: ignore[return-value]
    return node.kwargs.get(name, default)  # type: ignore[return-value]


# One rule per op family: ``rule(node) -> (severity, message) | None``, registered beside its "why".
RULES: dict[object, Callable[[fx.Node], tuple[str, str] | None]] = {}


def rule(*ops):
    def register(check):
        for op in ops:
            RULES[op] = check
        return check

    return register


@rule(aten.scatter_reduce.two, aten.scatter_reduce_.two)
def _scatter_reduce(node):
    return "error", "no converter: decomposed into one scatter per index (and reduce='mean' truncates floats)"


@rule(aten.scatter_add.default, aten.scatter_add_.default)
def _scatter_add(node):
    return "error", "no converter: decomposed into one scatter per index; use index_put(accumulate=True)"


@rule(aten.topk.default)
def _topk(node):
    k = _int_arg(node, 1, "k", 0)
    if not isinstance(k, int):
        return "error", "topk with a dynamic k has no converter"
    if k > TOPK_LIMIT:
        return "error", f"topk k={k} exceeds torch-tensorrt's limit of {TOPK_LIMIT}"
    return None


@rule(aten.sort.default, aten.sort.stable)
def _sort(node):
    shape = _shape(node.args[0])
    if node.target is aten.sort.default and len(node.args) < 2:
        return "error", "sort without an explicit dim crashes torch-tensorrt's sort_validator; pass dim="
    dim = _int_arg(node, 1, "dim", -1) if node.target is aten.sort.default else node.kwargs.get("dim", -1)
    size = shape[dim] if shape is not None and isinstance(dim, int) else None
    if size is None or size > TOPK_LIMIT:
        return "error", f"sort over {size} elements exceeds torch-tensorrt's limit of {TOPK_LIMIT}"
    return None


@rule(aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default, aten._unique2.default)
def _data_dependent(node):
    return "error", "data-dependent output shape"


@rule(aten._local_scalar_dense.default, aten.item.default)
def _item(node):
    return "error", ".item() reads a tensor value on the host: no converter, breaks the engine"


@rule(aten.max.dim, aten.min.dim)
def _max_dim(node):
    uses_indices = any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users)
    if uses_indices:
        return "warning", "max/min.dim with its indices used has no converter (runs in PyTorch); use argmax"
    return None


def to_aten(gm: fx.GraphModule, example_inputs: list[torch.Tensor]) -> fx.GraphModule:
    """Lower a torch-level graph to aten ops with fake tensors, keeping every node's module stack (a graph with
    count inputs: their lengths symbolic, as its engine is built; :mod:`sdtm_compile.core.counts`)."""
    if size_only_inputs(gm):
        return trace_with_symbolic_counts(gm, example_inputs)
    from torch.fx import traceback as fx_traceback
    from torch.fx.experimental.proxy_tensor import make_fx

    def run(*args):
        with fx_traceback.preserve_node_meta():
            return fx.Interpreter(gm).run(*args)

    with torch.no_grad():
        return make_fx(run, tracing_mode="fake", pre_dispatch=False)(*example_inputs)


def lint_report(aten_gm: fx.GraphModule) -> list[LintFinding]:
    """Every finding of an aten-level graph (see :func:`to_aten`)."""
    findings = []
    for node in aten_gm.graph.nodes:
        if node.op != "call_function":
            continue
        check = RULES.get(node.target)
        verdict = check(node) if check else None
        # A count input's length is a backed symbol with a range (a TensorRT shape profile); an unbacked one is a
        # shape read from data, which TensorRT cannot build
        if free_unbacked_symbols(_shape(node) or ()):
            verdict = verdict or ("error", "data-dependent (symbolic) output shape")
        if verdict is not None:
            stack = module_stack(node)
            findings.append(LintFinding(node.name, str(node.target), *verdict, stack[-1][0] if stack else ""))
    return findings


def lint_tensorrt(aten_gm: fx.GraphModule, what: object = "graph") -> list[LintFinding]:
    """Check an aten-level graph (see :func:`to_aten`): its findings, or :class:`TensorRTLintError` on an error.

    A check, not a rewrite: the graph is not changed. ``what`` names the graph in the debug log (e.g. its key).
    """
    findings = lint_report(aten_gm)
    for finding in findings:
        logger.debug("lint %s: %s", what, finding)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        raise TensorRTLintError(errors)
    logger.debug("lint_tensorrt: %s passes (%d warnings)", what, len(findings))
    return findings
