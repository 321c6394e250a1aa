"""Timing whole generations: :class:`TimedCall` and :func:`timed_rounds`, the one timing method of every benchmark.

Every timed thing (a main variant, a sweep point, a method at a ratio, a variant of a comparison) runs ``warmup``
untimed generations, then ``runs`` timed ones, round-robin with everything it is compared with, so drift (thermal,
other processes) hits all of them alike; the median of the timed generations is what the reports give.
:func:`step_records` reads which engine served each step of the last generation from the backend's history.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import BenchConfig
from .memory import peak_rss, resident_mib
from .workload import Workload

__all__ = ["TimedCall", "step_records", "timed_rounds"]

# the package's name: the CLI's log lines ("INFO sdtm_compile.bench: ...") read the same from every module
logger = logging.getLogger("sdtm_compile.bench")


@dataclass
class TimedCall:
    """One thing under measurement: its transformer call, compile times, timed generations, its final latent
    (of the first generation), whether every generation gave the same latent, and its peak memory."""

    name: str
    call: Callable[..., torch.Tensor]
    build_cold_s: float | None = None  #: compile time in empty caches (``None``: not measured)
    build_s: float | None = None  #: compile time of the module that is timed
    seconds: list[float] = field(default_factory=list)
    latent: torch.Tensor | None = None
    deterministic: bool = True
    peak_rss_mib: float | None = None
    peak_above_start_mib: float | None = None

    def record_peak(self, start: float | None, peak: float | None) -> None:
        """Keep the highest peak resident memory seen, and the most it rose above a generation's start."""
        if peak is None or start is None:
            return
        self.peak_rss_mib = max(self.peak_rss_mib or 0.0, peak)
        self.peak_above_start_mib = max(self.peak_above_start_mib or 0.0, peak - start)


def _generate(timed: TimedCall, workload: Workload, config: BenchConfig) -> tuple[torch.Tensor, float]:
    """One whole generation through ``timed.call``; returns the final latent and its wall time."""
    start = time.perf_counter()
    latent = workload.generate(timed.call, config)
    return latent, time.perf_counter() - start


def timed_rounds(calls: list[TimedCall], workload: Workload, config: BenchConfig, runs: int, what: str) -> None:
    """``config.warmup`` then ``runs`` generations per call, round-robin; keeps latents, times and peak memory.

    The peak memory is read during the warm-up generations (reading it resets the kernel's counter, which must not
    happen inside a timed one); with no warm-up, one more untimed generation per call is run for it.
    """
    total = len(calls) * (config.warmup + runs)
    done = 0
    for round_index in range(config.warmup + runs):
        timed = round_index >= config.warmup
        for call in calls:
            start, read_peak = (resident_mib(), peak_rss()) if not timed else (None, None)
            latent, seconds = _generate(call, workload, config)
            done += 1
            if read_peak is not None:
                call.record_peak(start, read_peak())
            if timed:
                call.seconds.append(seconds)
            if call.latent is None:
                call.latent = latent
            elif not torch.equal(latent, call.latent):
                call.deterministic = False
            label = f"run {round_index - config.warmup + 1}/{runs}" if timed else f"warm-up {round_index + 1}"
            logger.info("[%s %d/%d] %-9s %s: %.2f s", what, done, total, call.name, label, seconds)
    if config.warmup == 0:
        for call in calls:
            start, read_peak = resident_mib(), peak_rss()
            _generate(call, workload, config)
            call.record_peak(start, read_peak())


def step_records(compiled_graph: Any, num_steps: int) -> list[Any]:
    """The dispatcher's records of the first call of each step of the last generation (``key``, ``timestep``,
    ``position``, ``skipped``), from the backend's history."""
    return [record for record in compiled_graph.dispatcher.history if record.new_step][-num_steps:]
