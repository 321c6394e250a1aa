"""Parallel Inductor builds of many regions: compiler processes fed one job at a time.

Inductor's compile is mostly single-threaded Python, so independent engines are what parallelises a build.
"""

from __future__ import annotations

import logging
import queue
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .compile_worker import compile_job, pickle_job
from .registry import (
    CompiledEngine,
    aten_graph,
    build_inductor,
    engine_cache,
    load_inductor,
    load_inductor_artifact,
    store_inductor,
)
from .vec_isa_probe import wait_for_vec_isa_probe

__all__ = ["build_inductor_parallel", "build_order"]

logger = logging.getLogger(__name__)


def build_inductor_parallel(jobs: list[Any], settings: Any, workers: int) -> list[CompiledEngine]:
    """Build many Inductor engines at once, ``workers`` at a time: this process and ``workers - 1`` compiler
    processes (regional builds).

    ``jobs`` are :class:`~sdtm_compile.compiler.regions.RegionJob` s. Cached engines are loaded here; the others
    are lowered to aten here (``make_fx``) and compiled by ``standalone_compile``, each by whoever is free first:
    a compiler process (:mod:`sdtm_compile.engines.compile_worker`, which writes an artifact this process loads)
    or this process itself. Inductor's compile is mostly single-threaded Python, so independent engines are what
    parallelises a build; this process compiles too rather than wait, which spares one process its start (importing
    torch and Inductor, seconds of CPU) and its jobs the round trip through an artifact file. A job whose compiler
    process fails is built here instead, with a warning naming the error.
    """

    cache = engine_cache(settings)
    keys = [cache.key(job.region, job.inputs, "inductor") if cache else "" for job in jobs]
    engines = [load_inductor(cache, key) for key in keys]
    pending = [index for index, engine in enumerate(engines) if engine is None]
    logger.info("%d regions: %d from the engine cache, %d to build", len(jobs), len(jobs) - len(pending), len(pending))
    if len(pending) <= 1 or workers <= 1:  # nothing to parallelise: no compiler processes to start
        for index in pending:
            engines[index] = build_inductor(jobs[index].region, jobs[index].inputs, settings)
        return engines  # type: ignore[return-value]

    pending, waits_for = build_order(jobs, pending)
    with tempfile.TemporaryDirectory() as scratch, _CompilerPool(min(workers, len(pending)) - 1) as pool:
        for index in pending:  # lowering here overlaps with the compiler processes already at work
            job = jobs[index]
            pickle_job(f"{scratch}/{index}.job", aten_graph(job.region, job.inputs), job.inputs)
            pool.submit(index, f"{scratch}/{index}.job", f"{scratch}/{index}.bin", after=waits_for.get(index))
        pool.close_submissions()

        def built(index: int, make: Callable[[], CompiledEngine], save: Callable[[Any, str], Any], where: str):
            """``make()``'s engine, stored in the engine cache with ``save(engine, path)``; where that fails, the
            job built here from its region by ``build_inductor`` (which stores it), with a warning."""
            job = jobs[index]
            try:
                engine = make()
            except Exception as err:
                warnings.warn(
                    f"building {job.name} {where} failed ({err}); building it in this process instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return build_inductor(job.region, job.inputs, settings)
            store_inductor(cache, keys[index], lambda out: save(engine, out))
            return engine

        done = 0
        while done < len(pending):
            mine = pool.take()  # the next job no compiler process has taken, if one is ready
            if mine is not None:
                wait_for_vec_isa_probe()
                job_path = f"{scratch}/{mine}.job"  # compiled as a compiler process does (compile_job's docstring)
                engines[mine] = built(
                    mine, lambda: compile_job(job_path), lambda e, out: e.save(path=out), "from its job"
                )
                pool.finish_here(mine)
                done += 1
                logger.info("  region %d/%d built here: %s", done, len(pending), jobs[mine].name)
            for index, error in pool.finished_jobs(wait=mine is None):
                path = f"{scratch}/{index}.bin"
                load = lambda: _artifact(path, error)  # noqa: E731
                engines[index] = built(index, load, lambda _, out: shutil.copyfile(path, out), "in a compiler process")
                done += 1
                logger.info("  region %d/%d built: %s", done, len(pending), jobs[index].name)
    return engines  # type: ignore[return-value]


def _artifact(path: str, error: str) -> CompiledEngine:
    """The artifact a compiler process wrote at ``path``, or its ``error`` raised."""
    if error:
        raise RuntimeError(error)
    return load_inductor_artifact(path)


def _plans(region: Any) -> frozenset:
    """The plans a region makes: ``(plan function, options)`` of its ``sdtm_plan`` nodes."""
    from ..core.ops import sdtm_plan

    return frozenset((n.args[4], n.args[6]) for n in region.graph.nodes if n.target is sdtm_plan)


def build_order(jobs: list[Any], pending: list[int]) -> tuple[list[int], dict[int, int]]:
    """The order to build ``pending`` jobs in, largest first (so that no big region starts last while the other
    processes sit idle), and which jobs wait for another: ``(order, waits_for)``.

    A region that makes the same plans as an earlier one (the structure stage's merged part of a block and of the
    last block) waits until that one is built: the two share most kernels, and built one after the other the
    second finds the first's C++ kernels in Inductor's on-disk cache. Built at the same time, both compile them:
    measured on ``sd3m-1024``, the last block's part took 17 s beside the other instead of a few seconds after it
    (docs/design.md, "Build cost"). Meanwhile the other processes take the jobs queued after it.
    """
    order = sorted(pending, key=lambda i: -sum(node.op == "call_function" for node in jobs[i].region.graph.nodes))
    makers: dict[frozenset, int] = {}  # plans -> the first job in order that makes them
    waits_for: dict[int, int] = {}
    for index in order:
        plans = _plans(jobs[index].region)
        source = next((first for made, first in makers.items() if plans and plans <= made), None)
        if source is not None:
            waits_for[index] = source
        else:
            makers.setdefault(plans, index)
    return order, waits_for


class _CompilerPool:
    """``processes`` long-lived compiler processes (``python .../compile_worker.py``) fed one job at a time.

    A thread hands the next ready job to a process as soon as it answers, so that the processes never wait for
    this one, which compiles jobs of the same queue meanwhile (:meth:`take`, :meth:`finish_here`). A job
    submitted with ``after`` is handed out only once that job has finished, wherever it ran.
    """

    def __init__(self, processes: int) -> None:
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
            for _ in range(processes)
        ]
        self.lock = threading.Condition()
        self.queue: list[tuple[int, str, str, int | None]] = []  # (job, job file, artifact file, waits for)
        self.busy: dict[int, int] = {}  # process number -> job index
        self.finished: set[int] = set()  # jobs done, here or in a process, failed or not
        self.outstanding = 0  # jobs submitted and not finished
        self.accepting = True
        self.closed = False
        self.answers: queue.Queue[tuple[int, str]] = queue.Queue()  # (job, error or "") from the processes
        self.feeder = threading.Thread(target=self._serve, name="sdtm-compiler-pool", daemon=True)
        self.feeder.start()

    def __enter__(self) -> _CompilerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        for process in self.processes:  # every answer is in: no need to wait for the processes' own cleanup
            if process.stdin:
                process.stdin.close()
            process.kill()
            process.wait(timeout=60)
        self.feeder.join(timeout=10)

    def submit(self, index: int, job_path: str, out_path: str, after: int | None = None) -> None:
        """Queue a job; with ``after``, it is handed out only once job ``after`` (submitted earlier) has finished."""
        with self.lock:
            self.queue.append((index, job_path, out_path, after))
            self.outstanding += 1
            self._feed()
            self.lock.notify_all()

    def close_submissions(self) -> None:
        """No more jobs: the pool's thread ends once the submitted ones are done."""
        with self.lock:
            self.accepting = False
            self.lock.notify_all()

    def take(self) -> int | None:
        """The next ready job for this process to compile (no process gets it), or ``None`` if none is ready."""
        with self.lock:
            ready = self._next_ready()
            return None if ready is None else ready[0]

    def finish_here(self, index: int) -> None:
        """This process finished job ``index`` (built or failed): the jobs waiting for it may go."""
        with self.lock:
            self._finished(index)

    def finished_jobs(self, wait: bool):
        """Yield ``(job index, error or "")`` of the jobs the processes finished; with ``wait``, wait up to half a
        second for one first (then the caller looks for a ready job again: one may have been left queued)."""
        try:
            yield self.answers.get(timeout=0.5) if wait else self.answers.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                yield self.answers.get_nowait()
            except queue.Empty:
                return

    def _next_ready(self) -> tuple[int, str, str, int | None] | None:
        for position, (_, _, _, after) in enumerate(self.queue):
            if after is None or after in self.finished:
                return self.queue.pop(position)
        return None

    def _finished(self, index: int) -> None:
        self.finished.add(index)
        self.outstanding -= 1
        self._feed()
        self.lock.notify_all()

    def _feed(self) -> None:
        for number, process in enumerate(self.processes):
            if self.closed or number in self.busy or process.poll() is not None:
                continue
            ready = self._next_ready()
            if ready is None:
                return
            index, job_path, out_path, _ = ready
            assert process.stdin is not None
            try:
                process.stdin.write(f"{job_path}\t{out_path}\n")
                process.stdin.flush()
            except OSError:  # the process died since poll(): the job stays queued for another (or this one)
                self.queue.insert(0, ready)
                continue
            self.busy[number] = index

    def _serve(self) -> None:
        """The pool's thread: wait for the processes' answers, hand out the next jobs, pass the answers on."""
        while True:
            with self.lock:
                while not self.busy:  # nothing in a process: wait for a submission or for this process's jobs
                    live = any(process.poll() is None for process in self.processes)
                    if self.closed or not live or (self.outstanding == 0 and not self.accepting):
                        return  # (with every process dead, this process takes the queued jobs)
                    self.lock.wait()
                watched = dict(self.busy)
            with selectors.DefaultSelector() as selector:
                for number in watched:
                    selector.register(self.processes[number].stdout, selectors.EVENT_READ, number)
                ready = selector.select(timeout=0.5)  # a process fed meanwhile is watched on the next round
            for key, _ in ready:
                number = key.data
                line = self.processes[number].stdout.readline()  # type: ignore[union-attr]
                with self.lock:
                    if self.closed:
                        return
                    index = self.busy.pop(number)
                    self._finished(index)
                if not line:
                    error = f"the compiler process exited (code {self.processes[number].wait()})"
                else:
                    error = "" if line.startswith("ok") else line.rstrip("\n").split("\t", 1)[-1]
                self.answers.put((index, error))
