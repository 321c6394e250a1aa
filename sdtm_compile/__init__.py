"""sdtm-compile: SDTM token merging for diffusion transformers, as a torch.compile backend.

Public API::

    SDTMConfig                       # validated configuration
    schedule.*                       # CRA ratio, stages, buckets, token counts
    merge.ssm_plan / idm_plan / merge / unmerge
    reference.sdtm_block_forward     # the eager reference (the oracle)
    StageDispatcher                  # picks the engine from the timestep, carries li
    export_onnx / OnnxTransformer    # ONNX bundles and their ONNX Runtime runner
"""

from __future__ import annotations

from .config import DEFAULT_BUCKETS, SDTMConfig
from .export import BundleError, OnnxTransformer, export_onnx
from .merge import MergePlan, idm_plan, merge, ssm_plan, unmerge
from .runtime import StageDispatcher
from .schedule import EngineKey, Stage

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "DEFAULT_BUCKETS",
    "EngineKey",
    "MergePlan",
    "OnnxTransformer",
    "SDTMConfig",
    "Stage",
    "StageDispatcher",
    "export_onnx",
    "idm_plan",
    "merge",
    "ssm_plan",
    "unmerge",
    "__version__",
]
