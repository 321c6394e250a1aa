"""The method interface: what a token-reduction method tells the passes, the dispatcher, export and the references.

A method is a config (a :class:`~sdtm_compile.core.config.MethodConfig` subclass, validated when built) and a
:class:`TokenMethod` that answers, for that config:

* the schedule: which engine (stage, ratio bucket) serves a trajectory position, and every engine a generation
  can reach (:meth:`TokenMethod.engine_key_at`, :meth:`TokenMethod.engines_for_trajectory`);
* the plan: which plan function an engine runs and with which static count (:meth:`TokenMethod.plan_spec`; the
  plan function is registered by name with :func:`~sdtm_compile.core.plans.plan_method`), which branches it
  merges (:meth:`TokenMethod.merged_branches`) and which blocks make, reuse or skip a plan
  (:meth:`TokenMethod.block_plans`);
* the state the engines carry from block to block and step to step, ``[B, N]`` int32 (SDTM's ``li``; a random
  state for methods that draw random numbers): its value at the start of a generation
  (:meth:`TokenMethod.init_state`);
* its extensions (:meth:`TokenMethod.extensions`, :mod:`sdtm_compile.core.extension`): more state in the engine
  contract, more passes, hooks in the eager reference and in the dispatcher;
* its variants worth measuring beside it (:meth:`TokenMethod.variants`: named configs, e.g. an extension turned
  on), calibrated where they need it on an unmodified generation (:class:`VariantCalibration`).

How to merge and unmerge follows from the plan's form (:class:`~sdtm_compile.core.merge.MergePlan`: gather/mean,
scatter-add, or matmuls with a soft assignment). Adding a method is one module in :mod:`sdtm_compile.methods`:
its config, its plan function and its :class:`TokenMethod` subclass decorated with :func:`register_method`
(the package imports every module it holds, so nothing else needs an edit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from .blocks import BlockScheduleError, block_fractions
from .config import MethodConfig
from .extension import Extension
from .layout import FAMILY_BRANCHES, ModelLayout
from .merge import MergePlan
from .plans import PlanSpec, make_plan
from .schedule import FULL, EngineKey, Stage, TokenCounts, position_at_step, round_to_bucket
from .signature import METHOD_STATE, EngineSignature, StateTensor

__all__ = [
    "TokenMethod",
    "MethodVariant",
    "VariantCalibration",
    "register_method",
    "method_for",
    "engines_for_steps",
    "METHODS",
    "ATTENTION_BRANCHES",
    "FEED_FORWARD_BRANCHES",
]

#: Branch names (see :data:`sdtm_compile.core.layout.BRANCHES`): joint attention and SD3.5's second attention;
#: the feed-forward (SD3 blocks and Flux double blocks) and the MLP part of a Flux single block.
ATTENTION_BRANCHES = ("attn", "attn2")
FEED_FORWARD_BRANCHES = ("ff", "mlp")


@dataclass(frozen=True)
class MethodVariant:
    """A named config of a method, measured beside the method's plain config (``sdtm-compile bench --variants``)."""

    name: str  #: the variant's name in reports (``sdtm+fusion``, ...)
    description: str  #: one line saying what differs from the plain config
    config: MethodConfig


@dataclass(frozen=True)
class VariantCalibration:
    """What a method may calibrate its variants on: one benchmark generation of the unmodified model.

    Attributes:
        family: the model family (``sd3`` / ``flux``).
        grid: the image-token grid ``(H, W)``.
        num_steps: steps of a generation.
        first_block_plan_inputs: runs one unmodified generation and returns the first block's plan input
            (``[B, N, C]``, the normalised image tokens a plan is made from) of each of its calls, in order. It costs
            a whole generation, so it runs only when called.
    """

    family: str
    grid: tuple[int, int]
    num_steps: int
    first_block_plan_inputs: Callable[[], Sequence[torch.Tensor]]


