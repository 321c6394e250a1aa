"""The benchmark: what SDTM buys on a model, measured in one run against the baselines.

``sdtm-compile bench`` (or :func:`run_benchmark`) runs whole generations (flow-matching Euler, CFG batch 2,
fixed seeds) of one model four ways:

* ``eager``: the unmodified model, op by op;
* ``inductor``: the unmodified model under ``torch.compile`` (the baseline every speed-up is taken against);
* ``sdtm``: SDTM through the ``sdtm`` backend (static-shape engines, Inductor by default);
* ``reference``: SDTM through the eager reference (:mod:`sdtm_compile.reference`), the same algorithm.

For each it reports wall time per generation (median and spread of ``runs`` timed runs after ``warmup``,
run round-robin so drift hits every variant alike), the speed-up over ``inductor``, FLOPs per step and per
generation (``FlopCounterMode`` on each bucket graph, attention included; see :mod:`sdtm_compile.flops`), the
FLOP ratio and the speed-up as a fraction of it, fidelity of the final latent against ``eager`` (PSNR,
cosine), peak resident memory during a generation (and how far above the resident memory at its start),
and compile time cold (empty caches) and warm. It also
measures the share of time the merge ops take (profiler, bucket graphs run op by op), sweeps the ratio for
a speed-up vs fidelity curve, and draws the schedule, the curve and merge maps (:mod:`sdtm_compile.plots`).

Outputs in ``out_dir``: ``bench.json`` (every number), ``bench.md`` (the tables), ``schedule.png``,
``speedup_vs_fidelity.png``, ``merge_maps.png``.

What it does not do: GPU timing (CPU only here), image-space metrics (the models have random weights, so
only the final latent is compared), and attribution of time *inside* compiled Inductor kernels (merge ops
fuse with their neighbours there; the merge share is measured on the bucket graphs run op by op).

The package, one job per module:

* :mod:`.config`: :class:`BenchConfig` (validated) and the variants;
* :mod:`.memory`: peak and current resident memory probes;
* :mod:`.harness`: compiling the model cold / warm (caches passed per compile, not through the environment)
  and timing the first call;
* :mod:`.instrument`: FLOPs per bucket graph, the merge-op time share, merge maps;
* :mod:`.run`: :func:`run_benchmark`, the timed rounds and the sweep;
* :mod:`.result`: the typed result (:class:`BenchResult`, :class:`VariantResult`, :class:`SweepPoint`,
  :class:`Target`, ...), assembled with the targets; ``to_json()`` / ``from_json()`` are ``bench.json``;
* :mod:`.report`: :func:`markdown_report` and :func:`render` (JSON, markdown, pictures);
* :mod:`.readme`: :func:`update_readme`, the README's Results block.
"""

from __future__ import annotations

from .config import VARIANTS, BenchConfig
from .instrument import merge_time_share
from .memory import peak_rss, resident_mib
from .readme import update_readme
from .report import markdown_report, render
from .result import (
    BenchResult,
    FlopSummary,
    MachineInfo,
    MergeTimeShare,
    ModelInfo,
    RunSettings,
    ScheduleStep,
    SweepPoint,
    Target,
    VariantResult,
)
from .run import run_benchmark

__all__ = [
    "BenchConfig",
    "BenchResult",
    "FlopSummary",
    "MachineInfo",
    "MergeTimeShare",
    "ModelInfo",
    "RunSettings",
    "ScheduleStep",
    "SweepPoint",
    "Target",
    "VARIANTS",
    "VariantResult",
    "markdown_report",
    "merge_time_share",
    "peak_rss",
    "render",
    "resident_mib",
    "run_benchmark",
    "update_readme",
]
