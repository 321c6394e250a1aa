"""Regional engines: split each bucket graph into regions, build one engine per *distinct* region, reuse it.

A transformer repeats one block class many times, and the engines of two buckets differ only where tokens are
merged. Compiling every bucket graph whole (what we did before) compiles the same block again for every block
and every bucket. Like diffusers' regional compilation (``compile_repeated_blocks``), we compile a block once
and call that engine for every block of the same structure, with the block's weights as inputs - and we go one
step further across buckets:

* every block is cut in two: its *merged part* (the plan, what depends on it, and what feeds that after the
  block's first merge) and its *prefix* (the rest: norms, modulation and, in the detail stage, the whole
  attention and the text stream's feed-forward; :func:`region_partitions`). Prefixes do not depend on the
  bucket, so the four detail buckets share one prefix engine per block kind; only the small merged part is
  built per bucket;
* what is outside the blocks (patch embedding, time / text embeddings, the final norm and unpatchify) is a
  region of its own, shared by every bucket;
* regions are compared by their *signature*: the region's code with canonical names, the shapes, dtypes and
  strides of its inputs, and its constants. Equal signature, one engine.

The assembled engine of a bucket is the ``split_module`` graph whose submodules call the shared engines: its
inputs and outputs are the bucket graph's, so it drops in where the whole-graph engine was. Nothing runs while
building: region inputs are made from the fake-tensor shapes the passes recorded, and every engine checks the
strides it is called with (Inductor asserts them), so a mismatch is an error, never a silent wrong result.

With dynamic counts (``SDTMConfig(counts="exact")``) a merged part takes its plan's count input
(:mod:`sdtm_compile.core.counts`) and is built once for every count; its signature names the lengths it serves,
not the example's, so every block serving the same counts shares it. What this does not do: share regions across
*models* (the engine cache does that, keyed by the region's code).
"""

from __future__ import annotations

import hashlib
import logging
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from ..core.counts import served_lengths, size_only_inputs
from ..core.ops import sdtm_merge, sdtm_plan
from ..passes import RewrittenGraph, module_stack

__all__ = ["RegionalBuilder", "RegionJob", "RegionStats", "region_partitions", "split_into_regions"]

logger = logging.getLogger(__name__)

#: ``build(region_gm, example_inputs, name) -> engine``: builds one region (name is for logs and errors).
BuildRegion = Callable[[fx.GraphModule, list[torch.Tensor], str], Callable[..., Any]]


def region_partitions(rewritten: RewrittenGraph) -> dict[fx.Node, int]:
    """Partition id of every computing node: per block its prefix and its merged part; glue between blocks.

    A block's merged part is its plan and what depends on it (the merged branches, unmerge, the residuals after
    it), plus what feeds those and comes after the block's first merge (e.g. the text stream's q / k / v of a
    merged attention). The rest of the block is its prefix: the nodes before the first merge, and after it
    those the merged part neither reads nor depends on. The text stream's feed-forward after an unmerged
    attention (detail stage) is then prefix, so the merged parts of a block with a text feed-forward and of the
    last block (``context_pre_only``: none) are the same region.
    """
    nodes = [n for n in rewritten.gm.graph.nodes if n.op not in ("placeholder", "output")]
    block_of = _block_of_nodes(rewritten, nodes)
    planned: set[fx.Node] = set()  # a block's plan and the nodes of that block that depend on it
    merge_seen: set[int] = set()
    after_merge: set[fx.Node] = set()
    for node in nodes:
        block = block_of[node]
        if block is None:
            continue
        planning = (
            node.target in (sdtm_plan, sdtm_merge)
            or (node.target is operator.getitem and getattr(node.args[0], "target", None) is sdtm_plan)
            or node.meta.get("sdtm") == "plan"  # what the passes placed with the plan (its count input read)
        )
        if planning or any(arg in planned and block_of.get(arg) == block for arg in node.all_input_nodes):
            planned.add(node)
        if block in merge_seen:
            after_merge.add(node)
        if node.target is sdtm_merge:
            merge_seen.add(block)
    merged = set(planned)
    for node in reversed(nodes):  # after the first merge, what feeds the merged part joins it
        if node in after_merge and any(user in merged and block_of.get(user) == block_of[node] for user in node.users):
            merged.add(node)
    labels: dict[tuple, int] = {}
    partition: dict[fx.Node, int] = {}
    blocks_seen = 0
    for node in nodes:
        block = block_of[node]
        if block is None:
            label: tuple = ("glue", blocks_seen)
        else:
            blocks_seen = max(blocks_seen, block + 1)
            label = ("block", block, "merged" if node in merged else "prefix")
        partition[node] = labels.setdefault(label, len(labels))
    return partition


