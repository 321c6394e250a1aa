"""Who owns a generation's state: :func:`generation`, a context like diffusers' ``cache_context``.

Outside any context, each dispatcher (:class:`~sdtm_compile.runtime.dispatcher.StageDispatcher`) has one default
state and infers generations from the timestep. That is wrong when two generations share one compiled model - two
pipelines made with ``from_pipe``, a server - because they would share the method's state. :func:`generation` gives
each its own::

    with sdtm_compile.generation(pipe.transformer) as gen:   # like diffusers' cache_context
        image = pipe(prompt).images[0]

Inside the context every engine call (compiled backend, ONNX bundle, eager reference) reads and writes the
context's state, keyed by dispatcher and batch layout. A context can be entered again later (to interleave
generations call by call) but not by two threads at once, nor nested in itself: that raises
:class:`ConcurrentUseError`, as does two threads calling one model at the same time without a context. Histories
(:class:`CallRecord`) are off by default and bounded when on.
"""

from __future__ import annotations

import contextvars
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.schedule import EngineKey

__all__ = ["CallRecord", "ConcurrentUseError", "Generation", "generation", "active_generation"]


@dataclass(frozen=True)
class CallRecord:
    """What one call did (kept in :attr:`StageDispatcher.history` for demos, plots and tests).

    ``notes`` holds what the method's extensions noted for the call, by name (their
    :class:`~sdtm_compile.core.extension.ExtensionRun` writes them; SDTM's: ``protected``, ``statistic``,
    ``adaptive_ratio``); a note reads as an attribute too (``record.statistic``).
    """

    timestep: float
    position: float
    key: EngineKey
    new_generation: bool
    new_step: bool
    step: int = 0  #: the step's index in its generation
    skipped: bool = False  #: first-block cache: the blocks after the first were skipped (``key`` did not run)
    change: float | None = None  #: first-block cache: the first block's relative residual change
    #: first-block cache: the step's engine resumed from the head's first-block outputs (did not run that block again)
    resumed: bool = False
    notes: Mapping[str, Any] = field(default_factory=dict)  #: the extensions' notes, by name

    def __getattr__(self, name: str) -> Any:
        # only reached for a name that is not a field: the extensions' notes
        notes = self.__dict__.get("notes", {})
        if name in notes:
            return notes[name]
        raise AttributeError(
            f"CallRecord has no field or note {name!r}; this call's notes: {sorted(notes) or 'none'} (a note is "
            "written by the extension that owns it, when the config turns it on)"
        )


class ConcurrentUseError(RuntimeError):
    """One generation state used by two callers at once (two threads, or a context nested in itself)."""


class GenerationState:
    """The state per (dispatcher, batch layout) (:class:`~sdtm_compile.runtime.dispatcher.LayoutState`), an
    optional bounded history, and a lock against concurrent use."""

    def __init__(self, history: int) -> None:
        if not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be a number of calls >= 0 (0 = off), got {history!r}")
        self.layouts: dict[tuple, Any] = {}
        self.history: deque[CallRecord] | None = deque(maxlen=history) if history else None
        self.lock = threading.Lock()

    def clear(self) -> None:
        self.layouts.clear()
        if self.history is not None:
            self.history.clear()


_ACTIVE: contextvars.ContextVar[Generation | None] = contextvars.ContextVar("sdtm_generation", default=None)


class Generation:
    """The state of one generation (see the module docstring); make one with :func:`generation`.

    Attributes:
        model: what the context was opened for (informational: every SDTM call inside the context uses it).
        history: the calls made inside the context, oldest first (at most ``history`` of them; empty when off).
    """

    def __init__(self, model: Any = None, *, history: int = 0) -> None:
        self.model = model
        self._state = GenerationState(history)
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
    """A context owning the state of one generation: ``with sdtm_compile.generation(pipe.transformer): ...``.

    Args:
        model: the compiled transformer (or ``OnnxTransformer``, or a reference) the generation runs on.
        history: keep a :class:`CallRecord` of the last ``history`` calls made inside the context (0: none).

    The same :class:`Generation` may be entered several times (one ``with`` per call interleaves generations
    call by call); it must not be open twice at once.
    """
    return Generation(model, history=history)


def active_generation() -> Generation | None:
    """The :func:`generation` context open in this thread (or task), or ``None``."""
    return _ACTIVE.get()
