"""The compile harness: ``torch.compile`` the model (Inductor baseline or the ``sdtm`` backend), cold or warm,
and time its first call.

Cold compiles run in fresh caches under a scratch directory (:func:`compiler_caches`): the SDTM engine cache
goes to the backend through its ``cache_dir`` option (no process-wide ``$SDTM_CACHE_DIR``); Inductor's cache
is redirected with ``torch._inductor.runtime.cache_dir_utils.temporary_cache_dir`` while the block runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..core.config import MethodConfig
from ..models.sampling import GenerationInputs, cfg_batch, cfg_prompts

__all__ = ["Compiled", "cfg_call_inputs", "compiler_caches"]


def cfg_call_inputs(inputs: GenerationInputs, timestep: float) -> dict[str, torch.Tensor]:
    """The batch-2 transformer inputs of one CFG step, laid out exactly as
    :func:`~sdtm_compile.models.sampling.generate` passes them (a probe laid out differently would make the first
    generation recompile)."""
    latent, expanded = cfg_batch(inputs.latents, torch.tensor(float(timestep)))
    prompt, pooled = cfg_prompts(inputs)
    return {
        "hidden_states": latent,
        "encoder_hidden_states": prompt,
        "pooled_projections": pooled,
        "timestep": expanded,
    }


@contextlib.contextmanager
def compiler_caches(cold: bool, scratch: Path) -> Iterator[Path | None]:
    """Fresh Inductor and engine caches under ``scratch`` (``cold``), or the user's caches as they are.

    Yields the engine cache directory to give every :class:`Compiled` of the block (the ``sdtm`` backend's
    ``cache_dir`` option): ``scratch / "sdtm"`` when cold, ``None`` (the backend's default cache) otherwise.
    """
    if not cold:
        yield None
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with temporary_cache_dir(str(scratch / "inductor")):
        yield scratch / "sdtm"


class Compiled:
    """One ``torch.compile`` of the model (baseline or SDTM) and the time its first call took.

    Args:
        model: the transformer.
        method: the method's configuration, or ``None`` for the plain Inductor baseline.
        engine: engines of the ``sdtm`` backend (``"inductor"`` or ``"eager"``; ``"eager"`` compiles the baseline
            with Dynamo's eager backend as well).
        probe: the inputs of the first (timed) call, laid out as a generation passes them.
        cache_dir: the ``sdtm`` backend's engine cache (its ``cache_dir`` option); ``None`` for its default.

    Attributes:
        backend: the :class:`~sdtm_compile.compiler.backend.SDTMBackend` (``None`` for the baseline).
        module: the compiled module.
        build_s: seconds of the first call (Dynamo capture, rewrite, engine builds).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: MethodConfig | None,
        engine: str,
        probe: dict[str, Any],
        cache_dir: Path | None = None,
    ) -> None:
        from ..compiler.backend import SDTMBackend

        # history: the step table reads the engines of the last generation's calls
        options = {"method": method, "engine": engine, "history": 1024, "cache_dir": cache_dir}
        self.backend = None if method is None else SDTMBackend(options, name="sdtm")
        if self.backend is None:
            # the baseline compiles with Inductor, except in a test run of eager engines: Dynamo's eager backend
            # (no Inductor build, so the run is fast; its "speed-ups" then compare eager code with eager code)
            self.module = torch.compile(model, dynamic=False, backend="inductor" if engine == "inductor" else "eager")
        else:
            self.module = torch.compile(model, backend=self.backend, dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            self.module(**probe, return_dict=False)
        self.build_s = time.perf_counter() - start

    @property
    def compiled_graph(self) -> Any:
        """The ``sdtm`` backend's latest compiled graph (``None`` for the baseline)."""
        return self.backend.compiled[-1] if self.backend is not None else None
