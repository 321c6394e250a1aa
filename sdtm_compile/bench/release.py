"""The authors' release beside ours: run ``apply_SDTM`` from a user's copy of ``TR_SDTM.py`` on our model.

The release is not a dependency and is never committed here: the user fetches it (the authors' repository) and
points the benchmark at the file (``scripts/release_side_by_side.py --release PATH``). :func:`release_applied` loads it,
patches the transformer the way ``apply_SDTM`` does - it swaps the classes of the transformer and of every
``JointTransformerBlock`` for its own subclasses and wraps a *pipeline* whose ``__call__`` resets its step counter
- and undoes the patch on exit, so the same model then runs unmodified or compiled.

``apply_SDTM`` needs a pipeline object only for that ``__call__``: a diffusers pipeline would also need text
encoders, a VAE and a scheduler we do not build. :class:`ReleasePipeline` is the smallest object it accepts: a
``transformer`` attribute and a ``__call__(num_inference_steps=...)`` that runs our sampling loop, one transformer
call per step (CFG batched), as ``StableDiffusion3Pipeline`` calls it.

The schedule is set to ours: the release switches stages at an absolute step (``step_current <= switch_step``:
structure), we at a fraction of the trajectory (``s / (S - 1) < switch_at``); :func:`release_switch_step` gives the
step that makes them equal for a step count. Its ratio (``compute_ratio``: the same cosine over ``s / (S - 1)``)
and counts (``reduce_num = int(x.shape[1] * ratio_current)``, then ``reduce_num // 48 * 16`` in ``SSM``) are ours
with ``counts="exact"``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..core.schedule import Stage, position_at_step
from ..methods.sdtm.config import SDTMConfig
from ..methods.sdtm.schedule import stage_at

__all__ = ["ReleaseError", "ReleasePipeline", "load_release", "release_applied", "release_switch_step"]


class ReleaseError(RuntimeError):
    """The file is not a release ``apply_SDTM`` can be run from; the message says what to do."""


class ReleasePipeline(torch.nn.Module):
    """What ``apply_SDTM(pipe, ...)`` patches: ``pipe.transformer`` and ``pipe(num_inference_steps=S)``, which runs
    ``generate(S)`` (our sampling loop over the patched transformer) and returns its latent."""

    def __init__(self, transformer: torch.nn.Module, generate: Callable[[int], torch.Tensor]) -> None:
        super().__init__()
        self.transformer = transformer
        self._generate = generate

    def __call__(self, *args: Any, num_inference_steps: int, **kwargs: Any) -> torch.Tensor:
        return self._generate(num_inference_steps)


def load_release(path: str | Path) -> Any:
    """The module of the user's ``TR_SDTM.py`` (it must define ``apply_SDTM``)."""
    path = Path(path)
    if not path.is_file():
        raise ReleaseError(
            f"{path}: no such file; fetch TR_SDTM.py from the authors' SDTM repository and pass its path"
        )
    spec = importlib.util.spec_from_file_location("sdtm_release_TR_SDTM", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except ImportError as err:
        raise ReleaseError(f"{path} imports {err.name!r}, which is not installed: pip install {err.name}") from err
    if not callable(getattr(module, "apply_SDTM", None)):
        raise ReleaseError(f"{path} defines no apply_SDTM: pass the authors' TR_SDTM.py")
    sys.modules.pop("sdtm_release_TR_SDTM", None)
    return module


def release_switch_step(config: SDTMConfig, num_steps: int) -> int:
    """The release's ``switch_step`` that puts the stage switch where ``config.switch_at`` does at ``num_steps``
    steps: the last structure step (-1 when no step is)."""
    structure = [s for s in range(num_steps) if stage_at(position_at_step(s, num_steps), config) is Stage.STRUCTURE]
    return max(structure, default=-1)


@contextlib.contextmanager
def release_applied(
    release: Any,
    transformer: torch.nn.Module,
    generate: Callable[[int], torch.Tensor],
    config: SDTMConfig,
    num_steps: int,
) -> Iterator[ReleasePipeline]:
    """``apply_SDTM`` at ``config``'s ratio, deviation, switch and ``a_s`` on ``transformer`` (cache fusion when
    ``config`` has it: ``protect_steps_frequency`` and ``mcw``); yields the pipeline to call as
    ``pipe(num_inference_steps=num_steps)``; the transformer's classes are restored on exit."""
    # apply_SDTM swaps classes and sets attributes (it turns SD3.5's dual attention off): all of it comes back
    classes = {module: module.__class__ for module in transformer.modules()}
    dual = {m: m.use_dual_attention for m in transformer.modules() if "use_dual_attention" in m.__dict__}
    pipe = ReleasePipeline(transformer, generate)
    try:
        release.apply_SDTM(
            pipe,
            ratio=config.ratio,
            deviation=config.deviation,
            switch_step=release_switch_step(config, num_steps),
            use_rand=False,  # the merged value is the window's mean either way; no random draws in a timing
            a_s=config.a_s,
            mcw=config.mcw,
            protect_steps_frequency=config.protect_every if config.cache_fusion else None,
        )
        yield pipe
    finally:
        for module, cls in classes.items():
            module.__class__ = cls
            module.__dict__.pop("_tore_info", None)
        for module, value in dual.items():
            module.use_dual_attention = value
