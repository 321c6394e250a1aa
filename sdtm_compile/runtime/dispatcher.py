"""`StageDispatcher`: picks the engine of each transformer call from its timestep and carries the engine state.

The engines behind it are interchangeable: the eager reference, compiled per-bucket graphs, ONNX sessions. Each
caller passes :meth:`StageDispatcher.run` a ``call(key, state) -> (output, state)`` that runs its engine; ``state``
is an :class:`~sdtm_compile.core.signature.EngineState` holding what the engine contract
(:class:`~sdtm_compile.core.signature.EngineSignature`) says an engine takes: ``li``, the method's state (``[B, N]``
int32: SDTM's "not attended" counter, or the random state of ToMeSD and SiTo), plus what the method's extensions
carry. The rules below hold for every method.

Each call: the schedule's engine for the timestep's trajectory position
(:meth:`~sdtm_compile.core.method.TokenMethod.engine_key_at`), which each of the method's extensions may change
(:class:`~sdtm_compile.core.extension.ExtensionRun`: e.g. SDTM's cache fusion runs protected steps unmerged, SDTM*
picks the bucket from the previous step's reading), the state the extensions feed, and what they keep of the
result. A step cache (:mod:`sdtm_compile.runtime.step_cache`, the backend's ``step_cache`` option) runs a head
engine first and skips the rest of the model when the first block's residual barely changed.

State rules:

* a timestep *above* the last one seen for a batch layout starts a new generation: the state is reset;
* a *lower* timestep starts a new step: the state left by the latest call becomes the step's start state;
* the *same* timestep again (CFG as two calls, skip-layer guidance) is the same step: the call starts from
  the step's start state again, so extra calls never advance the state twice;
* state is kept per batch layout (shape, dtype, device of the latent), so a batch-2 and a batch-1 call do not
  share it. :meth:`StageDispatcher.reset` clears everything explicitly.

Who owns the state (this dispatcher's default state, or an open :func:`~sdtm_compile.runtime.generation` context):
see :mod:`sdtm_compile.runtime.generation`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from ..core.config import MethodConfig
from ..core.extension import ExtensionRun
from ..core.method import method_for
from ..core.schedule import EngineKey, position_from_timestep
from ..core.signature import METHOD_STATE, EngineSignature, EngineState
from .generation import CallRecord, ConcurrentUseError, GenerationState, active_generation
from .step_cache import FirstBlockCacheConfig, relative_change

__all__ = ["StageDispatcher", "FirstBlockCalls", "LayoutState"]

logger = logging.getLogger(__name__)

#: ``call(key, state) -> (output, state)``: runs the engine of ``key`` (a bare ``li`` tensor may stand for a state
#: holding only the method's)
EngineCall = Callable[[EngineKey, EngineState], tuple[Any, "EngineState | torch.Tensor"]]


@dataclass
class LayoutState:
    """One generation's state for one batch layout."""

    timestep: float
    li_step_start: torch.Tensor  #: the method's state as it stood when the current step began
    li_latest: torch.Tensor  #: the method's state after the latest call of the current step
    runs: list[ExtensionRun]  #: the method's extensions' parts of the generation
    step: int = 0  #: steps since the generation began
    call: int = 0  #: calls so far in the current step, minus one (the index of the latest)
    #: first-block cache, by call index within a step: (first block residual, last - first block output) of the
    #: last computed step
    first_block: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class FirstBlockCalls(NamedTuple):
    """What the first-block cache (:mod:`sdtm_compile.runtime.step_cache`) needs from a caller besides ``call``."""

    #: -> the first block's image input, then its outputs (the image stream first)
    head: Callable[[EngineState], tuple[torch.Tensor, ...]]
    out: Callable[[EngineState, torch.Tensor], Any]  #: the model's output from the last block's image output
    #: ``rest(key, state, first_block_outputs)``: a computed step that resumes from the head's outputs, as ``call``
    #: returns it; ``None`` where the engine of ``key`` runs its own first block (then ``call`` runs)
    rest: Callable[[EngineKey, EngineState, tuple[torch.Tensor, ...]], Any] | None = None


