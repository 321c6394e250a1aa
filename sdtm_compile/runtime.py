"""`StageDispatcher`: picks the engine for each transformer call from its timestep and carries ``li``;
:func:`generation`: a context that owns the state of one generation.

The engines behind it are interchangeable: the eager reference, compiled per-bucket graphs, ONNX sessions.
Each caller passes :meth:`StageDispatcher.run` a ``call(key, li) -> (output, li)`` that runs its engine.
``li`` is the method's state (``[B, N]`` int32): SDTM's "not attended" counter, or the random state of ToMeSD
and SiTo (:mod:`sdtm_compile.methods`); the rules below hold for every method.

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
from dataclasses import dataclass
from typing import Any

import torch

from .config import MethodConfig
from .schedule import EngineKey, engine_key_at, position_from_timestep

__all__ = ["StageDispatcher", "CallRecord", "Generation", "generation", "ConcurrentUseError"]

logger = logging.getLogger(__name__)


@dataclass
class _LayoutState:
    timestep: float
    li_step_start: torch.Tensor  # li as it stood when the current step began
    li_latest: torch.Tensor  # li after the latest call of the current step


@dataclass(frozen=True)
class CallRecord:
    """What one call did (kept in :attr:`StageDispatcher.history` for demos, plots and tests)."""

    timestep: float
    position: float
    key: EngineKey
    new_generation: bool
    new_step: bool


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


class StageDispatcher:
    """Runs each call on the engine of the (stage, bucket) its timestep maps to, carrying ``li``.

    Args:
        config: the method's configuration (schedule, buckets, timestep shift; any method's config).
        history: how many recent calls the default state (outside any :func:`generation`) records as a
            :class:`CallRecord` (0, the default: none; cleared by :meth:`reset`).
    """

    def __init__(self, config: MethodConfig, history: int = 0) -> None:
        self.config = config
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
        call: Callable[[EngineKey, torch.Tensor], tuple[Any, torch.Tensor]],
    ) -> Any:
        """Pick the engine for ``timestep``, run ``call(key, li)`` and keep the ``li`` it returns.

        ``layout`` is any hashable description of the batch layout (state is kept per layout) and
        ``li_shape`` the ``[B, N]`` shape of a fresh counter. ``call`` returns ``(output, li)``. The state is the
        open :func:`generation`'s, else this dispatcher's default state.
        """
        active = _ACTIVE.get()
        if active is not None:  # the context's lock is held by whoever entered it
            return self._run(active._state, (id(self), layout), timestep, li_shape, device, call)
        if not self._default.lock.acquire(blocking=False):
            raise ConcurrentUseError(
                "two callers are running this SDTM model at the same time without a generation context, so they "
                "would share one li state. Wrap each generation in: with sdtm_compile.generation(model): ..."
            )
        try:
            return self._run(self._default, layout, timestep, li_shape, device, call)
        finally:
            self._default.lock.release()

    def _run(
        self,
        owner: _State,
        layout: tuple,
        timestep: torch.Tensor | float,
        li_shape: tuple[int, int],
        device: torch.device,
        call: Callable[[EngineKey, torch.Tensor], tuple[Any, torch.Tensor]],
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
            state.li_step_start = state.li_latest  # type: ignore[union-attr]
        assert state is not None
        state.timestep = t
        output, state.li_latest = call(key, state.li_step_start)
        if owner.history is not None:
            owner.history.append(CallRecord(t, position, key, new_generation, new_step))
        return output
