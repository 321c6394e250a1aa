"""A distribution distance for generated images that needs no pretrained network: the multi-scale sliced
Wasserstein distance (SWD) on Laplacian-pyramid patches of Karras et al. 2018 ("Progressive Growing of GANs for
Improved Quality, Stability, and Variation", Sec. 5 and Appendix D), and the batched testbed sampling that feeds it.

What it measures. Each image set is split into a Laplacian pyramid (:func:`laplacian_pyramid`: band-pass levels,
finest first, then the low-pass residual). From every level, random 7x7 neighbourhoods of every image become
descriptors (``C * 49`` numbers each, :func:`patch_descriptors`), normalised per colour channel
(:func:`normalize_descriptors`). The distance between the two descriptor sets of a level is the sliced Wasserstein
distance (:func:`sliced_wasserstein`): project both on random unit directions, sort, and average the absolute
differences of the sorted projections (the 1-D earth mover's distance), averaged over the directions. Fine levels
compare texture and edges, coarse levels layout and colour blobs: FID-like "are these images distributed like
those" rather than a paired per-image fidelity.

Why no network. FID / KID / CLIP score need Inception or CLIP weights, which cannot be downloaded here. SWD needs
only the images: the "features" are raw pyramid patches, so it runs anywhere, deterministically, on CPU in a second
or so for a few thousand patches.

How to read it. :func:`swd` reports each level's distance multiplied by 1e3, as the paper's tables do, and their
mean. Lower is closer; two sets of the same images give exactly 0 (the same seed draws the same patch positions and
directions for both sides). The values depend on the sample size (fewer descriptors: more noise in the sorted
projections, a higher floor), on ``patches_per_image``, ``projections`` and ``levels``: compare numbers only at the
same settings and sample counts, and read a difference against the floor two disjoint draws of the same real
distribution give (:func:`distribution_report` reports the spread over two seed sets for that). Because each set
is normalised by its own per-channel statistics (as in the paper), the distance is blind to a global per-channel
shift or gain of a level (e.g. a uniformly brighter set): pair it with the paired PSNR / SSIM of
:func:`distribution_report`, which see those.

On the trained testbed (:mod:`sdtm_compile.models.testbed`): :func:`real_crops` are held-out real crops,
:func:`sample_testbed` generates images of a list of seeds in batches (one transformer call per step for ``batch``
seeds, CFG rows unconditional first), and :func:`distribution_report` compares merged configurations with the
unmerged model and with the real crops.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..core.config import MethodConfig
from ..models.sampling import TransformerCall, diffusers_call, generate

__all__ = [
    "PATCH_SIZE",
    "MIN_LEVEL_SIDE",
    "SWDResult",
    "laplacian_pyramid",
    "default_levels",
    "patch_descriptors",
    "normalize_descriptors",
    "sliced_wasserstein",
    "swd",
    "REAL_CROP_SEED",
    "real_crops",
    "sample_testbed",
    "SeedSetValues",
    "ConfigDistribution",
    "DistributionReport",
    "distribution_report",
]

logger = logging.getLogger(__name__)

#: the first seed of the real crops each seed set is compared with (set ``i`` draws ``REAL_CROP_SEED + i``): far from
#: the seeds of generated images, and the same everywhere a distance to real crops is reported
REAL_CROP_SEED = 20_000

#: the side of the square neighbourhoods taken as descriptors (the paper's 7x7)
PATCH_SIZE = 7
#: the smallest short side :func:`default_levels` lets the coarsest level reach (the paper stops at 16x16)
MIN_LEVEL_SIDE = 16
#: projections per chunk in :func:`sliced_wasserstein` (memory: ``n * chunk`` floats per side)
_CHUNK = 128

Normalization = Literal["per_set", "joint"]


# ----------------------------------------------------------------------------------------------- the pyramid


def _binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` blurred with the separable 5x5 binomial kernel ``[1, 4, 6, 4, 1] / 16`` (reflect
    padding, so the borders are not darkened); same shape."""
    channels = x.shape[1]
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, 5).expand(channels, 1, 1, 5), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, 5, 1).expand(channels, 1, 5, 1), groups=channels)


