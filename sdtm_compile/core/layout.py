"""What a method needs to know of a model to lay out its engines: :class:`ModelLayout`.

The same facts come from two places, and must agree: the FX graph Dynamo traced
(:meth:`sdtm_compile.passes.ModelSites.layout`) and the diffusers module itself
(:func:`sdtm_compile.reference.model_layout`). The engine contract
(:class:`~sdtm_compile.core.signature.EngineSignature`) is built from a layout, so the compiled engines, the ONNX
bundles and the eager reference carry the same state with the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BlockLayout", "ModelLayout", "BRANCHES", "FAMILY_BRANCHES", "band_grid"]

#: The image-token branches a block may have, by name: ``attn`` (joint attention; a Flux single block's
#: attention), ``attn2`` (SD3.5's second, image-only attention), ``ff`` (feed-forward of an SD3 block or a Flux
#: double block), ``mlp`` (the MLP part of a Flux single block).
BRANCHES = ("attn", "attn2", "ff", "mlp")
#: The branches the blocks of each model family have (SD3.5's blocks add ``attn2``; Flux's single blocks have ``mlp``
#: and their double blocks ``ff``).
FAMILY_BRANCHES = {"sd3": ("attn", "attn2", "ff"), "flux": ("attn", "ff", "mlp")}


@dataclass(frozen=True)
class BlockLayout:
    """One block: its position, its kind (``joint``: SD3 / SD3.5; ``double`` / ``single``: Flux) and the image
    branches it has (a subset of :data:`BRANCHES`, in that order)."""

    index: int
    kind: str
    branches: tuple[str, ...]


@dataclass(frozen=True)
class ModelLayout:
    """A transformer at one input shape, as a method sees it.

    Attributes:
        family: ``sd3`` (SD3 / SD3.5) or ``flux``.
        grid: the image-token grid ``(grid_h, grid_w)``; ``N = grid_h * grid_w``.
        text_tokens: text tokens ``T`` in the joint attention (``None`` if unknown).
        blocks: every block, in model order (Flux: the double blocks, then the single blocks).
        width: channels ``C`` of the image tokens inside the blocks.
        dtype: the dtype of the blocks' image tokens.
        batch: the batch size ``B`` of one call.
        context_parallel: the ranks the sequence is split across (diffusers' context parallelism, Ulysses degree);
            the layout is then one rank's shard: ``grid`` is the shard's band of grid rows, ``text_tokens`` its part
            of the text. Methods merge each shard on its own; what needs more than the shard refuses it.
    """

    family: str
    grid: tuple[int, int]
    text_tokens: int | None
    blocks: tuple[BlockLayout, ...]
    width: int
    dtype: torch.dtype
    batch: int
    context_parallel: int = 1

    @property
    def num_tokens(self) -> int:
        """``N``, the image tokens of the grid."""
        return self.grid[0] * self.grid[1]

    @property
    def kinds(self) -> tuple[str, ...]:
        """Each block's kind, in model order."""
        return tuple(block.kind for block in self.blocks)


def band_grid(grid: tuple[int, int], degree: int) -> tuple[int, int]:
    """The grid of one rank's band of rows when ``degree`` ranks split the row-major token sequence of ``grid``
    (context parallelism); ``ValueError`` when the rows do not split into equal bands."""
    grid_h, grid_w = grid
    if degree < 1 or grid_h % degree:
        raise ValueError(
            f"context parallelism splits the {grid_h}x{grid_w} image-token grid across {degree} ranks, but "
            f"{grid_h} rows do not split into {degree} equal bands, so a rank's tokens are not whole rows of the "
            f"grid and no 2-D merge window can be laid on them: use an image height whose token rows are a multiple "
            f"of {degree}"
        )
    return grid_h // degree, grid_w
