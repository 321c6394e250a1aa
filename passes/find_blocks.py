"""Find every MMDiT block in a Dynamo graph: its attention, ``attn2`` and feed-forward boundaries.

This is an analysis, not a rewrite: :func:`find_mmdit_blocks` returns a :class:`ModelSites` (a typed value the
rewrite passes take as an argument) and leaves the graph untouched. Sites name nodes of the graph they were
found on; :meth:`ModelSites.remapped` carries them over to a copy.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field, replace

from torch import fx

from ._graph import module_stack, node_shape

__all__ = [
    "FALLBACK_HINT",
    "find_mmdit_blocks",
    "Branch",
    "BlockSites",
    "ModelSites",
    "UnsupportedModelError",
    "BLOCK_CLASSES",
]

logger = logging.getLogger(__name__)

#: Module classes we know how to rewrite (diffusers SD3 / SD3.5).
BLOCK_CLASSES = ("JointTransformerBlock",)


class UnsupportedModelError(ValueError):
    """The traced graph has no block the SDTM passes can rewrite."""


@dataclass
class Branch:
    """One merged region of a block: ``input`` ``[B, N, C]`` enters ``module``, ``output`` ``[B, N, C]`` leaves."""

    module: str
    input: fx.Node
    output: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)

    def remapped(self, node_map: dict[fx.Node, fx.Node]) -> Branch:
        return Branch(self.module, node_map[self.input], node_map[self.output], [node_map[n] for n in self.nodes])


@dataclass
class BlockSites:
    index: int
    path: str
    attn: Branch
    ff: Branch
    attn2: Branch | None = None

    @property
    def branches(self) -> list[Branch]:
        return [b for b in (self.attn, self.attn2, self.ff) if b is not None]

    def branches_named(self, names: tuple[str, ...]) -> list[tuple[str, Branch]]:
        """``(name, branch)`` for each of ``names`` (``attn``, ``attn2``, ``ff``) this block has."""
        return [(name, branch) for name in names if (branch := getattr(self, name)) is not None]

    def remapped(self, node_map: dict[fx.Node, fx.Node]) -> BlockSites:
        attn2 = self.attn2.remapped(node_map) if self.attn2 is not None else None
        return BlockSites(self.index, self.path, self.attn.remapped(node_map), self.ff.remapped(node_map), attn2)


@dataclass(frozen=True)
class ModelSites:
    """What :func:`find_mmdit_blocks` found in one graph: the blocks' merge sites (nodes of that graph), the token
    grid and where the latent and timestep are among the graph's inputs."""

    blocks: list[BlockSites]
    num_tokens: int  #: image tokens N
    text_tokens: int | None  #: text tokens T in the joint attention (None if not found)
    grid: tuple[int, int]
    latent_index: int  #: position of the latent among the graph's placeholders
    timestep_index: int  #: position of the timestep among the graph's placeholders

    def remapped(self, node_map: dict[fx.Node, fx.Node]) -> ModelSites:
        """The same sites on a copy of the graph (``node_map``: original node -> copy, see ``copy_with_node_map``)."""
        return replace(self, blocks=[block.remapped(node_map) for block in self.blocks])


#: The advice every "cannot rewrite this graph" error ends with; the backend's fallback warning cuts it off.
FALLBACK_HINT = "Pass options={'on_unsupported': 'fallback'} to compile the model without token merging"

_FALLBACK_ADVICE = (
    "sdtm-compile knows diffusers' SD3 / SD3.5 JointTransformerBlock; a customised block or another diffusers "
    f"version may be laid out differently. {FALLBACK_HINT}, and report the model so that its layout can be "
    "supported."
)


def _unsupported(message: str) -> UnsupportedModelError:
    """An :class:`UnsupportedModelError` that says what was found and what the user can do."""
    return UnsupportedModelError(f"{message}. {_FALLBACK_ADVICE}")


def _describe_modules(gm: fx.GraphModule) -> str:
    classes: Counter[str] = Counter()
    for node in gm.graph.nodes:
        stack = module_stack(node)
        if len(stack) >= 1:
            classes[stack[0][1] if len(stack) == 1 else stack[1][1]] += 1
    if not classes:
        return "no module information at all (was the graph traced by Dynamo?)"
    return ", ".join(f"{name}" for name, _ in classes.most_common(8))


