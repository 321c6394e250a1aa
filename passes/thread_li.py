"""Thread the ``li`` counter through the graph: one more input (``sdtm_li``) and one more output."""

from __future__ import annotations

import logging

from torch import fx

from .find_blocks import ModelSites
from .settings import PassSettings

__all__ = ["thread_li_state", "li_input", "LI_INPUT_NAME"]

logger = logging.getLogger(__name__)

LI_INPUT_NAME = "sdtm_li"


def li_input(gm: fx.GraphModule) -> fx.Node | None:
    """The graph's ``sdtm_li`` input, or ``None`` if :func:`thread_li_state` has not run on it."""
    return next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == LI_INPUT_NAME), None)


def thread_li_state(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> fx.GraphModule:
    """Add the ``[B, N]`` int32 ``sdtm_li`` input after the last input and return it as the last output."""
    graph = gm.graph
    if li_input(gm) is not None:
        raise ValueError(
            "the graph already has an sdtm_li input: thread_li_state ran twice. Rewrite a fresh copy of the traced "
            "graph (rewrite_for_engine copies it for you) instead of rewriting a rewritten one"
        )
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        li = graph.placeholder(LI_INPUT_NAME)
    output = next(n for n in graph.nodes if n.op == "output")
    outputs = output.args[0]
    if not isinstance(outputs, (tuple, list)):
        raise ValueError(
            f"expected the traced graph to return a tuple, got {type(outputs).__name__}: trace the transformer "
            "with torch.compile / capture_dynamo_graph, whose graphs return their outputs as a tuple"
        )
    output.args = ((*outputs, li),)
    gm.recompile()
    logger.debug("thread_li_state: added input %s and output #%d", li.name, len(outputs))
    return gm
