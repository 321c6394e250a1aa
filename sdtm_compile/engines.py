"""Engine builders: ``name -> build(gm, example_inputs, settings) -> callable``, each with its "can I run here?".

An engine takes the rewritten graph's inputs (the model's flattened inputs plus ``li``) and returns its
outputs (the model's outputs plus ``li``). Add a builder with :func:`register_engine`.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

__all__ = [
    "EngineBuilder",
    "ENGINES",
    "register_engine",
    "engine_available",
    "EngineBuildError",
    "build_inductor_parallel",
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

    cache = _engine_cache(settings)
    key = cache.key(gm, example_inputs, "inductor") if cache else ""
    artifact = _load_inductor(cache, key)
    if artifact is not None:
        return artifact
    artifact = standalone_compile(
        _aten_graph(gm, example_inputs), example_inputs, dynamic_shapes="from_example_inputs", donate_graph_module=True
    )
    _store_inductor(cache, key, lambda path: artifact.save(path=path))
    return artifact


def _engine_cache(settings: Any) -> Any:
    """The :class:`~sdtm_compile.cache.EngineCache` the settings ask for, or ``None`` (caching off)."""
    from .cache import EngineCache

    cache_dir = settings.resolved_cache_dir() if hasattr(settings, "resolved_cache_dir") else None
    return EngineCache(cache_dir) if cache_dir is not None else None


def _aten_graph(gm: fx.GraphModule, example_inputs: list[torch.Tensor]) -> fx.GraphModule:
    """``gm`` lowered to aten: an aten-only graph (our plan ops traced through) is what Inductor can serialise."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        return make_fx(gm)(*example_inputs)


def _load_inductor(cache: Any, key: str) -> CompiledEngine | None:
    from torch._inductor import CompiledArtifact

    return cache.load(key, lambda path: CompiledArtifact.load(path=path)) if cache is not None else None


def _store_inductor(cache: Any, key: str, save: Callable[[str], Any]) -> None:
    if cache is not None:
        cache.store(key, save, {"engine": "inductor", "torch": torch.__version__})


def build_inductor_parallel(jobs: list[Any], settings: Any, workers: int) -> list[CompiledEngine]:
    """Build many Inductor engines at once, ``workers`` compiler processes in parallel (regional builds).

    ``jobs`` are :class:`~sdtm_compile.regions.RegionJob` s. Cached engines are loaded here; the others are lowered
    to aten here (``make_fx``) and compiled by ``standalone_compile`` in compiler processes
    (:mod:`sdtm_compile.compile_worker`), which write the artifacts this process loads and stores in the engine
    cache. Inductor's compile is mostly single-threaded Python, so independent engines are what parallelises a
    build. A job whose compiler process fails is built here instead, with a warning naming the error.
    """
    import shutil
    import tempfile

    from torch._inductor import CompiledArtifact

    from .compile_worker import pickle_job

    cache = _engine_cache(settings)
    keys = [cache.key(job.region, job.inputs, "inductor") if cache else "" for job in jobs]
    engines = [_load_inductor(cache, key) for key in keys]
    pending = [index for index, engine in enumerate(engines) if engine is None]
    logger.info("%d regions: %d from the engine cache, %d to build", len(jobs), len(jobs) - len(pending), len(pending))
    if len(pending) <= 1:  # nothing to parallelise: no compiler processes to start
        for index in pending:
            engines[index] = build_inductor(jobs[index].region, jobs[index].inputs, settings)
        return engines  # type: ignore[return-value]

    # Largest first, so that no big region starts last while the other processes sit idle
    pending.sort(key=lambda i: -sum(node.op == "call_function" for node in jobs[i].region.graph.nodes))
    with tempfile.TemporaryDirectory() as scratch, _CompilerPool(min(workers, len(pending))) as pool:
        for index in pending:  # lowering here overlaps with the compiler processes already at work
            job = jobs[index]
            layouts = [(tuple(t.shape), tuple(t.stride()), t.dtype) for t in job.inputs]
            pickle_job(f"{scratch}/{index}.job", _aten_graph(job.region, job.inputs), layouts)
            pool.submit(index, f"{scratch}/{index}.job", f"{scratch}/{index}.bin")
        for done, (index, error) in enumerate(pool.results(), 1):
            job, path = jobs[index], f"{scratch}/{index}.bin"
            try:
                if error:
                    raise RuntimeError(error)
                engines[index] = CompiledArtifact.load(path=path)
            except Exception as err:
                warnings.warn(
                    f"building {job.name} in a compiler process failed ({err}); building it in this process instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
                engines[index] = build_inductor(job.region, job.inputs, settings)
                continue
            _store_inductor(cache, keys[index], lambda out, p=path: shutil.copyfile(p, out))
            logger.info("  region %d/%d built: %s", done, len(pending), job.name)
    return engines  # type: ignore[return-value]


class _CompilerPool:
    """``workers`` long-lived compiler processes (``python .../compile_worker.py``) fed one job at a time."""

    def __init__(self, workers: int) -> None:
        import subprocess
        import sys
        from pathlib import Path

        # The file, not ``-m sdtm_compile.compile_worker``: the worker needs torch only, not this package
        worker = str(Path(__file__).with_name("compile_worker.py"))
        self.processes = [
            subprocess.Popen(
                [sys.executable, worker],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # Inductor's own warnings; failures come back on stdout
                text=True,
            )
            for _ in range(workers)
        ]
        self.queue: list[tuple[int, str, str]] = []
        self.busy: dict[int, int] = {}  # process number -> job index
        self.submitted = 0

    def __enter__(self) -> _CompilerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:  # every answer is in: no need to wait for the processes' own cleanup
            if process.stdin:
                process.stdin.close()
            process.kill()
            process.wait(timeout=60)

    def submit(self, index: int, job_path: str, out_path: str) -> None:
        self.queue.append((index, job_path, out_path))
        self.submitted += 1
        self._feed()

    def _feed(self) -> None:
        for number, process in enumerate(self.processes):
            if number not in self.busy and self.queue and process.poll() is None:
                index, job_path, out_path = self.queue.pop(0)
                assert process.stdin is not None
                process.stdin.write(f"{job_path}\t{out_path}\n")
                process.stdin.flush()
                self.busy[number] = index

    def results(self):
        """Yield ``(job index, error or "")`` as jobs finish."""
        import selectors

        finished = 0
        while finished < self.submitted:
            self._feed()
            if not self.busy:  # every process died: report the rest as failed
                while self.queue:
                    finished += 1
                    yield self.queue.pop(0)[0], "no compiler process left"
                return
            selector = selectors.DefaultSelector()
            for number in self.busy:
                selector.register(self.processes[number].stdout, selectors.EVENT_READ, number)
            ready = selector.select()
            selector.close()
            for key, _ in ready:
                number = key.data
                index = self.busy.pop(number)
                line = self.processes[number].stdout.readline()  # type: ignore[union-attr]
                finished += 1
                if not line:
                    yield index, f"the compiler process exited (code {self.processes[number].wait()})"
                else:
                    yield index, "" if line.startswith("ok") else line.rstrip("\n").split("\t", 1)[-1]


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
    from .tensorrt import build_tensorrt_engine

    return build_tensorrt_engine(gm, example_inputs, settings)
