"""`BucketGraphs`: the traced graph and one rewritten graph per engine, built by one policy for every consumer.

The backend, ONNX export, the TensorRT lint and the benchmark all need "the graph of each (stage, bucket) the
schedule can reach". This class owns that list and its policies, so they cannot drift apart:

* the keys: :func:`~sdtm_compile.schedule.engines_for_trajectory`, plus ``FULL`` first when asked (export and
  lint always include the unmerged graph; the backend builds it only when the schedule reaches it), no key twice;
* sharing: keys whose token counts are equal on this grid are the same graph, rewritten (and built) once;
* the rewrite (:func:`~sdtm_compile.passes.rewrite_for_engine`) from sites found once on the traced graph;
* ``li``: the method's fresh state ``[B, N]`` int32 on the latent's device (SDTM: the zero counter).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx

from .config import MethodConfig
from .methods import method_for
from .passes import (
    FALLBACK_HINT,
    ModelSites,
    PassSettings,
    RewrittenGraph,
    UnsupportedModelError,
    find_mmdit_blocks,
    rewrite_for_engine,
)
from .passes.fuse_cache import cache_slots
from .passes.insert_merge import stage_token_counts
from .passes.pipeline import engine_state_examples
from .schedule import FULL, EngineKey, TokenCounts, engines_for_trajectory, resolve_for_model

__all__ = ["BucketGraphs", "DistinctGraph", "engine_token_counts"]

logger = logging.getLogger(__name__)


def engine_token_counts(key: EngineKey, sites: ModelSites, config: MethodConfig) -> TokenCounts:
    """Image tokens each part of a merged block sees in the engine of ``key``, on the grid and model family of
    ``sites`` (e.g. Flux's attention is merged by SDTM only with ``merge_attention``)."""
    return stage_token_counts(sites, PassSettings(config, key))


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

    Raises :class:`~sdtm_compile.passes.UnsupportedModelError` when the graph has no block we can rewrite, or when
    the method cannot merge its token grid.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: list[torch.Tensor],
        config: MethodConfig,
        *,
        include_full: bool = False,
    ) -> None:
        self.traced = gm
        self.example_inputs = list(example_inputs)
        self.sites: ModelSites = find_mmdit_blocks(gm, self.example_inputs)
        #: ``config`` with the timestep mapping of this model filled in (see ``resolve_for_model``)
        self.config = resolve_for_model(config, self.sites.family, self.sites.num_tokens)
        problem = method_for(self.config).check_grid(*self.sites.grid) if self.config.enabled else None
        if problem is not None:
            raise UnsupportedModelError(f"{problem}. {FALLBACK_HINT}")
        if getattr(self.config, "fuses_cache", False):
            cache_slots(self.sites, self.config)  # type: ignore[arg-type]  # raises CacheFusionError on Flux
        keys = engines_for_trajectory(self.config)
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

    def new_li(self) -> torch.Tensor:
        """The method's fresh state for these inputs (SDTM: the ``li`` counter), ``[B, N]`` int32 on the latent's
        device."""
        return method_for(self.config).init_state(self.latent.shape[0], self.sites.num_tokens, self.latent.device)

    def new_state(self) -> list[torch.Tensor]:
        """Fresh state inputs for these inputs (:mod:`~sdtm_compile.engine_state`): ``li`` [, the cache]."""
        return engine_state_examples(self.sites, self.config, self.latent.shape[0], self.latent.device)

    def engine_inputs(self) -> list[torch.Tensor]:
        """What every engine takes: the traced graph's inputs and a fresh state (``li`` [, cache])."""
        return [*self.example_inputs, *self.new_state()]

    def counts(self, key: EngineKey) -> TokenCounts:
        return engine_token_counts(key, self.sites, self.config)

    def _graph_id(self, key: EngineKey) -> tuple:
        return (key.stage, self.counts(key))

    def graph(self, key: EngineKey) -> RewrittenGraph:
        """The rewritten graph serving ``key`` (rewritten once per distinct token counts)."""
        graph_id = self._graph_id(key)
        rewritten = self._rewritten.get(graph_id)
        if rewritten is None:
            rewritten = rewrite_for_engine(
                self.traced, self.example_inputs, PassSettings(self.config, key), sites=self.sites
            )
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
