"""`StageDispatcher`: picks the engine for each transformer call from its timestep and carries ``li``;
:func:`generation`: a context that owns the state of one generation.

The engines behind it are interchangeable: the eager reference, compiled per-bucket graphs, ONNX sessions.
Each caller passes :meth:`StageDispatcher.run` a ``call(key, state) -> (output, state)`` that runs its engine;
``state`` is an :class:`~sdtm_compile.engine_state.EngineState`: ``li``, the method's state (``[B, N]`` int32:
SDTM's "not attended" counter, or the random state of ToMeSD and SiTo), plus what an SDTM option carries. The
rules below hold for every method.

What the dispatcher decides besides the schedule's engine (DESIGN §3, §5):

* cache fusion (``SDTMConfig.cache_fusion``): steps are counted per generation; every ``protect_every``-th step
  (0, k, 2k, ...) is protected - it runs ``FULL``, whose cache output is kept, one cache per call index of the
  step (CFG as two calls keeps two) - and every other step passes the kept cache to its merged engine;
* SDTM* (``SDTMConfig.adaptive_threshold``): every engine returns a window statistic; from the second step on, the
  engine's bucket is ``0.75 x`` the previous step's smallest reading, rounded down to a bucket, in the stage the
  schedule gives (one host read per call);
* a step cache (:mod:`sdtm_compile.step_cache`, the backend's ``step_cache`` option): a head engine runs first and
  the rest of the model is skipped when the first block's residual barely changed.

State rules (DESIGN §5):

* a timestep *above* the last one seen for a batch layout starts a new generation: ``li`` is reset;
* a *lower* timestep starts a new step: the ``li`` left by the latest call becomes the step's start state;
* the *same* timestep again (CFG as two calls, skip-layer guidance) is the same step: the call starts from
  the step's start state again, so extra calls never advance ``li`` twice;
* state is kept per batch layout (shape, dtype, device of the latent), so a batch-2 and a batch-1 call do not
  share it. :meth:`StageDispatcher.reset` clears everything explicitly.

Who owns the state. Outside any context, each dispatcher has one default state and infers generations from
the timestep (above). That is wrong when two generations share one compiled model - two pipelines made with
``from_pipe``, a server - because they would share ``li``. :func:`generation` gives each its own::

    with sdtm_compile.generation(pipe.transformer) as gen:   # like diffusers' cache_context
        image = pipe(prompt).images[0]

Inside the context every SDTM engine call (compiled backend, ONNX bundle, eager reference) reads and writes the
context's state, keyed by dispatcher and batch layout. A context can be entered again later (to interleave
generations call by call) but not by two threads at once, nor nested in itself: that raises an error, as does
two threads calling one model at the same time without a context. Histories (:class:`CallRecord`) are off
by default and bounded when on.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .config import MAX_RATIO, MethodConfig, SDTMConfig
from .engine_state import EngineState
from .schedule import FULL, EngineKey, engine_key_at, position_from_timestep, round_to_bucket, stage_at
from .step_cache import FirstBlockCacheConfig, relative_change

__all__ = ["StageDispatcher", "FirstBlockCalls", "CallRecord", "Generation", "generation", "ConcurrentUseError"]

logger = logging.getLogger(__name__)


@dataclass
class _LayoutState:
    timestep: float
    li_step_start: torch.Tensor  # li as it stood when the current step began
    li_latest: torch.Tensor  # li after the latest call of the current step
    step: int = 0  # steps since the generation began (protected steps are counted on it)
    call: int = 0  # calls so far in the current step, minus one (the index of the latest)
    #: cache fusion: the cache each call of a protected step stored, by the call's index within its step (CFG as
    #: two calls keeps one cache per branch of the guidance)
    caches: dict[int, torch.Tensor] = field(default_factory=dict)
    readings: list[float] = field(default_factory=list)  # SDTM*: this step's statistics (min over the batch)
    adaptive_ratio: float | None = None  # SDTM*: the ratio the previous step's statistics picked
    #: first-block cache, by call index within a step: (first block residual, last - first block output) of the
    #: last computed step
    first_block: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class CallRecord:
    """What one call did (kept in :attr:`StageDispatcher.history` for demos, plots and tests)."""

    timestep: float
    position: float
    key: EngineKey
    new_generation: bool
    new_step: bool
    step: int = 0  #: the step's index in its generation
    protected: bool = False  #: cache fusion: a protected step (runs ``FULL`` and stores the cache)
    statistic: float | None = None  #: SDTM*: the statistic this call returned (min over the batch)
    adaptive_ratio: float | None = None  #: SDTM*: the ratio the previous step picked for this one
    skipped: bool = False  #: first-block cache: the blocks after the first were skipped (``key`` did not run)
    change: float | None = None  #: first-block cache: the first block's relative residual change


class ConcurrentUseError(RuntimeError):
    """One generation state used by two callers at once (two threads, or a context nested in itself)."""


class _State:
    """``li`` per (dispatcher, batch layout), an optional bounded history, and a lock against concurrent use."""

    def __init__(self, history: int) -> None:
        if not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be a number of calls >= 0 (0 = off), got {history!r}")
        self.layouts: dict[tuple, _LayoutState] = {}
        self.history: deque[CallRecord] | None = deque(maxlen=history) if history else None
        self.lock = threading.Lock()

    def clear(self) -> None:
        self.layouts.clear()
        if self.history is not None:
            self.history.clear()


_ACTIVE: contextvars.ContextVar[Generation | None] = contextvars.ContextVar("sdtm_generation", default=None)


class Generation:
    """The SDTM state of one generation (see the module docstring); make one with :func:`generation`.

    Attributes:
        model: what the context was opened for (informational: every SDTM call inside the context uses it).
        history: the calls made inside the context, oldest first (at most ``history`` of them; empty when off).
    """

    def __init__(self, model: Any = None, *, history: int = 0) -> None:
        self.model = model
        self._state = _State(history)
        self._token: contextvars.Token | None = None

    @property
    def history(self) -> list[CallRecord]:
        return list(self._state.history or ())

    def reset(self) -> None:
        """Forget this generation's state (as if it had never run)."""
        self._state.clear()

    def __enter__(self) -> Generation:
        if not self._state.lock.acquire(blocking=False):
            raise ConcurrentUseError(
                "this sdtm_compile.generation context is already open (in another thread, or around this one): "
                "one generation's state cannot be advanced by two callers at once. Open one context per "
                "generation: with sdtm_compile.generation(model): ..."
            )
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _ACTIVE.reset(self._token)
        self._token = None
        self._state.lock.release()


