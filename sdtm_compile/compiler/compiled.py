"""What the backend returns to Dynamo: :class:`SDTMCompiledGraph`, the engines and the dispatcher between them;
:func:`compiled_graphs` finds the ones built for a model."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..core.config import MethodConfig
from ..core.counts import count_tensors
from ..core.method import method_for
from ..core.schedule import EngineKey, Stage, TokenCounts
from ..core.signature import EngineSignature, EngineState
from ..passes import ModelSites
from ..runtime import FirstBlockCacheConfig, FirstBlockCalls, StageDispatcher

__all__ = ["SDTMCompiledGraph", "FirstBlockEngines", "compiled_graphs"]

_GRAPHS: weakref.WeakSet[SDTMCompiledGraph] = weakref.WeakSet()  # every live SDTM graph, for compiled_graphs()


def compiled_graphs(model: torch.nn.Module) -> list[SDTMCompiledGraph]:
    """The :class:`SDTMCompiledGraph` s built for ``model`` (the ``torch.compile`` result or the module itself).

    Matched by the model's parameters, which Dynamo passes to the backend as graph inputs: correct with any
    number of compiled models in the process, whichever backend object or name built them. Empty before the
    first call (``torch.compile`` builds lazily).
    """
    module = getattr(model, "_orig_mod", model)
    params = {id(p) for p in module.parameters()}
    return [graph for graph in list(_GRAPHS) if graph.parameter_ids & params]


class FirstBlockEngines(NamedTuple):
    """The first-block step cache's engines (:mod:`sdtm_compile.runtime.step_cache`)."""

    head: Callable[..., Any]  #: ``(*inputs, *state) -> (first block's image input, *outputs)``
    out: Callable[..., Any]  #: ``(*inputs, *state, last block's image output) -> the model's outputs``
    outputs: tuple[str, ...]  #: the first block's outputs the head returns (node names; the image stream first)
    nodes: frozenset[str]  #: the unmerged first block's nodes (an engine whose first block has others is merged there)


class SDTMCompiledGraph:
    """One engine per (stage, bucket) - with dynamic counts one per stage - and the dispatcher between them.

    Calling it with the graph's inputs reads the timestep, picks the engine, runs it with the engine state
    (:attr:`signature`) and returns the graph's outputs. ``engines``, ``dispatcher`` and ``signature`` are public
    for inspection and tests.
    """

    def __init__(
        self,
        engines: dict[EngineKey, Callable[..., Any]],
        engine_names: dict[EngineKey, str],
        sites: ModelSites,
        config: MethodConfig,
        signature: EngineSignature,
        example_inputs: list[torch.Tensor] = (),  # type: ignore[assignment]
        history: int = 0,
        step_cache: FirstBlockCacheConfig | None = None,
        first_block: FirstBlockEngines | None = None,
        resuming: frozenset[EngineKey] = frozenset(),
    ) -> None:
        self.engines = engines
        self.engine_names = engine_names
        self.sites = sites
        self.config = config
        self.signature = signature
        self.dispatcher = StageDispatcher(config, history=history, step_cache=step_cache)
        self.method = method_for(config)
        #: first-block cache: its head and out engines (:mod:`sdtm_compile.runtime.step_cache`); ``None`` without one
        self.first_block = first_block
        #: first-block cache: the keys whose engine starts from the head's first-block outputs (its first block runs
        #: unmerged, so a computed step does not run it twice); their engines take those outputs as extra inputs
        self.resuming = resuming
        #: ids of the model parameters among the graph's inputs (how :func:`compiled_graphs` finds the model);
        #: the graph's engines keep the parameters alive, so the ids cannot be reused while it lives.
        self.parameter_ids = {id(t) for t in example_inputs if isinstance(t, torch.nn.Parameter)}
        #: Flux: the ``img_ids`` the token grid was read from; every call must bring the same ones
        self.image_ids = None
        if sites.image_ids_index is not None and example_inputs:
            self.image_ids = example_inputs[sites.image_ids_index].detach().clone()
        _GRAPHS.add(self)

    def _check_image_ids(self, ids: torch.Tensor) -> None:
        """Flux: the merge windows were laid on the grid of the compile-time ``img_ids``; a new layout with the
        same token count (e.g. 32x32 -> 16x64) would not recompile, so check the values."""
        assert self.image_ids is not None
        if ids.shape != self.image_ids.shape or not torch.equal(ids.to(self.image_ids.device), self.image_ids):
            raise ValueError(
                f"img_ids differ from the ones this model was compiled with (a {self.sites.grid[0]}x"
                f"{self.sites.grid[1]} token grid): the merge windows are laid on that grid. Keep the image "
                "height and width, or compile again for the new size (torch._dynamo.reset(), then a new "
                "torch.compile)"
            )

    def __call__(self, *args: Any) -> Any:
        latent = args[self.sites.latent_index]
        timestep = args[self.sites.timestep_index]
        if self.image_ids is not None:
            self._check_image_ids(args[self.sites.image_ids_index])  # type: ignore[index]
        signature = self.signature

        def call(key: EngineKey, state: EngineState) -> tuple[Any, EngineState]:
            engine = self.engines.get(self.method.engine_of(key))
            if engine is None:
                raise KeyError(f"no engine was built for {key}; built: {sorted(map(str, self.engines))}")
            return signature.split(engine(*args, *signature.engine_inputs(state), *self.count_inputs(key, latent)))

        def rest(key: EngineKey, state: EngineState, outputs: tuple[torch.Tensor, ...]) -> Any:
            served = self.method.engine_of(key)
            if served not in self.resuming:
                return None
            counts = self.count_inputs(key, latent)
            return signature.split(self.engines[served](*args, *signature.engine_inputs(state), *counts, *outputs))

        first_block = None
        if self.first_block is not None:
            head, out = self.first_block.head, self.first_block.out
            first_block = FirstBlockCalls(
                head=lambda state: tuple(head(*args, *signature.engine_inputs(state))),  # type: ignore[arg-type]
                out=lambda state, hidden: tuple(out(*args, *signature.engine_inputs(state), hidden)),
                rest=rest,
            )
        return self.dispatcher.run(
            timestep, ("graph", id(self)), signature, latent.device, call, first_block=first_block
        )

    def count_inputs(self, key: EngineKey, like: torch.Tensor) -> list[torch.Tensor]:
        """With dynamic counts: the count inputs of ``key``'s step, on ``like``'s device (none for ``FULL`` or with
        static buckets; :mod:`sdtm_compile.core.counts`)."""
        if not self.method.dynamic_counts or key.stage is Stage.FULL:
            return []
        kinds = [block.kind for block in self.sites.blocks]
        counts = self.method.plan_counts(kinds, key, self.sites.grid)
        return count_tensors(counts, self.sites.num_tokens, like.device)

    def reset(self) -> None:
        """Forget the default generation state explicitly (``generation`` contexts keep theirs)."""
        self.dispatcher.reset()

    def token_counts(self, key: EngineKey) -> TokenCounts:
        """Image tokens the attention and the feed-forward see in the engine of ``key`` (for tables and plots)."""
        return method_for(self.config).token_counts(key, *self.sites.grid, self.sites.family)
