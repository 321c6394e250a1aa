"""What every pass receives: the SDTM config and the engine (stage, bucket) being built."""

from __future__ import annotations

from dataclasses import dataclass

from sdtm_compile.config import SDTMConfig
from sdtm_compile.schedule import FULL, EngineKey

__all__ = ["PassSettings"]


@dataclass(frozen=True)
class PassSettings:
    """Settings of one rewrite.

    Attributes:
        config: the SDTM configuration.
        key: the (stage, bucket) this graph is rewritten for; ``FULL`` leaves the blocks unmerged.

    What is found in the graph (blocks, token grid, inputs) is not a setting: :func:`find_mmdit_blocks` returns
    it as a :class:`~sdtm_compile.passes.ModelSites`, which every rewrite pass takes as its second argument.
    """

    config: SDTMConfig = SDTMConfig()
    key: EngineKey = FULL
