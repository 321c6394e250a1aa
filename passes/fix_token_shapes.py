"""Make token-count constants inside merged regions agree with the bucket, then re-check every shape.

Dynamo specialises shapes, so a merged region still holds the unmerged token count as constants: the joint
attention's split point (SD3: ``hidden_states[:, :N]`` and ``[:, N:]``; Flux: ``split_with_sizes([T, N])``) and
explicit sizes in ``view`` / ``reshape``. This pass rewrites an int only where it *is* the token axis: a slice
bound on a dimension whose recorded size was ``N`` or ``N + T`` (T = text tokens), a size argument at a position
whose recorded size was ``N`` or ``N + T``, or the image entry of a split of a joint ``N + T`` axis. It then
propagates fake tensors through the whole graph; any shape that does not fit raises :class:`TokenShapeError`
naming the node, and the graph's outputs must keep their original shapes.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from sdtm_compile.core.ops import sdtm_merge

from ._graph import collective, copy_location, node_shape
from .find_blocks import FALLBACK_HINT
from .insert_merge import block_token_counts, merged_blocks, merged_branch_names
from .settings import PassSettings
from .sites import ModelSites

__all__ = ["fix_token_shapes", "TokenShapeError", "propagate_shapes", "stale_token_constants"]

logger = logging.getLogger(__name__)

_SIZE_METHODS = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty", "new_full"}
_SIZE_FUNCTIONS = {torch.reshape, torch.zeros, torch.ones, torch.empty, torch.full}


class TokenShapeError(RuntimeError):
    """A rewritten graph whose shapes do not fit together."""


def _remap_slice(item: object, old_size: int, mapping: dict[int, int]) -> object:
    if not isinstance(item, slice) or old_size not in mapping:
        return item
    bounds = [mapping.get(v, v) if isinstance(v, int) and v in mapping else v for v in (item.start, item.stop)]
    return slice(bounds[0], bounds[1], item.step)


def _split_args(node: fx.Node, mapping: dict[int, int]) -> tuple | None:
    """``x.split_with_sizes([T, N], dim)`` on a joint ``T + N`` axis -> the args of ``[T, M]`` (Flux: text first, so
    the image part is the last entry equal to ``N``; the new sizes must add up to the merged joint length)."""
    source, sizes = node.args[0], node.args[1]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    old = node_shape(source)
    if old is None or not isinstance(sizes, (list, tuple)) or old[dim] not in mapping:
        return None
    if not all(isinstance(size, int) for size in sizes):  # computed sizes (dynamic counts): rewritten already
        return None
    total = mapping[old[dim]]
    new = list(sizes)
    for position in reversed(range(len(new))):
        if new[position] in mapping and new[position] != old[dim]:
            new[position] = mapping[new[position]]
            break
    if sum(new) != total or new == list(sizes):
        return None
    return (source, type(sizes)(new), *node.args[2:])


def _getitem_args(node: fx.Node, mapping: dict[int, int]) -> tuple | None:
    """``x[..., a:b]`` with a slice bound on a token axis -> the args with the merged bound."""
    source, index = node.args
    old = node_shape(source)
    if old is None:
        return None
    items = index if isinstance(index, tuple) else (index,)
    if any(item is Ellipsis or item is None for item in items):
        return None  # positions would not line up with dimensions; leave it to the shape check
    new_items = tuple(_remap_slice(item, old[d], mapping) for d, item in enumerate(items) if d < len(old))
    new_index = new_items if isinstance(index, tuple) else new_items[0]
    return (source, new_index) if new_index != index else None


def _size_args(node: fx.Node, mapping: dict[int, int]) -> tuple | None:
    """``view`` / ``reshape`` / ``new_zeros`` / ... with the token count as a size -> the args with the merged one."""
    out = node_shape(node)
    if out is None:
        return None
    first = 1 if node.op == "call_method" or node.target is torch.reshape else 0
    args = list(node.args)
    packed = len(args) == first + 1 and isinstance(args[first], (tuple, list))
    sizes = list(args[first]) if packed else args[first:]
    new_sizes = [
        mapping[v] if isinstance(v, int) and d < len(out) and v == out[d] and v in mapping else v
        for d, v in enumerate(sizes)
    ]
    if new_sizes == sizes:
        return None
    return tuple(args[:first]) + ((type(args[first])(new_sizes),) if packed else tuple(new_sizes))


def is_all_to_all(node: fx.Node) -> bool:
    """A functional ``all_to_all_single`` (what diffusers' Ulysses attention sends q / k / v / out through)."""
    return collective(node) == "all_to_all_single"


def _all_to_all_args(node: fx.Node, mapping: dict[int, int]) -> tuple | None:
    """``all_to_all_single(x.flatten(), out_sizes, in_sizes, group)`` of a tensor with a token axis -> the args with
    each rank's part of the merged tensor as both split sizes (Ulysses splits evenly: ``numel / degree`` each)."""
    flat, out_sizes, in_sizes, *rest = node.args
    if not isinstance(flat, fx.Node) or not isinstance(out_sizes, (list, tuple)) or list(out_sizes) != list(in_sizes):
        return None
    if not all(isinstance(size, int) for size in out_sizes):  # computed sizes (dynamic counts): rewritten already
        return None
    source = flat.args[0] if flat.op == "call_method" and flat.target == "flatten" and flat.args else flat
    shape = node_shape(source) if isinstance(source, fx.Node) else None
    axes = [d for d, size in enumerate(shape or ()) if size in mapping]
    if shape is None or not axes or sum(out_sizes) != math.prod(shape):  # the sizes no longer split the traced
        return None  # tensor: rewritten already
    if len(axes) > 1:
        raise TokenShapeError(
            f"{node.name}: all_to_all_single of a {tuple(shape)} tensor has several axes the size of a token count "
            f"({sorted(mapping)}); cannot tell which one merging shrinks"
        )
    old = shape[axes[0]]
    if any(size % old for size in out_sizes):
        return None
    sizes = [size // old * mapping[old] for size in out_sizes]
    return (flat, sizes, list(sizes), *rest) if sizes != list(out_sizes) else None


def _rewritten_args(node: fx.Node, mapping: dict[int, int]) -> tuple | None:
    """The args of ``node`` with its token-count constants mapped to the merged counts, or ``None`` when it holds
    none (the node is not changed)."""
    if is_all_to_all(node):
        return _all_to_all_args(node, mapping)
    if node.op == "call_method" and node.target in ("split_with_sizes", "split") and len(node.args) >= 2:
        return _split_args(node, mapping)
    if node.op == "call_function" and node.target is operator.getitem:
        return _getitem_args(node, mapping)
    is_size_call = (node.op == "call_method" and node.target in _SIZE_METHODS) or (
        node.op == "call_function" and node.target in _SIZE_FUNCTIONS
    )
    return _size_args(node, mapping) if is_size_call else None


def propagate_shapes(
    gm: fx.GraphModule, example_inputs: list[torch.Tensor], changed: set[fx.Node] | None = None
) -> None:
    """Run fake tensors through ``gm`` to refresh every node's recorded shape; raise on a mismatch.

    ``changed``: only these nodes are recomputed (the nodes the passes inserted or rewired, in merged regions);
    every other node keeps the shape Dynamo recorded, which the rewrite cannot have changed (what leaves a merged
    region is unmerged to its original shape); measured on ``sd3m-1024``, six rewrites take 3.2 s instead of ~6.5 s.
    Should the partial run fail, the whole graph is propagated, which either raises the error that names the node
    or is the correct result.
    """
    if changed is not None:
        try:
            _propagate_changed(gm, example_inputs, changed)
            return
        except Exception as err:  # the full run below reports it properly (or was never wrong)
            logger.debug("partial shape propagation failed (%s); propagating the whole graph", err)
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)
    except Exception as err:  # the failing node is in the message of torch's interpreter
        raise TokenShapeError(
            f"the rewritten graph does not type-check: {err}. A token-count constant inside a merged region was "
            f"not recognised (a block customised beyond diffusers' SD3 / SD3.5 layout?). {FALLBACK_HINT}, or run "
            "the 'eager' engine with logging at DEBUG to see which nodes fix_token_shapes rewrote"
        ) from err
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]


