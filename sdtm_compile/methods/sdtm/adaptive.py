"""SDTM* (``SDTMConfig.adaptive_threshold``): the ratio of each step from the previous step's window statistic.

The paper's adaptive variant merges every window whose SSM score passes a threshold, taking the minimum count over
the batch; the release has the branch but never takes it. With static shapes: every engine returns one more
output, the fraction ``[B]`` of the first block's 2x2 windows whose score is ``>= adaptive_threshold``
(:func:`~sdtm_compile.methods.sdtm.plans.window_score_fraction`); the dispatcher reads it once per call, takes the
minimum over the batch and the calls of the step, and runs the *next* step at ``0.75 x`` that fraction (3 of
every 4 tokens of a merged window go), rounded down to a compiled bucket, in the stage the schedule gives. Step 0
follows the CRA schedule. The one-step lag is ours: reading the statistic of the step itself would need a head
engine before every call.

The four parts of the extension (:mod:`sdtm_compile.core.extension`): the ``stat`` output ``[B]`` float32; the pass
:func:`add_window_statistic`; the same reading in the eager reference; the dispatcher's choice of bucket.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from ...core.extension import Extension, ExtensionRun, ReferenceHooks
from ...core.layout import ModelLayout
from ...core.ops import graph_op
from ...core.schedule import FULL, EngineKey, round_to_bucket
from ...core.signature import EngineState, StateTensor
from ...passes import GraphPass, ModelSites, PassSettings, copy_location, fact, li_input, set_state_output
from ...passes import state_outputs as graph_state_outputs
from .config import MAX_RATIO, SDTMConfig
from .plans import window_score_fraction
from .schedule import stage_at

__all__ = ["AdaptiveRatio", "add_window_statistic", "sdtm_window_stat"]

logger = logging.getLogger(__name__)


@graph_op
def sdtm_window_stat(
    x: torch.Tensor, li: torch.Tensor, grid_h: int, grid_w: int, a_s: float, threshold: float
) -> torch.Tensor:
    """SDTM*'s statistic ``[B]`` (see :func:`~sdtm_compile.methods.sdtm.plans.window_score_fraction`)."""
    return window_score_fraction(x, li, grid_h, grid_w, a_s, threshold)


def add_window_statistic(
    gm: fx.GraphModule, sites: ModelSites, settings: PassSettings
) -> tuple[fx.GraphModule, ModelSites]:
    """Return ``[B]`` float32 as the ``stat`` output, computed from the first block's plan input and the ``li`` the
    call started with (every engine, ``FULL`` included, so the dispatcher has a reading after every step)."""
    config = settings.config
    li = li_input(gm)
    if li is None:
        raise ValueError("add_window_statistic needs the sdtm_li input: run thread_engine_state first")
    first = sites.blocks[0]
    x = first.plan_input if first.stream is None else first.stream.norm_output
    graph = gm.graph
    with graph.inserting_after(x):
        stat = graph.call_function(sdtm_window_stat, (x, li, *sites.grid, config.a_s, float(config.adaptive_threshold)))
    copy_location(stat, x, "statistic")
    set_state_output(gm, settings.contract, "stat", stat)
    gm.recompile()
    logger.debug(
        "add_window_statistic: %s, threshold %g on block %s", settings.key, config.adaptive_threshold, first.path
    )
    return gm, sites


@fact("statistic_output")
def _statistic_output(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> bool:
    """The engine returns one ``sdtm_window_stat`` node as its ``stat`` output."""
    names = graph_state_outputs(gm)
    if "stat" not in names:
        return False
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return output.args[0][len(output.args[0]) - len(names) + names.index("stat")].target is sdtm_window_stat


class _StatisticHooks(ReferenceHooks):
    """SDTM* in the eager reference: the statistic of block 0's plan input, before any block runs."""

    def __init__(self, config: SDTMConfig, grid: tuple[int, int]) -> None:
        self.config, self.grid = config, grid
        self.stat: torch.Tensor | None = None

    def before_blocks(self, plan_input: torch.Tensor, li: torch.Tensor) -> None:
        threshold = float(self.config.adaptive_threshold)  # type: ignore[arg-type]
        self.stat = window_score_fraction(plan_input, li, *self.grid, self.config.a_s, threshold)

    def outputs(self) -> dict[str, torch.Tensor]:
        return {} if self.stat is None else {"stat": self.stat}


class _AdaptiveRun(ExtensionRun):
    """The readings of the current step and the ratio the previous step's picked."""

    def __init__(self, config: SDTMConfig) -> None:
        self.config = config
        self.readings: list[float] = []
        self.ratio: float | None = None

    def new_step(self) -> None:
        if self.readings:  # each merged 2x2 window removes 3 of its 4 tokens: ratio = 0.75 * windows merged
            self.ratio = MAX_RATIO * min(self.readings)
            self.readings = []

    def choose(self, key: EngineKey, position: float, step: int, call: int, notes: dict[str, Any]) -> EngineKey:
        notes["adaptive_ratio"] = self.ratio
        notes["statistic"] = None  # until the engine returns it (a step the step cache skips returns none)
        if self.ratio is None:
            return key
        bucket = round_to_bucket(self.ratio, self.config.buckets)
        return FULL if bucket == 0.0 else EngineKey(stage_at(position, self.config), bucket)

    def after(self, call: int, key: EngineKey, result: EngineState, notes: dict[str, Any]) -> None:
        if result.stat is None:
            raise ValueError("SDTM* is on, but the engine returned no window statistic")
        notes["statistic"] = float(result.stat.min())  # one host read per call
        self.readings.append(notes["statistic"])


class AdaptiveRatio(Extension):
    """The extension (see the module docstring)."""

    name = "adaptive_ratio"
    exportable = False  # each step's bucket comes from the previous step's reading

    def __init__(self, config: SDTMConfig) -> None:
        self.config = config

    def check(self, layout: ModelLayout) -> str | None:
        if layout.context_parallel > 1:
            return (
                "SDTM* (adaptive_threshold) picks each step's bucket from block 0's windows over the whole image; "
                f"under context parallelism each of the {layout.context_parallel} ranks reads only its own shard, so "
                "ranks could pick different buckets and their all-to-alls would not match. Use a fixed schedule "
                "(adaptive_threshold=None)"
            )
        return None

    def state(self, layout: ModelLayout) -> tuple[StateTensor, ...]:
        description = "SDTM*: the fraction of block 0's 2x2 windows whose score reaches the threshold (output only)"
        return (StateTensor("stat", (layout.batch,), torch.float32, carried=False, description=description),)

    def passes(self) -> tuple[GraphPass, ...]:
        return (
            GraphPass(
                "add_window_statistic",
                add_window_statistic,
                requires=("state_threaded",),
                ensures=("statistic_output",),
                phase="state",
                doc="SDTM*: the fraction of block 0's windows scoring >= the threshold, as the stat output",
            ),
        )

    def reference(self, state: EngineState, key: EngineKey, layout: ModelLayout) -> ReferenceHooks:
        return _StatisticHooks(self.config, layout.grid)

    def start(self) -> ExtensionRun:
        return _AdaptiveRun(self.config)
