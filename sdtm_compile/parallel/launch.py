"""Start the ranks of a context-parallel run: under ``torchrun`` (GPUs, NCCL) or, to try and test it on a CPU, as
local processes on gloo.

* :func:`init_ranks`: join the process group ``torchrun`` describes (``RANK`` / ``WORLD_SIZE`` / ``MASTER_*``):
  NCCL on GPUs, gloo on a CPU; returns ``(rank, world_size)``.
* :func:`spawn_ranks`: run ``fn(rank, world_size, *args)`` in ``world_size`` local processes on gloo (what the tests
  and the CPU examples do); a rank's exception is raised in the caller.

On a machine without an accelerator, diffusers' ``enable_parallelism`` computes ``rank % device_count()``, which is
``rank % 0``; :func:`init_ranks` makes ``torch.accelerator.device_count()`` answer 1 there (one CPU "device") and
logs that it did.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init_ranks", "spawn_ranks", "free_port"]

logger = logging.getLogger(__name__)


def _one_cpu_device() -> None:
    if torch.accelerator.is_available() or torch.accelerator.device_count() > 0:
        return
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    logger.info("no accelerator: torch.accelerator.device_count() answers 1 (diffusers places rank %% count)")


def init_ranks(backend: str | None = None) -> tuple[int, int]:
    """Join the process group of this run (``torchrun``'s environment) and return ``(rank, world_size)``.

    ``backend``: ``None`` picks NCCL when CUDA is available, else gloo. On CUDA each rank takes device
    ``LOCAL_RANK``. Already initialised: returns the current group's rank and size.
    """
    if not dist.is_initialized():
        missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"no process group and no torchrun environment ({', '.join(missing)} unset): start the script with "
                "torchrun --nproc-per-node N, or call spawn_ranks to run N local processes on gloo"
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    _one_cpu_device()
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    """A TCP port nothing listens on now (for a local run's ``MASTER_PORT``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, threads: int, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(threads)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0"
    )
    init_ranks("gloo")
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any, threads: int | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new local processes joined on gloo, and wait for them.

    ``fn`` must be importable by name (a module-level function: the processes are spawned). ``threads``: each
    process's ``torch.set_num_threads`` (default: the cores shared out among the ranks).
    """
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    torch.multiprocessing.spawn(
        _rank_entry, args=(world_size, free_port(), threads, fn, args), nprocs=world_size, join=True
    )
