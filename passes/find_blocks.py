"""Find every MMDiT block in a Dynamo graph: its attention, ``attn2`` and feed-forward boundaries.

This is an analysis, not a rewrite: :func:`find_mmdit_blocks` returns a :class:`ModelSites` (a typed value the
rewrite passes take as an argument) and leaves the graph untouched. Sites name nodes of the graph they were
found on; :meth:`ModelSites.remapped` carries them over to a copy.

Two model families:

* ``sd3``: diffusers' ``JointTransformerBlock`` (SD3 / SD3.5); the latent arrives as ``[B, C, H, W]``.
* ``flux``: ``FluxTransformerBlock`` (double-stream: ``attn`` and ``ff`` as in SD3, text first in the joint
  sequence) and ``FluxSingleTransformerBlock`` (single-stream: text and image concatenated, attention and MLP in
  parallel, one ``proj_out`` over both). A single block's MLP site is a :class:`SingleStream` (the nodes around
  ``proj_out``); the ``split_single_stream`` pass turns it into a merge-able ``mlp`` :class:`Branch`. The latent
  arrives packed ``[B, N, C_in]``; the token grid is read from the ``img_ids`` input's *values*, so Flux needs
  the example inputs.

Under diffusers' context parallelism (``enable_parallelism`` with a ``ContextParallelConfig``) the graph is one
rank's: its image tokens are ``chunk``-ed from the latent (Flux) or from ``pos_embed``'s output (SD3, with
:func:`sdtm_compile.parallel.prepare_sd3_context_parallel`'s plan), and attention runs through Ulysses
all-to-alls. The sites then describe the rank's shard: ``grid`` is its band of grid rows, ``text_tokens`` its part of
the text, and ``context_parallel`` the number of ranks (see :func:`sequence_split`).
"""

from __future__ import annotations

import logging
import math
import operator
from collections import Counter

import torch
from torch import fx

from sdtm_compile.core.layout import band_grid

from ._graph import collective, module_stack, node_shape
from .sites import BlockSites, Branch, ModelSites, SingleStream

__all__ = [
    "FALLBACK_HINT",
    "find_mmdit_blocks",
    "Branch",
    "BlockSites",
    "ModelSites",
    "UnsupportedModelError",
    "BLOCK_CLASSES",
    "BLOCK_FAMILIES",
    "SingleStream",
    "image_grid",
    "sequence_split",
]

logger = logging.getLogger(__name__)

#: Module classes we know how to rewrite, and the family each belongs to.
BLOCK_FAMILIES = {
    "JointTransformerBlock": "sd3",
    "FluxTransformerBlock": "flux",
    "FluxSingleTransformerBlock": "flux",
}
BLOCK_CLASSES = tuple(BLOCK_FAMILIES)


class UnsupportedModelError(ValueError):
    """The traced graph has no block the SDTM passes can rewrite."""


#: The advice every "cannot rewrite this graph" error ends with; the backend's fallback warning cuts it off.
FALLBACK_HINT = "Pass options={'on_unsupported': 'fallback'} to compile the model without token merging"