def _downsample(x: torch.Tensor) -> torch.Tensor:
    """Blur, then keep every other row and column: ``[N, C, H, W]`` -> ``[N, C, ceil(H/2), ceil(W/2)]``."""
    return _binomial_blur(x)[..., ::2, ::2]


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The expand step of a Burt-Adelson pyramid: zeros inserted between the samples of ``x`` ``[N, C, h, w]``,
    the binomial blur (times 4, so the mean is kept), cropped to ``size`` ``(H, W)``: ``[N, C, H, W]``."""
    n, c, h, w = x.shape
    spread = x.new_zeros(n, c, 2 * h, 2 * w)
    spread[..., ::2, ::2] = 4 * x
    return _binomial_blur(spread)[..., : size[0], : size[1]]


def _level_sides(side: int, levels: int) -> list[int]:
    """The side of every pyramid level of an image side ``side`` (each level ``ceil(previous / 2)``)."""
    sides = [side]
    for _ in range(levels - 1):
        sides.append((sides[-1] + 1) // 2)
    return sides


def default_levels(height: int, width: int) -> int:
    """How many pyramid levels :func:`swd` uses when not told: as many as halving allows while the coarsest level's
    short side stays at least :data:`MIN_LEVEL_SIDE` (16) px, as the paper does (1024 px down to 16 px: 7 levels;
    the 64x64 testbed: 64, 32, 16 = 3 levels). Images shorter than 16 px get one level (the image itself), down to
    :data:`PATCH_SIZE`; below it there is no 7x7 patch to take (``ValueError``).

    A 16 px floor rather than 8: on an 8x8 level a 7x7 patch is nearly the whole picture at that scale, so its
    "descriptors" would compare whole thumbnails with few distinct positions, a different and noisier measure.
    """
    short = min(height, width)
    if short < PATCH_SIZE:
        raise ValueError(
            f"images of {height}x{width} px are smaller than one {PATCH_SIZE}x{PATCH_SIZE} patch; SWD needs images of "
            f"at least {PATCH_SIZE} px a side (upsample them, or compare larger images)"
        )
    if short < MIN_LEVEL_SIDE:
        return 1
    return int(math.floor(math.log2(short / MIN_LEVEL_SIDE))) + 1


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The Laplacian pyramid of ``images`` ``[N, C, H, W]``: ``levels`` tensors, finest first.

    Level ``i < levels - 1`` is the band-pass ``G_i - expand(G_{i+1})`` ``[N, C, H_i, W_i]`` (``G_0`` = the images,
    ``G_{i+1}`` = ``G_i`` blurred with the 5x5 binomial kernel ``[1, 4, 6, 4, 1] / 16`` (separable, reflect padding)
    and downsampled by 2; ``expand`` upsamples by 2 with the same kernel); the last level is the Gaussian residual
    ``G_{levels-1}``. ``H_i = ceil(H_{i-1} / 2)``. Summing the expanded levels from the coarsest back gives the
    images exactly (up to float rounding). ``levels`` = 1: ``[images]``.
    """
    if images.dim() != 4:
        raise ValueError(f"laplacian_pyramid takes images [N, C, H, W], got shape {tuple(images.shape)}")
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    for side in (images.shape[-2], images.shape[-1]):
        blurred = _level_sides(side, levels)[:-1]  # every level but the last is blurred (reflect padding of 2)
        if blurred and min(blurred) < 3:
            raise ValueError(
                f"{levels} pyramid levels do not fit images of {images.shape[-2]}x{images.shape[-1]} px (a level "
                f"of {min(blurred)} px cannot be blurred); use fewer levels"
            )
    pyramid: list[torch.Tensor] = []
    current = images
    for _ in range(levels - 1):
        coarser = _downsample(current)
        pyramid.append(current - _upsample(coarser, (current.shape[-2], current.shape[-1])))
        current = coarser
    pyramid.append(current)
    return pyramid


# ------------------------------------------------------------------------------------------ the descriptors


