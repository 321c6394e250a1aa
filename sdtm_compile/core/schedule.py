"""What every method's schedule is made of: engine keys, trajectory positions, ratio buckets, timestep mapping.

A method's schedule (:meth:`~sdtm_compile.core.method.TokenMethod.engine_key_at`) is a function of the *trajectory
position* ``p`` in ``[0, 1]`` (0 = first step, pure noise; 1 = last step). For step ``s`` of ``S`` it is
``s / (S - 1)``, as in the SDTM release; from a timestep it is computed by undoing the scheduler's flow-matching
shift, which gives the same value within 0.5 % for the diffusers ``FlowMatchEulerDiscreteScheduler``. Basing a
schedule on the position rather than on a call counter keeps it right for any step count, any number of
transformer calls per step and a second generation.

An engine is named by an :class:`EngineKey`: a :class:`Stage` and a ratio bucket; its token counts per branch are a
:class:`TokenCounts`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

import torch

from .config import MethodConfig

__all__ = [
    "Stage",
    "EngineKey",
    "FULL",
    "TokenCounts",
    "position_at_step",
    "position_from_timestep",
    "timestep_at_position",
    "round_to_bucket",
    "FAMILY_TIMESTEPS",
    "timestep_shift_for",
    "resolve_for_model",
]

_EPS = 1e-9


class Stage(str, enum.Enum):
    """Which graph runs: the unmodified model, or a merged graph of one of the stages the methods declare (a
    one-stage method's ``MERGE``; SDTM's ``STRUCTURE`` and ``DETAIL``)."""

    FULL = "full"  #: no merging (ratio rounds below the smallest bucket, or the method is off)
    STRUCTURE = "structure"  #: SDTM: SSM plan; attention and FF merged
    DETAIL = "detail"  #: SDTM: IDM plan; attention full length, FF merged
    MERGE = "merge"  #: a method with one stage (ToMeSD, SiTo, ToMA): its plan at every step


@dataclass(frozen=True, order=True)
class EngineKey:
    """One compiled graph: a stage and its ratio bucket (``FULL`` always has bucket 0)."""

    stage: Stage
    bucket: float

    def __str__(self) -> str:
        return "full" if self.stage is Stage.FULL else f"{self.stage.value}@{self.bucket:g}"

    @property
    def slug(self) -> str:
        """A file-name-safe name, e.g. ``structure_r0.6``."""
        return "full" if self.stage is Stage.FULL else f"{self.stage.value}_r{self.bucket:g}"


FULL = EngineKey(Stage.FULL, 0.0)


@dataclass(frozen=True)
class TokenCounts:
    """Image tokens each part of a block sees for one engine on an ``grid_h x grid_w`` token grid."""

    tokens: int  #: N, image tokens in the residual stream (never merged)
    attention: int  #: image tokens entering joint attention (and ``attn2``)
    feed_forward: int  #: image tokens entering the feed-forward
    removed: int  #: tokens merged away (N - merged length) by this stage's plan


#: How each model family's pipelines feed timesteps, when the config leaves it to the model:
#: ``num_train_timesteps`` (SD3: ``t = 1000 sigma``; Flux: ``sigma``) and the scheduler's shift settings
#: (SD3: a fixed shift of 3.0; FLUX.1: dynamic, exponential, with these sequence lengths and shifts).
FAMILY_TIMESTEPS: dict[str, dict[str, object]] = {
    "sd3": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},
    "flux": {
        "num_train_timesteps": 1,
        "shift": 1.0,
        "use_dynamic_shifting": True,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "base_shift": 0.5,
        "max_shift": 1.15,
    },
}


def timestep_shift_for(num_tokens: int, settings: dict[str, object]) -> float:
    """The shift ``k`` a flow-matching scheduler with ``settings`` applies at ``num_tokens`` image tokens.

    Dynamic shifting (FLUX.1, diffusers' ``calculate_shift``): ``mu`` is linear in the token count between
    ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``, and the exponential time shift
    ``e^mu / (e^mu + 1/sigma - 1)`` is the fixed-shift formula with ``k = e^mu``. Otherwise ``k = shift``.
    """
    if not settings.get("use_dynamic_shifting"):
        return float(settings.get("shift", 1.0))  # type: ignore[arg-type]
    flux = FAMILY_TIMESTEPS["flux"]
    base_len = float(settings.get("base_image_seq_len", flux["base_image_seq_len"]))  # type: ignore[arg-type]
    max_len = float(settings.get("max_image_seq_len", flux["max_image_seq_len"]))  # type: ignore[arg-type]
    base_shift = float(settings.get("base_shift", flux["base_shift"]))  # type: ignore[arg-type]
    max_shift = float(settings.get("max_shift", flux["max_shift"]))  # type: ignore[arg-type]
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = num_tokens * slope + (base_shift - slope * base_len)
    return math.exp(mu)


def resolve_for_model(config: MethodConfig, family: str, num_tokens: int) -> MethodConfig:
    """``config`` with ``timestep_shift`` and ``num_train_timesteps`` filled in for a model of ``family`` at
    ``num_tokens`` image tokens (fields the user set are kept; ``config.scheduler`` overrides the family's
    scheduler settings)."""
    defaults = FAMILY_TIMESTEPS[family]
    settings = {**defaults, **dict(config.scheduler or ())}
    if config.scheduler is not None and "use_dynamic_shifting" not in dict(config.scheduler):
        settings["use_dynamic_shifting"] = False  # a scheduler config without the key shifts by its ``shift``
    shift = config.timestep_shift if config.timestep_shift is not None else timestep_shift_for(num_tokens, settings)
    scale = config.num_train_timesteps if config.num_train_timesteps is not None else defaults["num_train_timesteps"]
    return dataclasses.replace(config, timestep_shift=round(shift, 12), num_train_timesteps=int(scale))  # type: ignore[arg-type]


def _timestep_scale(config: MethodConfig) -> tuple[float, float]:
    """``(shift k, num_train_timesteps)``; a field left at ``None`` takes SD3's (see ``MethodConfig``)."""
    sd3 = FAMILY_TIMESTEPS["sd3"]
    k = config.timestep_shift if config.timestep_shift is not None else sd3["shift"]
    scale = config.num_train_timesteps if config.num_train_timesteps is not None else sd3["num_train_timesteps"]
    return float(k), float(scale)  # type: ignore[arg-type]


def position_at_step(step: int, num_steps: int) -> float:
    """Trajectory position of step ``step`` (0-based) of ``num_steps``, as in the release: ``s / (S - 1)``."""
    if num_steps < 1 or not 0 <= step < num_steps:
        raise ValueError(
            f"step {step} is outside 0..{num_steps - 1} (num_steps={num_steps}): pass a 0-based step index below "
            "num_steps, and num_steps >= 1"
        )
    return 0.0 if num_steps == 1 else step / (num_steps - 1)


def position_from_timestep(timestep: float | torch.Tensor, config: MethodConfig) -> float:
    """Trajectory position of a flow-matching timestep (``t = sigma * num_train_timesteps``).

    The scheduler spaces *unshifted* sigmas ``u`` evenly and feeds the model ``sigma = k u / (1 + (k-1) u)``
    (``k`` = ``config.timestep_shift``); we invert that and return ``1 - u``, clamped to ``[0, 1]``. For SD3's
    scheduler (``u`` from 1 to ~0) that is ``s / (S - 1)``; FLUX pipelines space ``u`` as
    ``linspace(1, 1/S, S)``, so on Flux it is ``s / S`` (the schedule runs at most one step's fraction behind the
    step index; the stage switch lands on the same step for the usual step counts).
    A tensor timestep is read once (one host sync); a batch must share one timestep.
    """
    if isinstance(timestep, torch.Tensor):
        flat = timestep.detach().reshape(-1)
        if flat.numel() == 0:
            raise ValueError("the timestep tensor is empty: pass the scheduler's timestep, one value per batch row")
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise ValueError(
                f"all batch rows must share one timestep to pick one SDTM stage; got {flat.tolist()}. Run rows at "
                "different timesteps as separate calls (one batch per timestep)"
            )
        t = float(flat[0])
    else:
        t = float(timestep)
    k, scale = _timestep_scale(config)
    sigma = min(max(t / scale, 0.0), 1.0)
    if config.sigmas is not None:  # the step index of the nearest given sigma: s / (S - 1)
        step = min(range(len(config.sigmas)), key=lambda i: abs(config.sigmas[i] - sigma))  # type: ignore[index]
        return step / (len(config.sigmas) - 1)
    unshifted = sigma / (k - (k - 1.0) * sigma)
    return min(max(1.0 - unshifted, 0.0), 1.0)


def round_to_bucket(ratio: float, buckets: tuple[float, ...]) -> float:
    """The largest bucket ``<= ratio`` (never more merging than scheduled); 0.0 below the smallest bucket."""
    below = [b for b in buckets if b <= ratio + _EPS]
    return max(below) if below else 0.0


def timestep_at_position(position: float, config: MethodConfig) -> float:
    """Inverse of :func:`position_from_timestep`: the flow-matching timestep at trajectory position ``p``."""
    unshifted = 1.0 - min(max(float(position), 0.0), 1.0)
    k, scale = _timestep_scale(config)
    return k * unshifted / (1.0 + (k - 1.0) * unshifted) * scale
