"""The ``sdtm`` and ``sdtm_trt`` torch.compile backends.

Dynamo traces the transformer once and hands its FX graph here. We find the MMDiT blocks, rewrite one copy
of the graph per (stage, ratio bucket) the method's schedule can reach (:class:`~.buckets.BucketGraphs`), build
one engine per copy, region by region (:mod:`.regions`), and return a callable that picks the engine from the
timestep on every call (:class:`~.compiled.SDTMCompiledGraph`)::

    pipe.transformer = torch.compile(pipe.transformer, backend="sdtm",
                                     options={"method": sdtm_compile.SDTMConfig(ratio=0.5)})

Every token-reduction method goes through the same passes and engines (``options={"method":
sdtm_compile.ToMeSDConfig(ratio=0.5)}``; likewise ``SiToConfig``, ``ToMAConfig``). The options are
:class:`~.settings.BackendSettings`.

Both names are declared in the ``torch_dynamo_backends`` entry-point group, so they work without importing
this package. ``sdtm`` builds Inductor engines by default; ``sdtm_trt`` builds TensorRT engines where
torch-tensorrt and CUDA exist and otherwise warns once and builds Inductor engines.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx

from ..core.schedule import FULL
from ..engines import ENGINES, EngineBuildError, build_inductor_parallel, engine_available
from ..engines.vec_isa_probe import start_vec_isa_probe
from ..passes import (
    FALLBACK_HINT,
    HIDDEN_STATE,
    UnsupportedModelError,
    first_block_nodes,
    first_block_outputs,
    head_graph,
    lint_tensorrt,
    node_value,
    out_graph,
    residual_sites,
    tail_graph,
    to_aten,
)
from .buckets import BucketGraphs, DistinctGraph
from .compiled import FirstBlockEngines, SDTMCompiledGraph, compiled_graphs
from .regions import RegionalBuilder
from .settings import BackendSettings

__all__ = ["BackendSettings", "SDTMBackend", "SDTMCompiledGraph", "compiled_graphs", "sdtm", "sdtm_trt"]

logger = logging.getLogger(__name__)


def _has_symbolic_shapes(gm: fx.GraphModule, example_inputs: list[torch.Tensor]) -> bool:
    values = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    values += [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    return any(isinstance(size, torch.SymInt) for v in values if isinstance(v, torch.Tensor) for size in v.shape)


class SDTMBackend:
    """A torch.compile backend object: ``torch.compile(model, backend=SDTMBackend({...}))``.

    ``compiled`` keeps every :class:`SDTMCompiledGraph` it produced (one per Dynamo graph / input shape).
    """

    def __init__(self, options: Mapping[str, Any] | None = None, *, name: str = "sdtm") -> None:
        self.settings = BackendSettings.from_options(options)
        self.name = name
        self.compiled: list[SDTMCompiledGraph] = []

    def _engine_order(self, example_inputs: list[torch.Tensor]) -> list[str]:
        """Engines to try, best first, after resolving ``auto``; warns once when TensorRT is not possible."""
        choice = self.settings.engine
        if choice == "auto" and self.name == "sdtm_trt":
            reason = engine_available("tensorrt", example_inputs)
            if reason is None:
                return ["tensorrt", "inductor"]
            warnings.warn(
                f"sdtm_trt: TensorRT is not usable here: {reason}. Building Inductor engines instead.",
                RuntimeWarning,
                stacklevel=3,
            )
            return ["inductor"]
        if choice == "auto":
            return ["inductor"]
        reason = engine_available(choice, example_inputs)
        if reason is not None:
            raise EngineBuildError(f"engine {choice!r} cannot be used: {reason}")
        return [choice] + (["inductor"] if choice == "tensorrt" else [])

    def _build(self, what: object, gm: fx.GraphModule, inputs: list[torch.Tensor], order: list[str]):
        """Build ``gm`` (a bucket graph or a region, named ``what``) with the first engine in ``order`` that works."""
        for position, name in enumerate(order):
            try:
                if name == "tensorrt":  # lint first: a graph TensorRT cannot convert must not half-build
                    lint_tensorrt(to_aten(gm, inputs), what)
                return name, ENGINES[name].build(gm, inputs, self.settings)
            except Exception as err:
                if position == len(order) - 1:
                    raise EngineBuildError(f"building the {name} engine for {what} failed: {err}") from err
                warnings.warn(
                    f"building the {name} engine for {what} failed ({type(err).__name__}: {err}); "
                    f"falling back to {order[position + 1]} for this engine",
                    RuntimeWarning,
                    stacklevel=2,
                )
        raise AssertionError("unreachable")

    def _unmodified(self, gm: fx.GraphModule, example_inputs: list[torch.Tensor], order: list[str], reason: str):
        """``on_unsupported='fallback'``: warn, naming why, and build the unmodified graph with the chosen engine."""
        warnings.warn(
            f"{self.name}: {reason}. Compiling the model WITHOUT token merging (on_unsupported='fallback').",
            RuntimeWarning,
            stacklevel=3,
        )
        return self._build(FULL, gm, example_inputs, order)[1]

    def _first_block_engines(self, buckets: BucketGraphs, inputs: list[torch.Tensor], order: list[str]):
        """The first-block cache's head and out engines, cut from (copies of) the unmerged graph
        (:mod:`sdtm_compile.passes.step_cache`), and the first block's outputs the head returns."""
        full = buckets.graph(FULL)
        names = residual_sites(full.sites)
        outputs = first_block_outputs(full.gm, full.sites, names)
        model_outputs = len(next(n for n in buckets.traced.graph.nodes if n.op == "output").args[0])
        head = head_graph(full.gm, names, outputs)
        out = out_graph(full.gm, names, model_outputs)
        hidden = buckets.signature[HIDDEN_STATE].fresh(buckets.latent.device)
        logger.info("building the first-block cache's head and out engines with %s", order[0])
        return FirstBlockEngines(
            self._build("first-block head", head, inputs, order)[1],
            self._build("out", out, [*inputs, hidden], order)[1],
            outputs,
            first_block_nodes(full.gm, full.sites),
        )

    @staticmethod
    def _resuming(bucket: DistinctGraph, first_block: FirstBlockEngines, inputs: list[torch.Tensor]):
        """``bucket``'s graph cut to start from the head's first-block outputs, with its example inputs, when its
        first block runs unmerged (else ``None``: its engine runs its own first block)."""
        rewritten = bucket.graph
        if first_block_nodes(rewritten.gm, rewritten.sites) != first_block.nodes:  # merged in the first block
            return None
        try:
            tail = tail_graph(rewritten.gm, rewritten.sites, first_block.outputs)
        except ValueError as err:  # not an error: the engine then runs its first block again, as before
            logger.info("%s runs its own first block: %s", bucket.keys[0], err)
            return None
        placeholders = [n for n in tail.graph.nodes if n.op == "placeholder"][len(inputs) :]
        values = [node_value(p) for p in placeholders]  # fake tensors: the engines are built on real ones
        device = next(t.device for t in inputs if isinstance(t, torch.Tensor))
        extra = [torch.zeros(v.shape, dtype=v.dtype, device=device) for v in values]
        return dataclasses.replace(rewritten, gm=tail), [*inputs, *extra]

    def __call__(self, gm: fx.GraphModule, example_inputs: list[torch.Tensor], **kwargs: Any) -> Callable[..., Any]:
        if "options" in kwargs:  # torch.compile(backend=<this object>, options=...) is not how we take options
            raise ValueError("pass options to SDTMBackend(options) or use backend='sdtm' with options={...}")
        example_inputs = list(example_inputs)
        if _has_symbolic_shapes(gm, example_inputs):
            raise UnsupportedModelError(
                "the SDTM backend needs static shapes (one set of engines per token count), but Dynamo traced "
                "this graph with dynamic shapes (it does so automatically when a compiled function sees a new "
                "shape). Compile with torch.compile(..., dynamic=False)."
            )
        order = self._engine_order(example_inputs)
        on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
        if "inductor" in order and on_cpu:
            start_vec_isa_probe()  # Inductor's CPU probe overlaps the passes (sdtm_compile.engines.vec_isa_probe)
        config = self.settings.config
        try:
            buckets = BucketGraphs(gm, example_inputs, config, step_cache=self.settings.step_cache is not None)
        except UnsupportedModelError as err:
            if self.settings.on_unsupported == "error":
                raise
            return self._unmodified(gm, example_inputs, order, _without_hint(err))

        graphs = []
        for keys in buckets.groups():  # rewrite every graph before building: a pass failure stops before any build
            try:
                graphs.append(buckets.distinct_graph(keys))
            except Exception as err:  # any pass failure: the graph is not one we can rewrite
                if self.settings.on_unsupported == "error":
                    raise
                reason = f"rewriting the graph for {keys[0]} failed ({type(err).__name__}: {_without_hint(err)})"
                return self._unmodified(gm, example_inputs, order, reason)

        engine_inputs = buckets.engine_inputs()
        first_block = None
        if self.settings.step_cache is not None:
            first_block = self._first_block_engines(buckets, engine_inputs, order)
        workers = self.settings.resolved_build_workers()
        parallel = (
            self.settings.regional
            and order == ["inductor"]
            and workers > 1
            and not torch.is_grad_enabled()  # the compiler processes build inference engines
            and on_cpu  # the engine state is made on the model inputs' device
            # a rank's graphs hold its collectives (context parallelism), which a compiler process cannot pickle
            and buckets.sites.context_parallel == 1
        )
        regional = RegionalBuilder(
            lambda region, inputs, name: self._build(name, region, inputs, order)[1],
            (lambda jobs: build_inductor_parallel(jobs, self.settings, workers)) if parallel else None,
        )
        engines, names, resuming = {}, {}, set()
        total = time.perf_counter()
        for bucket in graphs:
            rewritten = bucket.graph
            inputs = [*engine_inputs, *buckets.count_inputs(bucket.keys[0])]  # dynamic counts: + its count inputs
            tail = None if first_block is None else self._resuming(bucket, first_block, inputs)
            if tail is not None:
                (rewritten, inputs), resuming = tail, resuming | set(bucket.keys)
            counts = bucket.counts
            low, high = buckets.count_range(bucket.keys[0])
            logger.info(
                "%s %s (attention %d, FF %d of %d image tokens%s) with %s",
                "preparing" if self.settings.regional else "building",
                ", ".join(map(str, bucket.keys)),
                counts.attention,
                counts.feed_forward,
                counts.tokens,
                f"; plan counts from {list(low)} to {list(high)}, one engine" if high else "",
                order[0],
            )
            if self.settings.regional:
                engine, name = regional.add(rewritten, inputs), order[0]
            else:
                name, engine = self._build(bucket.keys[0], rewritten.gm, inputs, order)
            for served in bucket.keys:
                engines[served], names[served] = engine, name
        if self.settings.regional:
            logger.info(
                "building %d distinct regions for %d call sites%s ...",
                regional.pending,
                regional.stats.call_sites,
                f" in {workers} compiler processes" if parallel else "",
            )
            regional.finish()
        logger.info(
            "%s: %d engines (%d distinct graphs, %d distinct regions for %d call sites) ready in %.1f s",
            self.name,
            len(engines),
            len(graphs),
            regional.stats.built,
            regional.stats.call_sites,
            time.perf_counter() - total,
        )
        compiled = SDTMCompiledGraph(
            engines,
            names,
            buckets.sites,
            buckets.config,
            buckets.signature,
            example_inputs,
            self.settings.history,
            self.settings.step_cache,
            first_block,
            frozenset(resuming),
        )
        self.compiled.append(compiled)
        return compiled


def _without_hint(err: Exception) -> str:
    """A pass's error message without its "pass on_unsupported='fallback'" advice (the fallback is running)."""
    return str(err).split(f". {FALLBACK_HINT}")[0]


def _no_extra_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    if kwargs:  # e.g. torch.compile(mode="max-autotune"): say so instead of silently ignoring it
        raise ValueError(
            f"the {name} backend takes only options={{...}}; got {sorted(kwargs)}. Inductor modes do not apply "
            "to SDTM engines"
        )


def sdtm(gm: fx.GraphModule, example_inputs: list[torch.Tensor], options: Mapping[str, Any] | None = None, **kw):
    """The ``sdtm`` backend: SDTM with Inductor engines (``engine`` option to change)."""
    _no_extra_kwargs("sdtm", kw)
    return SDTMBackend(options, name="sdtm")(gm, example_inputs)


def sdtm_trt(gm: fx.GraphModule, example_inputs: list[torch.Tensor], options: Mapping[str, Any] | None = None, **kw):
    """The ``sdtm_trt`` backend: SDTM with TensorRT engines where possible, Inductor otherwise (with a warning)."""
    _no_extra_kwargs("sdtm_trt", kw)
    return SDTMBackend(options, name="sdtm_trt")(gm, example_inputs)
