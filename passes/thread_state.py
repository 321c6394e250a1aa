"""Thread the engine's carried state through the graph: one input per carried entry of the contract (``sdtm_li``,
and e.g. ``sdtm_cache``), each returned unchanged until a later pass makes its new value."""

from __future__ import annotations

import logging

from torch import fx

from ._graph import set_state_output, state_input, state_input_name
from .settings import PassSettings
from .sites import ModelSites

__all__ = ["thread_engine_state", "li_input", "LI_INPUT_NAME"]

logger = logging.getLogger(__name__)

#: The method state's input (``li``: SDTM's counter, another method's random state).
LI_INPUT_NAME = state_input_name("li")


def li_input(gm: fx.GraphModule) -> fx.Node | None:
    """The graph's ``sdtm_li`` input, or ``None`` if :func:`thread_engine_state` has not run on it."""
    return state_input(gm, "li")


def thread_engine_state(
    gm: fx.GraphModule, sites: ModelSites, settings: PassSettings
) -> tuple[fx.GraphModule, ModelSites]:
    """Add an input per carried state entry after the graph's inputs, and return each as an output after the
    model's (the output tuple ends with the state, in the contract's order)."""
    graph = gm.graph
    signature = settings.contract
    if li_input(gm) is not None:
        raise ValueError(
            "the graph already has an sdtm_li input: thread_engine_state ran twice. Rewrite a fresh copy of the "
            "traced graph (rewrite_for_engine copies it for you) instead of rewriting a rewritten one"
        )
    output = next(n for n in graph.nodes if n.op == "output")
    if not isinstance(output.args[0], (tuple, list)):
        raise ValueError(
            f"expected the traced graph to return a tuple, got {type(output.args[0]).__name__}: trace the "
            "transformer with torch.compile / capture_dynamo_graph, whose graphs return their outputs as a tuple"
        )
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for entry in signature.inputs:
        with graph.inserting_after(last):
            last = graph.placeholder(state_input_name(entry.name))
        set_state_output(gm, signature, entry.name, last)
    gm.recompile()
    logger.debug("thread_engine_state: inputs and outputs %s", [t.name for t in signature.inputs])
    return gm, sites