def patch_descriptors(level: torch.Tensor, patches_per_image: int, generator: torch.Generator) -> torch.Tensor:
    """``patches_per_image`` random 7x7 neighbourhoods of every image of ``level`` ``[N, C, H, W]`` (``H, W >= 7``;
    top-left corners uniform over the valid positions, drawn from ``generator``), flattened channel-major:
    ``[N * patches_per_image, C * 49]`` (row ``n * P + p``: image ``n``'s patch ``p``)."""
    n, c, h, w = level.shape
    if h < PATCH_SIZE or w < PATCH_SIZE:
        raise ValueError(f"a {h}x{w} level has no {PATCH_SIZE}x{PATCH_SIZE} patch; use fewer pyramid levels")
    tops = torch.randint(0, h - PATCH_SIZE + 1, (n, patches_per_image), generator=generator)
    lefts = torch.randint(0, w - PATCH_SIZE + 1, (n, patches_per_image), generator=generator)
    offsets = torch.arange(PATCH_SIZE)
    rows = (tops[..., None, None] + offsets[:, None]).to(level.device)  # [N, P, 7, 1]
    cols = (lefts[..., None, None] + offsets[None, :]).to(level.device)  # [N, P, 1, 7]
    index = torch.arange(n, device=level.device)[:, None, None, None]
    patches = level.permute(0, 2, 3, 1)[index, rows, cols]  # [N, P, 7, 7, C]
    return patches.permute(0, 1, 4, 2, 3).reshape(n * patches_per_image, c * PATCH_SIZE * PATCH_SIZE)


def _channel_stats(descriptors: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std ``[1, C, 1]`` of descriptors ``[n, C * 49]`` (over every descriptor and pixel)."""
    per_channel = descriptors.reshape(descriptors.shape[0], channels, -1)
    mean = per_channel.mean(dim=(0, 2), keepdim=True)
    std = per_channel.std(dim=(0, 2), keepdim=True)
    return mean, std


def normalize_descriptors(
    descriptors: torch.Tensor, channels: int, stats: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Descriptors ``[n, C * 49]`` with each colour channel's mean subtracted and divided by its std (over every
    descriptor and pixel of the set; ``stats``: a ``(mean, std)`` pair ``[1, C, 1]`` to use instead). A constant
    channel (std 0) is only centred. Same shape."""
    mean, std = stats if stats is not None else _channel_stats(descriptors, channels)
    std = torch.where(std > 0, std, torch.ones_like(std))
    per_channel = descriptors.reshape(descriptors.shape[0], channels, -1)
    return ((per_channel - mean) / std).reshape(descriptors.shape)


# --------------------------------------------------------------------------------------------- the distance


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int, generator: torch.Generator) -> float:
    """The sliced Wasserstein-1 distance between the point sets ``a`` and ``b`` ``[n, d]``.

    ``projections`` random unit directions (Gaussian, normalised; drawn from ``generator``): both sets are projected
    on each, sorted, and the mean absolute difference of the sorted projections is that direction's 1-D earth
    mover's distance; the result is its mean over the directions. Both sets must hold the same number ``n`` of
    points (then the sorted projections pair up one to one; :func:`swd` subsamples the larger set when the image
    counts differ). Directions are processed ``128`` at a time, so memory stays at ``2 * n * 128`` floats.
    Exactly 0 for equal sets; for ``d`` = 1 it is the 1-D earth mover's distance itself.
    """
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"sliced_wasserstein takes point sets [n, d], got shapes {tuple(a.shape)}, {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"sliced_wasserstein needs the same number of points of the same dimension on both sides, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}; subsample the larger set first"
        )
    if a.shape[0] == 0:
        raise ValueError("sliced_wasserstein needs at least one point a side")
    if projections < 1:
        raise ValueError(f"projections must be at least 1, got {projections}")
    total = 0.0
    done = 0
    while done < projections:
        count = min(_CHUNK, projections - done)
        directions = torch.randn(a.shape[1], count, generator=generator, dtype=torch.float64)
        directions = (directions / directions.norm(dim=0, keepdim=True)).to(a.dtype).to(a.device)
        proj_a = torch.sort(a @ directions, dim=0).values  # [n, count]
        proj_b = torch.sort(b @ directions, dim=0).values
        total += float((proj_a - proj_b).abs().double().mean(dim=0).sum())
        done += count
    return total / projections


# ------------------------------------------------------------------------------------------------------ swd


@dataclass(frozen=True)
class SWDResult:
    """:func:`swd`'s distances, each multiplied by 1e3 as the paper reports them.

    Attributes:
        per_level: one distance per pyramid level, finest first (the last: the low-pass residual).
        mean: their mean (the paper's "average" column).
        level_sizes: each level's ``(H, W)``, finest first.
    """

    per_level: tuple[float, ...]
    mean: float
    level_sizes: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "per_level": list(self.per_level),
            "mean": self.mean,
            "level_sizes": [list(size) for size in self.level_sizes],
        }


