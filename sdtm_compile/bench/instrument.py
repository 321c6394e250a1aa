"""Instrumentation: FLOPs per bucket graph, the share of time the merge ops take, and merge maps.

* :class:`CapturedBucketGraphs`: the model's Dynamo graph and its bucket graphs per method config, with FLOPs
  of one call of each (``FlopCounterMode``, attention included; see :mod:`sdtm_compile.bench.flops`).
* :func:`merge_time_share`: seconds per call in ``sdtm_plan`` / ``sdtm_merge`` / ``sdtm_unmerge``, measured
  with the profiler on a bucket graph run op by op (inside compiled Inductor kernels the merge ops fuse
  with their neighbours and cannot be told apart); :func:`generation_share` sums them over a generation.
* :func:`op_times`: milliseconds per call of any call (a compiled engine included), split the way a FLOP count
  sees them: matmuls, attention, GEMVs (matmuls of a few rows: next to no FLOPs, real time) and everything else.
* :func:`record_merge_maps`: which tokens were merged, per step and block, from one reference generation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx

from ..compiler.buckets import BucketGraphs
from ..core.config import MethodConfig
from ..core.counts import count_tensors
from ..core.ops import sdtm_merge, sdtm_plan, sdtm_unmerge
from ..core.schedule import EngineKey
from .config import BenchConfig
from .flops import FlopCount, count_flops

__all__ = [
    "CapturedBucketGraphs",
    "MERGE_OPS",
    "OpTimes",
    "generation_share",
    "merge_time_share",
    "op_times",
    "record_merge_maps",
]

#: The merge ops whose time :func:`merge_time_share` measures, and their labels in the profile.
MERGE_OPS = {sdtm_plan: "plan", sdtm_merge: "merge", sdtm_unmerge: "unmerge"}


class CapturedBucketGraphs:
    """The model's Dynamo graph and its :class:`~sdtm_compile.compiler.buckets.BucketGraphs` per method config (for
    FLOPs and the merge profile)."""

    def __init__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        from ..compiler.capture import capture_dynamo_graph

        self.gm, self.flat = capture_dynamo_graph(model, inputs)
        self._buckets: dict[MethodConfig, BucketGraphs] = {}
        self._flops: dict[tuple[EngineKey, MethodConfig], FlopCount] = {}

    def buckets(self, config: MethodConfig) -> BucketGraphs:
        """The bucket graphs of ``config`` (built once per config)."""
        if config not in self._buckets:
            self._buckets[config] = BucketGraphs(self.gm, self.flat, config)
        return self._buckets[config]

    def graph(self, key: EngineKey, config: MethodConfig) -> fx.GraphModule:
        """``key``'s rewritten bucket graph."""
        return self.buckets(config).graph(key).gm

    def li(self, key: EngineKey, config: MethodConfig) -> torch.Tensor:
        """A fresh ``li`` state input for ``key``'s bucket graph."""
        return self.buckets(config).new_li()

    def linear_flops(self, key: EngineKey, config: MethodConfig) -> int:
        """FLOPs of ``key``'s bucket graph outside attention (the linear layers: what the paper counts as W-MACs)."""
        count = self.flops(key, config)
        return count.total - sum(flops for op, flops in count.by_op.items() if "attention" in op)

    def flops(self, key: EngineKey, config: MethodConfig) -> FlopCount:
        """FLOPs of one call of ``key``'s bucket graph (a :class:`~sdtm_compile.bench.flops.FlopCount`)."""
        if (key, config) not in self._flops:
            with torch.no_grad():
                # every state input of the contract (the fusion cache too), fresh; with exact counts, key's counts
                buckets = self.buckets(config)
                counts = count_tensors(buckets.plan_counts(key), buckets.sites.num_tokens)
                count, _ = count_flops(self.graph(key, config), *self.flat, *buckets.new_state(), *counts)
            self._flops[(key, config)] = count
        return self._flops[(key, config)]


