"""SDTM*: one more output, the fraction of the first block's 2x2 windows whose SSM score passes the threshold."""

from __future__ import annotations

import logging

from torch import fx

from sdtm_compile.config import SDTMConfig
from sdtm_compile.ops import sdtm_window_stat

from ._graph import copy_location
from .find_blocks import ModelSites
from .settings import PassSettings
from .thread_li import li_input

__all__ = ["add_window_statistic"]

logger = logging.getLogger(__name__)


def add_window_statistic(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> fx.GraphModule:
    """With ``adaptive_threshold`` set: return ``[B]`` float32 after the state outputs, computed from the first
    block's plan input and the ``li`` the call started with (every engine, ``FULL`` included, so the dispatcher
    has a reading after every step). Otherwise: nothing."""
    config = settings.config
    if not (isinstance(config, SDTMConfig) and config.adaptive):
        return gm
    li = li_input(gm)
    if li is None:
        raise ValueError("add_window_statistic needs the sdtm_li input: run thread_li_state first")
    first = sites.blocks[0]
    x = first.plan_input if first.stream is None else first.stream.norm_output
    graph = gm.graph
    with graph.inserting_after(x):
        stat = graph.call_function(
            sdtm_window_stat,
            (x, li, *sites.grid, config.a_s, float(config.adaptive_threshold)),  # type: ignore[arg-type]
        )
    copy_location(stat, x, "statistic")
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((*output.args[0], stat),)
    gm.recompile()
    logger.debug(
        "add_window_statistic: %s, threshold %g on block %s", settings.key, config.adaptive_threshold, first.path
    )
    return gm
