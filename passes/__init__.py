"""FX passes over the graph Dynamo traces (installed as ``sdtm_compile.passes``).

Each pass is ``pass(gm, settings) -> gm`` and logs what it changed at debug level. They run in this order:

1. :func:`find_mmdit_blocks` - locate each block's attention / ``attn2`` / FF boundaries (``gm.meta``);
2. :func:`thread_li_state` - add the ``sdtm_li`` input and output;
3. :func:`insert_merge_nodes` - plan once per block, merge / unmerge around the branches of the stage;
4. :func:`fix_token_shapes` - make token-count constants in merged regions match the bucket;
5. :func:`lint_tensorrt` - (before TensorRT builds) check every aten op against torch-tensorrt 2.13.

:func:`rewrite_for_engine` runs them all on a copy of the graph and checks the shapes.
"""

from __future__ import annotations

import torch
from torch import fx

from ._graph import copy_graph_module, module_path, module_stack
from .find_blocks import FALLBACK_HINT, BlockSites, Branch, ModelSites, UnsupportedModelError, find_mmdit_blocks
from .fix_token_shapes import TokenShapeError, fix_token_shapes, propagate_shapes
from .insert_merge import insert_merge_nodes
from .lint_tensorrt import LintFinding, TensorRTLintError, lint_report, lint_tensorrt, to_aten
from .settings import PassSettings
from .thread_li import LI_INPUT_NAME, thread_li_state

__all__ = [
    "FALLBACK_HINT",
    "BlockSites",
    "Branch",
    "LI_INPUT_NAME",
    "LintFinding",
    "TensorRTLintError",
    "lint_report",
    "lint_tensorrt",
    "to_aten",
    "ModelSites",
    "PassSettings",
    "TokenShapeError",
    "UnsupportedModelError",
    "copy_graph_module",
    "find_mmdit_blocks",
    "fix_token_shapes",
    "insert_merge_nodes",
    "module_path",
    "module_stack",
    "propagate_shapes",
    "rewrite_for_engine",
    "thread_li_state",
]


def rewrite_for_engine(
    gm: fx.GraphModule, example_inputs: list[torch.Tensor], settings: PassSettings
) -> fx.GraphModule:
    """A copy of ``gm`` rewritten for ``settings.key``, taking ``example_inputs + [li]``, shapes checked."""
    out = copy_graph_module(gm)
    for rewrite in (find_mmdit_blocks, thread_li_state, insert_merge_nodes, fix_token_shapes):
        out = rewrite(out, settings)
    sites: ModelSites = out.meta["sdtm_sites"]
    batch = example_inputs[sites.latent_index].shape[0]
    li = torch.zeros(batch, sites.num_tokens, dtype=torch.int32)
    before = [node_shape for node_shape in _output_shapes(gm)]
    propagate_shapes(out, [*example_inputs, li])
    after = _output_shapes(out)
    if after[:-1] != before or after[-1] != (batch, sites.num_tokens):
        raise TokenShapeError(
            f"{settings.key}: the rewrite changed the graph's output shapes {before} -> {after}; a merged region "
            f"leaks merged tokens into an output. {FALLBACK_HINT}"
        )
    return out


def _output_shapes(gm: fx.GraphModule) -> list[tuple[int, ...] | None]:
    from ._graph import node_shape

    output = next(n for n in gm.graph.nodes if n.op == "output")
    return [node_shape(value) for value in output.args[0]]
