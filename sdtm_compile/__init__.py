"""sdtm-compile: SDTM token merging for diffusion transformers, as a torch.compile backend.

Public API::

    SDTMConfig                       # validated configuration of SDTM
    ToMeSDConfig / SiToConfig / ToMAConfig   # the other methods (sdtm_compile.methods), options={"method": ...}
    schedule.*                       # CRA ratio, stages, buckets, token counts
    merge.ssm_plan / idm_plan / merge / unmerge
    reference.sdtm_block_forward     # the eager reference (the oracle); reference_flux.* for Flux
    StageDispatcher                  # picks the engine from the timestep, carries li
    generation(model)                # a context owning one generation's state (li, history)
    compiled_graphs(model)           # the SDTM graphs torch.compile built for a model (engines, dispatcher)
    export_onnx / OnnxTransformer    # ONNX bundles and their ONNX Runtime runner
"""

from __future__ import annotations

from .backend import compiled_graphs
from .config import DEFAULT_BUCKETS, MethodConfig, SDTMConfig, config_from_dict
from .export import BundleError, OnnxTransformer, export_onnx
from .merge import MergePlan, idm_plan, merge, ssm_plan, unmerge
from .methods import SiToConfig, TokenMethod, ToMAConfig, ToMeSDConfig, method_for
from .runtime import ConcurrentUseError, Generation, StageDispatcher, generation
from .schedule import EngineKey, Stage
from .step_cache import FirstBlockCacheConfig

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "ConcurrentUseError",
    "Generation",
    "DEFAULT_BUCKETS",
    "EngineKey",
    "FirstBlockCacheConfig",
    "MergePlan",
    "MethodConfig",
    "OnnxTransformer",
    "SDTMConfig",
    "SiToConfig",
    "ToMAConfig",
    "ToMeSDConfig",
    "TokenMethod",
    "Stage",
    "StageDispatcher",
    "compiled_graphs",
    "config_from_dict",
    "export_onnx",
    "generation",
    "idm_plan",
    "merge",
    "method_for",
    "ssm_plan",
    "unmerge",
    "__version__",
]
