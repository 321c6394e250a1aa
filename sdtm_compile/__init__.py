"""sdtm-compile: token merging (SDTM and others) for diffusion transformers, as a torch.compile backend.

Public API::

    SDTMConfig, ToMeSDConfig, SiToConfig, ToMAConfig   # the methods' validated configs (sdtm_compile.methods)
    FirstBlockCacheConfig                             # the step cache the backend composes with any method
    torch.compile(model, backend="sdtm", options={"method": SDTMConfig(...)})   # the backends (entry points)
    generation(model)                                 # a context owning one generation's state
    compiled_graphs(model)                            # the engines and dispatcher torch.compile built for a model
    export_onnx / OnnxTransformer                     # ONNX bundles and their ONNX Runtime runner
    StageDispatcher, EngineKey, Stage                 # the runtime, for custom engines
    TokenMethod, method_for, MethodConfig             # the method interface, for new methods

The package, top-down: ``core`` (what every method shares) -> ``passes`` and ``methods`` -> ``engines`` and
``runtime`` -> ``compiler`` (the backends) -> ``reference`` (the eager oracle) -> ``models`` -> ``deploy`` (ONNX,
Triton) -> ``bench`` -> ``cli``. ``docs/architecture.md`` walks through it.
"""

from __future__ import annotations

import sys

from . import _aliases
from ._version import __version__
from .compiler import BackendSettings, SDTMBackend, compiled_graphs, load_tuned_options
from .core import (
    DEFAULT_BUCKETS,
    EngineKey,
    EngineSignature,
    EngineState,
    Extension,
    MergePlan,
    MethodConfig,
    Stage,
    TokenMethod,
    config_from_dict,
    merge,
    method_for,
    unmerge,
)
from .deploy import BundleError, OnnxTransformer, export_onnx
from .methods import SDTMConfig, SiToConfig, ToMAConfig, ToMeSDConfig, method_names
from .methods.sdtm import idm_plan, ssm_plan
from .runtime import CallRecord, ConcurrentUseError, FirstBlockCacheConfig, Generation, StageDispatcher, generation

_aliases.install(sys.modules[__name__])

__all__ = [
    "BackendSettings",
    "BundleError",
    "CallRecord",
    "ConcurrentUseError",
    "DEFAULT_BUCKETS",
    "EngineKey",
    "EngineSignature",
    "EngineState",
    "Extension",
    "FirstBlockCacheConfig",
    "Generation",
    "MergePlan",
    "MethodConfig",
    "OnnxTransformer",
    "SDTMBackend",
    "SDTMConfig",
    "SiToConfig",
    "Stage",
    "StageDispatcher",
    "ToMAConfig",
    "ToMeSDConfig",
    "TokenMethod",
    "compiled_graphs",
    "config_from_dict",
    "export_onnx",
    "generation",
    "load_tuned_options",
    "idm_plan",
    "merge",
    "method_for",
    "method_names",
    "ssm_plan",
    "unmerge",
    "__version__",
]
