"""Each pass, on a real Dynamo graph of tiny diffusers SD3 / SD3.5 models: which nodes exist after it."""

import operator

import pytest
import torch
from torch import fx

from sdtm_compile import SDTMConfig
from sdtm_compile.core.method import method_for
from sdtm_compile.core.ops import sdtm_merge, sdtm_plan, sdtm_unmerge
from sdtm_compile.core.schedule import FULL, EngineKey, Stage
from sdtm_compile.methods.sdtm.schedule import token_counts
from sdtm_compile.models import TINY_SD3, TINY_SD35, example_inputs, tiny_sd3_transformer
from sdtm_compile.passes import (
    LI_INPUT_NAME,
    PassOrderError,
    PassSettings,
    TokenShapeError,
    UnsupportedModelError,
    build_pipeline,
    copy_graph_module,
    copy_with_node_map,
    find_mmdit_blocks,
    first_block_nodes,
    first_block_outputs,
    fix_token_shapes,
    head_graph,
    insert_merge_nodes,
    module_path,
    module_stack,
    propagate_shapes,
    residual_sites,
    rewrite_for_engine,
    tail_graph,
    thread_engine_state,
)
from tests.helpers import capture_dynamo_graph

pytestmark = pytest.mark.unit

STRUCTURE = EngineKey(Stage.STRUCTURE, 0.7)
DETAIL = EngineKey(Stage.DETAIL, 0.5)


@pytest.fixture(scope="module")
def sd35_graph():
    model = tiny_sd3_transformer(TINY_SD35, seed=1)
    return capture_dynamo_graph(model, example_inputs(TINY_SD35, 2, (24, 40)))


@pytest.fixture(scope="module")
def sd3_graph():
    model = tiny_sd3_transformer(TINY_SD3)
    return capture_dynamo_graph(model, example_inputs(TINY_SD3, 1, (32, 32)))