def _branch(block_path: str, name: str, nodes: list[fx.Node], entry_path: str) -> Branch | None:
    """The region of ``nodes`` under ``block_path.name``; its input is what ``entry_path`` consumes."""
    prefix = f"{block_path}.{name}"
    inside = [n for n in nodes if (s := module_stack(n)) and any(p == prefix for p, _ in s)]
    if not inside:
        return None
    entry = next((n for n in inside if module_stack(n)[-1][0] == entry_path and n.args), None)
    if entry is None or not isinstance(entry.args[0], fx.Node):
        raise _unsupported(f"{prefix}: found no call of {entry_path} taking the image tokens")
    inside_set = set(inside)
    leaving = [n for n in inside if any(u not in inside_set for u in n.users)]
    image_outputs = [n for n in leaving if node_shape(n) == node_shape(entry.args[0])]
    # Prefer the image projection (to_out) by name: with as many text as image tokens, shapes alone are ambiguous.
    projected = [n for n in image_outputs if any(p.startswith(f"{prefix}.to_out") for p, _ in module_stack(n))]
    image_outputs = projected or image_outputs
    if not image_outputs:
        raise _unsupported(f"{prefix}: found no output with the image-token shape {node_shape(entry.args[0])}")
    return Branch(prefix, entry.args[0], image_outputs[-1], inside)


def _placeholder_feeding(gm: fx.GraphModule, module_suffix: str, name_hint: str) -> int | None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        for user in node.users:
            if any(path.endswith(module_suffix) for path, _ in module_stack(user)):
                return index
    for index, node in enumerate(placeholders):
        if name_hint in node.name:
            return index
    return None


def find_mmdit_blocks(gm: fx.GraphModule) -> ModelSites:
    """Locate each MMDiT block's attention / ``attn2`` / FF inputs and outputs (raises UnsupportedModelError)."""
    by_block: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":  # weights carry their module's stack too; they are inputs, not regions
            continue
        for path, cls in module_stack(node):
            if cls in BLOCK_CLASSES:
                by_block.setdefault(path, []).append(node)
                break
    if not by_block:
        raise UnsupportedModelError(
            f"no MMDiT block found: looked for {' / '.join(BLOCK_CLASSES)} modules (diffusers SD3 / SD3.5) in the "
            f"traced graph's nn_module_stack; the graph holds: {_describe_modules(gm)}. {FALLBACK_HINT}."
        )
    blocks = []
    for index, (path, nodes) in enumerate(by_block.items()):
        attn = _branch(path, "attn", nodes, f"{path}.attn.to_q")
        ff = _branch(path, "ff", nodes, f"{path}.ff.net.0.proj")
        if attn is None or ff is None:
            raise _unsupported(f"block {path} has no {'attn' if attn is None else 'ff'} region in the graph")
        attn2 = _branch(path, "attn2", nodes, f"{path}.attn2.to_q")
        blocks.append(BlockSites(index, path, attn, ff, attn2))

    shapes = {node_shape(b.input) for block in blocks for b in block.branches}
    if len(shapes) != 1 or len(next(iter(shapes)) or ()) != 3:
        raise _unsupported(f"merge sites disagree on the image-token shape [B, N, C]: {shapes}")
    num_tokens = next(iter(shapes))[1]  # type: ignore[index]

    text_tokens = None
    for node in blocks[0].attn.nodes:
        if node.op == "call_function" and module_stack(node)[-1][0].endswith(".attn.add_q_proj") and node_shape(node):
            text_tokens = node_shape(node)[1]  # type: ignore[index]
            break

    latent_index = _placeholder_feeding(gm, "pos_embed.proj", "hidden_states")
    timestep_index = _placeholder_feeding(gm, "time_text_embed.time_proj", "timestep")
    if latent_index is None or timestep_index is None:
        raise _unsupported(
            "could not find the latent and timestep inputs of the traced transformer (call it with the "
            "hidden_states and timestep arguments of SD3Transformer2DModel.forward)"
        )
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    latent_shape = node_shape(placeholders[latent_index])
    if latent_shape is None or len(latent_shape) != 4:
        raise _unsupported(
            f"expected a latent hidden_states [B, C, H, W], got shape {latent_shape}: pass the unpatchified "
            "latent, as diffusers' SD3 pipelines do"
        )
    height, width = latent_shape[-2:]
    patch = round(math.sqrt(height * width / num_tokens))
    grid = (height // patch, width // patch)
    if grid[0] * grid[1] != num_tokens:
        raise _unsupported(
            f"latent {height}x{width} does not map onto {num_tokens} image tokens: use a latent whose sides are "
            "multiples of the transformer's patch_size"
        )

    sites = ModelSites(blocks, num_tokens, text_tokens, grid, latent_index, timestep_index)
    logger.info(
        "found %d MMDiT blocks (%d with attn2), %d image tokens on a %dx%d grid, %s text tokens",
        len(blocks),
        sum(b.attn2 is not None for b in blocks),
        num_tokens,
        *grid,
        text_tokens,
    )
    for block in blocks:
        logger.debug("  %s: merge sites %s", block.path, [b.module for b in block.branches])
    return sites
