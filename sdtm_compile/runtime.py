"""`StageDispatcher`: picks the engine for each transformer call from its timestep and carries ``li``.

The engines behind it are interchangeable: the eager reference, compiled per-bucket graphs, ONNX sessions.
Each caller passes :meth:`StageDispatcher.run` a ``call(key, li) -> (output, li)`` that runs its engine.

State rules (DESIGN §5):

* a timestep *above* the last one seen for a batch layout starts a new generation: ``li`` is reset;
* a *lower* timestep starts a new step: the ``li`` left by the latest call becomes the step's start state;
* the *same* timestep again (CFG as two calls, skip-layer guidance) is the same step: the call starts from
  the step's start state again, so extra calls never advance ``li`` twice;
* state is kept per batch layout (shape, dtype, device of the latent), so a batch-2 and a batch-1 call do not
  share it. :meth:`StageDispatcher.reset` clears everything explicitly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import SDTMConfig
from .merge import init_li
from .schedule import EngineKey, engine_key_at, position_from_timestep

__all__ = ["StageDispatcher", "CallRecord"]

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


class StageDispatcher:
    """Runs each call on the engine of the (stage, bucket) its timestep maps to, carrying ``li``.

    Args:
        config: the SDTM configuration (schedule, buckets, timestep shift).
        keep_history: record a :class:`CallRecord` per call (cleared by :meth:`reset`).
    """

    def __init__(self, config: SDTMConfig, keep_history: bool = True) -> None:
        self.config = config
        self.keep_history = keep_history
        self.history: list[CallRecord] = []
        self._states: dict[tuple, _LayoutState] = {}

    def reset(self) -> None:
        """Forget all generation state (``li`` of every batch layout) and the call history."""
        self._states.clear()
        self.history.clear()

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
        ``li_shape`` the ``[B, N]`` shape of a fresh counter. ``call`` returns ``(output, li)``.
        """
        position, key = self.key_for(timestep)
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        state = self._states.get(layout)
        new_generation = state is None or t > state.timestep
        new_step = new_generation or t < state.timestep  # type: ignore[union-attr]
        if new_generation:
            li = init_li(*li_shape, device=device)
            state = _LayoutState(t, li, li)
            self._states[layout] = state
            logger.debug("new generation for layout %s (timestep %.3f)", layout, t)
        elif new_step:
            state.li_step_start = state.li_latest  # type: ignore[union-attr]
        assert state is not None
        state.timestep = t
        output, state.li_latest = call(key, state.li_step_start)
        if self.keep_history:
            self.history.append(CallRecord(t, position, key, new_generation, new_step))
        return output
