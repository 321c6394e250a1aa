"""Parallel Inductor builds of many regions: compiler processes fed one job at a time.

Inductor's compile is mostly single-threaded Python, so independent engines are what parallelises a build.
"""

from __future__ import annotations

import logging
import selectors
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .compile_worker import pickle_job
from .registry import (
    CompiledEngine,
    aten_graph,
    build_inductor,
    engine_cache,
    load_inductor,
    load_inductor_artifact,
    store_inductor,
)

__all__ = ["build_inductor_parallel", "build_order"]

logger = logging.getLogger(__name__)


def build_inductor_parallel(jobs: list[Any], settings: Any, workers: int) -> list[CompiledEngine]:
    """Build many Inductor engines at once, ``workers`` compiler processes in parallel (regional builds).

    ``jobs`` are :class:`~sdtm_compile.compiler.regions.RegionJob` s. Cached engines are loaded here; the others
    are lowered to aten here (``make_fx``) and compiled by ``standalone_compile`` in compiler processes
    (:mod:`sdtm_compile.engines.compile_worker`), which write the artifacts this process loads and stores in the
    engine cache. Inductor's compile is mostly single-threaded Python, so independent engines are what parallelises a
    build. A job whose compiler process fails is built here instead, with a warning naming the error.
    """

    cache = engine_cache(settings)
    keys = [cache.key(job.region, job.inputs, "inductor") if cache else "" for job in jobs]
    engines = [load_inductor(cache, key) for key in keys]
    pending = [index for index, engine in enumerate(engines) if engine is None]
    logger.info("%d regions: %d from the engine cache, %d to build", len(jobs), len(jobs) - len(pending), len(pending))
    if len(pending) <= 1:  # nothing to parallelise: no compiler processes to start
        for index in pending:
            engines[index] = build_inductor(jobs[index].region, jobs[index].inputs, settings)
        return engines  # type: ignore[return-value]

    pending = build_order(jobs, pending, workers)
    with tempfile.TemporaryDirectory() as scratch, _CompilerPool(min(workers, len(pending))) as pool:
        for index in pending:  # lowering here overlaps with the compiler processes already at work
            job = jobs[index]
            layouts = [(tuple(t.shape), tuple(t.stride()), t.dtype) for t in job.inputs]
            pickle_job(f"{scratch}/{index}.job", aten_graph(job.region, job.inputs), layouts)
            pool.submit(index, f"{scratch}/{index}.job", f"{scratch}/{index}.bin")
        for done, (index, error) in enumerate(pool.results(), 1):
            job, path = jobs[index], f"{scratch}/{index}.bin"
            try:
                if error:
                    raise RuntimeError(error)
                engines[index] = load_inductor_artifact(path)
            except Exception as err:
                warnings.warn(
                    f"building {job.name} in a compiler process failed ({err}); building it in this process instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
                engines[index] = build_inductor(job.region, job.inputs, settings)
                continue
            store_inductor(cache, keys[index], lambda out, p=path: shutil.copyfile(p, out))
            logger.info("  region %d/%d built: %s", done, len(pending), job.name)
    return engines  # type: ignore[return-value]


def _plans(region: Any) -> frozenset:
    """The plans a region makes: ``(plan function, options)`` of its ``sdtm_plan`` nodes."""
    from ..core.ops import sdtm_plan

    return frozenset((n.args[4], n.args[6]) for n in region.graph.nodes if n.target is sdtm_plan)


def build_order(jobs: list[Any], pending: list[int], workers: int) -> list[int]:
    """The order to build ``pending`` jobs in: largest first, so that no big region starts last while the other
    processes sit idle; but a region making the same plans as an earlier one waits for the first ``workers``
    jobs to be handed out.

    Two such regions (the structure stage's merged part of a block and of the last block) share most kernels:
    built at the same time in two processes, both compile them; built one after the other, the second finds the
    first's C++ kernels in Inductor's on-disk cache. Queued right after the first jobs, the second starts when
    a process frees rather than last, where it ran alone while the other processes sat idle (docs/design.md,
    "Build cost").
    """
    by_size = sorted(pending, key=lambda i: -sum(node.op == "call_function" for node in jobs[i].region.graph.nodes))
    seen: set = set()
    first, later = [], []
    for index in by_size:
        plans = _plans(jobs[index].region)
        (later if plans and plans <= seen else first).append(index)
        seen |= plans
    return first[:workers] + later + first[workers:]


class _CompilerPool:
    """``workers`` long-lived compiler processes (``python .../compile_worker.py``) fed one job at a time."""

    def __init__(self, workers: int) -> None:

        # The file, not ``-m sdtm_compile.engines.compile_worker``: the worker needs torch only, not this package
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
                self._feed()  # the next job goes out before the caller spends seconds loading this one's artifact
                if not line:
                    yield index, f"the compiler process exited (code {self.processes[number].wait()})"
                else:
                    yield index, "" if line.startswith("ok") else line.rstrip("\n").split("\t", 1)[-1]
