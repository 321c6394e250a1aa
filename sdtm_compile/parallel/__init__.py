"""Token merging under context parallelism (diffusers' Ulysses): what SD3 needs to run it, and what it moves.

* :mod:`.sd3`: SD3 / SD3.5's context-parallel plan and an attention processor through ``dispatch_attention_fn``;
* :mod:`.traffic`: the bytes each rank's collectives move, read off the engines' graphs;
* :mod:`.launch`: start the ranks (``torchrun``; local gloo processes on a CPU).

The backends need nothing from here: they find the split in the graph Dynamo traces (see ``docs/parallel.md``).
"""

from .launch import free_port, init_ranks, spawn_ranks
from .sd3 import (
    SD3_CP_PLAN,
    ContextParallelTextError,
    SD3ContextParallelAttnProcessor,
    prepare_sd3_context_parallel,
    sd3_cp_plan,
)
from .traffic import CollectiveBytes, collective_bytes

__all__ = [
    "CollectiveBytes",
    "collective_bytes",
    "free_port",
    "init_ranks",
    "spawn_ranks",
    "SD3_CP_PLAN",
    "ContextParallelTextError",
    "SD3ContextParallelAttnProcessor",
    "prepare_sd3_context_parallel",
    "sd3_cp_plan",
]