def _sub_seed(seed: int, level: int, stream: int) -> torch.Generator:
    """A generator of its own for (seed, level, stream), the same in every process and for both image sets."""
    return torch.Generator().manual_seed((seed * 1_000_003 + level * 101 + stream) % (2**63))


def _check_images(name: str, images: Any) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a tensor [N, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"{name} must be a batch of images [N, C, H, W], got shape {tuple(images.shape)}; add a batch dimension "
            "(images[None]) for one image, or stack a list with torch.stack"
        )
    if images.shape[0] < 2:
        raise ValueError(
            f"{name} holds {images.shape[0]} image(s); SWD compares distributions and needs at least 2 images a set "
            "(use dozens for a stable value)"
        )
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point (images in [-1, 1]), got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} holds NaN or infinite values; check the generation that made them")
    return images.detach().to(torch.float32)


def swd(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    *,
    levels: int | None = None,
    patches_per_image: int = 128,
    projections: int = 512,
    seed: int = 0,
    normalize: Normalization = "per_set",
) -> SWDResult:
    """The multi-scale sliced Wasserstein distance between two image sets ``[N_a, C, H, W]`` and ``[N_b, C, H, W]``.

    Images: floats in [-1, 1] (what the testbed generates and :func:`real_crops` returns); any range works if both
    sets share it, and a common affine rescaling of both (e.g. [0, 1] instead of [-1, 1]) gives the same result,
    since the pyramid is linear and the descriptors are normalised per channel. Raises ``ValueError`` naming the
    problem for anything but two 4-D float tensors of the same ``C, H, W``, at least 2 images each, finite.

    ``levels``: pyramid levels (``None``: :func:`default_levels`, down to a 16 px coarsest level; 3 at 64x64).
    ``patches_per_image``: 7x7 descriptors taken from each image at each level (the paper's 128). When the sets
    hold different numbers of images, the larger set's descriptors are subsampled (seeded) to the smaller's count.
    ``projections``: random directions per level (the paper's 4 x 128 = 512). ``normalize``: ``"per_set"`` (the
    paper) or ``"joint"`` (see the comment in the code). Deterministic for a fixed ``seed``; two identical sets
    give exactly 0.
    """
    a = _check_images("images_a", images_a)
    b = _check_images("images_b", images_b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"the two image sets differ in [C, H, W]: {list(a.shape[1:])} vs {list(b.shape[1:])}; resize or crop them "
            "to the same size and channels first"
        )
    if patches_per_image < 1:
        raise ValueError(f"patches_per_image must be at least 1, got {patches_per_image}")
    if projections < 1:
        raise ValueError(f"projections must be at least 1, got {projections}")
    if normalize not in ("per_set", "joint"):
        raise ValueError(f"normalize must be 'per_set' or 'joint', got {normalize!r}")
    channels, height, width = a.shape[1:]
    levels = default_levels(height, width) if levels is None else levels
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    coarsest = min(_level_sides(height, levels)[-1], _level_sides(width, levels)[-1])
    if coarsest < PATCH_SIZE:
        raise ValueError(
            f"{levels} pyramid levels of {height}x{width} px images end at {coarsest} px, smaller than a "
            f"{PATCH_SIZE}x{PATCH_SIZE} patch; use at most {default_levels(height, width)} levels (or levels=None)"
        )
    pyramid_a, pyramid_b = laplacian_pyramid(a, levels), laplacian_pyramid(b, levels)
    per_level: list[float] = []
    for level, (level_a, level_b) in enumerate(zip(pyramid_a, pyramid_b)):
        # the same positions for both sets (the same generator state): identical sets give identical descriptors
        desc_a = patch_descriptors(level_a, patches_per_image, _sub_seed(seed, level, 0))
        desc_b = patch_descriptors(level_b, patches_per_image, _sub_seed(seed, level, 0))
        if desc_a.shape[0] != desc_b.shape[0]:
            count = min(desc_a.shape[0], desc_b.shape[0])
            pick = _sub_seed(seed, level, 1)
            if desc_a.shape[0] > count:
                desc_a = desc_a[torch.randperm(desc_a.shape[0], generator=pick)[:count]]
            else:
                desc_b = desc_b[torch.randperm(desc_b.shape[0], generator=pick)[:count]]
        # Normalisation. "per_set" (default) is the paper's: each set's descriptors of a level are centred and scaled
        # by that set's own per-channel mean and std, so the distance compares the *shape* of the patch
        # distributions (structure, texture, relative contrast) and not a level's global offset or gain; it keeps
        # values comparable with the paper's method. "joint" uses the statistics of both sets together (one affine
        # map for both), so a global colour or contrast change of one set counts too; it is offered for that, but
        # the value then also depends on what it is compared with.
        if normalize == "joint":
            stats = _channel_stats(torch.cat([desc_a, desc_b]), channels)
            desc_a = normalize_descriptors(desc_a, channels, stats)
            desc_b = normalize_descriptors(desc_b, channels, stats)
        else:
            desc_a = normalize_descriptors(desc_a, channels)
            desc_b = normalize_descriptors(desc_b, channels)
        distance = sliced_wasserstein(desc_a, desc_b, projections, _sub_seed(seed, level, 2))
        per_level.append(distance * 1e3)
    sizes = tuple((int(level.shape[-2]), int(level.shape[-1])) for level in pyramid_a)
    result = SWDResult(tuple(per_level), sum(per_level) / len(per_level), sizes)
    logger.debug("swd %s vs %s: %s", tuple(a.shape), tuple(b.shape), result)
    return result