def _labelled(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    """``fn`` run inside ``record_function("sdtm::<label>")``, so the profiler attributes its time."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(f"sdtm::{label}"):
            return fn(*args, **kwargs)

    run.__name__ = f"{fn.__name__}_labelled"
    return run


def merge_time_share(gm: fx.GraphModule, inputs: list[torch.Tensor], calls: int = 3) -> dict[str, float]:
    """Seconds per call spent in ``sdtm_plan`` / ``sdtm_merge`` / ``sdtm_unmerge`` and in all, op by op.

    Runs a copy of the bucket graph whose merge ops are wrapped in ``record_function`` under the profiler.
    """
    from ..passes import copy_graph_module

    labelled = copy_graph_module(gm)
    for node in labelled.graph.nodes:
        if node.op == "call_function" and node.target in MERGE_OPS:
            node.target = _labelled(node.target, MERGE_OPS[node.target])
    labelled.recompile()
    with torch.no_grad():
        labelled(*inputs)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                labelled(*inputs)
            total = (time.perf_counter() - start) / calls
    share = {"total_s": total}
    for label in MERGE_OPS.values():
        share[f"{label}_s"] = sum(e.cpu_time_total for e in prof.key_averages() if e.key == f"sdtm::{label}") / (
            1e6 * calls
        )
    return share


def generation_share(step_keys: list[EngineKey], shares: dict[EngineKey, dict[str, float]]) -> dict[str, float]:
    """Merge-op seconds and shares over one generation's calls (each step's bucket graph, op by op)."""
    total = sum(shares[key]["total_s"] for key in step_keys)
    result = {"generation_total_s": total}
    for label in MERGE_OPS.values():
        seconds = sum(shares[key][f"{label}_s"] for key in step_keys)
        result[f"{label}_s"] = seconds
        result[f"{label}_share"] = seconds / total
    result["all_merge_ops_share"] = sum(result[f"{label}_share"] for label in MERGE_OPS.values())
    return result


#: aten ops whose time :func:`op_times` counts as matmul (or GEMV) and as attention; their FLOPs are what
#: ``FlopCounterMode`` counts (with :mod:`~sdtm_compile.bench.flops`' attention formula).
MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::mkldnn_convolution", "aten::convolution")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")
#: A matmul of at most this many rows is a GEMV: AdaLN modulation and the embeddings, ``[B, C]`` rows, whose time
#: goes to reading the weights, with next to no FLOPs, and which merging does not shrink.
GEMV_ROWS = 16


@dataclass(frozen=True)
class OpTimes:
    """Milliseconds per call, by what the FLOP count sees (the profiler's self time of each op)."""

    matmul_ms: float  #: matmuls (addmm, mm, bmm, convolution) of more than :data:`GEMV_ROWS` rows
    attention_ms: float  #: scaled-dot-product attention kernels
    gemv_ms: float  #: matmuls of at most :data:`GEMV_ROWS` rows
    other_ms: float  #: everything else: Inductor's fused kernels (norms, GELU, merges), copies, call overhead

    @property
    def total_ms(self) -> float:
        return self.matmul_ms + self.attention_ms + self.gemv_ms + self.other_ms

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _matmul_rows(key: str, shapes: list[list[int]]) -> int:
    """Rows of a matmul's left operand from the profiler's input shapes (``addmm(bias, mat1, mat2)``, ``mm(a, b)``,
    ``bmm(a, b)`` per batch entry); a convolution counts as a matmul of many rows."""
    operand = shapes[1] if key == "aten::addmm" else shapes[0] if key in ("aten::mm", "aten::bmm") else None
    if not operand:
        return GEMV_ROWS + 1
    return operand[-2]


def op_times(fn: Callable[[], Any], calls: int = 2) -> OpTimes:
    """Profile ``calls`` calls of ``fn`` (after one warm-up) and split their time per call into :class:`OpTimes`.

    Works on compiled engines: Inductor calls matmuls and attention as aten ops (extern kernels), so the profiler
    sees them beside its own fused kernels.
    """
    with torch.no_grad():
        fn()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                fn()
    split = {"matmul_ms": 0.0, "attention_ms": 0.0, "gemv_ms": 0.0, "other_ms": 0.0}
    for event in prof.key_averages(group_by_input_shape=True):
        ms = event.self_cpu_time_total / (1e3 * calls)
        if event.key in ATTENTION_OPS:
            split["attention_ms"] += ms
        elif event.key in MATMUL_OPS:
            gemv = _matmul_rows(event.key, event.input_shapes) <= GEMV_ROWS
            split["gemv_ms" if gemv else "matmul_ms"] += ms
        else:
            split["other_ms"] += ms
    return OpTimes(**split)


def record_merge_maps(
    workload: Any, config: BenchConfig, blocks: tuple[int, ...]
) -> dict[int, dict[int, torch.Tensor]]:
    """``{step: {block: slot [N]}}`` of the last batch row (SD3: the conditional row), from one reference
    generation of the benchmark's :class:`~sdtm_compile.bench.workload.Workload`."""
    reference = workload.reference(config.method)
    current: dict[str, int] = {"step": 0}
    maps: dict[int, dict[int, torch.Tensor]] = {}

    def record(block: int, plan) -> None:
        if block in blocks:
            maps.setdefault(current["step"], {})[block] = plan.slot[-1].clone()

    reference.on_plan = record

    def on_step(step: int, timestep: float) -> None:
        current["step"] = step + 1

    workload.generate(workload.call_of(reference), config, on_step=on_step)
    return maps
