"""What an engine takes and returns besides the model's own inputs and outputs: the dispatcher's state.

Every engine takes ``li`` (the method's ``[B, N]`` int32 state) after the model's inputs and returns it after the
model's outputs. Two SDTM options add to that, in this order:

* cache fusion (``SDTMConfig.cache_fusion``): the cache ``[K, B, N, C]`` (one gated branch output per cached
  branch, see :func:`sdtm_compile.passes.cache_slots`) is an input *and* an output of every engine: the unmerged
  engine returns what it stored, a merged engine returns its input unchanged;
* SDTM* (``SDTMConfig.adaptive_threshold``): a ``[B]`` float32 statistic is one more output of every engine.

So an engine is ``engine(*model_inputs, *state.engine_inputs()) -> (*model_outputs, *state_outputs)``, and
:func:`split_engine_outputs` reads the tail back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import MethodConfig, SDTMConfig

__all__ = ["EngineState", "state_inputs", "state_outputs", "split_engine_outputs"]


class EngineState(NamedTuple):
    """The state one engine call takes (``li``, ``cache``) or returns (``li``, ``cache``, ``stat``)."""

    li: torch.Tensor  #: ``[B, N]`` int32: SDTM's "not attended" counter, or another method's state
    cache: torch.Tensor | None = None  #: ``[K, B, N, C]``: gated branch outputs of the last protected step
    stat: torch.Tensor | None = None  #: ``[B]`` float32: SDTM*'s window statistic (an output only)
    #: ``[B, N, C]``: the last block's image output, when the backend's first-block cache asks for it (output only)
    hidden: torch.Tensor | None = None

    def engine_inputs(self) -> tuple[torch.Tensor, ...]:
        """What follows the model's inputs in an engine call."""
        return (self.li,) if self.cache is None else (self.li, self.cache)


def _sdtm(config: MethodConfig) -> SDTMConfig | None:
    return config if isinstance(config, SDTMConfig) else None


def state_inputs(config: MethodConfig) -> tuple[str, ...]:
    """Names of the state inputs of every engine of ``config``: ``("li",)`` or ``("li", "cache")``."""
    sdtm = _sdtm(config)
    return ("li", "cache") if sdtm is not None and sdtm.fuses_cache else ("li",)


def state_outputs(config: MethodConfig) -> tuple[str, ...]:
    """Names of the outputs every engine of ``config`` adds after the model's: ``li`` [, ``cache``] [, ``stat``]."""
    sdtm = _sdtm(config)
    stat = ("stat",) if sdtm is not None and sdtm.adaptive else ()
    return (*state_inputs(config), *stat)


def split_engine_outputs(outputs: tuple | list, config: MethodConfig) -> tuple[tuple, EngineState]:
    """An engine's outputs -> ``(model outputs, EngineState)``."""
    names = state_outputs(config)
    head, tail = tuple(outputs[: -len(names)]), outputs[-len(names) :]
    return head, EngineState(**dict(zip(names, tail)))
