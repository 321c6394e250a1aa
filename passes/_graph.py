"""Small helpers the passes share: module paths from ``nn_module_stack``, shapes from node metadata, copies, and
where the engine state enters and leaves a rewritten graph."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

__all__ = [
    "collective",
    "module_path",
    "module_stack",
    "node_shape",
    "node_value",
    "copy_graph_module",
    "copy_with_node_map",
    "copy_location",
    "state_input",
    "state_input_name",
    "state_outputs",
    "set_state_output",
]


def module_path(raw: str) -> str:
    """Normalise a Dynamo module path: ``L['self'].__dict__['_modules']['blocks'].0.attn`` -> ``blocks.0.attn``."""
    path = re.sub(r"^L\['self'\]", "", raw)
    path = path.replace(".__dict__['_modules']", "").replace("._modules", "")
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.lstrip(".")


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """``[(path, class name), ...]`` outermost first, from the node's ``nn_module_stack`` (empty if none)."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = []
    for raw, cls in stack.values():
        name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        entries.append((module_path(raw), name.rsplit(".", 1)[-1]))
    return entries


def collective(node: fx.Node) -> str | None:
    """The name of the functional collective ``node`` calls (``all_to_all_single``, ``all_gather_into_tensor``,
    ``wait_tensor``, ...: ``torch.ops._c10d_functional``, what Dynamo traces ``torch.distributed`` into), or
    ``None``."""
    parts = str(node.target).split(".")
    if node.op != "call_function" or parts[0] != "_c10d_functional" or len(parts) < 2:
        return None
    return parts[1]


def node_value(node: object) -> Any:
    """The value (a fake tensor, or a structure of them) Dynamo / FakeTensorProp recorded for ``node``."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


def node_shape(node: object) -> tuple[int, ...] | None:
    """The static shape Dynamo/FakeTensorProp recorded for ``node``, or ``None``."""
    value = node_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def copy_location(new: fx.Node, like: fx.Node, role: str) -> fx.Node:
    """Give a node a pass inserted ``like``'s module stack (so regions, the lint and profiles put it in that block)
    and mark it as ours: ``meta["sdtm"] = role`` (the shape check re-propagates every node so marked)."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in like.meta:
            new.meta[key] = like.meta[key]
    new.meta["sdtm"] = role
    return new


def copy_with_node_map(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A new GraphModule with a copied graph (node metadata included) and the map old node -> its copy.

    Each bucket rewrites its own copy; the map carries what was found on the original (e.g.
    :meth:`~sdtm_compile.passes.ModelSites.remapped`) over to the copy's nodes.
    """
    graph = fx.Graph()
    node_map: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, node_map)
    graph.output(output)
    copied = fx.GraphModule(gm, graph)
    copied.meta = dict(getattr(gm, "meta", {}))  # the state outputs' order included
    return copied, node_map


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copied graph (node metadata included)."""
    return copy_with_node_map(gm)[0]


# -- the engine state in a graph (the contract: sdtm_compile.core.signature) -------------------------------------

#: A state entry ``name`` enters a rewritten graph as the placeholder ``sdtm_<name>`` (``sdtm_li``, ``sdtm_cache``).
STATE_INPUT_PREFIX = "sdtm_"
#: ``gm.meta`` key: the state entries at the end of the graph's output tuple, in order.
_STATE_OUTPUTS = "sdtm_state_outputs"


def state_input_name(name: str) -> str:
    """The placeholder name of state entry ``name``."""
    return f"{STATE_INPUT_PREFIX}{name}"


def state_input(gm: fx.GraphModule, name: str) -> fx.Node | None:
    """The graph's input of state entry ``name`` (``sdtm_<name>``), or ``None``."""
    target = state_input_name(name)
    return next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == target), None)


def state_outputs(gm: fx.GraphModule) -> list[str]:
    """The state entries at the end of the graph's outputs, in order (empty before ``thread_engine_state``)."""
    return list(gm.meta.get(_STATE_OUTPUTS, ()))


def set_state_output(gm: fx.GraphModule, signature: Any, name: str, value: fx.Node) -> None:
    """Make ``value`` the graph's output of state entry ``name``, at its place in ``signature``'s order (replacing
    the entry's output if there is one). The graph is not recompiled."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    present = state_outputs(gm)
    values = list(output.args[0])
    model, tail = values[: len(values) - len(present)], dict(zip(present, values[len(values) - len(present) :]))
    tail[name] = value
    order = [n for n in signature.names if n in tail]
    output.args = ((*model, *(tail[n] for n in order)),)
    gm.meta[_STATE_OUTPUTS] = order