def _propagate_changed(gm: fx.GraphModule, example_inputs: list[torch.Tensor], changed: set[fx.Node]) -> None:
    """Fake-run only ``changed`` nodes; their other inputs are fakes laid out as recorded."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    values: dict[fx.Node, object] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        values[node] = mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
        node.meta["val"] = node.meta["example_value"] = values[node]

    def like(value: object) -> object:
        if not isinstance(value, torch.Tensor):
            return value
        with mode:
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)

    def value_of(node: fx.Node) -> object:
        if node not in values:
            recorded = node.meta.get("val", node.meta.get("example_value"))
            if recorded is None:
                raise ValueError(f"{node.name} has no recorded shape")
            values[node] = fx.node.map_aggregate(recorded, like)
        return values[node]

    for node in gm.graph.nodes:
        if node not in changed or node.op in ("placeholder", "output"):
            continue
        args = fx.node.map_arg(node.args, value_of)
        kwargs = fx.node.map_arg(node.kwargs, value_of)
        with mode:
            if node.op == "call_function":
                result = node.target(*args, **kwargs)  # type: ignore[operator]
            elif node.op == "call_method":
                result = getattr(args[0], node.target)(*args[1:], **kwargs)  # type: ignore[arg-type]
            else:
                raise ValueError(f"{node.name}: cannot fake-run a {node.op} node partially")
        values[node] = result
        node.meta["val"] = node.meta["example_value"] = result


def _symbolic(old: object, new: object, symbols: dict[int, Callable[[], fx.Node]]) -> object:
    """``new`` (rewritten args) with every int the rewrite changed replaced by the graph node that computes it."""
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)) and len(old) == len(new):
        return type(new)(_symbolic(o, n, symbols) for o, n in zip(old, new))
    if isinstance(old, slice) and isinstance(new, slice):
        return slice(*(_symbolic(getattr(old, a), getattr(new, a), symbols) for a in ("start", "stop", "step")))
    if isinstance(new, int) and not isinstance(new, bool) and new != old and new in symbols:
        return symbols[new]()
    return new


def _size_nodes(gm: fx.GraphModule, nodes: list[fx.Node], merged_count: int, text_tokens: int | None):
    """Dynamic counts: ``{merged count: () -> node reading it}`` for a branch, from the length of the merge that
    feeds it (``M``, and ``M + T`` for a joint axis); the nodes are made on first use, right after the merge."""
    merge = next(a for node in nodes for a in node.all_input_nodes if a.target is sdtm_merge)
    made: dict[str, fx.Node] = {}

    def merged() -> fx.Node:
        if "m" not in made:
            with gm.graph.inserting_after(merge):
                length = gm.graph.call_function(torch.ops.aten.sym_size.int, (merge, 1))
            made["m"] = copy_location(length, merge, "plan")
        return made["m"]

    def joint() -> fx.Node:
        if "mt" not in made:
            with gm.graph.inserting_after(merged()):
                made["mt"] = copy_location(gm.graph.call_function(operator.add, (merged(), text_tokens)), merge, "plan")
        return made["mt"]

    symbols: dict[int, Callable[[], fx.Node]] = {merged_count: merged}
    if text_tokens is not None:
        symbols[merged_count + text_tokens] = joint
    return symbols


def _dynamic_split_args(gm: fx.GraphModule, node: fx.Node, degree: int) -> tuple:
    """Dynamic counts: ``all_to_all_single``'s split sizes as ``numel(x) // degree``, read from the tensor sent."""
    flat = node.args[0]
    with gm.graph.inserting_before(node):
        numel = copy_location(gm.graph.call_method("numel", (flat,)), node, "plan")
        part = copy_location(gm.graph.call_function(operator.floordiv, (numel, degree)), node, "plan")
    return (flat, [part] * degree, [part] * degree, *node.args[3:])


