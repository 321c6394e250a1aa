"""What every pass receives: the SDTM config, the engine (stage, bucket) being built and the token grid."""

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
        grid: the image-token grid ``(grid_h, grid_w)``; ``None`` until :func:`find_mmdit_blocks` infers it.
    """

    config: SDTMConfig = SDTMConfig()
    key: EngineKey = FULL
    grid: tuple[int, int] | None = None
