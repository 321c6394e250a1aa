"""Block schedules: which blocks of a model merge, and at what fraction of the step's ratio.

Every method's config has a ``blocks`` field (:class:`~sdtm_compile.core.config.MethodConfig`). A block whose
fraction is ``f`` merges at ``f x`` the ratio of the engine (the step's bucket): ``1`` is the step's ratio, ``0``
leaves the block unmerged. The forms, all JSON-ready (options dicts, manifests, the tuner's output):

========================  ======================================================================================
``"all"``                 every block at the step's ratio (the default; what every method did before schedules)
``"first-unmerged:K"``    the first ``K`` blocks unmerged, the rest at the step's ratio (ToMA's authors leave the
                          leading blocks unmerged)
``"staggered"``           the repeating pattern ``0, 1, 0.5, 1``: the SDTM paper's adaptation of ToMeSD to MMDiT
                          ("for every four consecutive Transformer blocks, we apply no compression, standard
                          compression, reduced compression, and standard compression rates"); the paper does not
                          say how much "reduced" is: ``0.5`` is ours
``"pattern:a,b,..."``     the fractions ``a, b, ...`` repeated over the blocks
``"protect-every:K"``     blocks ``0, K, 2K, ...`` and the last block unmerged: which layers the release's
                          ``protect_layers_frequency=K`` protects (``if idx % freq == 0: return True`` /
                          ``if idx == max(total - 1, 0): return True`` in ``compute_ratio``)
``[f0, f1, ...]``         one fraction per block, in model order (Flux: double-stream blocks first)
========================  ======================================================================================

Fractions are in ``[0, 1]``. Blocks are counted in model order over every block the passes find (SD3: the joint
blocks; Flux: double then single blocks). A method may leave more blocks unmerged on its own (ToMA's
``unmerged_double`` / ``unmerged_single``); a block merges only where both allow it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["BlockScheduleError", "normalize_block_schedule", "block_fractions", "STAGGERED", "NAMED_SCHEDULES"]

#: The SDTM paper's staggered pattern for ToMeSD on MMDiT (see the module docstring).
STAGGERED: tuple[float, ...] = (0.0, 1.0, 0.5, 1.0)

#: The string forms, for error messages and the CLI's help.
NAMED_SCHEDULES = ("all", "first-unmerged:K", "staggered", "pattern:a,b,...", "protect-every:K")

_HOW = (
    f"a block schedule is one of {', '.join(repr(n) for n in NAMED_SCHEDULES)} or a list of per-block fractions "
    "in [0, 1]"
)


class BlockScheduleError(ValueError):
    """A block schedule that is not one of the forms, or does not fit the model it is compiled for."""


def _fraction(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BlockScheduleError(f"{where}: {value!r} is not a number; {_HOW}")
    if not 0.0 <= value <= 1.0:
        raise BlockScheduleError(f"{where}: fraction {value!r} is outside [0, 1]; {_HOW}")
    return float(value)


def _count(text: str, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise BlockScheduleError(f"{where}: {text!r} is not a positive block count; {_HOW}")
    return value


def normalize_block_schedule(value: object) -> str | tuple[float, ...]:
    """``value`` in its canonical form (a lower-case string, or a tuple of floats), or :class:`BlockScheduleError`
    naming what is wrong and the forms allowed. Checks everything that does not depend on the model."""
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        name, _, argument = text.partition(":")
        if text in ("all", "staggered"):
            return text
        if name in ("first-unmerged", "protect-every") and argument:
            if name == "first-unmerged" and argument == "0":
                return "all"
            return f"{name}:{_count(argument, repr(value))}"
        if name == "pattern" and argument:
            parts = argument.split(",")
            fractions = []
            for part in parts:
                try:
                    fractions.append(_fraction(float(part), repr(value)))
                except ValueError as error:
                    if isinstance(error, BlockScheduleError):
                        raise
                    raise BlockScheduleError(f"{value!r}: {part!r} is not a number; {_HOW}") from None
            return "pattern:" + ",".join(f"{f:g}" for f in fractions)
        raise BlockScheduleError(f"unknown block schedule {value!r}: {_HOW}")
    if isinstance(value, (list, tuple)):
        if not value:
            raise BlockScheduleError(f"an empty list of block fractions: {_HOW}")
        return tuple(_fraction(v, f"block {i}") for i, v in enumerate(value))
    raise BlockScheduleError(f"block schedule {value!r} is a {type(value).__name__}: {_HOW}")


def block_fractions(schedule: str | Sequence[float], num_blocks: int) -> tuple[float, ...]:
    """The fraction of the step's ratio each of ``num_blocks`` blocks merges at, in model order.

    Raises :class:`BlockScheduleError` when the schedule does not fit the model: an explicit list of another length,
    or ``first-unmerged:K`` with ``K`` >= the block count (nothing would merge: use ratio 0 instead).
    """
    schedule = normalize_block_schedule(schedule)
    if isinstance(schedule, tuple):
        if len(schedule) != num_blocks:
            raise BlockScheduleError(
                f"the block schedule lists {len(schedule)} fractions but the model has {num_blocks} blocks: give one "
                "fraction per block (model order; Flux: double-stream blocks first), or a repeating "
                "'pattern:a,b,...'"
            )
        return schedule
    name, _, argument = schedule.partition(":")
    if name == "all":
        return (1.0,) * num_blocks
    if name == "first-unmerged":
        skip = int(argument)
        if skip >= num_blocks:
            raise BlockScheduleError(
                f"'first-unmerged:{skip}' leaves every one of the model's {num_blocks} blocks unmerged: keep K below "
                f"{num_blocks}, or turn merging off with ratio 0"
            )
        return (0.0,) * skip + (1.0,) * (num_blocks - skip)
    if name == "protect-every":
        every = int(argument)
        return tuple(0.0 if i % every == 0 or i == num_blocks - 1 else 1.0 for i in range(num_blocks))
    pattern = STAGGERED if name == "staggered" else tuple(float(f) for f in argument.split(","))
    return tuple(pattern[i % len(pattern)] for i in range(num_blocks))