class StageDispatcher:
    """Runs each call on the engine of the (stage, bucket) its timestep maps to, carrying the engine state.

    Args:
        config: the method's configuration (schedule, buckets, timestep shift; any method's config).
        history: how many recent calls the default state (outside any :func:`generation`) records as a
            :class:`CallRecord` (0, the default: none; cleared by :meth:`reset`).
        step_cache: a first-block cache (:mod:`sdtm_compile.runtime.step_cache`): every call then runs the caller's
            head engine first and may skip to its out engine (``None``, the default: no step cache).
    """

    def __init__(self, config: MethodConfig, history: int = 0, step_cache: FirstBlockCacheConfig | None = None) -> None:
        self.config = config
        self.step_cache = step_cache
        self._default = GenerationState(history)

    @property
    def config(self) -> MethodConfig:
        return self._config

    @config.setter
    def config(self, config: MethodConfig) -> None:
        self._config = config
        self.method = method_for(config)

    @property
    def history(self) -> list[CallRecord]:
        """The calls made outside any :func:`generation` context, oldest first (empty unless ``history`` > 0)."""
        return list(self._default.history or ())

    def reset(self) -> None:
        """Forget the default state (every batch layout's) and its history; contexts keep theirs."""
        self._default.clear()

    def key_for(self, timestep: torch.Tensor | float) -> tuple[float, EngineKey]:
        """The trajectory position of ``timestep`` and the engine the schedule gives it."""
        position = position_from_timestep(timestep, self.config)
        return position, self.method.engine_key_at(position)

    def plan(self, timesteps: list[float]) -> list[tuple[EngineKey, dict[str, Any]]]:
        """The engine of every step of a generation with one call per step (CFG batched), and each step's notes
        (SDTM's ``protected``), decided from the timesteps alone as :meth:`run` decides them: what an exported step
        table records. Only for extensions whose choices need no engine output (``Extension.exportable``)."""
        refused = [ext.name for ext in self.method.extensions() if not ext.exportable]
        if refused:
            raise ValueError(f"{refused} choose engines from what the engines return: no plan ahead of a generation")
        runs = [run for ext in self.method.extensions() if (run := ext.start()) is not None]
        planned = []
        for step, timestep in enumerate(timesteps):
            if step:
                for run in runs:
                    run.new_step()
            position, key = self.key_for(timestep)
            notes: dict[str, Any] = {}
            for run in runs:
                key = run.choose(key, position, step, 0, notes)
            for run in runs:  # what a run keeps of an engine's output is not needed to choose: none is given
                run.after(0, key, EngineState(), notes)
            planned.append((key, notes))
        return planned

    def contract(self, shape: tuple[int, int]) -> EngineSignature:
        """A contract holding only the method's state, ``[B, N]`` (what a caller without extensions passes)."""
        return EngineSignature([self.method.state_tensor(*shape)])

    def run(
        self,
        timestep: torch.Tensor | float,
        layout: tuple,
        signature: EngineSignature | tuple[int, int],
        device: torch.device,
        call: EngineCall,
        first_block: FirstBlockCalls | None = None,
    ) -> Any:
        """Pick the engine for ``timestep``, run ``call(key, state)`` and keep the state it returns.

        ``layout`` is any hashable description of the batch layout (state is kept per layout); ``signature`` the
        engine contract (or the ``[B, N]`` shape of a contract holding only the method's state). ``call`` gets an
        :class:`~sdtm_compile.core.signature.EngineState` and returns ``(output, state)``. ``first_block`` runs
        the first-block cache's head and out engines (required with ``step_cache``). The state is the open
        :func:`generation`'s, else this dispatcher's default state.
        """
        if not isinstance(signature, EngineSignature):
            signature = self.contract(tuple(signature))  # type: ignore[arg-type]
        active = active_generation()
        if active is not None:  # the context's lock is held by whoever entered it
            return self._run(active._state, (id(self), layout), timestep, signature, device, call, first_block)
        if not self._default.lock.acquire(blocking=False):
            raise ConcurrentUseError(
                "two callers are running this model at the same time without a generation context, so they would "
                "share one generation's state. Wrap each generation in: with sdtm_compile.generation(model): ..."
            )
        try:
            return self._run(self._default, layout, timestep, signature, device, call, first_block)
        finally:
            self._default.lock.release()

    def _layout_state(
        self, owner: GenerationState, layout: tuple, t: float, signature: EngineSignature, device: torch.device
    ) -> tuple[LayoutState, bool, bool]:
        """The layout's state, advanced to the step of timestep ``t``; whether ``t`` starts a generation, a step."""
        state = owner.layouts.get(layout)
        new_generation = state is None or t > state.timestep
        new_step = new_generation or t < state.timestep  # type: ignore[union-attr]
        if new_generation:
            li = signature[METHOD_STATE].fresh(device)
            runs = [run for ext in self.method.extensions() if (run := ext.start()) is not None]
            state = LayoutState(t, li, li, runs)
            owner.layouts[layout] = state
            logger.debug("new generation for layout %s (timestep %.3f)", layout, t)
        elif new_step:
            assert state is not None
            state.li_step_start = state.li_latest
            state.step, state.call = state.step + 1, 0
            for run in state.runs:
                run.new_step()
        else:
            state.call += 1  # type: ignore[union-attr]
        assert state is not None
        state.timestep = t
        return state, new_generation, new_step

    def _run(
        self,
        owner: GenerationState,
        layout: tuple,
        timestep: torch.Tensor | float,
        signature: EngineSignature,
        device: torch.device,
        call: EngineCall,
        first_block: FirstBlockCalls | None,
    ) -> Any:
        position, key = self.key_for(timestep)
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        state, new_generation, new_step = self._layout_state(owner, layout, t, signature, device)
        notes: dict[str, Any] = {}
        fed: dict[str, torch.Tensor] = {}
        for run in state.runs:
            key = run.choose(key, position, state.step, state.call, notes)
            fed.update(run.inputs(state.call, signature, device))
        given = EngineState(state.li_step_start, **fed)

        def record(key: EngineKey, **extra: Any) -> None:
            if owner.history is not None:
                owner.history.append(
                    CallRecord(
                        t, position, key, new_generation, new_step, state.step, notes=MappingProxyType(notes), **extra
                    )
                )

        change, residual = None, None
        if self.step_cache is not None:
            if first_block is None:
                raise ValueError("a step cache is on, but the caller passed no first_block to StageDispatcher.run")
            first_in, *streams = first_block.head(given)
            first_out = streams[0]
            residual = first_out - first_in
            cached = state.first_block.get(state.call)
            if cached is not None:
                change = relative_change(cached[0], residual)
            skippable = all(run.may_skip(state.call, notes) for run in state.runs)  # e.g. not a protected step
            if (
                skippable
                and change is not None
                and self.step_cache.threshold > 0
                and change <= self.step_cache.threshold
            ):
                output = first_block.out(given, first_out + cached[1])  # type: ignore[index]
                state.li_latest = state.li_step_start  # nothing merged: the state stays as the step found it
                record(key, skipped=True, change=change)
                return output
        resumed = None
        if residual is not None and first_block.rest is not None:  # type: ignore[union-attr]
            resumed = first_block.rest(key, given, tuple(streams))  # type: ignore[union-attr]
        output, returned = call(key, given) if resumed is None else resumed
        result = returned if isinstance(returned, EngineState) else EngineState(returned)
        state.li_latest = result.li  # type: ignore[assignment]
        if residual is not None:
            if result.hidden is None:
                raise ValueError("a step cache is on, but the engine returned no last-block output")
            state.first_block[state.call] = (residual, result.hidden - first_out)
        for run in state.runs:
            run.after(state.call, key, result, notes)
        record(key, change=change, resumed=resumed is not None)
        return output