def _merged_regions(sites: ModelSites, settings: PassSettings):
    """``(branch nodes, {old token count: merged count})`` of every merged branch of the engine."""
    per_block = block_token_counts(sites, settings)
    n = sites.num_tokens
    for block in merged_blocks(sites, settings):
        counts = per_block[block.index]
        for name, branch in block.branches_named(merged_branch_names(sites, settings)):
            merged = counts.feed_forward if name in ("ff", "mlp") else counts.attention
            mapping = {n: merged}
            if sites.text_tokens is not None:
                mapping[n + sites.text_tokens] = merged + sites.text_tokens
            yield branch.nodes, mapping


def stale_token_constants(sites: ModelSites, settings: PassSettings) -> list[str]:
    """Nodes of merged branches that still hold an unmerged token count this pass would rewrite (none once it ran;
    the graph is not changed)."""
    return [
        node.name
        for nodes, mapping in _merged_regions(sites, settings)
        for node in nodes
        if _rewritten_args(node, mapping) is not None
    ]


def fix_token_shapes(
    gm: fx.GraphModule, sites: ModelSites, settings: PassSettings
) -> tuple[fx.GraphModule, ModelSites]:
    """Rewrite token-count constants in the engine's merged branches
    (:meth:`~sdtm_compile.core.method.TokenMethod.merged_branches`)."""
    changed: list[str] = []
    dynamic = settings.method.dynamic_counts
    for nodes, mapping in _merged_regions(sites, settings):
        symbols = None
        for node in nodes:
            args = _rewritten_args(node, mapping)
            if args is not None:
                if dynamic and is_all_to_all(node):  # each rank's part of the merged tensor, computed
                    args = _dynamic_split_args(gm, node, len(args[1]))
                elif dynamic:  # the count is an input: sizes computed from the merged length, not constants
                    symbols = symbols or _size_nodes(gm, nodes, mapping[sites.num_tokens], sites.text_tokens)
                    args = _symbolic(node.args, args, symbols)  # type: ignore[assignment]
                node.args = args  # type: ignore[assignment]
                changed.append(node.name)
    gm.recompile()
    logger.debug("fix_token_shapes: %s: rewrote %d nodes %s", settings.key, len(changed), changed[:8])
    return gm, sites
