"""The benchmark harness: what a token-reduction method buys on a model, measured against the baselines, with one
record, one renderer and one result page per run.

Three kinds of run share it (``sdtm-compile bench``, with ``--methods`` or ``--variants``):

* the benchmark (:func:`run_benchmark`): whole generations (flow-matching Euler, CFG batch 2 or Flux's batch 1,
  fixed seeds) of ``eager`` (the unmodified model), ``inductor`` (under ``torch.compile``: the baseline every
  speed-up is taken against), ``sdtm`` (the method through the ``sdtm`` backend) and ``reference`` (the method
  through the eager reference), with FLOPs, the merge ops' share of the time, targets, a ratio sweep
  (``TokenMethod.with_ratio``), merge maps and, on the trained testbed, image measures;
* a method comparison (:func:`run_method_comparison`): methods at several ratios, each beside a fresh baseline;
* a variant comparison (:func:`run_variant_comparison`): a method, the variants it names
  (``TokenMethod.variants``), step caches and other libraries' caches, in the same rounds.

Every timed thing is measured the same way (:mod:`.timing`, :mod:`.measures`): the median of timed generations
after warm-up, round-robin with what it is compared with; FLOPs by ``FlopCounterMode`` on each step's bucket graph;
fidelity of the final latent (and image) against the unmodified model's. Every run gives one
:class:`BenchReport` of :class:`Measurement` points, rendered into a page under ``docs/results``
(:func:`render`): ``result.json``, the pictures, and ``index.md`` naming the date measured and the machine; the
results folder's index lists every page. :func:`rerender` draws a saved result's page again (any saved layout,
:mod:`.legacy`).

The package, one job per module:

* :mod:`.config`: :class:`BenchConfig` (validated) and the main variants;
* :mod:`.workload`: a model family's generation (SD3, Flux, the pixel-space testbed);
* :mod:`.harness`: compiling cold / warm and timing the first call; :mod:`.memory`: resident-memory probes;
* :mod:`.timing`: :class:`~.timing.TimedCall` and the round-robin timed rounds;
* :mod:`.flops`, :mod:`.instrument`: FLOP counting, bucket graphs, the merge-op profile, merge maps;
* :mod:`.measures`: a :class:`Measurement` from a timed thing; :mod:`.record`: the records;
  :mod:`.report`: :class:`BenchReport`; :mod:`.legacy`: the layouts saved before it;
* :mod:`.assemble`: the benchmark's sections and targets; :mod:`.benchmark`, :mod:`.compare_methods`,
  :mod:`.compare_variants` (with :mod:`.peers`): the three runs;
* :mod:`.markdown`, :mod:`.plots`, :mod:`.pages`, :mod:`.render`: tables, pictures, pages and the index.
"""

from __future__ import annotations

from .benchmark import run_benchmark
from .compare_methods import method_config, run_method_comparison
from .compare_variants import run_variant_comparison
from .config import VARIANTS, BenchConfig
from .instrument import merge_time_share
from .markdown import markdown_report
from .memory import peak_rss, resident_mib
from .pages import Page, update_index, write_page
from .record import (
    FlopSummary,
    ImageQuality,
    MachineInfo,
    Measurement,
    MergeTimeShare,
    ModelInfo,
    RunSettings,
    ScheduleStep,
    Target,
    machine_info,
)
from .render import render, rerender
from .report import BenchReport

__all__ = [
    "BenchConfig",
    "BenchReport",
    "FlopSummary",
    "ImageQuality",
    "MachineInfo",
    "Measurement",
    "MergeTimeShare",
    "ModelInfo",
    "Page",
    "RunSettings",
    "ScheduleStep",
    "Target",
    "VARIANTS",
    "machine_info",
    "markdown_report",
    "merge_time_share",
    "method_config",
    "peak_rss",
    "render",
    "rerender",
    "resident_mib",
    "run_benchmark",
    "run_method_comparison",
    "run_variant_comparison",
    "update_index",
    "write_page",
]