def _block_of_nodes(rewritten: RewrittenGraph, nodes: list[fx.Node]) -> dict[fx.Node, int | None]:
    """The index of the block each node belongs to (``None``: outside every block)."""
    block_of_path = {block.path: block.index for block in rewritten.sites.blocks}
    return {n: next((block_of_path[p] for p, _ in module_stack(n) if p in block_of_path), None) for n in nodes}


def split_into_regions(rewritten: RewrittenGraph) -> fx.GraphModule:
    """The bucket graph as a graph of region submodules (``submod_<i>``), same inputs and outputs."""
    partition = region_partitions(rewritten)
    return split_module(rewritten.gm, None, lambda node: partition[node], keep_original_order=True)


def _value(node: Any) -> Any:
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else node


def _canonical(sub: fx.GraphModule, inputs: list[Any]) -> tuple[fx.GraphModule, list[int], bool]:
    """``sub`` with canonical node names, tensor inputs only and a tuple output.

    Returns ``(region, tensor_positions, single_output)``: which call arguments are tensors (a ``None`` argument,
    e.g. a plan part a method lacks, is baked in) and whether ``sub`` returned one value rather than a tuple.
    """
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    positions: list[int] = []
    single = False
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    for position, (node, value) in enumerate(zip(placeholders, inputs)):
        if isinstance(value, torch.Tensor):
            env[node] = graph.placeholder(f"in_{len(positions)}")
            env[node].meta = dict(node.meta)
            positions.append(position)
        elif value is None or isinstance(value, (int, float, bool)):
            env[node] = value
        else:
            raise TypeError(f"region input {node.name} is a {type(value).__name__}, which no engine can take")
    count = 0
    for node in sub.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            result = node.args[0]
            single = not isinstance(result, (tuple, list))
            graph.output(fx.node.map_arg((result,) if single else tuple(result), lambda n: env[n]))
            continue
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        env[node] = graph.create_node(node.op, node.target, args, kwargs, name=f"v{count}")
        env[node].meta = dict(node.meta)
        count += 1
    return fx.GraphModule(sub, graph), positions, single


def _signature(region: fx.GraphModule, inputs: list[torch.Tensor]) -> str:
    """What makes two regions the same engine: canonical code, input layouts (for a count input, the lengths it
    serves, not its example length), constant values."""
    digest = hashlib.sha256(region.code.encode())
    counts = set(size_only_inputs(region))
    for position, value in enumerate(inputs):
        shape = ("count", served_lengths(value)) if position in counts else tuple(value.shape)
        digest.update(repr((shape, value.stride(), value.dtype, value.device.type)).encode())
    for node in region.graph.nodes:
        if node.op == "get_attr":
            constant = getattr(region, str(node.target))
            if isinstance(constant, torch.Tensor):
                digest.update(constant.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _example(value: Any, real: dict[int, torch.Tensor]) -> Any:
    """A concrete tensor standing for a recorded value: the real input where there is one, else zeros laid out
    like it (zeros, so that indices built from it stay in range while an engine traces)."""
    if not isinstance(value, torch.Tensor):
        return value
    if id(value) in real:
        return real[id(value)]
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device).zero_()


class RegionEngine(nn.Module):
    """Calls a shared region engine with this call site's tensor arguments (bound by :meth:`RegionalBuilder.finish`)."""

    def __init__(self, positions: list[int], single: bool, signature: str) -> None:
        super().__init__()
        self.engine: Callable[..., Any] | None = None
        self.positions = positions
        self.single = single
        self.signature = signature

    def forward(self, *args: Any) -> Any:
        if self.engine is None:
            raise RuntimeError("region engine not built yet: call RegionalBuilder.finish() before running")
        outputs = self.engine(*[args[i] for i in self.positions])
        return outputs[0] if self.single else tuple(outputs)


@dataclass
class RegionJob:
    """One distinct region to build: its canonical graph, example inputs and a name for logs."""

    signature: str
    region: fx.GraphModule
    inputs: list[torch.Tensor]
    name: str


@dataclass
class RegionStats:
    """How much was shared: call sites assembled, distinct engines built (or loaded)."""

    call_sites: int = 0
    built: int = 0


