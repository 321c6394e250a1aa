"""Inductor's one-time CPU probe, started on a thread when the backend is entered.

Before it generates CPU code, Inductor checks which SIMD instruction sets the host compiler can build
(``torch._inductor.cpu_vec_isa.valid_vec_isa_list``): one C++ test program per instruction set, compiled into
Inductor's cache, then loaded in a subprocess. Measured on our 2-core CI machine: 6.7 s with an empty cache, 1.1 s
with a warm one, once per process. A plain ``torch.compile`` pays it in the middle of its compile. We start it when
the backend is entered: its compiler runs on the other core while the passes rewrite the graph and the regions are
lowered, and the compiler processes of a parallel build then find its programs in the shared cache (they wait on
Inductor's own file locks meanwhile, so nothing is compiled twice).

The probe's answer is cached in the process (``functools.cache``): everything in this process that compiles or
loads an Inductor engine calls :func:`wait_for_vec_isa_probe` first, so that the probe never runs twice at once.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["start_vec_isa_probe", "wait_for_vec_isa_probe"]

logger = logging.getLogger(__name__)

_probe: threading.Thread | None = None


def start_vec_isa_probe() -> None:
    """Start Inductor's CPU probe on a daemon thread (once per process; later calls do nothing)."""
    global _probe
    if _probe is not None:
        return
    # Imported here, on the calling thread: a module imported on two threads at once can deadlock on its lock
    import torch._inductor.codecache  # noqa: F401  (the probe's compile and load helpers)
    import torch._inductor.cpp_builder  # noqa: F401
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    def probe() -> None:
        start = time.perf_counter()
        try:
            found = valid_vec_isa_list()
        except Exception as err:  # Inductor runs the probe again (and reports) where it needs it
            logger.debug("Inductor's CPU probe failed on its thread: %s", err)
            return
        logger.debug("Inductor's CPU probe: %s in %.1f s", [str(isa) for isa in found], time.perf_counter() - start)

    _probe = threading.Thread(target=probe, name="sdtm-vec-isa-probe", daemon=True)
    _probe.start()


def wait_for_vec_isa_probe() -> None:
    """Wait for the probe :func:`start_vec_isa_probe` started, if any (it is then cached in this process)."""
    if _probe is not None:
        _probe.join()