# ---------------------------------------------------------------------------------------------- the testbed


def real_crops(count: int, seed: int) -> torch.Tensor:
    """``count`` held-out real crops of the testbed ``[count, 3, 64, 64]`` in [-1, 1], drawn from ``seed`` (the same
    in every process; :func:`~sdtm_compile.models.testbed.data.fixed_crops` of the ``heldout`` split: pictures the
    testbed never trained on). Needs scikit-image / scikit-learn (``pip install 'sdtm-compile[testbed]'``)."""
    from ..models.testbed.data import fixed_crops

    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    return fixed_crops("heldout", count, seed)[0]


def sample_testbed(
    model: Any,
    reference_call: TransformerCall,
    seeds: Sequence[int],
    *,
    steps: int = 28,
    guidance_scale: float = 3.0,
    batch: int = 8,
    shift: float | None = 3.0,
    progress: bool = True,
) -> torch.Tensor:
    """One image per seed of the testbed ``model`` (a :class:`~sdtm_compile.models.testbed.model.TestbedModel`):
    ``[len(seeds), 3, 64, 64]`` in the order of ``seeds``, clamped to [-1, 1] (as an image is shown and saved).

    Seed ``s`` has the inputs of the one-image path (:func:`~sdtm_compile.models.testbed.quality.generation_inputs`:
    its noise, the labels of held-out crop ``s`` as prompt, the null prompt as negative); ``batch`` seeds at a time
    go through one transformer call per step (:func:`~sdtm_compile.models.sampling.generate`: batch ``2 * B``,
    the unconditional rows first, then the conditional ones), so a batch gives the images of ``B`` one-seed
    generations up to float rounding. ``reference_call``: a
    :data:`~sdtm_compile.models.sampling.TransformerCall`, e.g. ``diffusers_call(model.transformer)`` (unmerged) or
    ``diffusers_call(ReferenceTransformer(model.transformer, config))`` (a merged config; its state starts anew with
    every batch, as the timestep rises again). ``progress``: a tqdm bar of transformer calls.
    """
    from ..models.testbed.quality import generation_batch

    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError("sample_testbed needs at least one seed")
    if batch < 1 or steps < 1:
        raise ValueError(f"batch and steps must be at least 1, got batch={batch}, steps={steps}")
    from tqdm.auto import tqdm

    chunks = [seeds[i : i + batch] for i in range(0, len(seeds), batch)]
    images: list[torch.Tensor] = []
    with tqdm(total=len(chunks) * steps, desc="sample_testbed", unit="call", disable=not progress) as bar:
        for chunk in chunks:
            inputs = generation_batch(model, chunk)
            out = generate(reference_call, inputs, steps, guidance_scale, shift, on_step=lambda step, t: bar.update(1))
            images.append(out.clamp(-1, 1))
            logger.debug("sampled seeds %s", chunk)
    return torch.cat(images)


