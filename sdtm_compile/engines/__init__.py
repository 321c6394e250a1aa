"""Engine builders and what serves them.

* :mod:`.registry`: ``name -> build(gm, example_inputs, settings)``: ``eager``, ``inductor``, ``tensorrt``, each
  with its "can I run here?";
* :mod:`.parallel` and :mod:`.compile_worker`: Inductor builds of many regions in compiler processes;
* :mod:`.vec_isa_probe`: Inductor's one-time CPU probe, started early on a thread;
* :mod:`.tensorrt`: the torch-tensorrt 2.13 builder and its option check;
* :mod:`.cache`: the on-disk engine cache.
"""

from .cache import EngineCache, default_cache_dir, sha256_file
from .parallel import build_inductor_parallel
from .registry import ENGINES, EngineBuilder, EngineBuildError, engine_available, register_engine
from .tensorrt import TENSORRT_SETTING_FIELDS, build_tensorrt_engine, tensorrt_options

__all__ = [
    "ENGINES",
    "TENSORRT_SETTING_FIELDS",
    "EngineBuildError",
    "EngineBuilder",
    "EngineCache",
    "build_inductor_parallel",
    "build_tensorrt_engine",
    "default_cache_dir",
    "engine_available",
    "register_engine",
    "sha256_file",
    "tensorrt_options",
]
