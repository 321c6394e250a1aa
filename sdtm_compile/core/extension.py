"""Extensions: what a method adds to every engine beyond its plans (SDTM's cache fusion, SDTM*, size-aware
attention), declared in five parts so that no code outside the method needs to know it exists.

An :class:`Extension` says

* which models it can run on (:meth:`Extension.check`);
* the state it adds to the engine contract (:meth:`Extension.state`: e.g. a cache carried from step to step, a
  reading every engine returns);
* the graph passes that rewrite each engine for it (:meth:`Extension.passes`; the pipeline places them, see
  :func:`sdtm_compile.passes.build_pipeline`);
* what the eager reference does for it, call by call (:meth:`Extension.reference`: a :class:`ReferenceHooks`);
* what the dispatcher decides for it, step by step (:meth:`Extension.start`: an :class:`ExtensionRun` per
  generation and batch layout: which engine a call runs, which state it is fed, what is kept of its result).

Every part defaults to nothing, so an extension implements only what it changes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .layout import ModelLayout
from .merge import MergePlan
from .schedule import EngineKey
from .signature import EngineSignature, EngineState, StateTensor

__all__ = ["Extension", "ExtensionRun", "ReferenceHooks"]


class ExtensionRun:
    """An extension's part of one generation's state, for one batch layout (made by :meth:`Extension.start`).

    The dispatcher calls, for every transformer call: :meth:`new_step` when the call starts a new step (not for a
    generation's first), :meth:`choose` to let it change the engine, :meth:`inputs` for the state it feeds,
    :meth:`may_skip` when a step cache would skip the call, and :meth:`after` with what the engine returned.
    ``notes`` become the call's record's notes (:attr:`CallRecord.notes <sdtm_compile.runtime.CallRecord>`: SDTM's
    ``protected``, ``statistic``, ``adaptive_ratio``): a run writes each of its notes on every call (``None`` where
    it has no value), so that every record of a generation has them.
    """

    def new_step(self) -> None:
        """A new step of the generation begins."""

    def choose(self, key: EngineKey, position: float, step: int, call: int, notes: dict[str, Any]) -> EngineKey:
        """The engine call ``call`` of step ``step`` runs (``key``: what the schedule, and the extensions before
        this one, chose)."""
        return key

    def inputs(self, call: int, signature: EngineSignature, device: torch.device) -> dict[str, torch.Tensor]:
        """State this extension feeds the engine (by name), besides the method's ``li``."""
        return {}

    def may_skip(self, call: int, notes: dict[str, Any]) -> bool:
        """Whether the backend's step cache may skip this call (``notes``: what :meth:`choose` wrote). A skipped
        call runs no engine past the step cache's head: it reads nothing this extension feeds and :meth:`after` is
        not called."""
        return True

    def after(self, call: int, key: EngineKey, result: EngineState, notes: dict[str, Any]) -> None:
        """The engine of call ``call`` returned ``result`` (every output entry of the signature)."""


class ReferenceHooks:
    """An extension's part of one eager reference call (made by :meth:`Extension.reference`).

    The reference calls them where the compiled passes rewrite the graph, so both run the same arithmetic:
    """

    def before_blocks(self, plan_input: torch.Tensor, li: torch.Tensor) -> None:
        """The first block's plan input ``[B, N, C]`` and the ``li`` the call started with, before any block."""

    def attention_bias(self, plan: MergePlan, text_tokens: int, text_first: bool) -> torch.Tensor | None:
        """An additive key bias for a merged attention (``[B, 1, 1, M + T]``), or ``None``."""
        return None

    def observes(self, block: int, branch: str) -> bool:
        """Whether :meth:`gated` must see this branch's gated output on its own: a Flux single block gates the sum
        of its attention and MLP columns, and computes them apart only when asked."""
        return False

    def gated(self, block: int, branch: str, value: torch.Tensor, li: torch.Tensor | None) -> torch.Tensor:
        """A branch's gated output ``[B, N, C]`` (after its gate multiply, before the residual add); ``li``: the
        state after the block's plan when the branch was merged, else ``None``. Returns what is added."""
        return value

    def outputs(self) -> dict[str, torch.Tensor]:
        """The state entries this call returns (by name), e.g. a stored cache or a reading."""
        return {}


class Extension:
    """One extension of a method (see the module docstring)."""

    #: its name, for errors and for ``sdtm-compile passes``
    name: ClassVar[str] = ""
    #: whether the backend's first-block step cache may run beside it (``False`` for an extension whose state
    #: cannot survive a skipped step; see :meth:`ExtensionRun.may_skip` for one that only forbids some skips)
    composes_with_step_cache: ClassVar[bool] = True
    #: whether an exported bundle (ONNX, Triton) can run it: its state carried from call to call and its engine
    #: choice a function of the step alone, so that a step table written at export time holds it (``False`` for
    #: SDTM*, which picks each step's bucket from the previous step's reading)
    exportable: ClassVar[bool] = True

    def check(self, layout: ModelLayout) -> str | None:
        """Why this extension cannot run on a model of ``layout``, or ``None``."""
        return None

    def state(self, layout: ModelLayout) -> tuple[StateTensor, ...]:
        """The state entries it adds to the engine contract."""
        return ()

    def passes(self) -> tuple[Any, ...]:
        """The graph passes (:class:`sdtm_compile.passes.GraphPass`) it adds to every engine's rewrite."""
        return ()

    def reference(self, state: EngineState, key: EngineKey, layout: ModelLayout) -> ReferenceHooks | None:
        """Its hooks for one eager reference call on the engine of ``key`` fed ``state``, or ``None``."""
        return None

    def start(self) -> ExtensionRun | None:
        """Its state for one generation and batch layout in the dispatcher, or ``None`` (nothing to decide)."""
        return None
