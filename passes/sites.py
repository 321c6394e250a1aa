"""What :func:`~sdtm_compile.passes.find_mmdit_blocks` finds in a graph: the merge sites of every block, as typed
values the passes take and return (:class:`ModelSites`), never mutated in place."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import fx

from sdtm_compile.core.layout import BlockLayout, ModelLayout

from ._graph import node_value

__all__ = ["Branch", "SingleStream", "BlockSites", "ModelSites"]


@dataclass(frozen=True)
class Branch:
    """One merged region of a block: ``input`` ``[B, N, C]`` enters ``module``, ``output`` ``[B, N, C]`` leaves."""

    module: str
    input: fx.Node
    output: fx.Node
    nodes: tuple[fx.Node, ...] = ()

    def remapped(self, node_map: dict[fx.Node, fx.Node]) -> Branch:
        return Branch(self.module, node_map[self.input], node_map[self.output], tuple(node_map[n] for n in self.nodes))


@dataclass(frozen=True)
class SingleStream:
    """The nodes of a ``FluxSingleTransformerBlock`` that ``split_single_stream`` rewrites.

    ``norm_output`` ``[B, T+N, C]`` feeds ``proj_mlp`` (a linear, then ``act`` ``[B, T+N, 4C]``) and the attention
    (its nodes: ``attention``; output ``attn_output`` ``[B, T+N, C]``); ``concat`` = ``cat([attn_output, act], -1)``
    feeds ``proj_out``.
    """

    norm_output: fx.Node
    proj_mlp: fx.Node
    act: fx.Node
    attn_output: fx.Node
    concat: fx.Node
    proj_out: fx.Node
    attention: tuple[fx.Node, ...] = ()

    def remapped(self, node_map: dict[fx.Node, fx.Node]) -> SingleStream:
        nodes = (node_map[getattr(self, name)] for name in self.__dataclass_fields__ if name != "attention")
        return SingleStream(*nodes, attention=tuple(node_map[n] for n in self.attention))


@dataclass(frozen=True)
class BlockSites:
    """One block's merge sites. ``kind``: ``joint`` (SD3), ``double`` or ``single`` (Flux).

    ``attn`` / ``attn2`` / ``ff``: the image-token branches (a single block has none of them when found).
    ``stream``: a single block's :class:`SingleStream`; its ``mlp`` branch (image part of the MLP), and its
    ``attn`` branch when the stage merges attention, exist only once ``split_single_stream`` has run on the graph:
    the pass returns sites with them (:meth:`ModelSites.with_blocks`).
    """

    index: int
    path: str
    attn: Branch | None
    ff: Branch | None
    attn2: Branch | None = None
    kind: str = "joint"
    stream: SingleStream | None = None
    mlp: Branch | None = None

    @property
    def branches(self) -> list[Branch]:
        return [b for b in (self.attn, self.attn2, self.ff, self.mlp) if b is not None]

    @property
    def plan_input(self) -> fx.Node:
        """The image tokens ``[B, N, C]`` the block's merge plan is made from: the attention input after ``norm1``
        and its modulation (a Flux single block: the image part of its ``norm`` output)."""
        if self.stream is not None:
            if self.mlp is None:
                raise ValueError(f"{self.path}: a single-stream block has no plan input before split_single_stream")
            return self.mlp.input
        assert self.attn is not None
        return self.attn.input

    def branches_named(self, names: tuple[str, ...]) -> list[tuple[str, Branch]]:
        """``(name, branch)`` for each of ``names`` (``attn``, ``attn2``, ``ff``, ``mlp``) this block has."""
        return [(name, branch) for name in names if (branch := getattr(self, name)) is not None]

    def remapped(self, node_map: dict[fx.Node, fx.Node]) -> BlockSites:
        def copy(branch: Branch | None) -> Branch | None:
            return branch.remapped(node_map) if branch is not None else None

        stream = self.stream.remapped(node_map) if self.stream is not None else None
        return BlockSites(
            self.index, self.path, copy(self.attn), copy(self.ff), copy(self.attn2), self.kind, stream, copy(self.mlp)
        )


@dataclass(frozen=True)
class ModelSites:
    """What :func:`find_mmdit_blocks` found in one graph: the blocks' merge sites (nodes of that graph), the token
    grid and where the latent and timestep are among the graph's inputs."""

    blocks: tuple[BlockSites, ...]
    num_tokens: int  #: image tokens N
    text_tokens: int | None  #: text tokens T in the joint attention (None if not found)
    grid: tuple[int, int]
    latent_index: int  #: position of the latent among the graph's placeholders
    timestep_index: int  #: position of the timestep among the graph's placeholders
    family: str = "sd3"  #: ``sd3`` or ``flux`` (see the module docstring)
    image_ids_index: int | None = None  #: Flux: position of ``img_ids`` (the grid's source) among the placeholders
    #: ranks the sequence is split across (context parallelism): ``num_tokens``, ``grid`` and ``text_tokens`` are then
    #: one rank's shard
    context_parallel: int = 1

    @property
    def total_tokens(self) -> int:
        """The image tokens of the whole image, every rank's shard together."""
        return self.num_tokens * self.context_parallel

    def remapped(self, node_map: dict[fx.Node, fx.Node]) -> ModelSites:
        """The same sites on a copy of the graph (``node_map``: original node -> copy, see ``copy_with_node_map``)."""
        return replace(self, blocks=tuple(block.remapped(node_map) for block in self.blocks))

    def with_blocks(self, *blocks: BlockSites) -> ModelSites:
        """These sites with ``blocks`` replacing the blocks of the same index (what a pass that adds branches
        returns)."""
        new = {block.index: block for block in blocks}
        return replace(self, blocks=tuple(new.get(block.index, block) for block in self.blocks))

    def layout(self) -> ModelLayout:
        """The model as a method sees it (:class:`~sdtm_compile.core.layout.ModelLayout`), from the graph."""
        first = self.blocks[0]
        tokens = first.attn.input if first.attn is not None else first.stream.norm_output  # type: ignore[union-attr]
        value = node_value(tokens)  # [B, N, C] (a single block's: [B, T + N, C])
        blocks = []
        for block in self.blocks:
            if block.kind == "single":
                names: tuple[str, ...] = ("attn", "mlp")
            else:
                names = tuple(name for name in ("attn", "attn2", "ff") if getattr(block, name) is not None)
            blocks.append(BlockLayout(block.index, block.kind, names))
        batch, width = int(value.shape[0]), int(value.shape[-1])
        return ModelLayout(
            self.family, self.grid, self.text_tokens, tuple(blocks), width, value.dtype, batch, self.context_parallel
        )
