"""Quality measures on the trained testbed: what merging costs in image terms.

* :func:`merged_losses`: held-out flow-matching loss at fixed ``(x0, eps, sigma)``, merged vs unmerged, per sigma
  (deterministic and cheap; the increase is the cost of merging at that point of the trajectory);
* :func:`image_psnr` / :func:`image_ssim`: paired PSNR and SSIM of two final images (scikit-image; the testbed
  works in pixel space, so the final latent *is* the image);
* :func:`generation_inputs`: a seeded generation of the testbed (noise and a held-out crop's labels as prompt);
  :func:`generation_batch`: several of them stacked into one batch;
* :func:`plot_samples`: generated samples next to the real held-out crops whose labels prompted them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..._pyplot import pyplot
from ...core.config import MethodConfig
from ...reference import ReferenceTransformer
from ..sampling import GenerationInputs, diffusers_call, generate
from .data import LABEL_SLOTS, fixed_crops
from .model import TestbedModel
from .train import EVAL_SIGMAS, EvalSet, eval_losses, make_eval_set

__all__ = [
    "LossAtSigma",
    "merged_losses",
    "to_image",
    "image_psnr",
    "image_ssim",
    "generation_inputs",
    "generation_batch",
    "null_labels",
    "plot_samples",
]

logger = logging.getLogger(__name__)


def to_image(x: torch.Tensor) -> np.ndarray:
    """A testbed output ``[1, 3, H, W]`` (or ``[3, H, W]``) in [-1, 1] -> ``[H, W, 3]`` float64 in [0, 1]."""
    x = x.reshape(-1, *x.shape[-3:])[0]
    return ((x.double().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


def _metrics():
    try:
        from skimage import metrics
    except ImportError as error:
        raise ImportError("image measures need scikit-image: pip install 'sdtm-compile[testbed]'") from error
    return metrics


def image_psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB, peak 1) of image ``x`` against ``reference`` (both testbed outputs in [-1, 1]); inf if equal."""
    a, b = to_image(x), to_image(reference)
    if np.array_equal(a, b):
        return float("inf")
    return float(_metrics().peak_signal_noise_ratio(b, a, data_range=1.0))


def image_ssim(x: torch.Tensor, reference: torch.Tensor) -> float:
    """SSIM (scikit-image's, 7x7 Gaussian-free windows, RGB averaged) of ``x`` against ``reference``; 1 if equal."""
    return float(_metrics().structural_similarity(to_image(reference), to_image(x), channel_axis=-1, data_range=1.0))


@dataclass(frozen=True)
class LossAtSigma:
    """Held-out flow-matching loss at one noise level, unmerged and merged, and the engine the merged call took."""

    sigma: float
    unmerged: float
    merged: float
    engine: str

    @property
    def increase(self) -> float:
        return self.merged - self.unmerged


def merged_losses(
    model: TestbedModel,
    config: MethodConfig,
    sigmas: tuple[float, ...] = EVAL_SIGMAS,
    evalset: EvalSet | None = None,
) -> list[LossAtSigma]:
    """Held-out flow-matching loss at fixed ``(x0, eps, sigma)`` of the unmodified testbed and of SDTM at
    ``config`` (the eager reference, :class:`~sdtm_compile.reference.ReferenceTransformer`).

    Every merged call is a fresh generation's first call at that sigma (``li`` reset), so it takes the engine the
    schedule picks at ``sigma * 1000`` without any history: the cost of merging at that point, in isolation.
    """
    evalset = evalset if evalset is not None else make_eval_set("heldout", 16)
    reference = ReferenceTransformer(model.transformer, config, history=4)
    engines: dict[float, str] = {}

    def merged(x: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        reference.reset()
        prompt, pooled = model.prompt(labels)
        out = reference(x, prompt, pooled, sigma * 1000, return_dict=False)[0]
        engines[round(float(sigma[0]), 6)] = str(reference.history[-1].key)
        return out

    unmerged_loss = eval_losses(model, evalset, sigmas)
    merged_loss = eval_losses(merged, evalset, sigmas)
    return [LossAtSigma(s, unmerged_loss[s], merged_loss[s], engines[round(s, 6)]) for s in unmerged_loss]


def null_labels(batch: int = 1) -> torch.Tensor:
    """The unconditional prompt's labels ``[B, 6]`` (every slot null)."""
    return torch.zeros(batch, len(LABEL_SLOTS), dtype=torch.long)


@torch.no_grad()
def generation_inputs(model: TestbedModel, seed: int, side: int = 64) -> GenerationInputs:
    """Seed ``seed``'s generation: noise ``[1, 3, side, side]`` and, as prompt, the labels of held-out crop
    ``seed`` (source null); the negative prompt is all nulls. The same seed gives the same inputs everywhere."""
    labels = held_out_prompt(seed)[1]
    g = torch.Generator().manual_seed(seed)
    prompt, pooled = model.prompt(labels)
    negative, negative_pooled = model.prompt(null_labels())
    return GenerationInputs(
        latents=torch.randn(1, 3, side, side, generator=g),
        prompt_embeds=prompt,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=negative,
        negative_pooled_prompt_embeds=negative_pooled,
    )


def generation_batch(model: TestbedModel, seeds: Sequence[int], side: int = 64) -> GenerationInputs:
    """The generations of ``seeds`` as one batch: each field of :func:`generation_inputs` (one seed each) stacked
    along dim 0, in the order of ``seeds`` (noise ``[B, 3, side, side]``, prompts ``[B, 6, D]``, pooled
    ``[B, D]``). Row ``i`` is exactly seed ``seeds[i]``'s one-image input."""
    if len(seeds) == 0:
        raise ValueError("generation_batch needs at least one seed")
    rows = [generation_inputs(model, seed, side) for seed in seeds]
    return GenerationInputs(
        **{f.name: torch.cat([getattr(row, f.name) for row in rows]) for f in dataclasses.fields(GenerationInputs)}
    )


def held_out_prompt(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out crop ``[1, 3, 64, 64]`` and labels ``[1, 6]`` that prompt seed ``seed``'s generation."""
    return fixed_crops("heldout", 1, seed=10_000 + seed)


def describe(labels: torch.Tensor) -> str:
    """The words of a label row, e.g. ``"top left, green, textured, mid"`` (nulls left out)."""
    words = [slot_words[i - 1] for slot_words, i in zip(LABEL_SLOTS.values(), labels.tolist()) if i > 0]
    return ", ".join(words)


def plot_samples(
    model: TestbedModel,
    path: str | Path,
    seeds: tuple[int, ...] = tuple(range(8)),
    steps: int = 28,
    guidance_scale: float = 3.0,
    call: Callable | None = None,
) -> str:
    """Generated samples (bottom row) next to the real held-out crops whose labels prompted them (top row)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(seeds), figsize=(1.6 * len(seeds), 3.6), squeeze=False)
    for col, seed in enumerate(seeds):
        crop, labels = held_out_prompt(seed)
        image = generate(
            call or diffusers_call(model.transformer), generation_inputs(model, seed), steps, guidance_scale
        )
        for row, picture in enumerate((crop, image)):
            axes[row][col].imshow(to_image(picture), interpolation="nearest")
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
        axes[0][col].set_title(describe(labels[0]).replace(", ", "\n", 2), fontsize=6)
        logger.info("sample %d/%d done", col + 1, len(seeds))
    axes[0][0].set_ylabel("held-out crop", fontsize=8)
    axes[1][0].set_ylabel("generated", fontsize=8)
    fig.suptitle(
        f"testbed-1024: samples ({steps} steps, CFG {guidance_scale}) prompted with held-out crops' labels", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
