"""Split a Flux single-stream block's ``proj_out`` into its attention and MLP column blocks.

``FluxSingleTransformerBlock`` runs attention and an MLP in parallel on ``norm(cat([text, image]))`` and
projects both with one Linear: ``proj_out(cat([attn, act(proj_mlp(x))], -1))`` (input ``C + 4C``). Merging only
the MLP's image tokens needs the MLP on its own path to ``proj_out``'s output, so this pass rewrites::

    proj_out(cat([attn, mlp], -1))   ->   linear(attn, W[:, :C], b) + cat([m[:, :T], m[:, T:]], 1)
                                          where m = linear(act(proj_mlp(cat([x[:, :T], x[:, T:]], 1))), W[:, C:])

The slices and concatenations of the text (``[:, :T]``) and image (``[:, T:]``) tokens are the seams
``insert_merge_nodes`` uses: ``x[:, T:]`` ``[B, N, C]`` is the block's plan input and the ``mlp`` branch's input,
``m[:, T:]`` its output; text tokens pass through the MLP with the image tokens (one matmul) and are never
merged. Numerically the split equals the original up to float summation order (one ``C + 4C`` dot product becomes
a ``C`` and a ``4C`` one, then a sum).

When the stage merges attention (the method's ``merged_branches`` name it), the attention gets the same seams: its q/k/v
read ``cat([x[:, :T], x[:, T:]], 1)`` and its output ``a`` reaches ``proj_out``'s attention columns as
``cat([a[:, :T], a[:, T:]], 1)``; ``x[:, T:]`` to ``a[:, T:]`` is the block's ``attn`` branch (its RoPE reads are
then gathered per merged token by ``gather_rotary_positions``). Otherwise the attention keeps every token.

Runs only for merging engines of a model with single-stream blocks (the ``FULL`` engine keeps the unmodified
graph). Returns the sites with each split block's ``mlp`` (and ``attn``) branch.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import replace

import torch
from torch import fx

from ._graph import copy_location, node_shape
from .insert_merge import merged_blocks, merged_branch_names
from .settings import PassSettings
from .sites import BlockSites, Branch, ModelSites

__all__ = ["split_single_blocks", "split_single_stream"]

logger = logging.getLogger(__name__)


def _seam(graph: fx.Graph, x: fx.Node, text: int, after: fx.Node, like: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """``x[:, :T]``, ``x[:, T:]`` and their ``cat`` along the tokens, inserted after ``after``: ``(text, image,
    joint)``. A no-op at ratio 0; once the image part is merged (or unmerged) in between, the merge seam."""
    parts = []
    for index in ((slice(None), slice(None, text)), (slice(None), slice(text, None))):
        with graph.inserting_after(parts[-1] if parts else after):
            parts.append(copy_location(graph.call_function(operator.getitem, (x, index)), like, "split"))
    with graph.inserting_after(parts[-1]):
        joint = copy_location(graph.call_function(torch.cat, (parts, 1)), like, "split")
    return parts[0], parts[1], joint


def _linear_args(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """``(input, weight, bias)`` of a traced linear call."""
    args = list(node.args) + [None] * (3 - len(node.args))
    weight = node.kwargs.get("weight", args[1])
    bias = node.kwargs.get("bias", args[2])
    return args[0], weight, bias


def split_single_stream(
    gm: fx.GraphModule, sites: ModelSites, settings: PassSettings
) -> tuple[fx.GraphModule, ModelSites]:
    """Split every merged single-stream block's ``proj_out``; return the sites with each block's image MLP as its
    ``mlp`` branch (and, when the stage merges attention, its image attention as its ``attn`` branch)."""
    singles = [block for block in merged_blocks(sites, settings) if block.stream is not None]
    if not singles:
        return gm, sites
    merge_attention = "attn" in merged_branch_names(sites, settings)
    gm, sites = split_single_blocks(gm, sites, singles, merge_attention)
    logger.debug(
        "split_single_stream: %s: split proj_out of %d single-stream blocks%s",
        settings.key,
        len(singles),
        " (and cut their attention for merging)" if merge_attention else "",
    )
    return gm, sites


def split_single_blocks(
    gm: fx.GraphModule, sites: ModelSites, singles: list[BlockSites], merge_attention: bool = False
) -> tuple[fx.GraphModule, ModelSites]:
    """Split the ``proj_out`` of each of ``singles`` (single-stream blocks of ``sites``), cutting their attention
    too when ``merge_attention``; the sites with their ``mlp`` (and ``attn``) branches. Also used by an unmerged
    engine that needs the MLP columns apart (SDTM's cache fusion stores them)."""
    graph = gm.graph
    text = sites.text_tokens
    assert text is not None  # find_mmdit_blocks sets it whenever there is a single-stream block
    split: list[BlockSites] = []
    for block in singles:
        stream = block.stream
        assert stream is not None
        if block.mlp is not None:
            raise ValueError(f"{block.path}: split_single_stream already ran on these sites")
        norm, linear = stream.norm_output, stream.proj_out.target
        _, weight, bias = _linear_args(stream.proj_out)
        channels = node_shape(stream.attn_output)[-1]  # type: ignore[index]

        def call(target, args, like):
            return copy_location(graph.call_function(target, args), like, "split")

        # The MLP's input: text and image tokens, cut apart so the image part can be merged.
        text_in, image_in, mlp_in = _seam(graph, norm, text, norm, stream.proj_mlp)
        stream.proj_mlp.replace_input_with(norm, mlp_in)
        attn_in = None
        if merge_attention:  # the attention reads the joint sequence through the same seam
            with graph.inserting_after(mlp_in):
                attn_in = call(torch.cat, ([text_in, image_in], 1), stream.proj_mlp)
            attention = set(stream.attention)
            for user in [u for u in norm.users if u in attention]:
                user.replace_input_with(norm, attn_in)

        # proj_out by column blocks: attention columns (with the bias) + MLP columns, text and image apart.
        with graph.inserting_after(stream.proj_out):
            w_attn = call(operator.getitem, (weight, (slice(None), slice(None, channels))), stream.proj_out)
        with graph.inserting_after(w_attn):
            w_mlp = call(operator.getitem, (weight, (slice(None), slice(channels, None))), stream.proj_out)
        with graph.inserting_after(w_mlp):
            mlp_out = call(linear, (stream.act, w_mlp, None), stream.proj_out)
        _, image_out, mlp_joint = _seam(graph, mlp_out, text, mlp_out, stream.proj_out)
        attn_joint, attn_branch = stream.attn_output, None
        if merge_attention:
            _, attn_image, attn_joint = _seam(graph, stream.attn_output, text, mlp_joint, stream.proj_out)
            attn_branch = Branch(f"{block.path}.attn", image_in, attn_image, (attn_in, *stream.attention))
        with graph.inserting_after(attn_joint if merge_attention else mlp_joint):
            attn_out = call(linear, (attn_joint, w_attn, bias), stream.proj_out)
        with graph.inserting_after(attn_out):
            projected = call(operator.add, (attn_out, mlp_joint), stream.proj_out)
        stream.proj_out.replace_all_uses_with(projected)
        graph.erase_node(stream.proj_out)
        graph.erase_node(stream.concat)
        mlp_branch = Branch(
            f"{block.path}.proj_mlp", image_in, image_out, (mlp_in, stream.proj_mlp, stream.act, mlp_out)
        )
        split.append(replace(block, mlp=mlp_branch, attn=attn_branch))
    gm.recompile()
    return gm, sites.with_blocks(*split)
