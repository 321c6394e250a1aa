"""The rewrite pipeline: which passes rewrite one engine's graph, in which order, and what each guarantees.

A pass is a declared transformation (:class:`GraphPass`): ``run(gm, sites, settings) -> (gm, sites)`` returns
the graph and the sites it changed, and names the facts it requires and ensures. :func:`build_pipeline` puts one
together for a method, a model family and a stage: the generic passes that apply, then each extension's passes
(:meth:`Extension.passes <sdtm_compile.core.extension.Extension.passes>`) in their phase; a pass that would do
nothing for that engine is left out, not run as a no-op. :func:`rewrite_for_engine` runs it on a copy of the
traced graph and checks, after every pass, ``graph.lint()`` and the pass's facts *on the graph* (the facts are
functions of the graph, not bookkeeping), so a pass run out of order, or one that silently did nothing, fails
loudly and names itself; at the end every output must keep its traced shape and the state outputs must match the
engine contract. ``describe()`` prints a pipeline, like torch-tensorrt's ``dump_lowering_passes()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from sdtm_compile.core.counts import count_tensors
from sdtm_compile.core.method import TokenMethod
from sdtm_compile.core.ops import sdtm_merge, sdtm_plan, sdtm_unmerge
from sdtm_compile.core.schedule import EngineKey, Stage
from sdtm_compile.core.signature import EngineSignature

from ._graph import copy_with_node_map, node_shape, state_input, state_outputs
from .facts import check_facts, fact
from .find_blocks import FALLBACK_HINT, find_mmdit_blocks
from .fix_token_shapes import TokenShapeError, fix_token_shapes, propagate_shapes, stale_token_constants
from .gather_rotary import gather_rotary_positions, pending_rotary_reads
from .insert_merge import block_plans, insert_merge_nodes, merged_blocks, merged_branch_names
from .settings import PassSettings
from .sites import ModelSites
from .split_single_stream import split_single_stream
from .step_cache import HIDDEN_STATE, add_hidden_output, hidden_state
from .thread_state import thread_engine_state

__all__ = [
    "GraphPass",
    "Pipeline",
    "PassContext",
    "RewrittenGraph",
    "build_pipeline",
    "rewrite_for_engine",
]

logger = logging.getLogger(__name__)

PassResult = tuple[fx.GraphModule, ModelSites]


@dataclass(frozen=True)
class PassContext:
    """What decides whether a pass belongs in a pipeline: the method, the model family, the engine's stage and
    whether the engines return the last block's output (the step cache)."""

    method: TokenMethod
    family: str
    stage: Stage
    step_cache: bool = False

    @property
    def merges(self) -> bool:
        """The engine merges something (not ``FULL``)."""
        return self.stage is not Stage.FULL

    @property
    def merged_branches(self) -> tuple[str, ...]:
        return self.method.merged_branches(self.stage, self.family) if self.merges else ()


@dataclass(frozen=True)
class GraphPass:
    """One rewrite pass: ``run(gm, sites, settings) -> (gm, sites)``, the facts it requires and ensures, where it
    goes (``phase``: ``"rewrite"`` passes change merged regions and run before ``fix_token_shapes``; ``"state"``
    passes add engine state and run after it) and when it applies (``applies(context)``; ``None``: always)."""

    name: str
    run: Callable[[fx.GraphModule, ModelSites, PassSettings], PassResult]
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ()
    phase: str = "rewrite"
    applies: Callable[[PassContext], bool] | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.phase not in ("rewrite", "state"):
            raise ValueError(f"{self.name}: phase must be 'rewrite' or 'state', got {self.phase!r}")
        if not self.ensures:
            raise ValueError(f"{self.name}: every pass declares at least one fact it ensures")

    def describe(self) -> str:
        """``name: what it does`` and the facts it requires and ensures."""
        doc = self.doc or " ".join((self.run.__doc__ or "").split()).split(". ")[0]
        requires = f"requires {', '.join(self.requires)}; " if self.requires else ""
        return f"{self.name}: {doc}\n       ({requires}ensures {', '.join(self.ensures)})"