#: ``build_regions(jobs) -> engines`` (same order): builds many regions at once, e.g. in parallel processes.
BuildRegions = Callable[[list[RegionJob]], list[Callable[..., Any]]]


class RegionalBuilder:
    """Builds bucket engines region by region, sharing one engine per distinct region signature.

    One builder serves every bucket graph of a compile, so regions shared across buckets are built once.
    :meth:`add` splits a bucket graph and records its regions; :meth:`finish` builds every region not built
    yet - one by one with ``build_region``, or all at once with ``build_regions`` when given (parallel
    builds) - and binds them. :meth:`build` is both for one graph.
    """

    def __init__(self, build_region: BuildRegion, build_regions: BuildRegions | None = None) -> None:
        self.build_region = build_region
        self.build_regions = build_regions
        self.engines: dict[str, Callable[..., Any]] = {}
        self.stats = RegionStats()
        self._pending: dict[str, RegionJob] = {}
        self._call_sites: list[RegionEngine] = []

    @property
    def pending(self) -> int:
        """Distinct regions queued for :meth:`finish`."""
        return len(self._pending)

    def build(self, rewritten: RewrittenGraph, engine_inputs: list[torch.Tensor]) -> fx.GraphModule:
        """The engine of one bucket graph, built now (see :meth:`add` and :meth:`finish`)."""
        engine = self.add(rewritten, engine_inputs)
        self.finish()
        return engine

    def add(self, rewritten: RewrittenGraph, engine_inputs: list[torch.Tensor]) -> fx.GraphModule:
        """The engine of one bucket graph: its region graph, whose submodules call shared region engines.

        Regions not seen before are queued for :meth:`finish`; the returned engine runs once it was called.
        """
        split = split_into_regions(rewritten)
        placeholders = [n for n in split.graph.nodes if n.op == "placeholder"]
        # A region's inputs are graph inputs (real tensors: weights, latent, li) or values another region makes.
        values: dict[fx.Node, Any] = dict(zip(placeholders, engine_inputs))
        real = {id(t): t for t in engine_inputs if isinstance(t, torch.Tensor)}
        for node in split.graph.nodes:
            if node.op == "call_module":
                sub = getattr(split, str(node.target))
                args = [_example(values[a] if isinstance(a, fx.Node) else a, real) for a in node.args]
                region, positions, single = _canonical(sub, args)
                inputs = [args[i] for i in positions]
                signature = _signature(region, inputs)
                if signature not in self.engines and signature not in self._pending:
                    name = f"{rewritten.key} {node.target} ({_describe(sub)})"
                    self._pending[signature] = RegionJob(signature, region, inputs, name)
                call_site = RegionEngine(positions, single, signature)
                setattr(split, str(node.target), call_site)
                self._call_sites.append(call_site)
                self.stats.call_sites += 1
                output = next(n for n in sub.graph.nodes if n.op == "output").args[0]
                values[node] = fx.node.map_aggregate(output, _value)
            elif node.op == "call_function" and node.target is operator.getitem:
                source, index = node.args
                values[node] = values[source][index]  # type: ignore[index]
        split.recompile()
        return split

    def finish(self) -> None:
        """Build every queued region and bind every call site to its engine."""
        jobs = list(self._pending.values())
        if jobs:
            if self.build_regions is not None and len(jobs) > 1:
                engines = self.build_regions(jobs)
            else:
                engines = []
                for number, job in enumerate(jobs, 1):
                    start = time.perf_counter()
                    engines.append(self.build_region(job.region, job.inputs, job.name))
                    seconds = time.perf_counter() - start
                    logger.info("  region %d/%d: %s in %.1f s", number, len(jobs), job.name, seconds)
            for job, engine in zip(jobs, engines):
                self.engines[job.signature] = engine
            self.stats.built += len(jobs)
            self._pending.clear()
        for call_site in self._call_sites:
            call_site.engine = self.engines[call_site.signature]


def _describe(sub: fx.GraphModule) -> str:
    stacks = [module_stack(n) for n in sub.graph.nodes if n.op == "call_function"]
    paths = {stack[1][0] if len(stack) > 1 else stack[0][0] for stack in stacks if stack}
    computing = sum(n.op == "call_function" for n in sub.graph.nodes)
    return f"{computing} ops in {', '.join(sorted(paths)[:2]) or 'the model'}"