def count(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def test_module_path_normalisation():
    assert module_path("L['self'].__dict__['_modules']['transformer_blocks'].0.attn") == "transformer_blocks.0.attn"
    assert module_path("L['self'].transformer_blocks[3].ff.net[0].proj") == "transformer_blocks.3.ff.net.0.proj"


def test_find_blocks_sd35(sd35_graph):
    gm, _ = sd35_graph
    sites = find_mmdit_blocks(gm)
    assert [b.path for b in sites.blocks] == [f"transformer_blocks.{i}" for i in range(3)]
    assert [b.attn2 is not None for b in sites.blocks] == [True, True, False]
    assert (sites.num_tokens, sites.grid, sites.text_tokens) == (240, (12, 20), 8)
    for block in sites.blocks:
        # the attention input feeds to_q/to_k/to_v, the FF input feeds ff.net.0.proj
        consumers = {module_stack(u)[-1][0] for u in block.attn.input.users}
        assert {f"{block.path}.attn.to_q", f"{block.path}.attn.to_k", f"{block.path}.attn.to_v"} <= consumers
        assert module_stack(block.attn.output)[-1][0].startswith(f"{block.path}.attn.to_out")
        assert any(module_stack(u)[-1][0] == f"{block.path}.ff.net.0.proj" for u in block.ff.input.users)
        assert module_stack(block.ff.output)[-1][0] == f"{block.path}.ff.net.2"
    # an analysis: the graph is unchanged, and the sites carry over to a copy's nodes
    assert count(gm, sdtm_plan) == 0
    copy, node_map = copy_with_node_map(gm)
    moved = sites.remapped(node_map)
    copied_nodes = set(copy.graph.nodes)
    assert all(b.input in copied_nodes and set(b.nodes) <= copied_nodes for blk in moved.blocks for b in blk.branches)
    assert [b.attn.input.name for b in moved.blocks] == [b.attn.input.name for b in sites.blocks]


def test_find_blocks_logs_what_it_found(sd3_graph, caplog):
    gm, _ = sd3_graph
    with caplog.at_level("INFO", logger="sdtm_compile.passes.find_blocks"):
        find_mmdit_blocks(gm)
    assert "found 2 sd3 blocks (0 with attn2, 0 single-stream), 256 image tokens on a 16x16 grid" in caplog.text


def test_find_blocks_rejects_a_model_without_mmdit_blocks():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    captured = {}

    def keep(gm, example_inputs):
        captured["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    torch.compile(mlp, backend=keep)(torch.randn(2, 8))
    with pytest.raises(UnsupportedModelError) as info:
        find_mmdit_blocks(captured["gm"])
    message = str(info.value)
    assert "JointTransformerBlock" in message
    assert "Linear" in message
    assert "on_unsupported" in message


def _settings(gm, key=FULL, config=None):
    """Pass settings with the method's engine contract (what rewrite_for_engine fills in)."""
    settings = PassSettings(config or SDTMConfig(), key)
    return settings.with_signature(settings.method.signature(find_mmdit_blocks(gm).layout()))


def test_thread_li_adds_one_input_and_one_output(sd3_graph):
    gm, inputs = sd3_graph
    out, node_map = copy_with_node_map(gm)
    sites = find_mmdit_blocks(gm).remapped(node_map)
    out, sites = thread_engine_state(out, sites, _settings(gm))
    placeholders = [n for n in out.graph.nodes if n.op == "placeholder"]
    assert placeholders[-1].name == LI_INPUT_NAME
    assert len(placeholders) == len(inputs) + 1
    output = next(n for n in out.graph.nodes if n.op == "output")
    assert output.args[0][-1] is placeholders[-1]
    li = torch.randint(0, 5, (1, 256), dtype=torch.int32)
    with torch.no_grad():
        result = out(*inputs, li)
    assert result[-1] is li  # the full engine passes li through untouched
    with pytest.raises(ValueError, match="ran twice"):
        thread_engine_state(out, sites, _settings(gm))


def _through_insert(gm, key):
    """The graph after thread_li_state and insert_merge_nodes, and its sites."""
    settings = _settings(gm, key)
    out, node_map = copy_with_node_map(gm)
    sites = find_mmdit_blocks(gm).remapped(node_map)
    for rewrite in (thread_engine_state, insert_merge_nodes):
        out, sites = rewrite(out, sites, settings)
    return out, sites


def test_the_pipeline_is_declared_in_order_and_checked():
    """Built per method, family and stage from declared passes: the ones that apply, in order; every pass ensures
    a fact, and what a pass requires an earlier one ensures."""
    every_extension = SDTMConfig(merge_attention=True, size_aware_attention=True, adaptive_threshold=0.5)
    flux = build_pipeline(method_for(every_extension), "flux", Stage.STRUCTURE)
    assert flux.names == [
        "split_single_stream",
        "thread_engine_state",
        "insert_merge_nodes",
        "gather_rotary_positions",
        "add_key_size_bias",
        "fix_token_shapes",
        "add_window_statistic",
    ]
    established = set()
    for graph_pass in flux.passes:
        assert set(graph_pass.requires) <= established, graph_pass.name
        assert graph_pass.ensures, graph_pass.name
        established |= set(graph_pass.ensures)
    # optional passes are left out, not run as no-ops: SD3's structure and FULL engines with SDTM's defaults
    sd3 = method_for(SDTMConfig())
    assert build_pipeline(sd3, "sd3", Stage.STRUCTURE).names == [
        "thread_engine_state",
        "insert_merge_nodes",
        "fix_token_shapes",
    ]
    assert build_pipeline(sd3, "sd3", Stage.FULL).names == ["thread_engine_state"]
    fusion = method_for(SDTMConfig(cache_fusion=True))
    assert build_pipeline(fusion, "sd3", Stage.FULL, step_cache=False).names[-1] == "fuse_cached_branches"
    assert "gather_rotary_positions" not in build_pipeline(sd3, "flux", Stage.STRUCTURE).names
    assert "fix_token_shapes" in build_pipeline(sd3, "flux", Stage.STRUCTURE).describe()


def test_a_pass_run_out_of_order_is_refused(sd3_graph):
    gm, inputs = sd3_graph
    sites = find_mmdit_blocks(gm)
    out, node_map = copy_with_node_map(gm)
    with pytest.raises(ValueError, match="run thread_engine_state first"):
        insert_merge_nodes(out, sites.remapped(node_map), _settings(gm, STRUCTURE))
    skipping = build_pipeline(method_for(SDTMConfig()), "sd3", Stage.STRUCTURE).without("thread_engine_state")
    with pytest.raises(PassOrderError, match="before insert_merge_nodes: fact 'state_threaded'"):
        rewrite_for_engine(gm, inputs, PassSettings(SDTMConfig(), STRUCTURE), pipeline=skipping)


def test_insert_merge_structure_stage(sd35_graph):
    gm, _ = sd35_graph
    out, sites = _through_insert(gm, STRUCTURE)
    blocks, with_attn2 = 3, 2
    assert count(out, sdtm_plan) == blocks  # one plan per block, reused by attention and FF
    assert count(out, sdtm_merge) == count(out, sdtm_unmerge) == 2 * blocks + with_attn2
    plans = [n for n in out.graph.nodes if n.target is sdtm_plan]
    assert [p.args[4:6] for p in plans] == [("ssm", token_counts(STRUCTURE, 12, 20).removed // 3)] * 3
    # li is chained: block 0 reads the input, block k reads block k-1's li, the output is the last li
    assert plans[0].args[1].name == LI_INPUT_NAME
    for prev, nxt in zip(plans, plans[1:]):
        li_node = nxt.args[1]
        assert li_node.target is operator.getitem
        assert li_node.args == (prev, 2)
    output = next(n for n in out.graph.nodes if n.op == "output")
    assert output.args[0][-1].args == (plans[-1], 2)
    for block in sites.blocks:
        for branch in block.branches:
            # everything inside the branch now reads the merged tokens; everything outside the unmerged output
            assert all(user.target is sdtm_merge or user not in branch.nodes for user in branch.input.users)
            assert all(u.target is sdtm_unmerge or u in branch.nodes for u in branch.output.users)


def test_insert_merge_detail_stage_merges_only_ff(sd35_graph):
    gm, _ = sd35_graph
    out, _ = _through_insert(gm, DETAIL)
    assert count(out, sdtm_plan) == 3
    assert count(out, sdtm_merge) == count(out, sdtm_unmerge) == 3
    for node in out.graph.nodes:
        if node.target is sdtm_merge:
            assert all(".ff.net." in module_stack(user)[-1][0] for user in node.users)
    assert {n.args[4] for n in out.graph.nodes if n.target is sdtm_plan} == {"idm"}


def test_insert_merge_full_engine_inserts_nothing(sd35_graph):
    gm, _ = sd35_graph
    out, _ = _through_insert(gm, FULL)
    assert count(out, sdtm_plan) == count(out, sdtm_merge) == count(out, sdtm_unmerge) == 0


def test_fix_token_shapes_rewrites_the_joint_split(sd35_graph):
    gm, inputs = sd35_graph
    out, sites = _through_insert(gm, STRUCTURE)
    li = torch.zeros(2, 240, dtype=torch.int32)
    with pytest.raises(TokenShapeError, match="does not type-check"):
        propagate_shapes(copy_graph_module(out), [*inputs, li])  # before the fix: split at N, shapes break
    out, sites = fix_token_shapes(out, sites, _settings(gm, STRUCTURE))
    merged = token_counts(STRUCTURE, 12, 20).attention
    splits = [
        n
        for n in out.graph.nodes
        if n.target is operator.getitem
        and isinstance(n.args[1], tuple)
        and any(isinstance(s, slice) and merged in (s.start, s.stop) for s in n.args[1])
    ]
    assert len(splits) == 5  # image and text halves in blocks 0 and 1, the image half of the last block
    assert not any(
        isinstance(s, slice) and 240 in (s.start, s.stop)
        for n in out.graph.nodes
        if n.target is operator.getitem and isinstance(n.args[1], tuple)
        for s in n.args[1]
    )
    propagate_shapes(out, [*inputs, li])


@pytest.mark.parametrize("key", [FULL, STRUCTURE, DETAIL], ids=str)
def test_rewrite_for_engine_keeps_output_shapes(sd35_graph, key):
    gm, inputs = sd35_graph
    rewritten = rewrite_for_engine(gm, inputs, PassSettings(SDTMConfig(), key))
    out = rewritten.gm
    with torch.no_grad():
        sample, li = out(*inputs, torch.zeros(2, 240, dtype=torch.int32))
    assert rewritten.key == key
    assert sample.shape == inputs[rewritten.sites.latent_index].shape
    assert li.shape == (2, 240)
    assert li.dtype == torch.int32
    assert gm is not out
    assert count(gm, sdtm_plan) == 0  # the original graph is untouched


def test_the_step_cache_cuts_a_head_and_a_tail_that_starts_after_the_first_block(sd35_graph):
    """The head returns the first block's input and its two streams; the tail of an engine whose first block is
    unmerged keeps no node of that block and, fed the head's streams, returns exactly the whole engine's outputs."""
    gm, inputs = sd35_graph
    full = rewrite_for_engine(gm, inputs, PassSettings(SDTMConfig(), FULL), step_cache=True)
    names = residual_sites(full.sites)
    outputs = first_block_outputs(full.gm, full.sites, names)
    assert len(outputs) == 2 and outputs[0] == names.first_out  # the image stream, then the text stream
    head = head_graph(full.gm, names, outputs)
    tail = tail_graph(full.gm, full.sites, outputs)
    assert first_block_nodes(full.gm, full.sites) and not first_block_nodes(tail, full.sites)
    later = {n.name for n in full.gm.graph.nodes if n.op == "call_function"} - first_block_nodes(full.gm, full.sites)
    assert {n.name for n in tail.graph.nodes if n.op == "call_function"} <= later
    placeholders = [n.name for n in tail.graph.nodes if n.op == "placeholder"]
    assert placeholders[-2:] == ["sdtm_first_block_output_0", "sdtm_first_block_output_1"]
    li = torch.zeros(2, 240, dtype=torch.int32)
    with torch.no_grad():
        first_in, *streams = head(*inputs, li)
        want, got = full.gm(*inputs, li), tail(*inputs, li, *streams)
    assert first_in.shape == streams[0].shape == (2, 240, TINY_SD35.inner_dim) and streams[1].shape[1] != 240
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    merged = rewrite_for_engine(gm, inputs, PassSettings(SDTMConfig(), STRUCTURE), step_cache=True)
    assert first_block_nodes(merged.gm, merged.sites) != first_block_nodes(full.gm, full.sites)  # no tail for it