def generation(model: Any = None, *, history: int = 0) -> Generation:
    """A context owning the SDTM state of one generation: ``with sdtm_compile.generation(pipe.transformer): ...``.

    Args:
        model: the SDTM-compiled transformer (or ``OnnxTransformer``) the generation runs on.
        history: keep a :class:`CallRecord` of the last ``history`` calls made inside the context (0: none).

    The same :class:`Generation` may be entered several times (one ``with`` per call interleaves generations
    call by call); it must not be open twice at once.
    """
    return Generation(model, history=history)


class FirstBlockCalls(NamedTuple):
    """What the first-block cache (:mod:`sdtm_compile.step_cache`) needs from a caller besides ``call``."""

    head: Callable[[EngineState], tuple[torch.Tensor, torch.Tensor]]  #: -> the first block's image (input, output)
    out: Callable[[EngineState, torch.Tensor], Any]  #: the model's output from the last block's image output


class StageDispatcher:
    """Runs each call on the engine of the (stage, bucket) its timestep maps to, carrying ``li``.

    Args:
        config: the method's configuration (schedule, buckets, timestep shift; any method's config).
        history: how many recent calls the default state (outside any :func:`generation`) records as a
            :class:`CallRecord` (0, the default: none; cleared by :meth:`reset`).
        step_cache: a first-block cache (:mod:`sdtm_compile.step_cache`): every call then runs the caller's head
            engine first and may skip to its out engine (``None``, the default: no step cache).
    """

    def __init__(self, config: MethodConfig, history: int = 0, step_cache: FirstBlockCacheConfig | None = None) -> None:
        self.config = config
        self.step_cache = step_cache
        self._default = _State(history)

    @property
    def history(self) -> list[CallRecord]:
        """The calls made outside any :func:`generation` context, oldest first (empty unless ``history`` > 0)."""
        return list(self._default.history or ())

    def reset(self) -> None:
        """Forget the default state (``li`` of every batch layout) and its history; contexts keep theirs."""
        self._default.clear()

    def _init_state(self, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """The method's state at the start of a generation (SDTM: ``li`` zeros; ToMeSD / SiTo: their seeded
        random state)."""
        from .methods import method_for

        return method_for(self.config).init_state(batch, num_tokens, device)

    def key_for(self, timestep: torch.Tensor | float) -> tuple[float, EngineKey]:
        """The trajectory position of ``timestep`` and the engine that serves it."""
        position = position_from_timestep(timestep, self.config)
        return position, engine_key_at(position, self.config)

    def run(
        self,
        timestep: torch.Tensor | float,
        layout: tuple,
        li_shape: tuple[int, int],
        device: torch.device,
        call: Callable[[EngineKey, EngineState], tuple[Any, EngineState | torch.Tensor]],
        new_cache: Callable[[], torch.Tensor] | None = None,
        first_block: FirstBlockCalls | None = None,
    ) -> Any:
        """Pick the engine for ``timestep``, run ``call(key, state)`` and keep the state it returns.

        ``layout`` is any hashable description of the batch layout (state is kept per layout) and
        ``li_shape`` the ``[B, N]`` shape of a fresh counter. ``call`` gets an
        :class:`~sdtm_compile.engine_state.EngineState` (``li``, and with cache fusion the cache) and returns
        ``(output, state)`` (a bare ``li`` tensor is fine when there is nothing else). ``new_cache`` makes an empty
        cache (required with cache fusion); ``first_block`` runs the first-block cache's head and out engines
        (required with ``step_cache``). The state is the open :func:`generation`'s, else this dispatcher's
        default state.
        """
        active = _ACTIVE.get()
        if active is not None:  # the context's lock is held by whoever entered it
            return self._run(
                active._state, (id(self), layout), timestep, li_shape, device, call, new_cache, first_block
            )
        if not self._default.lock.acquire(blocking=False):
            raise ConcurrentUseError(
                "two callers are running this SDTM model at the same time without a generation context, so they "
                "would share one li state. Wrap each generation in: with sdtm_compile.generation(model): ..."
            )
        try:
            return self._run(self._default, layout, timestep, li_shape, device, call, new_cache, first_block)
        finally:
            self._default.lock.release()

    def _pick(self, state: _LayoutState, position: float, key: EngineKey) -> tuple[EngineKey, bool]:
        """The engine a call runs (the schedule's ``key``, overridden by SDTM* and cache fusion) and whether the
        step is protected."""
        config = self.config
        if not isinstance(config, SDTMConfig):
            return key, False
        if config.adaptive and state.adaptive_ratio is not None:
            bucket = round_to_bucket(state.adaptive_ratio, config.buckets)
            key = FULL if bucket == 0.0 else EngineKey(stage_at(position, config), bucket)
        if config.fuses_cache and (state.step % config.protect_every == 0 or state.call not in state.caches):
            return FULL, True  # a call with no stored cache (e.g. a third guidance call) runs unmerged too
        return key, False

    def _run(
        self,
        owner: _State,
        layout: tuple,
        timestep: torch.Tensor | float,
        li_shape: tuple[int, int],
        device: torch.device,
        call: Callable[[EngineKey, EngineState], tuple[Any, EngineState | torch.Tensor]],
        new_cache: Callable[[], torch.Tensor] | None,
        first_block: FirstBlockCalls | None,
    ) -> Any:
        position, key = self.key_for(timestep)
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        state = owner.layouts.get(layout)
        new_generation = state is None or t > state.timestep
        new_step = new_generation or t < state.timestep  # type: ignore[union-attr]
        if new_generation:
            li = self._init_state(*li_shape, device=device)
            state = _LayoutState(t, li, li)
            owner.layouts[layout] = state
            logger.debug("new generation for layout %s (timestep %.3f)", layout, t)
        elif new_step:
            assert state is not None
            state.li_step_start = state.li_latest
            state.step, state.call = state.step + 1, 0
            if state.readings:  # SDTM*: the previous step's smallest fraction of similar windows
                # each merged 2x2 window removes 3 of its 4 tokens: ratio = 0.75 * fraction of windows merged
                state.adaptive_ratio = MAX_RATIO * min(state.readings)
                state.readings = []
        else:
            state.call += 1  # type: ignore[union-attr]
        assert state is not None
        state.timestep = t
        key, protected = self._pick(state, position, key)
        cache = None
        if isinstance(self.config, SDTMConfig) and self.config.fuses_cache:
            if new_cache is None:
                raise ValueError("cache fusion is on, but the caller passed no new_cache to StageDispatcher.run")
            # a protected step's engine does not read its cache input: the stored one (or, before the first
            # protected step of this call index, an empty one) only fills the slot
            cache = state.caches.get(state.call)
            if cache is None:
                cache = new_cache()
        given = EngineState(state.li_step_start, cache)
        change, residual = None, None
        if self.step_cache is not None:
            if first_block is None:
                raise ValueError("a step cache is on, but the caller passed no first_block to StageDispatcher.run")
            first_in, first_out = first_block.head(given)
            residual = first_out - first_in
            cached = state.first_block.get(state.call)
            if cached is not None:
                change = relative_change(cached[0], residual)
            if change is not None and self.step_cache.threshold > 0 and change <= self.step_cache.threshold:
                output = first_block.out(given, first_out + cached[1])  # type: ignore[index]
                state.li_latest = state.li_step_start  # nothing merged: the state stays as the step found it
                if owner.history is not None:
                    owner.history.append(
                        CallRecord(t, position, key, new_generation, new_step, state.step, skipped=True, change=change)
                    )
                return output
        output, returned = call(key, given)
        result = returned if isinstance(returned, EngineState) else EngineState(returned)
        state.li_latest = result.li
        if residual is not None:
            if result.hidden is None:
                raise ValueError("a step cache is on, but the engine returned no last-block output")
            state.first_block[state.call] = (residual, result.hidden - first_out)
        if protected:
            state.caches[state.call] = result.cache  # type: ignore[assignment]
        reading = None
        if result.stat is not None:
            reading = float(result.stat.min())  # one host read per call
            state.readings.append(reading)
        if owner.history is not None:
            owner.history.append(
                CallRecord(
                    t,
                    position,
                    key,
                    new_generation,
                    new_step,
                    state.step,
                    protected,
                    reading,
                    state.adaptive_ratio,
                    change=change,
                )
            )
        return output
