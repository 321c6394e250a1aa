"""FX passes over the graph Dynamo traces (installed as ``sdtm_compile.passes``).

1. :func:`find_mmdit_blocks` - an analysis: each block's attention / ``attn2`` / FF boundaries, returned as a
   :class:`ModelSites` that every pass takes and returns;
2. :func:`build_pipeline` - the rewrite passes of one engine, each a declared :class:`GraphPass`
   ``run(gm, sites, settings) -> (gm, sites)`` with the facts it requires and ensures:
   :func:`split_single_stream` (Flux single-stream blocks: ``proj_out`` split into attention and MLP columns),
   :func:`thread_engine_state` (the engine contract's carried state: ``sdtm_li``, ...), :func:`insert_merge_nodes`
   (plan once per block, merge / unmerge around the branches of the stage), :func:`gather_rotary_positions`
   (merged Flux attention: RoPE rows per merged token), a method's extension passes, :func:`fix_token_shapes`
   (token-count constants in merged regions), and :func:`add_hidden_output` (the step cache); see
   ``sdtm-compile passes`` for the pipeline of a method and model;
3. :func:`lint_tensorrt` - a check on the aten graph (:func:`to_aten`) before TensorRT builds.

:func:`rewrite_for_engine` runs a pipeline on a copy of the graph and returns a :class:`RewrittenGraph`.
"""

from __future__ import annotations

from ._graph import (
    collective,
    copy_graph_module,
    copy_location,
    copy_with_node_map,
    module_path,
    module_stack,
    node_shape,
    node_value,
    set_state_output,
    state_input,
    state_input_name,
    state_outputs,
)
from .facts import FACTS, PassOrderError, check_facts, fact
from .find_blocks import FALLBACK_HINT, UnsupportedModelError, find_mmdit_blocks, image_grid
from .fix_token_shapes import TokenShapeError, fix_token_shapes, propagate_shapes
from .gather_rotary import gather_rotary_positions
from .insert_merge import insert_merge_nodes, merged_blocks, merged_branch_names
from .lint_tensorrt import LintFinding, TensorRTLintError, lint_report, lint_tensorrt, to_aten
from .pipeline import GraphPass, PassContext, Pipeline, RewrittenGraph, build_pipeline, rewrite_for_engine
from .settings import PassSettings
from .sites import BlockSites, Branch, ModelSites
from .split_single_stream import split_single_blocks, split_single_stream
from .step_cache import (
    HIDDEN_INPUT_NAME,
    HIDDEN_STATE,
    ResidualSites,
    add_hidden_output,
    first_block_nodes,
    first_block_outputs,
    head_graph,
    hidden_state,
    out_graph,
    residual_sites,
    tail_graph,
)
from .thread_state import LI_INPUT_NAME, li_input, thread_engine_state

__all__ = [
    "FACTS",
    "FALLBACK_HINT",
    "HIDDEN_INPUT_NAME",
    "HIDDEN_STATE",
    "LI_INPUT_NAME",
    "BlockSites",
    "Branch",
    "GraphPass",
    "LintFinding",
    "ModelSites",
    "PassContext",
    "PassOrderError",
    "PassSettings",
    "Pipeline",
    "ResidualSites",
    "RewrittenGraph",
    "TensorRTLintError",
    "TokenShapeError",
    "UnsupportedModelError",
    "add_hidden_output",
    "build_pipeline",
    "check_facts",
    "collective",
    "copy_graph_module",
    "copy_location",
    "copy_with_node_map",
    "fact",
    "find_mmdit_blocks",
    "fix_token_shapes",
    "gather_rotary_positions",
    "first_block_nodes",
    "first_block_outputs",
    "head_graph",
    "tail_graph",
    "hidden_state",
    "image_grid",
    "insert_merge_nodes",
    "li_input",
    "lint_report",
    "lint_tensorrt",
    "merged_blocks",
    "merged_branch_names",
    "module_path",
    "module_stack",
    "node_shape",
    "node_value",
    "out_graph",
    "propagate_shapes",
    "residual_sites",
    "rewrite_for_engine",
    "set_state_output",
    "split_single_blocks",
    "split_single_stream",
    "state_input",
    "state_input_name",
    "state_outputs",
    "thread_engine_state",
    "to_aten",
]