class TokenMethod:
    """One token-reduction method under one config (subclass per method; see the module docstring)."""

    #: the config class this method takes (each subclass sets it; :func:`register_method` keys the registry by it)
    config_class: ClassVar[type[MethodConfig]]
    #: with dynamic counts: every count a plan is fed is a multiple of this, or an end of its stage's range (an
    #: engine is checked against each of them when it is built)
    count_step: ClassVar[int] = 1

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {config!r}")
        self.config = config

    @property
    def name(self) -> str:
        """The method's name (``sdtm``, ``tomesd``, ...)."""
        return self.config.method

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

    def describe(self) -> str:
        """One line naming the config's schedule, for logs and reports. Default: the ratio."""
        return f"{self.name} ratio {self.config.ratio:g}"

    def with_ratio(self, ratio: float) -> MethodConfig:
        """This method's config at another ``ratio`` (a sweep point), every other field kept. A method whose other
        fields are bounded by the ratio narrows them (SDTM: its deviation)."""
        return dataclasses.replace(self.config, ratio=ratio)

    def engines_for_steps(self, num_steps: int) -> list[EngineKey]:
        """The distinct engines a generation of ``num_steps`` steps uses (positions ``s / (S-1)``), sorted."""
        return sorted({self.engine_of(self.engine_key_at(position_at_step(s, num_steps))) for s in range(num_steps)})

    # -- exact counts: one engine per stage, the merged count an input (see docs/design.md) --------------------

    @property
    def dynamic_counts(self) -> bool:
        """The engines take each plan's count as an input (``[k]`` count tensors) instead of baking a bucket's:
        one engine per stage serves every exact count of the schedule. Default: no (static buckets)."""
        return False

    def engine_of(self, key: EngineKey) -> EngineKey:
        """The key of the engine that serves the schedule's ``key`` (with static buckets: ``key`` itself)."""
        return key

    def count_slots(self, kinds: Sequence[str], key: EngineKey, grid: tuple[int, int]) -> list[int | None]:
        """Per block of the engine of ``key``: which count input its plan reads (``None``: it makes no plan). Blocks
        at the same fraction of the step's ratio share one input, numbered in block order."""
        sources = self.plan_sources(kinds, key, grid)
        fractions = block_fractions(self.config.blocks, len(kinds))
        slots: dict[float, int] = {}
        return [
            slots.setdefault(fraction, len(slots)) if source == index else None
            for index, (source, fraction) in enumerate(zip(sources, fractions))
        ]

    def plan_counts(self, kinds: Sequence[str], key: EngineKey, grid: tuple[int, int]) -> tuple[int, ...]:
        """The count of each count input (:meth:`count_slots`) at the schedule's ``key``: what the dispatcher feeds
        an engine with dynamic counts for that step (each plan's :meth:`plan_spec` count)."""
        counts: dict[int, int] = {}
        for block_key, slot in zip(self.block_keys(kinds, key, grid), self.count_slots(kinds, key, grid)):
            if slot is not None:
                counts.setdefault(slot, self.plan_spec(block_key, *grid).count)
        return tuple(counts[slot] for slot in range(len(counts)))

    def count_range(
        self, kinds: Sequence[str], key: EngineKey, grid: tuple[int, int]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(smallest, largest)`` count of each count input over every step the engine of ``key`` serves.
        Default: the counts of ``key`` itself (a method whose counts vary per step overrides it)."""
        counts = self.plan_counts(kinds, key, grid)
        return counts, counts

    # -- the plan -------------------------------------------------------------------------------------------------

    def plan_spec(self, key: EngineKey, grid_h: int, grid_w: int) -> PlanSpec:
        """The plan function (by name), its static count and options for the engine of ``key``."""
        raise NotImplementedError

    def plan_for(
        self, key: EngineKey, x: torch.Tensor, state: torch.Tensor, grid_h: int, grid_w: int
    ) -> tuple[MergePlan, torch.Tensor]:
        """The plan of the engine of ``key`` for image tokens ``x`` ``[B, N, C]``, and the state after it."""
        return make_plan(self.plan_spec(key, grid_h, grid_w), x, state, grid_h, grid_w)

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
        """For blocks of these kinds (``joint``, ``double``, ``single``, in model order): ``None`` for a block the
        method itself leaves unmerged, else the index of the block whose plan it uses (its own index: it makes one).
        Default: every block makes its own plan. The config's block schedule is applied on top
        (:meth:`block_keys`, :meth:`plan_sources`)."""
        return list(range(len(kinds)))

    def block_keys(self, kinds: Sequence[str], key: EngineKey, grid: tuple[int, int]) -> list[EngineKey]:
        """The engine key each block of the engine of ``key`` runs as: ``FULL`` for a block left unmerged (by the
        method or by the config's block schedule), else
        ``key`` with its ratio scaled by the block's fraction (:mod:`sdtm_compile.core.blocks`). ``grid``: the
        image-token grid (a method may use it to decide)."""
        if key.stage is Stage.FULL:
            return [FULL] * len(kinds)
        keys = []
        for fraction, source in zip(block_fractions(self.config.blocks, len(kinds)), self.block_plans(kinds)):
            if source is None or fraction == 0.0:
                keys.append(FULL)
                continue
            keys.append(key if fraction == 1.0 else EngineKey(key.stage, round(key.bucket * fraction, 9)))
        return keys

    def plan_sources(self, kinds: Sequence[str], key: EngineKey, grid: tuple[int, int]) -> list[int | None]:
        """Per block of the engine of ``key``: ``None`` (unmerged) or the index of the block whose plan it uses.
        A block shares the plan :meth:`block_plans` names only with blocks that run at the same key; the first
        such block makes it."""
        keys = self.block_keys(kinds, key, grid)
        shared = self.block_plans(kinds)
        sources: list[int | None] = []
        for index, (block_key, group) in enumerate(zip(keys, shared)):
            if block_key.stage is Stage.FULL:
                sources.append(None)
                continue
            maker = next(j for j in range(index + 1) if shared[j] == group and keys[j] == block_key)
            sources.append(maker)
        return sources

    def check_blocks(self, num_blocks: int) -> str | None:
        """Why the config's block schedule does not fit a model of ``num_blocks`` blocks, or ``None``."""
        try:
            block_fractions(self.config.blocks, num_blocks)
        except BlockScheduleError as error:
            return f"{type(self.config).__name__}.blocks={self.config.blocks!r}: {error}"
        return None

    def block_token_counts(
        self, kinds: Sequence[str], key: EngineKey, grid: tuple[int, int], family: str
    ) -> tuple[TokenCounts, ...]:
        """Image tokens each part of each block sees in the engine of ``key`` (what its graph specialises)."""
        return tuple(self.token_counts(k, *grid, family) for k in self.block_keys(kinds, key, grid))

    def token_counts(self, key: EngineKey, grid_h: int, grid_w: int, family: str) -> TokenCounts:
        """Image tokens each part of a (merged) block sees in the engine of ``key``."""
        n = grid_h * grid_w
        if key.stage is Stage.FULL:
            return TokenCounts(n, n, n, 0)
        # a branch name the family's blocks do not have merges nothing (e.g. "mlp" on SD3)
        merged = [b for b in self.merged_branches(key.stage, family) if b in FAMILY_BRANCHES[family]]
        m = self.merged_tokens(key, grid_h, grid_w)
        attention = m if any(b in merged for b in ATTENTION_BRANCHES) else n
        feed_forward = m if any(b in merged for b in FEED_FORWARD_BRANCHES) else n
        return TokenCounts(n, attention, feed_forward, n - m)

    # -- the state and the extensions ------------------------------------------------------------------------

    def init_state(self, batch: int, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The ``[B, N]`` int32 state at the start of a generation. Default: zeros (a method without state
        passes it through)."""
        return torch.zeros(batch, num_tokens, dtype=torch.int32, device=device)

    def extensions(self) -> tuple[Extension, ...]:
        """What the config turns on beyond the plans (:mod:`sdtm_compile.core.extension`). Default: nothing."""
        return ()

    def variants(self, calibration: VariantCalibration) -> list[MethodVariant]:
        """Named configs derived from this one that are worth measuring beside it on the model ``calibration``
        describes (e.g. one extension turned on each), in report order. Default: none."""
        return []

    def check_model(self, layout: ModelLayout) -> str | None:
        """Why the method (with its extensions) cannot run on a model of ``layout``, or ``None``."""
        problem = self.check_grid(*layout.grid) if self.config.enabled else None
        problem = problem or self.check_blocks(len(layout.kinds))
        for extension in self.extensions():
            problem = problem or extension.check(layout)
        return problem

    def state_tensor(self, batch: int, tokens: int) -> StateTensor:
        """The contract's entry for the method's own state, ``[B, N]`` int32, fresh from :meth:`init_state`."""
        return StateTensor(
            METHOD_STATE,
            (batch, tokens),
            torch.int32,
            carried=True,
            initial=lambda device: self.init_state(batch, tokens, device),
            description=f"the {self.name} method's state; fresh at the start of every generation (a timestep "
            "above the previous one)",
        )

    def signature(self, layout: ModelLayout, extra: Sequence[StateTensor] = ()) -> EngineSignature:
        """The engine contract of a compile on a model of ``layout``: the method's state, its extensions' state,
        then ``extra`` (a backend option's, e.g. the step cache's), carried entries first."""
        entries = [self.state_tensor(layout.batch, layout.num_tokens)]
        for extension in self.extensions():
            entries.extend(extension.state(layout))
        entries.extend(extra)
        entries.sort(key=lambda t: not t.carried)  # stable: carried first, each group in declaration order
        return EngineSignature(entries)


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


def engines_for_steps(config: MethodConfig, num_steps: int) -> list[EngineKey]:
    """The distinct engines a generation of ``num_steps`` steps uses under ``config`` (any method's), sorted."""
    return method_for(config).engines_for_steps(num_steps)
