"""What every token-reduction method's config shares: :class:`MethodConfig`, and the registry of configs by name.

Every config is a frozen dataclass validated when it is built. Each method's own config (``SDTMConfig``,
``ToMeSDConfig``, ``SiToConfig``, ``ToMAConfig``) lives beside its method in :mod:`sdtm_compile.methods` and
subclasses :class:`MethodConfig`, which registers it by its ``method`` name for :func:`config_from_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .blocks import BlockScheduleError, normalize_block_schedule

__all__ = [
    "MethodConfig",
    "DEFAULT_BUCKETS",
    "DEFAULT_METHOD",
    "config_from_dict",
    "METHOD_CONFIGS",
    "NAMED_CONFIGS",
    "named_config",
    "SCHEDULER_KEYS",
]

#: Compression ratios the compiler builds one engine for. A scheduled ratio is rounded *down* to one of these.
DEFAULT_BUCKETS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)

#: The method a config dict, a backend option or a command without a ``method`` gets.
DEFAULT_METHOD = "sdtm"

#: Config classes by method name (``"sdtm"``, ``"tomesd"``, ...), filled as the classes are defined.
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}

#: Named operating points (``sdtm-compile ... --config NAME``): a config factory per name, filled by the methods
#: (``"sdtm-release-eval"``: :meth:`sdtm_compile.methods.sdtm.config.SDTMConfig.release_eval`).
NAMED_CONFIGS: dict[str, Callable[[], MethodConfig]] = {}


def named_config(name: str) -> MethodConfig:
    """The config of a named operating point of :data:`NAMED_CONFIGS`; a clear error naming the known ones."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown named config {name!r}: expected one of {sorted(NAMED_CONFIGS)} or a JSON file")
    return NAMED_CONFIGS[name]()


def _fail(name: str, value: object, allowed: str, owner: str) -> None:
    raise ValueError(f"{owner}.{name}={value!r} is invalid: allowed {allowed}.")