# ----------------------------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class SeedSetValues:
    """One measure over the seed sets of a :func:`distribution_report`.

    Attributes:
        per_set: the value of each seed set, in order.
        mean: their mean.
        spread: ``max - min`` over the seed sets (0 when they are equal, also when all are inf): how far the
            value moves with the draw of seeds (and of real crops), the noise floor to read a difference against.
        per_level: for SWD, each seed set's per-level values (finest level first); empty otherwise.
    """

    per_set: tuple[float, ...]
    mean: float
    spread: float
    per_level: tuple[tuple[float, ...], ...] = ()

    @classmethod
    def of(cls, values: Sequence[float], per_level: Sequence[Sequence[float]] = ()) -> SeedSetValues:
        values = tuple(float(v) for v in values)
        top, bottom = max(values), min(values)
        return cls(
            per_set=values,
            mean=sum(values) / len(values),
            spread=0.0 if top == bottom else top - bottom,
            per_level=tuple(tuple(float(v) for v in row) for row in per_level),
        )

    @classmethod
    def of_swd(cls, results: Sequence[SWDResult]) -> SeedSetValues:
        return cls.of([r.mean for r in results], [r.per_level for r in results])


@dataclass(frozen=True)
class ConfigDistribution:
    """What one configuration's images look like as a distribution, over the seed sets of the report.

    Attributes:
        name: the configuration's name in the report.
        config: its ``to_dict()`` (``None``: the unmerged model).
        swd_real: SWD (x 1e3) of its images to the real held-out crops of each seed set.
        swd_unmerged: SWD (x 1e3) of its images to the unmerged model's images of the same seeds (0 for the unmerged
            model itself).
        psnr_db, ssim: paired PSNR (dB) and SSIM of each image against the unmerged image of its seed, averaged per
            seed set (inf and 1.0 for the unmerged model).
        seconds: wall time of its generations (all seed sets; the unmerged model's are shared).
    """

    name: str
    config: dict[str, Any] | None
    swd_real: SeedSetValues
    swd_unmerged: SeedSetValues
    psnr_db: SeedSetValues
    ssim: SeedSetValues
    seconds: float


