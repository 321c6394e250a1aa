"""`BucketGraphs`: the traced graph and one rewritten graph per engine, built by one policy for every consumer.

The backend, ONNX export, the TensorRT lint and the benchmark all need "the graph of each (stage, bucket) the
schedule can reach". This class owns that list and its policies, so they cannot drift apart:

* the keys: the method's :meth:`~sdtm_compile.core.method.TokenMethod.engines_for_trajectory`, plus ``FULL``
  first when asked (export and lint always include the unmerged graph; the backend builds it only when the
  schedule reaches it), no key twice;
* sharing: keys whose token counts are equal on this grid are the same graph, rewritten (and built) once; with
  dynamic counts (``SDTMConfig(counts="exact")``) one graph per stage, whose count inputs follow the engine
  contract's state (:mod:`sdtm_compile.core.counts`);
* the engine contract (:attr:`BucketGraphs.signature`): built once from the method and the model's layout, the
  same for every graph;
* the rewrite (:func:`~sdtm_compile.passes.rewrite_for_engine`) from sites found once on the traced graph.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx

from ..core.config import MethodConfig
from ..core.counts import example_count_tensor, reachable_counts
from ..core.method import TokenMethod, method_for
from ..core.schedule import FULL, EngineKey, Stage, TokenCounts, resolve_for_model
from ..core.signature import EngineSignature
from ..passes import (
    FALLBACK_HINT,
    ModelSites,
    PassSettings,
    RewrittenGraph,
    UnsupportedModelError,
    find_mmdit_blocks,
    hidden_state,
    rewrite_for_engine,
)

__all__ = ["BucketGraphs", "DistinctGraph"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistinctGraph:
    """One distinct bucket graph and every engine key it serves (the first key is the one it was rewritten for)."""

    keys: tuple[EngineKey, ...]
    graph: RewrittenGraph
    counts: TokenCounts


class BucketGraphs:
    """The engines' graphs of one traced transformer (see the module docstring).

    Args:
        gm: the graph Dynamo traced (not modified).
        example_inputs: its flattened inputs (parameters included), as the backend receives them.
        config: the method's configuration (its schedule decides the keys).
        include_full: also the unmerged graph (``FULL``), first, even when the schedule never reaches it.
        step_cache: every engine also returns the last block's image output (the first-block step cache).

    Raises :class:`~sdtm_compile.passes.UnsupportedModelError` when the graph has no block we can rewrite, or when
    the method (or one of its extensions) cannot run on this model.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: list[torch.Tensor],
        config: MethodConfig,
        *,
        include_full: bool = False,
        step_cache: bool = False,
    ) -> None:
        self.traced = gm
        self.example_inputs = list(example_inputs)
        self.sites: ModelSites = find_mmdit_blocks(gm, self.example_inputs)
        #: ``config`` with the timestep mapping of this model filled in (see ``resolve_for_model``)
        self.config = resolve_for_model(config, self.sites.family, self.sites.total_tokens)
        self.method: TokenMethod = method_for(self.config)
        if step_cache and self.sites.context_parallel > 1:
            raise UnsupportedModelError(
                "the first-block step cache skips a step when the first block's residual barely changed, read on "
                f"this rank's shard alone: under context parallelism the {self.sites.context_parallel} ranks could "
                "decide differently and their collectives would not match. Drop the step_cache option. "
                f"{FALLBACK_HINT}"
            )
        layout = self.sites.layout()
        problem = self.method.check_model(layout)
        if problem is not None:
            raise UnsupportedModelError(f"{problem}. {FALLBACK_HINT}")
        #: the engine contract every graph keeps
        self.signature: EngineSignature = self.method.signature(layout, (hidden_state(layout),) if step_cache else ())
        keys = self.method.engines_for_trajectory()
        if include_full:
            keys = [FULL, *keys]
        self.keys: list[EngineKey] = list(dict.fromkeys(keys))
        self._rewritten: dict[tuple, RewrittenGraph] = {}

    @property
    def latent(self) -> torch.Tensor:
        return self.example_inputs[self.sites.latent_index]

    @property
    def grid(self) -> tuple[int, int]:
        return self.sites.grid

    def new_state(self) -> list[torch.Tensor]:
        """Fresh carried state for these inputs, on the latent's device (the contract's inputs, in order)."""
        return self.signature.example_inputs(self.latent.device)

    def new_li(self) -> torch.Tensor:
        """The method's fresh state (SDTM: the ``li`` counter), ``[B, N]`` int32 on the latent's device."""
        return self.signature["li"].fresh(self.latent.device)

    def engine_inputs(self, key: EngineKey | None = None) -> list[torch.Tensor]:
        """What every engine takes: the traced graph's inputs and a fresh carried state; with dynamic counts and a
        merged ``key``, then the count inputs at ``key``'s counts (:mod:`sdtm_compile.core.counts`)."""
        return [*self.example_inputs, *self.new_state(), *self.count_inputs(key)]

    def count_inputs(self, key: EngineKey | None) -> list[torch.Tensor]:
        """The count inputs to build the engine of ``key`` with, at ``key``'s counts, each naming every count of its
        stage (:func:`~sdtm_compile.core.counts.example_count_tensor`; none with static buckets, or for ``FULL``)."""
        if key is None or not self.method.dynamic_counts or key.stage is Stage.FULL:
            return []
        low, high = self.count_range(key)
        return [
            example_count_tensor(
                count, reachable_counts(lo, hi, self.method.count_step), self.sites.num_tokens, self.latent.device
            )
            for count, lo, hi in zip(self.plan_counts(key), low, high)
        ]

    def plan_counts(self, key: EngineKey) -> tuple[int, ...]:
        """Each count input's count at the schedule's ``key`` (empty with static buckets)."""
        if not self.method.dynamic_counts or key.stage is Stage.FULL:
            return ()
        return self.method.plan_counts(self.kinds, key, self.sites.grid)

    def count_range(self, key: EngineKey) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(smallest, largest)`` count of each count input of the engine of ``key`` over its stage."""
        if not self.method.dynamic_counts or key.stage is Stage.FULL:
            return (), ()
        return self.method.count_range(self.kinds, key, self.sites.grid)

    @property
    def kinds(self) -> list[str]:
        """Each block's kind (``joint``, ``double``, ``single``), in model order."""
        return [block.kind for block in self.sites.blocks]

    def counts(self, key: EngineKey) -> TokenCounts:
        """Image tokens each part of a merged block sees in the engine of ``key``."""
        return self.method.token_counts(key, *self.sites.grid, self.sites.family)

    def block_counts(self, key: EngineKey) -> tuple[TokenCounts, ...]:
        """Image tokens each part of each block sees in the engine of ``key`` (the config's block schedule
        applied): what its graph specialises."""
        kinds = [block.kind for block in self.sites.blocks]
        return self.method.block_token_counts(kinds, key, self.sites.grid, self.sites.family)

    def _graph_id(self, key: EngineKey) -> tuple:
        if self.method.dynamic_counts and key.stage is not Stage.FULL:  # one graph per stage serves every count
            return (key.stage, "dynamic counts")
        return (key.stage, self.block_counts(key))

    def graph(self, key: EngineKey) -> RewrittenGraph:
        """The rewritten graph serving ``key`` (rewritten once per distinct token counts)."""
        graph_id = self._graph_id(key)
        rewritten = self._rewritten.get(graph_id)
        if rewritten is None:
            key = self.method.engine_of(key)  # dynamic counts: the stage's engine, whatever step's key asks
            settings = PassSettings(self.config, key, self.signature)
            rewritten = rewrite_for_engine(self.traced, self.example_inputs, settings, sites=self.sites)
            self._rewritten[graph_id] = rewritten
        return rewritten

    def groups(self) -> list[tuple[EngineKey, ...]]:
        """The keys grouped by the graph that serves them (equal token counts on this grid), in key order."""
        groups: dict[tuple, list[EngineKey]] = {}
        for key in self.keys:
            groups.setdefault(self._graph_id(key), []).append(key)
        return [tuple(keys) for keys in groups.values()]

    def distinct_graph(self, keys: tuple[EngineKey, ...]) -> DistinctGraph:
        """The graph of one group of :meth:`groups` (rewritten on first use)."""
        if len(keys) > 1:
            logger.info("%s have the same token counts on this grid: one graph serves them", ", ".join(map(str, keys)))
        return DistinctGraph(keys, self.graph(keys[0]), self.counts(keys[0]))

    def distinct(self) -> Iterator[DistinctGraph]:
        """Each distinct graph once, in key order, with the keys it serves (rewritten lazily, one at a time)."""
        for keys in self.groups():
            yield self.distinct_graph(keys)