@dataclass(frozen=True)
class MethodConfig:
    """What every token-reduction method's config has: a ratio, the ratio buckets, and how timesteps map to
    trajectory positions (the dispatcher's part). Subclass it for a method; set ``method`` to its name.

    Attributes:
        ratio: Fraction of image tokens removed in the merged branches. ``0`` turns the method off (the model
            runs unmodified). Range ``[0, max_ratio]``; SDTM's is the centre of its ratio schedule.
        buckets: Ratios that get a compiled engine, strictly increasing, each in ``(0, max_ratio]``. A ratio is
            rounded down to the nearest bucket (below the smallest bucket the full model runs).
        timestep_shift: The flow-matching shift ``k`` of the scheduler that produces the timesteps
            (``sigma' = k sigma / (1 + (k - 1) sigma)``); the dispatcher undoes it to turn a timestep into a
            trajectory position. ``None`` (default): from the model and ``scheduler`` - SD3 / SD3.5 pipelines
            3.0; Flux ``e^mu`` with ``mu`` from the image token count and FLUX.1's scheduler settings (dynamic
            shifting), computed by the backend from the traced shapes. Range ``[0.1, 100]``.
        num_train_timesteps: What a timestep of 1.0 sigma is fed to the model as: SD3 pipelines pass
            ``t = 1000 sigma``, Flux pipelines pass ``sigma`` itself (1). ``None`` (default): the model's.
        scheduler: The diffusers scheduler config (a ``FlowMatchEulerDiscreteScheduler`` or its ``.config``, or
            a dict) whose shift settings produce the timesteps: ``shift``, or ``use_dynamic_shifting`` with
            ``base_shift``, ``max_shift``, ``base_image_seq_len``, ``max_image_seq_len`` (exponential shift).
            Only these keys are kept. Ignored when ``timestep_shift`` is given. ``None``: the family's defaults.
        blocks: Which blocks merge, and at what fraction of the step's ratio (:mod:`sdtm_compile.core.blocks`):
            ``"all"`` (default), ``"first-unmerged:K"``, ``"staggered"`` (the SDTM paper's ``0, 1, 0.5, 1`` for
            ToMeSD on MMDiT), ``"pattern:a,b,..."``, ``"protect-every:K"`` (the release's
            ``protect_layers_frequency``), or one fraction per block. It changes the engines' graphs (a block's
            token count), not which engine a step runs.
        sigmas: The sigmas the model will be fed, one per step, in order (e.g. ``scheduler.sigmas[:-1]`` after
            ``set_timesteps``). When given, a timestep's position is its step index ``s / (S - 1)`` (the nearest
            sigma), exactly the release's step fraction, instead of the shift-derived ``1 - u``. Only right for
            that step count and scheduler: compile again (or leave it ``None``) for another.

    Direct calls of the schedule helpers with ``timestep_shift`` / ``num_train_timesteps`` left at ``None`` use
    SD3's values (3.0, 1000); the backend, the ONNX export and the references resolve them for their model
    (:func:`sdtm_compile.core.schedule.resolve_for_model`).
    """

    #: The method's name (``options={"method": ...}``, manifests, the bench's ``--methods``).
    method: ClassVar[str] = ""
    #: The largest ratio the method can reach (each method sets its own).
    max_ratio: ClassVar[float] = 0.75
    #: Names a user of the method's original code may pass that are not fields here, with what to do instead
    #: (added to the "no such field" error).
    field_hints: ClassVar[dict[str, str]] = {}
    #: Fields that are not plain finite numbers (checked by the subclass or here).
    _other_fields: ClassVar[tuple[str, ...]] = ()

    ratio: float = 0.5
    buckets: tuple[float, ...] = field(default=DEFAULT_BUCKETS)
    timestep_shift: float | None = None
    num_train_timesteps: int | None = None
    scheduler: Mapping[str, Any] | None = None
    sigmas: tuple[float, ...] | None = None
    blocks: str | tuple[float, ...] = "all"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            METHOD_CONFIGS[cls.method] = cls

    def _fail(self, name: str, value: object, allowed: str) -> None:
        _fail(name, value, allowed, type(self).__name__)

    def __post_init__(self) -> None:
        skip = ("buckets", "num_train_timesteps", "scheduler", "sigmas", "blocks", *self._other_fields)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in skip or (f.name == "timestep_shift" and value is None):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                self._fail(f.name, value, "a finite number")
        if not 0.0 <= self.ratio <= self.max_ratio:
            self._fail("ratio", self.ratio, f"0 <= ratio <= {self.max_ratio}")
        buckets = tuple(self.buckets) if isinstance(self.buckets, (list, tuple)) else None
        allowed = f"a non-empty tuple of ratios in (0, {self.max_ratio}], strictly increasing"
        if not buckets:
            self._fail("buckets", self.buckets, allowed)
        for b in buckets:  # type: ignore[union-attr]
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < b <= self.max_ratio:
                self._fail("buckets", self.buckets, f"every bucket in (0, {self.max_ratio}]; {b!r} is not")
        if any(b2 <= b1 for b1, b2 in zip(buckets, buckets[1:])):  # type: ignore[index,arg-type]
            self._fail("buckets", self.buckets, "strictly increasing ratios, no duplicates")
        object.__setattr__(self, "buckets", tuple(float(b) for b in buckets))  # type: ignore[union-attr]
        if self.timestep_shift is not None and not 0.1 <= self.timestep_shift <= 100.0:
            self._fail("timestep_shift", self.timestep_shift, "0.1 <= timestep_shift <= 100, or None (the model's)")
        if self.num_train_timesteps is not None and (
            isinstance(self.num_train_timesteps, bool)
            or not isinstance(self.num_train_timesteps, int)
            or self.num_train_timesteps < 1
        ):
            self._fail("num_train_timesteps", self.num_train_timesteps, "an int >= 1, or None (the model's)")
        object.__setattr__(self, "scheduler", _scheduler_settings(self.scheduler, type(self).__name__))
        try:
            object.__setattr__(self, "blocks", normalize_block_schedule(self.blocks))
        except BlockScheduleError as error:
            raise ValueError(f"{type(self).__name__}.blocks={self.blocks!r} is invalid: {error}.") from None
        if self.sigmas is not None:
            try:
                sigmas = tuple(float(v) for v in self.sigmas)
            except (TypeError, ValueError):
                sigmas = ()
            if len(sigmas) < 2 or any(not 0.0 <= v <= 1.0 for v in sigmas) or list(sigmas) != sorted(sigmas)[::-1]:
                self._fail("sigmas", self.sigmas, "at least 2 sigmas in [0, 1], non-increasing (one per step), or None")
            object.__setattr__(self, "sigmas", sigmas)

    def _check_flag(self, name: str) -> None:
        """A field that must be ``True`` or ``False``."""
        value = getattr(self, name)
        if not isinstance(value, bool):
            self._fail(name, value, "True or False")

    def _check_window(self, keeps: str) -> None:
        """``sx`` / ``sy`` (1 to 4 tokens, at least 2 tokens a window) and ``ratio <= 1 - 1 / (sx * sy)``: each
        window keeps its ``keeps`` (a method with one kept token per ``sy x sx`` window)."""
        for name in ("sx", "sy"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4:
                self._fail(name, value, "an int from 1 to 4 (tokens)")
        if self.sx * self.sy < 2:  # type: ignore[attr-defined]
            self._fail("sx", self.sx, "a window of at least 2 tokens (sx * sy >= 2)")  # type: ignore[attr-defined]
        limit = 1.0 - 1.0 / (self.sx * self.sy)  # type: ignore[attr-defined]
        if self.ratio > limit + 1e-9:
            self._fail("ratio", self.ratio, f"at most 1 - 1/(sx*sy) = {limit:g}: every window keeps its {keeps}")

    def _check_seed(self) -> None:
        seed = self.seed  # type: ignore[attr-defined]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            self._fail("seed", seed, "an int >= 0")

    @property
    def enabled(self) -> bool:
        """False when ``ratio == 0``: the model then runs unmodified."""
        return self.ratio > 0.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MethodConfig:
        """Build from a dict of fields (options, manifests); an unknown key is a ``ValueError`` naming it.

        A ``"method"`` key, as :meth:`to_dict` writes it, must name this class's method.
        """
        values = dict(values)
        method = values.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"{cls.__name__} is the {cls.method!r} method's config, not {method!r}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            hints = "".join(f" {cls.field_hints[name]}" for name in unknown if name in cls.field_hints)
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; valid fields: {valid}.{hints}")
        return cls(**values)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict: ``method``, then every field (tuples become lists, the scheduler settings a dict);
        ``blocks`` only when it is not the default ``"all"``, SDTM's ``counts`` only when not ``"buckets"``."""
        out: dict[str, object] = {"method": self.method}
        for f in fields(self):
            value = getattr(self, f.name)
            if (f.name, value) in (("blocks", "all"), ("counts", "buckets")):
                continue  # the defaults leave records and manifests written before these fields unchanged
            out[f.name] = (
                dict(value)
                if f.name == "scheduler" and value is not None
                else (list(value) if isinstance(value, tuple) else value)
            )
        return out


def config_from_dict(values: Mapping[str, Any]) -> MethodConfig:
    """The config a dict describes: its ``"method"`` key picks the class (:data:`DEFAULT_METHOD` when absent).

    The classes register themselves when defined; ``import sdtm_compile`` imports every method of the package.
    """
    name = values.get("method", DEFAULT_METHOD)
    cls = METHOD_CONFIGS.get(name)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown token-reduction method {name!r}: expected one of {sorted(METHOD_CONFIGS)}")
    return cls.from_dict(values)


#: The scheduler settings that decide the timestep shift (diffusers ``FlowMatchEulerDiscreteScheduler``).
SCHEDULER_KEYS = (
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "time_shift_type",
)


def _scheduler_settings(scheduler: Any, owner: str) -> tuple[tuple[str, Any], ...] | None:
    """The shift settings of a scheduler, its config or a dict, as sorted ``(key, value)`` pairs (hashable)."""
    if scheduler is None:
        return None
    values = getattr(scheduler, "config", scheduler)
    if isinstance(values, tuple):  # already normalised (dataclasses.replace passes it through again)
        values = dict(values)
    if not isinstance(values, Mapping):
        _fail("scheduler", scheduler, "a diffusers scheduler, its .config, or a dict of its shift settings", owner)
    settings = {key: values[key] for key in SCHEDULER_KEYS if key in values}
    if settings.get("time_shift_type", "exponential") != "exponential":
        _fail(
            "scheduler",
            scheduler,
            "time_shift_type 'exponential' (the FLUX.1 / SD3 schedulers'); 'linear' is not supported",
            owner,
        )
    for key in ("shift", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"):
        value = settings.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            _fail("scheduler", scheduler, f"a number for {key}, got {value!r}", owner)
    return tuple(sorted(settings.items()))
