"""sdtm-compile: SDTM token merging for diffusion transformers, as a torch.compile backend.

Public API::

    SDTMConfig                       # validated configuration
    schedule.*                       # CRA ratio, stages, buckets, token counts
    merge.ssm_plan / idm_plan / merge / unmerge
    reference.sdtm_block_forward     # the eager reference (the oracle)
    StageDispatcher                  # picks the engine from the timestep, carries li
"""

from __future__ import annotations

from .config import DEFAULT_BUCKETS, SDTMConfig
from .merge import MergePlan, idm_plan, merge, ssm_plan, unmerge
from .runtime import StageDispatcher
from .schedule import EngineKey, Stage

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BUCKETS",
    "EngineKey",
    "MergePlan",
    "SDTMConfig",
    "Stage",
    "StageDispatcher",
    "idm_plan",
    "merge",
    "ssm_plan",
    "unmerge",
    "__version__",
]
