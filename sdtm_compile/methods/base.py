"""The method interface: what a token-reduction method tells the passes, the dispatcher, export and the lint.

A method is a config (a :class:`~sdtm_compile.config.MethodConfig` subclass, validated when built) and a
:class:`TokenMethod` that answers, for that config:

* the schedule: which engine (stage, ratio bucket) serves a trajectory position, and every engine a generation
  can reach (:meth:`TokenMethod.engine_key_at`, :meth:`TokenMethod.engines_for_trajectory`);
* the plan: which plan function an engine runs and with which static count (:meth:`TokenMethod.plan_spec`; the
  plan function is registered by name with :func:`plan_method`), which branches it merges
  (:meth:`TokenMethod.merged_branches`) and which blocks make, reuse or skip a plan
  (:meth:`TokenMethod.block_plans`);
* the state the engines carry from block to block and step to step, ``[B, N]`` int32 (SDTM's ``li``; a random
  state for methods that draw random numbers): its value at the start of a generation
  (:meth:`TokenMethod.init_state`).

How to merge and unmerge follows from the plan's form (:class:`~sdtm_compile.merge.MergePlan`: gather/mean,
scatter-add, or matmuls with a soft assignment). Adding a method is one module in this package: its config, its
plan function, its :class:`TokenMethod` subclass decorated with :func:`register_method`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from ..config import MethodConfig
from ..merge import PLAN_METHODS, MergePlan, PlanSpec
from ..schedule import FULL, EngineKey, Stage, TokenCounts, round_to_bucket

__all__ = [
    "TokenMethod",
    "WindowMethod",
    "register_method",
    "method_for",
    "plan_method",
    "plan_sources",
    "window_method_count",
    "METHODS",
    "seeded_state",
    "advance_state",
    "state_uniform",
    "STATE_MODULUS",
    "ATTENTION_BRANCHES",
    "FEED_FORWARD_BRANCHES",
]

#: Branch names (see :data:`sdtm_compile.merge.MERGED_BRANCHES`): joint attention and SD3.5's second attention;
#: the feed-forward (SD3 blocks and Flux double blocks) and the MLP part of a Flux single block.
ATTENTION_BRANCHES = ("attn", "attn2")
FEED_FORWARD_BRANCHES = ("ff", "mlp")


class TokenMethod:
    """One token-reduction method under one config (subclass per method; see the module docstring)."""

    #: the config class this method takes (each subclass sets it; :func:`register_method` keys the registry by it)
    config_class: ClassVar[type[MethodConfig]]

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {config!r}")
        self.config = config

    # -- the schedule (the dispatcher's part) -------------------------------------------------------------------

    def engine_key_at(self, position: float) -> EngineKey:
        """The engine at trajectory position ``position`` in ``[0, 1]``. Default: one stage (``MERGE``) at the
        config's ratio, rounded down to a bucket, at every step."""
        bucket = round_to_bucket(self.config.ratio, self.config.buckets) if self.config.enabled else 0.0
        return FULL if bucket == 0.0 else EngineKey(Stage.MERGE, bucket)

    def engines_for_trajectory(self) -> list[EngineKey]:
        """Every engine any step count can reach (what the compiler builds). Default: the one of
        :meth:`engine_key_at`."""
        return [self.engine_key_at(0.0)]

    # -- the plan -------------------------------------------------------------------------------------------------

    def plan_spec(self, key: EngineKey, grid_h: int, grid_w: int) -> PlanSpec:
        """The plan function (by name), its static count and options for the engine of ``key``."""
        raise NotImplementedError

    def merged_branches(self, stage: Stage, family: str) -> tuple[str, ...]:
        """Branch names merged in ``stage`` on a model of ``family`` (``sd3`` / ``flux``); names a block does
        not have are ignored for it."""
        raise NotImplementedError

    def merged_tokens(self, key: EngineKey, grid_h: int, grid_w: int) -> int:
        """``M``, the merged length of the engine of ``key`` (``N`` for ``FULL``)."""
        raise NotImplementedError

    def check_grid(self, grid_h: int, grid_w: int) -> str | None:
        """Why the method cannot merge a ``grid_h x grid_w`` token grid, or ``None`` when it can (checked once
        per compile, before any rewrite). Default: any grid."""
        return None

    def block_plans(self, kinds: Sequence[str]) -> list[int | None]:
        """For blocks of these kinds (``joint``, ``double``, ``single``, in model order): ``None`` for a block
        left unmerged, else the index of the block whose plan it uses (its own index: it makes one). Default:
        every block makes its own plan."""
        return list(range(len(kinds)))

    def token_counts(self, key: EngineKey, grid_h: int, grid_w: int, family: str) -> TokenCounts:
        """Image tokens each part of a (merged) block sees in the engine of ``key``."""
        n = grid_h * grid_w
        if key.stage is Stage.FULL:
            return TokenCounts(n, n, n, 0)
        merged = self.merged_branches(key.stage, family)
        m = self.merged_tokens(key, grid_h, grid_w)
        attention = m if any(b in merged for b in ATTENTION_BRANCHES) else n
        feed_forward = m if any(b in merged for b in FEED_FORWARD_BRANCHES) else n
        return TokenCounts(n, attention, feed_forward, n - m)

    def init_state(self, batch: int, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The ``[B, N]`` int32 state at the start of a generation. Default: zeros (a method without state
        passes it through)."""
        return torch.zeros(batch, num_tokens, dtype=torch.int32, device=device)


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


#: Method classes by their config class.
METHODS: dict[type[MethodConfig], type[TokenMethod]] = {}


def register_method(cls: type[TokenMethod]) -> type[TokenMethod]:
    """Class decorator: make ``cls`` the method of its ``config_class``."""
    METHODS[cls.config_class] = cls
    return cls


def method_for(config: MethodConfig) -> TokenMethod:
    """The :class:`TokenMethod` for ``config`` (any registered method's config)."""
    cls = METHODS.get(type(config))
    if cls is None:
        known = ", ".join(sorted(c.__name__ for c in METHODS))
        raise TypeError(f"{config!r} is not the config of a token-reduction method; expected one of {known}")
    return cls(config)


def plan_sources(config: MethodConfig, kinds: Sequence[str], key: EngineKey) -> list[int | None]:
    """:meth:`TokenMethod.block_plans` of ``config``'s method for the engine of ``key`` (``FULL``: no block
    merges): per block ``None`` or the index of the block whose plan it uses."""
    if key.stage is Stage.FULL:
        return [None] * len(kinds)
    return method_for(config).block_plans(kinds)


def plan_method(name: str) -> Callable[[Callable[..., tuple[MergePlan, torch.Tensor]]], Callable[..., tuple]]:
    """Decorator: register a plan function ``plan(x, state, grid_h, grid_w, count, **options) -> (plan, state)``
    under ``name`` (what :class:`~sdtm_compile.merge.PlanSpec` and the graph's ``sdtm_plan`` nodes name)."""

    def register(fn: Callable[..., tuple[MergePlan, torch.Tensor]]) -> Callable[..., tuple]:
        if name in PLAN_METHODS and PLAN_METHODS[name] is not fn:
            raise ValueError(f"a plan function named {name!r} is registered already")
        PLAN_METHODS[name] = fn
        return fn

    return register


def window_method_count(bucket: float, grid_h: int, grid_w: int, sy: int = 2, sx: int = 2) -> int:
    """Tokens a ToMeSD / SiTo engine removes: ``int(N * ratio)`` as both codes compute it, at most the tokens left
    once every ``sy x sx`` window keeps one."""
    n = grid_h * grid_w
    return min(int(n * bucket), n - (grid_h // sy) * (grid_w // sx))


# -- the random state ---------------------------------------------------------------------------------------------
# ToMeSD and SiTo draw random numbers in every block of every step. An engine cannot call randint (the backends
# would disagree, DESIGN §8), so the numbers are a state [B, N] int32 that enters the engine as an input, seeded
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
