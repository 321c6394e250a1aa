"""Whole generations of a candidate configuration on a workload, and their quality against the unmerged model's.

Shared by the tuner (:mod:`.tune`) and the speed / quality front (:mod:`.front`): a :class:`Candidate` is a method
config with, optionally, our first-block step cache; :class:`QualitySampler` generates the images of a batch of seeds
through its eager path (the eager reference, or the backend's eager engine when the step cache is on) and measures
them against the unmerged model's images of the same seeds (paired PSNR / SSIM and, on a trained testbed, the sliced
Wasserstein distance to real held-out crops added over the unmerged model's, :mod:`.distribution`);
:func:`generation_flops` counts a generation's FLOPs from the engines that served its steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.config import MethodConfig
from ..core.schedule import FULL
from ..models.sampling import GenerationInputs, diffusers_call, generate, make_generation_inputs, psnr
from ..runtime import FirstBlockCacheConfig
from .config import BenchConfig
from .instrument import CapturedBucketGraphs
from .workload import Workload

__all__ = ["Candidate", "QualitySampler", "generation_flops"]


@dataclass(frozen=True)
class Candidate:
    """One configuration the tuner may choose: a method config and, optionally, our first-block step cache."""

    name: str
    method: MethodConfig
    step_cache: float | None = None  #: the first-block cache's threshold (``None``: off)

    def options(self) -> dict[str, Any]:
        """Its ``torch.compile(..., backend="sdtm", options=...)`` dict (JSON-ready)."""
        options: dict[str, Any] = {"method": self.method.to_dict()}
        if self.step_cache is not None:
            options["step_cache"] = {"threshold": self.step_cache}
        return options


class QualitySampler:
    """Whole generations of a batch of seeds through a candidate's eager path, and their quality against the
    unmerged model's images of the same seeds."""

    def __init__(self, workload: Workload, config: BenchConfig) -> None:
        self.workload, self.config = workload, config
        self.side = workload.grid[0] * 2
        self._unmerged: dict[int, torch.Tensor] = {}
        self._reals: dict[tuple[int, int], torch.Tensor] = {}
        self._unmerged_swd: dict[tuple[tuple[int, ...], int], float] = {}

    def inputs(self, seeds: Sequence[int]) -> GenerationInputs:
        """Stacked generation inputs of ``seeds`` for a model with random weights (``make_generation_inputs``)."""
        rows = [make_generation_inputs(self.workload.spec, (self.side, self.side), seed=s) for s in seeds]
        return GenerationInputs(*(torch.cat([getattr(r, f.name) for r in rows]) for f in dataclasses.fields(rows[0])))

    def call(self, candidate: Candidate | None) -> tuple[Callable[..., torch.Tensor], Callable[[], list[Any]]]:
        """The candidate's transformer call and a function returning the dispatcher records of its last generation
        (``None``: the unmerged model, no records)."""
        model = self.workload.model
        if candidate is None:
            return diffusers_call(model), list
        if candidate.step_cache is None:
            from ..reference import ReferenceTransformer

            reference = ReferenceTransformer(model, candidate.method, history=100_000)
            return diffusers_call(reference), lambda: list(reference.dispatcher.history)
        from ..compiler.backend import SDTMBackend

        options = {"method": candidate.method, "engine": "eager", "history": 100_000, "cache_dir": False}
        backend = SDTMBackend({**options, "step_cache": FirstBlockCacheConfig(candidate.step_cache)})
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, dynamic=False)
        return diffusers_call(compiled), lambda: list(backend.compiled[-1].dispatcher.history)

    def images(self, candidate: Candidate | None, seeds: Sequence[int], batch: int) -> tuple[torch.Tensor, list]:
        """Final images (latents) ``[S, C, H, W]`` of ``seeds`` and the records of the last batch's generation."""
        call, records = self.call(candidate)
        return self.run(call, seeds, batch), records()

    def run(self, call: Callable[..., torch.Tensor], seeds: Sequence[int], batch: int) -> torch.Tensor:
        """Final images (latents) ``[S, C, H, W]`` of ``seeds`` through ``call``, ``batch`` seeds a generation (a
        trained testbed: :func:`~.distribution.sample_testbed`, its prompts and clamped images)."""
        if self.workload.testbed is not None:
            from .distribution import sample_testbed

            steps, guidance = self.config.steps, self.config.guidance_scale
            return sample_testbed(self.workload.testbed, call, seeds, steps=steps, guidance_scale=guidance,  # type: ignore[arg-type]
                                  batch=batch, progress=False)  # fmt: skip
        out = []
        for start in range(0, len(seeds), batch):
            chunk = seeds[start : start + batch]
            with torch.no_grad():
                latent = generate(call, self.inputs(chunk), self.config.steps, self.config.guidance_scale, shift=None)  # type: ignore[arg-type]
            out.append(latent)
        return torch.cat(out)

    def unmerged(self, seeds: Sequence[int], batch: int) -> torch.Tensor:
        missing = [s for s in seeds if s not in self._unmerged]
        if missing:
            images, _ = self.images(None, missing, batch)
            self._unmerged.update(zip(missing, images))
        return torch.stack([self._unmerged[s] for s in seeds])

    def swd_to_real(self, images: torch.Tensor, seed_set: int) -> float:
        """SWD (x 1e3) of ``images`` to as many real held-out crops, drawn for seed set ``seed_set``."""
        from .distribution import REAL_CROP_SEED, real_crops, swd

        if (len(images), seed_set) not in self._reals:
            self._reals[(len(images), seed_set)] = real_crops(len(images), REAL_CROP_SEED + seed_set)
        return swd(images, self._reals[(len(images), seed_set)]).mean

    def unmerged_swd_to_real(self, seeds: Sequence[int], seed_set: int, batch: int) -> float:
        key = (tuple(seeds), seed_set)
        if key not in self._unmerged_swd:
            self._unmerged_swd[key] = self.swd_to_real(self.unmerged(seeds, batch), seed_set)
        return self._unmerged_swd[key]

    def quality(self, images: list[torch.Tensor], sets: list[list[int]], batch: int) -> dict[str, Any]:
        """Paired PSNR / SSIM of each seed set's ``images`` averaged over the sets and, on a trained testbed, the SWD
        to real crops added over the unmerged model's (each set against its own real crops), with the spread between
        the two sets and the per-set values."""
        values = [self.paired(x, seeds, batch) for x, seeds in zip(images, sets)]
        out: dict[str, Any] = {key: sum(v[key] for v in values) / len(values) for key in values[0]}
        if self.workload.pixel_space:
            own = [self.swd_to_real(x, i) for i, x in enumerate(images)]
            unmerged = [self.unmerged_swd_to_real(seeds, i, batch) for i, seeds in enumerate(sets)]
            added = [a - b for a, b in zip(own, unmerged)]
            out |= {
                "swd_real": sum(own) / len(own),
                "unmerged_swd_real": sum(unmerged) / len(unmerged),
                "swd_added": sum(added) / len(added),
                "swd_added_spread": max(added) - min(added),
                "swd_real_per_set": own,
                "unmerged_swd_real_per_set": unmerged,
            }
        return out

    def paired(self, images: torch.Tensor, seeds: Sequence[int], batch: int) -> dict[str, float]:
        """Mean paired PSNR (and SSIM on trained testbeds) against the unmerged images of ``seeds``."""
        reference = self.unmerged(seeds, batch)
        if self.workload.pixel_space:
            from ..models.testbed.quality import image_psnr, image_ssim

            pairs = list(zip(images, reference))
            return {
                "psnr": sum(image_psnr(x[None], y[None]) for x, y in pairs) / len(pairs),
                "ssim": sum(image_ssim(x[None], y[None]) for x, y in pairs) / len(pairs),
            }
        return {"psnr": sum(psnr(x, y) for x, y in zip(images, reference)) / len(seeds)}


def generation_flops(records: list[Any], candidate: Candidate, graphs: CapturedBucketGraphs, steps: int, blocks: int):
    """``(FLOP ratio, step counts)`` of a generation from the dispatcher records of its calls."""
    full = graphs.flops(FULL, candidate.method).total
    per_step = [r for r in records if r.new_step][-steps:] if records else []
    if not per_step:  # the unmerged model
        return 1.0, {"merged": 0, "unmerged": steps, "skipped": 0}
    head = full / blocks  # the step cache's head: the embeddings and one unmerged block, about a block's work
    # a computed step runs the head too, and its engine repeats the first block unless it resumed from the head
    again = 0.0 if candidate.step_cache is None else head
    flops = [
        head if r.skipped else graphs.flops(r.key, candidate.method).total + (0.0 if r.resumed else again)
        for r in per_step
    ]
    skipped = sum(r.skipped for r in per_step)
    unmerged = sum(r.key == FULL and not r.skipped for r in per_step)
    counts = {"merged": len(per_step) - skipped - unmerged, "unmerged": unmerged, "skipped": skipped}
    return full * len(per_step) / sum(flops), counts