_FALLBACK_ADVICE = (
    "sdtm-compile knows diffusers' SD3 / SD3.5 JointTransformerBlock and Flux's FluxTransformerBlock / "
    "FluxSingleTransformerBlock; a customised block or another diffusers "
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
    return Branch(prefix, entry.args[0], image_outputs[-1], tuple(inside))


def _placeholder_feeding(gm: fx.GraphModule, module_suffix: str, name_hint: str) -> int | None:
    """Position of the input that feeds ``module_suffix`` (by name first: the module's weights feed it too)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    feeding = [
        index
        for index, node in enumerate(placeholders)
        if any(any(path.endswith(module_suffix) for path, _ in module_stack(user)) for user in node.users)
    ]
    named = [index for index, node in enumerate(placeholders) if name_hint in node.name]
    for index in [i for i in feeding if i in named] + named + feeding:
        return index
    return None


_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


def _single_stream(path: str, nodes: list[fx.Node]) -> SingleStream:
    """The ``proj_out(cat([attn, act(proj_mlp(norm))], -1))`` nodes of a ``FluxSingleTransformerBlock``."""
    proj_out = next((n for n in nodes if n.target in _LINEAR and module_stack(n)[-1][0] == f"{path}.proj_out"), None)
    concat = proj_out.args[0] if proj_out is not None else None
    if (
        not isinstance(concat, fx.Node)
        or concat.target is not torch.cat
        or len(concat.args[0]) != 2
        or (concat.args[1] if len(concat.args) > 1 else concat.kwargs.get("dim", 0)) not in (-1, 2)
    ):
        raise _unsupported(f"{path}: expected proj_out(cat([attention, mlp], dim=-1)), found {concat}")
    attn_output, act = concat.args[0]
    proj_mlp = act.args[0] if isinstance(act, fx.Node) and act.args else None
    if not (
        isinstance(proj_mlp, fx.Node)
        and proj_mlp.target in _LINEAR
        and module_stack(proj_mlp)[-1][0] == f"{path}.proj_mlp"
        and len(act.users) == 1
    ):
        raise _unsupported(f"{path}: expected the MLP branch act(proj_mlp(norm)) as proj_out's second input")
    attention = [n for n in nodes if any(p == f"{path}.attn" for p, _ in module_stack(n))]
    return SingleStream(proj_mlp.args[0], proj_mlp, act, attn_output, concat, proj_out, tuple(attention))


def image_grid(ids: torch.Tensor, num_tokens: int) -> tuple[int, int]:
    """The ``(grid_h, grid_w)`` of Flux ``img_ids`` ``[N, 3]`` (row, column in columns 1 and 2), row-major only.

    Raises :class:`UnsupportedModelError` saying what is wrong with the ids (callers add what the user can do).
    """
    if ids.dim() != 2 or ids.shape != (num_tokens, 3):
        raise UnsupportedModelError(f"img_ids must be [N, 3] = [{num_tokens}, 3], got {tuple(ids.shape)}")
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    grid_h, grid_w = int(rows.max()) + 1, int(cols.max()) + 1
    n = torch.arange(num_tokens, device=ids.device)
    if grid_h * grid_w != num_tokens or not (torch.equal(rows, n // grid_w) and torch.equal(cols, n % grid_w)):
        raise UnsupportedModelError(
            f"img_ids do not describe a row-major {grid_h}x{grid_w} grid of the {num_tokens} image tokens (as "
            "FluxPipeline's _prepare_latent_image_ids makes them); extra image tokens such as Kontext's "
            "reference image are not supported"
        )
    return grid_h, grid_w


def _is_chunk(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "chunk") or (
        node.op == "call_function" and node.target is torch.chunk
    )


def sequence_split(gm: fx.GraphModule, latent: fx.Node, family: str) -> tuple[int, int] | None:
    """``(degree, rank)`` when the graph is one rank's under context parallelism, else ``None``.

    diffusers' context-parallel hooks shard a tensor as ``x.chunk(degree, dim)[rank]`` (``EquipartitionSharder``); the
    image tokens are the chunk of the packed latent (Flux's ``_cp_plan``) or of ``pos_embed``'s output (SD3, our
    plan), along the token axis. Dynamo records the degree and this rank's index as constants.
    """
    for node in gm.graph.nodes:
        if not _is_chunk(node) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        stack = module_stack(source)
        is_image = source is latent if family == "flux" else bool(stack) and stack[-1][0].split(".")[-1] == "pos_embed"
        if not is_image:
            continue
        degree = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        shape = node_shape(source)
        picks = [u.args[1] for u in node.users if u.target is operator.getitem]
        if shape is None or dim not in (1, 1 - len(shape)) or len(picks) != 1 or not isinstance(degree, int):
            raise _unsupported(
                f"the image tokens are split across ranks in a way the passes do not know ({node.format_node()}): "
                "expected diffusers' context parallelism, x.chunk(degree, dim=1)[rank] along the token axis"
            )
        return degree, int(picks[0])
    return None


#: The collectives a block may hold under context parallelism: Ulysses' all-to-alls (their sizes follow the merged
#: counts, see ``fix_token_shapes``) and the waits on them.
_ULYSSES_COLLECTIVES = {"all_to_all_single", "wait_tensor"}


def _check_ulysses(blocks: list[BlockSites]) -> None:
    """Refuse collectives inside the blocks other than Ulysses' (ring attention passes key / value blocks around)."""
    for block in blocks:
        nodes = [n for b in block.branches for n in b.nodes] + list(block.stream.attention if block.stream else ())
        for node in nodes:
            if (name := collective(node)) is not None and name not in _ULYSSES_COLLECTIVES:
                raise _unsupported(
                    f"{block.path} runs {name} inside its attention: token merging under context parallelism "
                    "supports Ulysses attention (ContextParallelConfig(ulysses_degree=N)), not ring attention "
                    "(ring_degree > 1), whose key / value exchange it has never been run with"
                )


def find_mmdit_blocks(gm: fx.GraphModule, example_inputs: list | None = None) -> ModelSites:
    """Locate each MMDiT block's attention / ``attn2`` / FF inputs and outputs (raises UnsupportedModelError).

    ``example_inputs`` (the graph's inputs) are needed for Flux, whose token grid is in the ``img_ids`` values.
    """
    by_block: dict[str, list[fx.Node]] = {}
    kinds: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":  # weights carry their module's stack too; they are inputs, not regions
            continue
        for path, cls in module_stack(node):
            if cls in BLOCK_CLASSES:
                by_block.setdefault(path, []).append(node)
                kinds[path] = cls
                break
    if not by_block:
        raise UnsupportedModelError(
            f"no MMDiT block found: looked for {' / '.join(BLOCK_CLASSES)} modules (diffusers SD3 / SD3.5 and "
            f"Flux) in the traced graph's nn_module_stack; the graph holds: {_describe_modules(gm)}. A step cache "
            "that hooks the blocks (diffusers' enable_cache / apply_first_block_cache, cache-dit) breaks the graph "
            "into fragments without a whole block: remove it and use the backend's own, "
            "options={'step_cache': sdtm_compile.FirstBlockCacheConfig(threshold)}. "
            f"{FALLBACK_HINT}."
        )
    families = {BLOCK_FAMILIES[cls] for cls in kinds.values()}
    if len(families) != 1:
        raise _unsupported(f"the graph mixes blocks of several model families: {sorted(set(kinds.values()))}")
    family = families.pop()
    blocks = []
    for index, (path, nodes) in enumerate(by_block.items()):
        if kinds[path] == "FluxSingleTransformerBlock":
            blocks.append(BlockSites(index, path, None, None, kind="single", stream=_single_stream(path, nodes)))
            continue
        attn = _branch(path, "attn", nodes, f"{path}.attn.to_q")
        ff = _branch(path, "ff", nodes, f"{path}.ff.net.0.proj")
        if attn is None or ff is None:
            raise _unsupported(f"block {path} has no {'attn' if attn is None else 'ff'} region in the graph")
        attn2 = _branch(path, "attn2", nodes, f"{path}.attn2.to_q")
        kind = "double" if family == "flux" else "joint"
        blocks.append(BlockSites(index, path, attn, ff, attn2, kind=kind))

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    embedder = "pos_embed.proj" if family == "sd3" else "x_embedder"
    latent_index = _placeholder_feeding(gm, embedder, "hidden_states")
    split = sequence_split(gm, placeholders[latent_index], family) if latent_index is not None else None
    degree, rank = split if split is not None else (1, 0)
    image_ids_index = None
    if family == "flux":
        image_ids_index = next((i for i, n in enumerate(placeholders) if "img_ids" in n.name), None)
        ids_shape = node_shape(placeholders[image_ids_index]) if image_ids_index is not None else None
        if ids_shape is None or len(ids_shape) != 2:
            raise _unsupported("found no 2-D img_ids input: call the Flux transformer with img_ids [N, 3]")
        num_tokens = ids_shape[0]
    shapes = {node_shape(b.input) for block in blocks for b in block.branches}
    if family == "sd3" and (len(shapes) != 1 or len(next(iter(shapes)) or ()) != 3):
        raise _unsupported(f"merge sites disagree on the image-token shape [B, N, C]: {shapes}")
    if family == "flux" and any(
        shape is None or len(shape) != 3 or shape[1] != num_tokens // degree for shape in shapes
    ):
        held = f"{num_tokens} image tokens of img_ids" + (f", split across {degree} ranks" if degree > 1 else "")
        raise _unsupported(f"double-block merge sites {shapes} do not hold the {held}")
    if family == "flux":
        total_tokens, num_tokens = num_tokens, num_tokens // degree
    else:
        num_tokens = next(iter(shapes))[1]  # type: ignore[index]
        total_tokens = num_tokens * degree

    text_tokens = None
    for node in next((b.attn.nodes for b in blocks if b.attn is not None), []):
        if node.op == "call_function" and module_stack(node)[-1][0].endswith(".attn.add_q_proj") and node_shape(node):
            text_tokens = node_shape(node)[1]  # type: ignore[index]
            break
    for block in blocks:
        if block.stream is not None:
            joint = node_shape(block.stream.norm_output)
            if joint is None or len(joint) != 3 or joint[1] <= num_tokens:
                raise _unsupported(f"{block.path}: the single-stream input {joint} is not [B, T + N, C]")
            if text_tokens not in (None, joint[1] - num_tokens):
                raise _unsupported(
                    f"{block.path}: {joint[1] - num_tokens} text tokens, the double blocks have {text_tokens}"
                )
            text_tokens = joint[1] - num_tokens

    timestep_index = _placeholder_feeding(gm, "time_text_embed.time_proj", "timestep")
    if latent_index is None or timestep_index is None:
        raise _unsupported(
            "could not find the latent and timestep inputs of the traced transformer (call it with the "
            "hidden_states and timestep arguments of the diffusers transformer's forward)"
        )
    latent_shape = node_shape(placeholders[latent_index])
    if family == "flux":
        if latent_shape is None or len(latent_shape) != 3 or latent_shape[1] != total_tokens:
            raise _unsupported(
                f"expected a packed latent hidden_states [B, N, C] with N = {total_tokens} (the rows of img_ids), got "
                f"shape {latent_shape}: pass the latent packed as FluxPipeline does"
            )
        if example_inputs is None:
            raise ValueError(
                "find_mmdit_blocks needs the graph's example inputs for a Flux model: its token grid is read from "
                "the img_ids values"
            )
        try:
            grid = image_grid(example_inputs[image_ids_index], total_tokens)  # type: ignore[index]
        except UnsupportedModelError as err:
            raise _unsupported(str(err)) from err
    else:
        if latent_shape is None or len(latent_shape) != 4:
            raise _unsupported(
                f"expected a latent hidden_states [B, C, H, W], got shape {latent_shape}: pass the unpatchified "
                "latent, as diffusers' SD3 pipelines do"
            )
        height, width = latent_shape[-2:]
        patch = round(math.sqrt(height * width / total_tokens))
        grid = (height // patch, width // patch)
        if grid[0] * grid[1] != total_tokens:
            raise _unsupported(
                f"latent {height}x{width} does not map onto {total_tokens} image tokens: use a latent whose sides are "
                "multiples of the transformer's patch_size"
            )
    if degree > 1:
        try:
            grid = band_grid(grid, degree)
        except ValueError as err:
            raise _unsupported(str(err)) from err
        _check_ulysses(blocks)
        logger.info("context parallelism: rank %d of %d holds a %dx%d band of the image tokens", rank, degree, *grid)

    sites = ModelSites(
        tuple(blocks),
        num_tokens,
        text_tokens,
        grid,
        latent_index,
        timestep_index,
        family,
        image_ids_index,
        context_parallel=degree,
    )
    logger.info(
        "found %d %s blocks (%d with attn2, %d single-stream), %d image tokens on a %dx%d grid, %s text tokens",
        len(blocks),
        family,
        sum(b.attn2 is not None for b in blocks),
        sum(b.kind == "single" for b in blocks),
        num_tokens,
        *grid,
        text_tokens,
    )
    for block in blocks:
        logger.debug("  %s (%s): merge sites %s", block.path, block.kind, [b.module for b in block.branches])
    return sites
