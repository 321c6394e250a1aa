"""The testbed's images and labels: sample images that install with scikit-image and scikit-learn.

Every image ships inside a package wheel (nothing is downloaded), under a licence that allows training on it
(:data:`SOURCES` records each one). Whole images are held out for evaluation (``split="heldout"``), so held-out
numbers measure crops of pictures the model never saw, not unseen crops of seen pictures.

A training example is a 64x64 RGB crop in ``[-1, 1]`` (``[3, 64, 64]``) of an image resized to a random scale
(short side 64 to 256 pixels, so crops range from a whole picture to a detail), flipped at random, with six
labels - the model's "prompt" (:data:`LABEL_SLOTS`): which source image, where the crop sits in it (row, column),
its dominant colour word, how textured it is and how bright. Grayscale textures are used as gray RGB.

What it does not handle: the pool is 13 pictures, so the model learns patches of these pictures, not images
in general; label words are computed from pixels by fixed rules (:func:`crop_labels`), not written by people.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ImageSource",
    "SOURCES",
    "LABEL_SLOTS",
    "COLOUR_WORDS",
    "CROP",
    "load_images",
    "crop_labels",
    "sample_batch",
    "fixed_crops",
]

#: Side of a training crop in pixels (patch 2 -> 32 x 32 = 1024 image tokens).
CROP = 64
#: Short sides (pixels) an image is resized to before cropping.
SCALES = (64, 96, 128, 176, 256)


@dataclass(frozen=True)
class ImageSource:
    """One picture: where it comes from, its licence and whether it is trained on or held out."""

    name: str
    package: str  #: ``skimage`` (``skimage.data.<loader>()``) or ``sklearn`` (``load_sample_image(<loader>)``)
    loader: str
    licence: str
    split: str  #: ``train`` or ``heldout``


#: Every picture of the testbed, with the licence its package documents for it.
SOURCES: tuple[ImageSource, ...] = (
    ImageSource("astronaut", "skimage", "astronaut", "public domain (NASA Great Images)", "train"),
    ImageSource("rocket", "skimage", "rocket", "public domain (SpaceX)", "train"),
    ImageSource("hubble", "skimage", "hubble_deep_field", "public domain (NASA)", "train"),
    ImageSource("retina", "skimage", "retina", "CC0 1.0", "train"),
    ImageSource("ihc", "skimage", "immunohistochemistry", "no known copyright restrictions", "train"),
    ImageSource("chelsea", "skimage", "chelsea", "CC0 (Stefan van der Walt)", "train"),
    ImageSource("china", "sklearn", "china.jpg", "CC BY 2.0 (danielbuechele, Flickr)", "train"),
    ImageSource("brick", "skimage", "brick", "CC0 (CC0Textures)", "train"),
    ImageSource("gravel", "skimage", "gravel", "CC0 (CC0Textures)", "train"),
    ImageSource("camera", "skimage", "camera", "CC0 (Lav Varshney)", "train"),
    ImageSource("coffee", "skimage", "coffee", "CC0 (Rachel Michetti)", "heldout"),
    ImageSource("flower", "sklearn", "flower.jpg", "CC BY 2.0 (vultilion, Flickr)", "heldout"),
    ImageSource("grass", "skimage", "grass", "CC0 (CC0Textures)", "heldout"),
)

#: Named colours of the colour word (RGB in [0, 1]); a crop gets the one nearest its mean colour.
COLOUR_WORDS: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "gray": (0.5, 0.5, 0.5),
    "white": (0.95, 0.95, 0.95),
    "red": (0.7, 0.15, 0.15),
    "orange": (0.85, 0.5, 0.2),
    "yellow": (0.85, 0.8, 0.3),
    "green": (0.25, 0.55, 0.25),
    "blue": (0.2, 0.3, 0.7),
    "purple": (0.5, 0.3, 0.6),
    "brown": (0.45, 0.3, 0.2),
    "pink": (0.9, 0.6, 0.7),
}

#: The prompt's slots and their words; every slot also has a null word (index 0: "unknown" / dropped).
LABEL_SLOTS: dict[str, tuple[str, ...]] = {
    "source": tuple(s.name for s in SOURCES if s.split == "train"),
    "row": ("top", "middle", "bottom"),
    "column": ("left", "centre", "right"),
    "colour": tuple(COLOUR_WORDS),
    "texture": ("smooth", "textured", "busy"),
    "brightness": ("dark", "mid", "bright"),
}


def _load(source: ImageSource) -> np.ndarray:
    """``[H, W, 3]`` float32 in [0, 1]."""
    if source.package == "sklearn":
        from sklearn.datasets import load_sample_image

        image = load_sample_image(source.loader)
    else:
        import skimage.data

        image = getattr(skimage.data, source.loader)()
    image = np.asarray(image, dtype=np.float32) / 255.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3]


@cache
def load_images(split: str) -> tuple[tuple[ImageSource, tuple[torch.Tensor, ...]], ...]:
    """The pictures of ``split``, each as a pyramid ``[3, h, w]`` in [0, 1] (one level per :data:`SCALES`)."""
    try:
        import skimage.data  # noqa: F401
        import sklearn.datasets  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "the testbed's images come with scikit-image and scikit-learn: pip install 'sdtm-compile[testbed]'"
        ) from error
    out = []
    for source in SOURCES:
        if source.split != split:
            continue
        image = torch.from_numpy(_load(source)).permute(2, 0, 1).contiguous()
        short = min(image.shape[1:])
        levels = []
        for side in SCALES:
            scale = side / short
            size = (max(CROP, round(image.shape[1] * scale)), max(CROP, round(image.shape[2] * scale)))
            levels.append(F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0].clamp(0, 1))
        out.append((source, tuple(levels)))
    if not out:
        raise ValueError(f"no testbed images in split {split!r}: expected 'train' or 'heldout'")
    return tuple(out)


def _word(slot: str, word: str | None) -> int:
    """Index of ``word`` within ``slot`` (0 = null)."""
    return 0 if word is None else LABEL_SLOTS[slot].index(word) + 1


def crop_labels(crop: torch.Tensor, source: str | None, centre: tuple[float, float]) -> list[int]:
    """The six label indices (per slot, 0 = null) of a crop ``[3, h, w]`` in [0, 1].

    ``centre`` is the crop's centre as a fraction of the image (row, column). Texture is the mean absolute
    difference between neighbouring pixels (fixed thresholds); brightness the mean luma.
    """
    mean = crop.mean(dim=(1, 2))
    colours = torch.tensor(list(COLOUR_WORDS.values()))
    colour = list(COLOUR_WORDS)[int((colours - mean).square().sum(1).argmin())]
    gradient = 0.5 * ((crop[:, 1:] - crop[:, :-1]).abs().mean() + (crop[:, :, 1:] - crop[:, :, :-1]).abs().mean())
    texture = "smooth" if gradient < 0.02 else "textured" if gradient < 0.06 else "busy"
    luma = float(0.299 * mean[0] + 0.587 * mean[1] + 0.114 * mean[2])
    brightness = "dark" if luma < 0.3 else "mid" if luma < 0.65 else "bright"
    third = lambda f: min(2, int(f * 3))  # noqa: E731
    return [
        _word("source", source),
        third(centre[0]) + 1,
        third(centre[1]) + 1,
        _word("colour", colour),
        _word("texture", texture),
        _word("brightness", brightness),
    ]


def _random_crop(levels, generator: torch.Generator) -> tuple[torch.Tensor, tuple[float, float]]:
    level = levels[int(torch.randint(len(levels), (1,), generator=generator))]
    h, w = level.shape[1:]
    top = int(torch.randint(h - CROP + 1, (1,), generator=generator))
    left = int(torch.randint(w - CROP + 1, (1,), generator=generator))
    crop = level[:, top : top + CROP, left : left + CROP]
    if torch.rand((), generator=generator) < 0.5:
        crop = crop.flip(-1)
    return crop, ((top + CROP / 2) / h, (left + CROP / 2) / w)


def sample_batch(
    split: str, batch: int, generator: torch.Generator, label_dropout: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops ``[B, 3, 64, 64]`` in [-1, 1] and their labels ``[B, 6]`` (long), drawn from ``generator``.

    ``label_dropout``: each label is replaced by null with this probability, and the whole prompt with the same
    probability (so the model also learns the unconditional prediction classifier-free guidance needs). Held-out
    crops always have a null source.
    """
    images = load_images(split)
    crops, labels = [], []
    for _ in range(batch):
        source, levels = images[int(torch.randint(len(images), (1,), generator=generator))]
        crop, centre = _random_crop(levels, generator)
        label = torch.tensor(crop_labels(crop, source.name if split == "train" else None, centre))
        if label_dropout > 0:
            keep = torch.rand(label.shape, generator=generator) >= label_dropout
            keep &= torch.rand((), generator=generator) >= label_dropout
            label = label * keep
        crops.append(crop * 2 - 1)
        labels.append(label)
    return torch.stack(crops), torch.stack(labels)


def fixed_crops(split: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` crops and labels of ``split`` drawn from ``seed`` (the same in every process): evaluation sets."""
    return sample_batch(split, count, torch.Generator().manual_seed(seed))
