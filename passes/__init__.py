"""FX passes over the graph Dynamo traces (installed as ``sdtm_compile.passes``).

1. :func:`find_mmdit_blocks` - an analysis: each block's attention / ``attn2`` / FF boundaries, returned as a
   :class:`ModelSites` that the passes take as an argument;
2. :data:`REWRITE_PIPELINE` - the rewrite passes, ``pass(gm, sites, settings) -> gm``, each declaring the facts
   it requires and ensures (:mod:`.pipeline`): :func:`split_single_stream` (Flux single-stream blocks:
   ``proj_out`` split into attention and MLP columns), :func:`thread_li_state` (the ``sdtm_li`` input and output),
   :func:`insert_merge_nodes` (plan once per block, merge / unmerge around the branches of the stage),
   :func:`gather_rotary_positions` (merged Flux attention: RoPE rows per merged token),
   :func:`add_key_size_bias` (size-aware attention: a ``log(size)`` key bias, when the config asks),
   :func:`fix_token_shapes` (token-count constants in merged regions, then every shape re-checked),
   :func:`thread_step_cache` (cache fusion: the ``sdtm_cache`` input and output, when the config asks),
   :func:`add_window_statistic` (SDTM*: the first block's window statistic as one more output, when asked);
3. :func:`lint_tensorrt` - a check on the aten graph (:func:`to_aten`) before TensorRT builds.

:func:`rewrite_for_engine` runs the pipeline on a copy of the graph and returns a :class:`RewrittenGraph`.
"""

from __future__ import annotations

from ._graph import copy_graph_module, copy_with_node_map, module_path, module_stack
from .attention_bias import add_key_size_bias
from .find_blocks import (
    FALLBACK_HINT,
    BlockSites,
    Branch,
    ModelSites,
    UnsupportedModelError,
    find_mmdit_blocks,
    image_grid,
)
from .fix_token_shapes import TokenShapeError, fix_token_shapes, propagate_shapes
from .fuse_cache import CACHE_INPUT_NAME, CacheFusionError, cache_slots, new_cache, thread_step_cache
from .gather_rotary import gather_rotary_positions
from .insert_merge import insert_merge_nodes
from .lint_tensorrt import LintFinding, TensorRTLintError, lint_report, lint_tensorrt, to_aten
from .pipeline import FACTS, REWRITE_PIPELINE, GraphPass, PassOrderError, RewrittenGraph, rewrite_for_engine
from .settings import PassSettings
from .split_single_stream import split_single_stream
from .thread_li import LI_INPUT_NAME, li_input, thread_li_state
from .window_stat import add_window_statistic

__all__ = [
    "CACHE_INPUT_NAME",
    "CacheFusionError",
    "add_key_size_bias",
    "add_window_statistic",
    "cache_slots",
    "new_cache",
    "thread_step_cache",
    "FACTS",
    "FALLBACK_HINT",
    "REWRITE_PIPELINE",
    "BlockSites",
    "Branch",
    "GraphPass",
    "LI_INPUT_NAME",
    "LintFinding",
    "ModelSites",
    "PassOrderError",
    "PassSettings",
    "RewrittenGraph",
    "TensorRTLintError",
    "TokenShapeError",
    "UnsupportedModelError",
    "copy_graph_module",
    "copy_with_node_map",
    "find_mmdit_blocks",
    "image_grid",
    "fix_token_shapes",
    "gather_rotary_positions",
    "insert_merge_nodes",
    "li_input",
    "lint_report",
    "lint_tensorrt",
    "module_path",
    "module_stack",
    "propagate_shapes",
    "rewrite_for_engine",
    "split_single_stream",
    "thread_li_state",
    "to_aten",
]