@dataclass(frozen=True)
class Pipeline:
    """The passes that rewrite one engine's graph, in order (see :func:`build_pipeline`)."""

    context: PassContext
    passes: tuple[GraphPass, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def without(self, name: str) -> Pipeline:
        """This pipeline without the pass ``name`` (for tests of the order checks)."""
        return Pipeline(self.context, tuple(p for p in self.passes if p.name != name))

    def describe(self) -> str:
        """One line per pass: its name, the facts it requires and ensures, and what it does."""
        ctx = self.context
        head = f"{ctx.method.name} on {ctx.family}, {ctx.stage.value} engines" + (" (+ step cache)" * ctx.step_cache)
        return "\n".join([head, *(f"  {i}. {p.describe()}" for i, p in enumerate(self.passes, 1))])


# -- the generic passes' facts -------------------------------------------------------------------------------------


@fact("state_threaded")
def _state_threaded(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> bool:
    """Every carried entry of the contract is an input of the graph and one of its outputs."""
    carried = [t.name for t in settings.contract.inputs]
    return all(state_input(gm, name) is not None for name in carried) and set(carried) <= set(state_outputs(gm))


@fact("merge_nodes_inserted")
def _merged_as_planned(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> bool:
    """One plan per planning block, a merge per distinct merged input and an unmerge per merged branch."""
    plans = sum(n.target is sdtm_plan for n in gm.graph.nodes)
    merges = sum(n.target is sdtm_merge for n in gm.graph.nodes)
    unmerges = sum(n.target is sdtm_unmerge for n in gm.graph.nodes)
    merged = merged_branch_names(sites, settings) if settings.key.stage is not Stage.FULL else ()
    branches = [b.branches_named(merged) for b in merged_blocks(sites, settings)]
    inputs = sum(len({branch.input for _, branch in named}) for named in branches)
    distinct_plans = {source for source in block_plans(sites, settings) if source is not None}
    return plans == len(distinct_plans) and merges == inputs and unmerges == sum(map(len, branches))


@fact("single_streams_split")
def _single_streams_split(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> bool:
    """Every merged single-stream block has its ``mlp`` branch and no ``proj_out`` over ``cat([attn, mlp])`` is left."""
    singles = [b for b in merged_blocks(sites, settings) if b.stream is not None]
    left = [b for b in singles if b.stream.proj_out in gm.graph.nodes]  # type: ignore[union-attr]
    return all(b.mlp is not None for b in singles) and not left


@fact("rotary_per_token")
def _rotary_per_token(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> bool:
    """No merged attention reads the RoPE table of the unmerged sequence."""
    return not pending_rotary_reads(sites, settings)


@fact("token_constants_rewritten")
def _token_constants_rewritten(gm: fx.GraphModule, sites: ModelSites, settings: PassSettings) -> bool:
    """No merged branch holds an unmerged token count as a constant any more."""
    return not stale_token_constants(sites, settings)


# -- the generic passes ---------------------------------------------------------------------------------------------


def _flux_merging(ctx: PassContext) -> bool:
    return ctx.merges and ctx.family == "flux"


GENERIC_REWRITE: tuple[GraphPass, ...] = (
    GraphPass(
        "split_single_stream",
        split_single_stream,
        ensures=("single_streams_split",),
        applies=_flux_merging,
        doc="Flux single-stream blocks: proj_out split into attention and MLP columns (the MLP branch to merge)",
    ),
    GraphPass(
        "thread_engine_state",
        thread_engine_state,
        ensures=("state_threaded",),
        doc="the engine contract's carried state (sdtm_li, ...) as inputs, returned after the model's outputs",
    ),
    GraphPass(
        "insert_merge_nodes",
        insert_merge_nodes,
        requires=("state_threaded", "single_streams_split"),
        ensures=("merge_nodes_inserted",),
        applies=lambda ctx: ctx.merges,
        doc="a plan per block (or a shared one), merge / unmerge around every branch the stage merges",
    ),
    GraphPass(
        "gather_rotary_positions",
        gather_rotary_positions,
        requires=("merge_nodes_inserted",),
        ensures=("rotary_per_token",),
        applies=lambda ctx: _flux_merging(ctx) and "attn" in ctx.merged_branches,
        doc="merged Flux attention: each merged token rotated by its representative's RoPE row",
    ),
)
FIX_SHAPES = GraphPass(
    "fix_token_shapes",
    fix_token_shapes,
    requires=("merge_nodes_inserted", "rotary_per_token"),
    ensures=("token_constants_rewritten",),
    applies=lambda ctx: ctx.merges,
    doc="token-count constants inside merged branches set to the merged count",
)
HIDDEN_OUTPUT = GraphPass(
    "add_hidden_output",
    add_hidden_output,
    requires=("state_threaded",),
    ensures=("hidden_output",),
    phase="state",
    applies=lambda ctx: ctx.step_cache,
    doc="the step cache: the last block's image output as the hidden state output",
)


def build_pipeline(method: TokenMethod, family: str, stage: Stage, step_cache: bool = False) -> Pipeline:
    """The passes that rewrite an engine of ``stage`` for ``method`` on a model of ``family``.

    Order: ``split_single_stream``, ``thread_engine_state``, ``insert_merge_nodes``, ``gather_rotary_positions``,
    the extensions' rewrite passes, ``fix_token_shapes``, the extensions' state passes, ``add_hidden_output``;
    each only where it applies. A pass's required facts are checked on the graph before it runs; a fact about
    something the model does not have (single-stream blocks on SD3, RoPE reads in an unmerged attention) holds.
    """
    context = PassContext(method, family, stage, step_cache)
    extension_passes = [p for extension in method.extensions() for p in extension.passes()]
    ordered = [
        *GENERIC_REWRITE,
        *(p for p in extension_passes if p.phase == "rewrite"),
        FIX_SHAPES,
        *(p for p in extension_passes if p.phase == "state"),
        HIDDEN_OUTPUT,
    ]
    return Pipeline(context, tuple(p for p in ordered if p.applies is None or p.applies(context)))


@dataclass(frozen=True)
class RewrittenGraph:
    """One engine's graph: takes the traced graph's inputs plus the carried state and returns its outputs plus
    every state output of the contract (:class:`~sdtm_compile.core.signature.EngineSignature`)."""

    key: EngineKey
    gm: fx.GraphModule
    sites: ModelSites  #: the merge sites, as nodes of ``gm``
    signature: EngineSignature


def rewrite_for_engine(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    settings: PassSettings,
    sites: ModelSites | None = None,
    pipeline: Pipeline | Sequence[GraphPass] | None = None,
    step_cache: bool = False,
) -> RewrittenGraph:
    """A copy of ``gm`` rewritten for ``settings.key``; every pass linted and checked, output shapes checked.

    ``sites`` (from :func:`find_mmdit_blocks` on ``gm``) is found when not given; ``settings.signature`` is the
    method's (:meth:`~sdtm_compile.core.method.TokenMethod.signature`, with the step cache's hidden state when
    ``step_cache``) when not given; a given one says itself whether the engines return the hidden state.
    ``pipeline`` defaults to :func:`build_pipeline`'s for the method, family, stage and step cache. ``gm`` is not
    modified.
    """
    sites = sites if sites is not None else find_mmdit_blocks(gm, example_inputs)
    if settings.signature is None:
        extra = (hidden_state(sites.layout()),) if step_cache else ()
        settings = settings.with_signature(settings.method.signature(sites.layout(), extra))
    step_cache = HIDDEN_STATE in settings.contract  # a given contract decides whether the engines return it
    if pipeline is None:
        pipeline = build_pipeline(settings.method, sites.family, settings.key.stage, step_cache)
    passes = pipeline.passes if isinstance(pipeline, Pipeline) else tuple(pipeline)
    out, node_map = copy_with_node_map(gm)
    sites = sites.remapped(node_map)
    for graph_pass in passes:
        check_facts(graph_pass.requires, out, sites, settings, f"before {graph_pass.name}")
        out, sites = graph_pass.run(out, sites, settings)
        out.graph.lint()
        check_facts(graph_pass.ensures, out, sites, settings, f"after {graph_pass.name}")
    _check_shapes(gm, out, example_inputs, sites, settings)
    return RewrittenGraph(settings.key, out, sites, settings.contract)


def _check_shapes(
    traced: fx.GraphModule, out: fx.GraphModule, inputs: list[torch.Tensor], sites: ModelSites, settings: PassSettings
) -> None:
    """Propagate fake tensors through ``out``: its outputs must be the traced graph's, then the contract's state."""
    signature = settings.contract
    state = signature.example_inputs()  # CPU tensors: only shapes and dtypes matter
    before = _output_shapes(traced)
    changed = {n for n in out.graph.nodes if "sdtm" in n.meta}  # plan, merge, unmerge, the plan's parts, splits
    if settings.key.stage is not Stage.FULL:
        merged = merged_branch_names(sites, settings)
        blocks = merged_blocks(sites, settings)
        changed |= {n for block in blocks for _, branch in block.branches_named(merged) for n in branch.nodes}
    if settings.method.dynamic_counts and settings.key.stage is not Stage.FULL:
        # Dynamic counts: the graph must type-check at both ends of its count range (a count left baked in as a
        # constant fits one of them at most); the representative's counts go last, they are what regions record.
        kinds = [block.kind for block in sites.blocks]
        lowest, _ = settings.method.count_range(kinds, settings.key, sites.grid)
        propagate_shapes(out, [*inputs, *state, *count_tensors(lowest, sites.num_tokens)], changed)
        counts = settings.method.plan_counts(kinds, settings.key, sites.grid)
        propagate_shapes(out, [*inputs, *state, *count_tensors(counts, sites.num_tokens)], changed)
    else:
        propagate_shapes(out, [*inputs, *state], changed)
    after = _output_shapes(out)
    expected = [*before, *signature.output_shapes()]
    if after != expected or state_outputs(out) != list(signature.names):
        raise TokenShapeError(
            f"{settings.key}: the rewrite changed the graph's outputs {expected} -> {after} (state "
            f"{state_outputs(out)}, the contract's {list(signature.names)}); a merged region leaks merged tokens "
            f"into an output, or a pass did not return its state. {FALLBACK_HINT}"
        )


def _output_shapes(gm: fx.GraphModule) -> list[tuple[int, ...] | None]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return [node_shape(value) for value in output.args[0]]
