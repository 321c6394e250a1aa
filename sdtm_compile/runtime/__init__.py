"""The runtime: which engine serves each call, and the state a generation carries.

* :mod:`.dispatcher`: :class:`StageDispatcher`, the engine of each call from its timestep, the engine state;
* :mod:`.generation`: :func:`generation`, a context owning one generation's state; :class:`CallRecord`;
* :mod:`.step_cache`: :class:`FirstBlockCacheConfig`, the first-block step cache the dispatcher runs.
"""

from .dispatcher import FirstBlockCalls, LayoutState, StageDispatcher
from .generation import CallRecord, ConcurrentUseError, Generation, generation
from .step_cache import FirstBlockCacheConfig, relative_change

__all__ = [
    "CallRecord",
    "ConcurrentUseError",
    "FirstBlockCacheConfig",
    "FirstBlockCalls",
    "Generation",
    "LayoutState",
    "StageDispatcher",
    "generation",
    "relative_change",
]
