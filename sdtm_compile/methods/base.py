"""What several methods share: :class:`WindowMethod` (one kept token per window, a constant ratio) and the random
state the engines carry for methods that draw random numbers."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..core.method import ATTENTION_BRANCHES, FEED_FORWARD_BRANCHES, TokenMethod
from ..core.schedule import EngineKey, Stage

__all__ = [
    "WindowMethod",
    "window_method_count",
    "seeded_state",
    "advance_state",
    "state_uniform",
    "STATE_MODULUS",
]


class WindowMethod(TokenMethod):
    """A one-stage method that keeps one token per ``sy x sx`` window and removes ``int(N * ratio)`` others
    (ToMeSD, SiTo): its config has ``sx``, ``sy`` and two flags, named by :attr:`attention_flag` and
    :attr:`feed_forward_flag`, for the branches it reduces."""

    attention_flag: ClassVar[str]
    feed_forward_flag: ClassVar[str]

    def merged_branches(self, stage: Stage, family: str) -> tuple[str, ...]:
        if stage is Stage.FULL:
            return ()
        attention = ATTENTION_BRANCHES if getattr(self.config, self.attention_flag) else ()
        return attention + (FEED_FORWARD_BRANCHES if getattr(self.config, self.feed_forward_flag) else ())

    def removed(self, key: EngineKey, grid_h: int, grid_w: int) -> int:
        """Tokens the engine of ``key`` removes (see :func:`window_method_count`)."""
        config = self.config
        return window_method_count(key.bucket, grid_h, grid_w, config.sy, config.sx)  # type: ignore[attr-defined]

    def merged_tokens(self, key: EngineKey, grid_h: int, grid_w: int) -> int:
        n = grid_h * grid_w
        return n if key.stage is Stage.FULL else n - self.removed(key, grid_h, grid_w)


def window_method_count(bucket: float, grid_h: int, grid_w: int, sy: int = 2, sx: int = 2) -> int:
    """Tokens a ToMeSD / SiTo engine removes: ``int(N * ratio)`` as both codes compute it, at most the tokens left
    once every ``sy x sx`` window keeps one."""
    n = grid_h * grid_w
    return min(int(n * bucket), n - (grid_h // sy) * (grid_w // sx))


# -- the random state ---------------------------------------------------------------------------------------------
# ToMeSD and SiTo draw random numbers in every block of every step. An engine cannot call randint (the backends
# would disagree), so the numbers are a state [B, N] int32 that enters the engine as an input, seeded
# per generation, and that every block advances with a 16-bit linear congruential step - plain integer arithmetic
# every backend computes alike (25173 * 65535 + 13849 < 2^31: no int32 overflow). Low bits of such a generator
# repeat quickly, so values are read from the high bits.

#: The state's values lie in ``[0, STATE_MODULUS)``.
STATE_MODULUS = 65536


def seeded_state(seed: int, shape: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh random state of ``shape`` (int32 in ``[0, 65536)``), the same for the same ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, STATE_MODULUS, shape, generator=generator, dtype=torch.int32).to(device)


def advance_state(state: torch.Tensor) -> torch.Tensor:
    """The next value of every entry of the state (one LCG step)."""
    return (state * 25173 + 13849) % STATE_MODULUS


def state_uniform(state: torch.Tensor) -> torch.Tensor:
    """A float32 in ``(0, 1)`` per entry, from the state's value."""
    return (state.float() + 0.5) / STATE_MODULUS