@dataclass(frozen=True)
class DistributionReport:
    """:func:`distribution_report`'s result: the settings, the unmerged model's SWD to the real crops, and one
    :class:`ConfigDistribution` per named configuration. :meth:`to_dict` is JSON-ready (``json.dumps``; a PSNR of
    identical images is ``inf``, written ``Infinity``, as the bench records do)."""

    settings: dict[str, Any]
    unmerged_swd_real: SeedSetValues
    configs: dict[str, ConfigDistribution]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def distribution_report(
    model: Any,
    configs: Mapping[str, MethodConfig | None],
    *,
    samples: int = 64,
    seed_sets: Sequence[Sequence[int]] | None = None,
    steps: int = 28,
    guidance_scale: float = 3.0,
    batch: int = 8,
    real_seed: int = REAL_CROP_SEED,
    levels: int | None = None,
    patches_per_image: int = 128,
    projections: int = 512,
    swd_seed: int = 0,
    normalize: Normalization = "per_set",
    progress: bool = True,
) -> DistributionReport:
    """SWD of each configuration's testbed images to real held-out crops and to the unmerged model's images.

    ``model``: the testbed (:func:`~sdtm_compile.models.testbed.model.load_testbed`); ``configs``: name -> method
    config, ``None`` for the unmerged model (its images are generated once and shared; merged configs run the eager
    reference, :class:`~sdtm_compile.reference.ReferenceTransformer`). ``seed_sets``: the seed sets (default: two
    disjoint sets of ``samples`` seeds, ``0 .. samples - 1`` and ``samples .. 2 * samples - 1``), at least 2 seeds
    each; seed set ``i`` is compared with :func:`real_crops` ``(len(set), real_seed + i)``. ``steps``,
    ``guidance_scale``, ``batch``: :func:`sample_testbed`'s; ``levels``, ``patches_per_image``, ``projections``,
    ``swd_seed``, ``normalize``: :func:`swd`'s. Costs ``len(configs) + (None not in configs)`` generations of every
    seed (about 6.5 s per image at 28 steps, batch 8, on one busy CPU thread for the unmerged model).
    """
    from ..models.testbed.quality import image_psnr, image_ssim
    from ..reference import ReferenceTransformer

    if seed_sets is None:
        if samples < 2:
            raise ValueError(f"samples must be at least 2 (SWD needs 2 images a set), got {samples}")
        seed_sets = (tuple(range(samples)), tuple(range(samples, 2 * samples)))
    sets = [tuple(int(s) for s in seeds) for seeds in seed_sets]
    if not sets or any(len(seeds) < 2 for seeds in sets):
        raise ValueError(
            f"every seed set needs at least 2 seeds (SWD compares sets), got sizes {[len(s) for s in sets]}"
        )
    if len({s for seeds in sets for s in seeds}) < sum(len(seeds) for seeds in sets):
        logger.warning("the seed sets overlap: their spread understates how much the values move with the seeds")
    if not configs:
        raise ValueError("configs is empty: name at least one configuration (None for the unmerged model)")

    swd_options: dict[str, Any] = {
        "levels": levels,
        "patches_per_image": patches_per_image,
        "projections": projections,
        "seed": swd_seed,
        "normalize": normalize,
    }
    real_seeds = [real_seed + i for i in range(len(sets))]

    def sample(call: TransformerCall, seeds: tuple[int, ...]) -> torch.Tensor:
        return sample_testbed(
            model, call, seeds, steps=steps, guidance_scale=guidance_scale, batch=batch, progress=progress
        )

    reals = [real_crops(len(seeds), seed) for seeds, seed in zip(sets, real_seeds)]
    start = time.perf_counter()
    unmerged_call = diffusers_call(model.transformer)
    unmerged = [sample(unmerged_call, seeds) for seeds in sets]
    unmerged_seconds = time.perf_counter() - start
    unmerged_real = [swd(images, real, **swd_options) for images, real in zip(unmerged, reals)]
    logger.info(
        "unmerged: SWD to real %.2f (sets %s), %.1f s",
        sum(r.mean for r in unmerged_real) / len(sets),
        [round(r.mean, 2) for r in unmerged_real],
        unmerged_seconds,
    )

    def paired(measure: Callable[[torch.Tensor, torch.Tensor], float], images: list[torch.Tensor]) -> SeedSetValues:
        means = []
        for generated, reference in zip(images, unmerged):
            values = [measure(x[None], y[None]) for x, y in zip(generated, reference)]
            means.append(sum(values) / len(values))
        return SeedSetValues.of(means)

    results: dict[str, ConfigDistribution] = {}
    for name, config in configs.items():
        if config is None:
            images, seconds = unmerged, unmerged_seconds
            to_real = unmerged_real
        else:
            start = time.perf_counter()
            call = diffusers_call(ReferenceTransformer(model.transformer, config))
            images = [sample(call, seeds) for seeds in sets]
            seconds = time.perf_counter() - start
            to_real = [swd(x, real, **swd_options) for x, real in zip(images, reals)]
        to_unmerged = [swd(x, ref, **swd_options) for x, ref in zip(images, unmerged)]
        entry = ConfigDistribution(
            name=name,
            config=None if config is None else config.to_dict(),
            swd_real=SeedSetValues.of_swd(to_real),
            swd_unmerged=SeedSetValues.of_swd(to_unmerged),
            psnr_db=paired(image_psnr, images),
            ssim=paired(image_ssim, images),
            seconds=seconds,
        )
        results[name] = entry
        logger.info(
            "%s: SWD to real %.2f +- %.2f, to unmerged %.2f +- %.2f, PSNR %.2f dB, SSIM %.4f, %.1f s",
            name,
            entry.swd_real.mean,
            entry.swd_real.spread,
            entry.swd_unmerged.mean,
            entry.swd_unmerged.spread,
            entry.psnr_db.mean,
            entry.ssim.mean,
            seconds,
        )

    settings = {
        "seed_sets": [list(seeds) for seeds in sets],
        "real_seeds": real_seeds,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "batch": batch,
        "swd": {**swd_options, "levels_used": len(unmerged_real[0].per_level), "scale": 1e3},
    }
    return DistributionReport(settings, SeedSetValues.of_swd(unmerged_real), results)
