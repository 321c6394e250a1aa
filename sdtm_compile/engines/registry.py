"""Engine builders: ``name -> build(gm, example_inputs, settings) -> callable``, each with its "can I run here?".

An engine takes the rewritten graph's inputs (the model's flattened inputs, then the carried state of the engine
contract) and returns its outputs (the model's, then every state output of the contract:
:mod:`sdtm_compile.core.signature`). Add a builder with :func:`register_engine`.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..core.counts import CountRangeError, size_only_inputs, trace_with_symbolic_counts
from .cache import EngineCache
from .compile_worker import compile_job_bytes, job_bytes
from .tensorrt import build_tensorrt_engine
from .vec_isa_probe import wait_for_vec_isa_probe

__all__ = [
    "EngineBuilder",
    "ENGINES",
    "register_engine",
    "engine_available",
    "EngineBuildError",
    "build_inductor",
    "engine_cache",
    "aten_graph",
    "load_inductor",
    "load_inductor_artifact",
    "store_inductor",
]

logger = logging.getLogger(__name__)

CompiledEngine = Callable[..., Any]


class EngineBuildError(RuntimeError):
    """An engine could not be built (or cannot be built on this machine)."""


@dataclass(frozen=True)
class EngineBuilder:
    name: str
    build: Callable[[fx.GraphModule, list[torch.Tensor], Any], CompiledEngine]
    #: ``(example_inputs) -> None`` if this engine can run here, else the reason it cannot.
    unavailable_reason: Callable[[list[torch.Tensor]], str | None]
    description: str


ENGINES: dict[str, EngineBuilder] = {}


def register_engine(name: str, *, unavailable_reason: Callable[[list[torch.Tensor]], str | None], description: str):
    """Decorator: register ``build(gm, example_inputs, settings)`` under ``name``."""

    def decorator(build):
        if name in ENGINES:
            raise ValueError(f"engine {name!r} is already registered")
        ENGINES[name] = EngineBuilder(name, build, unavailable_reason, description)
        return build

    return decorator


def engine_available(name: str, example_inputs: list[torch.Tensor]) -> str | None:
    """``None`` if engine ``name`` can run here, else why not."""
    return ENGINES[name].unavailable_reason(example_inputs)


def _always(_: list[torch.Tensor]) -> str | None:
    return None


@register_engine("eager", unavailable_reason=_always, description="the rewritten FX graph run op by op (debugging)")
def build_eager(gm: fx.GraphModule, example_inputs: list[torch.Tensor], settings: Any) -> CompiledEngine:
    return gm


@register_engine(
    "inductor",
    unavailable_reason=_always,
    description="TorchInductor (the sdtm backend's default on every device), disk-cached",
)
def build_inductor(gm: fx.GraphModule, example_inputs: list[torch.Tensor], settings: Any) -> CompiledEngine:
    """Lower to aten with ``make_fx``, compile with ``standalone_compile``; load/store it in the engine cache."""
    from torch._inductor import standalone_compile

    cache = engine_cache(settings)
    key = cache.key(gm, example_inputs, "inductor") if cache else ""
    artifact = load_inductor(cache, key)
    if artifact is not None:
        return artifact
    wait_for_vec_isa_probe()
    graph = aten_graph(gm, example_inputs)
    if size_only_inputs(gm):  # count inputs: their lengths stay symbolic
        artifact = _compile_with_counts(graph, example_inputs)
    else:
        artifact = standalone_compile(
            graph, example_inputs, dynamic_shapes="from_example_inputs", donate_graph_module=True
        )
    store_inductor(cache, key, lambda path: artifact.save(path=path))
    return artifact


def _compile_with_counts(graph: fx.GraphModule, example_inputs: list[torch.Tensor]) -> CompiledEngine:
    """A graph with count inputs compiled as a compiler process compiles its job, so that its artifact can be
    saved in the engine cache (:func:`~sdtm_compile.engines.compile_worker.compile_job_bytes` says why). A graph
    that cannot be pickled (a rank's functional collectives) is compiled as it is; the engine cache then warns
    that it could not store it."""
    from torch._inductor import standalone_compile

    try:
        job = job_bytes(graph, example_inputs)
    except Exception as err:
        logger.debug("compiling a graph with count inputs in memory (%s)", err)
        return standalone_compile(graph, example_inputs, dynamic_shapes="from_graph", donate_graph_module=True)
    return compile_job_bytes(job)


def engine_cache(settings: Any) -> Any:
    """The :class:`~sdtm_compile.engines.cache.EngineCache` the settings ask for, or ``None`` (caching off)."""

    cache_dir = settings.resolved_cache_dir() if hasattr(settings, "resolved_cache_dir") else None
    return EngineCache(cache_dir) if cache_dir is not None else None


def aten_graph(gm: fx.GraphModule, example_inputs: list[torch.Tensor]) -> fx.GraphModule:
    """``gm`` lowered to aten: an aten-only graph (our plan ops traced through) is what Inductor can serialise.

    A graph with count inputs is traced with their lengths symbolic and every other size static, and checked to
    serve every count its inputs name (:func:`~sdtm_compile.core.counts.trace_with_symbolic_counts`).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    if size_only_inputs(gm):
        try:
            return trace_with_symbolic_counts(gm, example_inputs)
        except CountRangeError as err:
            raise EngineBuildError(str(err)) from err
    with torch.no_grad():
        return make_fx(gm)(*example_inputs)


def load_inductor(cache: Any, key: str) -> CompiledEngine | None:
    return cache.load(key, load_inductor_artifact) if cache is not None else None


def load_inductor_artifact(path: str) -> CompiledEngine:
    """An Inductor engine saved at ``path``, once Inductor's CPU probe (if started) has answered."""
    from torch._inductor import CompiledArtifact

    wait_for_vec_isa_probe()
    return CompiledArtifact.load(path=path)


def store_inductor(cache: Any, key: str, save: Callable[[str], Any]) -> None:
    if cache is not None:
        cache.store(key, save, {"engine": "inductor", "torch": torch.__version__})


def _tensorrt_unavailable(example_inputs: list[torch.Tensor]) -> str | None:
    if importlib.util.find_spec("torch_tensorrt") is None:
        return "torch-tensorrt is not installed (pip install 'sdtm-compile[trt]' on a CUDA machine)"
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    if devices != {"cuda"}:
        return f"the model runs on {sorted(devices)}; TensorRT engines need every input on CUDA"
    return None


@register_engine(
    "tensorrt", unavailable_reason=_tensorrt_unavailable, description="torch-tensorrt 2.13 (CUDA machines)"
)
def build_tensorrt(gm: fx.GraphModule, example_inputs: list[torch.Tensor], settings: Any) -> CompiledEngine:
    return build_tensorrt_engine(gm, example_inputs, settings)
