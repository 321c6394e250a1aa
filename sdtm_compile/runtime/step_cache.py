"""First-block caching - a step cache - composed with token merging, decided by the dispatcher.

A step cache skips work when consecutive steps barely differ; token merging makes the work that runs cheaper. They
compose. This is the rule of diffusers' ``FirstBlockCacheConfig`` (ParaAttention's "first block cache"), moved into
the compiled backend so it works with every merging engine and never breaks Dynamo's graph:

* every call first runs a small *head* engine: the unmerged model up to the end of its first block, returning the
  first block's image input and outputs (the image stream ``out``, ``[B, N, C]``, and the text stream); the residual
  ``r = out - in`` is compared with the one of the last computed step: ``mean|r - r_prev| / mean|r_prev|``
  (diffusers' ``_should_compute_remaining_blocks``);
* above ``threshold`` (or with no earlier step, or ``threshold`` 0) the step's engine runs (merged or not),
  returning also the last block's image output ``h`` (its ``hidden`` state output); the dispatcher keeps ``r`` and
  ``h - out``. Where that engine's first block runs unmerged (the unmerged engine; a block schedule that leaves the
  first block out, e.g. ``"first-unmerged:K"`` or ``"staggered"``) it was built to *resume* from the head's outputs
  and does not run the first block again; an engine that merges in its first block runs it itself (its first
  block is not the head's);
* at or below it the rest of the model is skipped: an *out* engine (final norm, projection, unpatchify) runs on
  ``out + (h - out)_cached``, and the merging state (``li``) is left as it was.

The graphs (head, out, the resuming engines, the ``hidden`` output) are cut by :mod:`sdtm_compile.passes.step_cache`.
What it costs: one head (the embeddings and one unmerged block) per call - on computed steps of an engine that
merges in its first block, that block runs twice (``1 / num_blocks`` extra) - and ``2 x B x N x C`` of memory per
call of a step. SD3 / SD3.5 only. With SDTM's cache fusion: a protected step always computes (the steps after it
blend with what it stores), a skipped step reads and writes no fusion cache (:meth:`ExtensionRun.may_skip
<sdtm_compile.core.extension.ExtensionRun.may_skip>`), and the unmerged engine of a protected step runs its own first
block (the head's outputs do not include the gated branch outputs it stores).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["FirstBlockCacheConfig", "relative_change"]


@dataclass(frozen=True)
class FirstBlockCacheConfig:
    """First-block caching in the ``sdtm`` backend (``options={"step_cache": FirstBlockCacheConfig(0.1)}``).

    Attributes:
        threshold: Skip the rest of the model when the first block's residual changed by at most this much
            (relative mean absolute change) since the last computed step. ``0``: never skip (every step runs
            fully; the head still runs). Range ``[0, 10]``. diffusers' examples use 0.2 on Flux.
    """

    threshold: float = 0.1

    def __post_init__(self) -> None:
        value = self.threshold
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not 0 <= value <= 10
        ):
            raise ValueError(f"FirstBlockCacheConfig.threshold={value!r} is invalid: allowed a number in [0, 10]")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FirstBlockCacheConfig:
        unknown = sorted(set(values) - {"threshold"})
        if unknown:
            raise ValueError(f"FirstBlockCacheConfig has no field(s) {unknown}; valid fields: ['threshold']")
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def relative_change(previous: torch.Tensor, current: torch.Tensor) -> float:
    """``mean|current - previous| / mean|previous|`` (one host read)."""
    return float((current - previous).abs().mean() / previous.abs().mean())
