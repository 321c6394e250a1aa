"""The passes on a real Dynamo graph of a tiny Flux (2 double-stream + 2 single-stream blocks): what they find,
which nodes exist after each, and that the proj_out split changes nothing at ratio 0."""

import operator

import pytest
import torch
from torch import fx

from sdtm_compile import SDTMConfig
from sdtm_compile.core.method import method_for
from sdtm_compile.core.ops import sdtm_merge, sdtm_plan, sdtm_rotary, sdtm_unmerge
from sdtm_compile.core.schedule import FULL, EngineKey, Stage
from sdtm_compile.models import TINY_FLUX, flux_example_inputs, tiny_flux_transformer
from sdtm_compile.passes import (
    PassOrderError,
    PassSettings,
    UnsupportedModelError,
    build_pipeline,
    copy_with_node_map,
    find_mmdit_blocks,
    module_stack,
    rewrite_for_engine,
    split_single_stream,
)
from tests.helpers import capture_dynamo_graph

pytestmark = pytest.mark.unit

STRUCTURE = EngineKey(Stage.STRUCTURE, 0.7)
DETAIL = EngineKey(Stage.DETAIL, 0.5)
LATENT = (12, 20)  # a 6x10 token grid: non-square


@pytest.fixture(scope="module")
def flux_graph():
    model = tiny_flux_transformer(TINY_FLUX, seed=1)
    inputs = flux_example_inputs(TINY_FLUX, 2, LATENT)
    gm, flat = capture_dynamo_graph(model, inputs)
    return model, inputs, gm, flat


def count(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _at(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and module_stack(n) and module_stack(n)[-1][0] == path]


def test_find_blocks_flux(flux_graph):
    _, _, gm, flat = flux_graph
    sites = find_mmdit_blocks(gm, flat)
    assert sites.family == "flux"
    assert [(b.kind, b.path) for b in sites.blocks] == [
        ("double", "transformer_blocks.0"),
        ("double", "transformer_blocks.1"),
        ("single", "single_transformer_blocks.0"),
        ("single", "single_transformer_blocks.1"),
    ]
    assert (sites.num_tokens, sites.grid, sites.text_tokens) == (60, (6, 10), TINY_FLUX.text_tokens)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert "img_ids" in placeholders[sites.image_ids_index].name
    assert "hidden_states" in placeholders[sites.latent_index].name
    assert "timestep" in placeholders[sites.timestep_index].name
    for block in sites.blocks[:2]:  # double: the image stream's attention input and FF, as on SD3
        consumers = {module_stack(u)[-1][0] for u in block.attn.input.users}
        assert {f"{block.path}.attn.to_q", f"{block.path}.attn.to_k", f"{block.path}.attn.to_v"} <= consumers
        assert module_stack(block.attn.output)[-1][0].startswith(f"{block.path}.attn.to_out")
        assert module_stack(block.ff.output)[-1][0] == f"{block.path}.ff.net.2"
        assert block.stream is None
        assert block.mlp is None
    for block in sites.blocks[2:]:  # single: no image-only branch until the split; the nodes around proj_out
        assert block.attn is None
        assert block.ff is None
        assert block.mlp is None
        stream = block.stream
        assert module_stack(stream.proj_out)[-1][0] == f"{block.path}.proj_out"
        assert module_stack(stream.proj_mlp)[-1][0] == f"{block.path}.proj_mlp"
        assert stream.concat.target is torch.cat
        assert stream.concat.args[0] == [stream.attn_output, stream.act]
        assert stream.norm_output.meta["example_value"].shape == (2, 60 + TINY_FLUX.text_tokens, 32)
        with pytest.raises(ValueError, match="before split_single_stream"):
            block.plan_input  # noqa: B018


def test_flux_needs_its_inputs_and_a_row_major_grid(flux_graph):
    _, _, gm, flat = flux_graph
    with pytest.raises(ValueError, match="img_ids values"):
        find_mmdit_blocks(gm)
    shuffled = list(flat)
    ids_index = find_mmdit_blocks(gm, flat).image_ids_index
    shuffled[ids_index] = flat[ids_index].flip(0)  # same token count, not FluxPipeline's row-major layout
    with pytest.raises(UnsupportedModelError, match="row-major"):
        find_mmdit_blocks(gm, shuffled)


def test_split_single_stream_keeps_the_output(flux_graph):
    """The split alone: proj_out becomes an attention-column and an MLP-column linear; same output (ratio 0)."""
    _, _, gm, flat = flux_graph
    copy, node_map = copy_with_node_map(gm)
    sites = find_mmdit_blocks(gm, flat).remapped(node_map)
    for block in sites.blocks[2:]:
        assert len(_at(copy, f"{block.path}.proj_out")) == 1
    copy, sites = split_single_stream(copy, sites, PassSettings(SDTMConfig(), DETAIL))
    copy.graph.lint()
    for block in sites.blocks[2:]:
        linears = [n for n in _at(copy, f"{block.path}.proj_out") if n.target is torch._C._nn.linear]
        assert len(linears) == 2  # attention columns (with the bias) and MLP columns (no bias)
        assert [n.args[2] is None for n in linears] == [True, False]
        assert not any(n.target is torch.cat and len(n.args) > 1 and n.args[1] == -1 for n in copy.graph.nodes)
        mlp = block.mlp
        assert mlp is not None
        assert block.plan_input is mlp.input
        assert mlp.input.target is operator.getitem
        assert mlp.input.args[0] is block.stream.norm_output
        assert mlp.input.meta.get("sdtm") == "split"
        assert mlp.output.meta.get("sdtm") == "split"
    with torch.no_grad():
        torch.testing.assert_close(copy(*flat)[0], gm(*flat)[0], rtol=0, atol=1e-6)
    # the FULL engine keeps the unmodified graph
    full_copy, full_map = copy_with_node_map(gm)
    before = len(full_copy.graph.nodes)
    full_sites = find_mmdit_blocks(gm, flat).remapped(full_map)
    split_single_stream(full_copy, full_sites, PassSettings(SDTMConfig(), FULL))
    assert len(full_copy.graph.nodes) == before


@pytest.mark.parametrize("key", [STRUCTURE, DETAIL], ids=str)
def test_flux_rewrite_merges_the_feed_forwards_only(flux_graph, key):
    _, _, gm, flat = flux_graph
    assert build_pipeline(method_for(SDTMConfig()), "flux", key.stage).names[0] == "split_single_stream"
    rewritten = rewrite_for_engine(gm, flat, PassSettings(SDTMConfig(), key))
    out = rewritten.gm
    # one plan per block; a merge/unmerge for each double block's ff and each single block's MLP, none for attention
    assert count(out, sdtm_plan) == 4
    assert count(out, sdtm_merge) == 4
    assert count(out, sdtm_unmerge) == 4
    merged_inputs = [n.args[0] for n in out.graph.nodes if n.target is sdtm_merge]
    blocks = rewritten.sites.blocks
    assert merged_inputs == [blocks[0].ff.input, blocks[1].ff.input, blocks[2].mlp.input, blocks[3].mlp.input]
    # by default the double blocks' joint attention is untouched: its split keeps [T, N]
    splits = [n for n in out.graph.nodes if n.op == "call_method" and n.target == "split_with_sizes"]
    assert [list(n.args[1]) for n in splits] == [[TINY_FLUX.text_tokens, 60]] * 2


def test_flux_attention_merge_option_merges_every_attention(flux_graph):
    _, _, gm, flat = flux_graph
    config = SDTMConfig(merge_attention=True)
    rewritten = rewrite_for_engine(gm, flat, PassSettings(config, STRUCTURE))
    out, blocks = rewritten.gm, rewritten.sites.blocks
    # double: attn + ff; single: attention + MLP, which both read x[:, T:] and share its one merge
    assert count(out, sdtm_merge) == 6
    assert count(out, sdtm_unmerge) == 8
    merged = [n.args[0] for n in out.graph.nodes if n.target is sdtm_merge]
    assert all(block.attn.input in merged for block in blocks)
    for block in blocks[2:]:  # the single block's attention reads the seam, its q/k/v no longer the joint norm
        assert block.attn.input is block.mlp.input is block.plan_input
        assert not any(module_stack(u)[-1][0].startswith(f"{block.path}.attn") for u in block.stream.norm_output.users)
    # every RoPE read inside a merged attention is gathered per merged token
    assert count(out, sdtm_rotary) == 4 * 4  # 4 attentions, each reads cos and sin for q and for k
    # the detail stage never merges attention
    detail = rewrite_for_engine(gm, flat, PassSettings(config, DETAIL))
    assert count(detail.gm, sdtm_merge) == 4
    assert count(detail.gm, sdtm_rotary) == 0


def test_flux_passes_out_of_order_are_refused(flux_graph):
    _, _, gm, flat = flux_graph
    config = SDTMConfig(merge_attention=True)
    pipeline = build_pipeline(method_for(config), "flux", Stage.STRUCTURE)
    no_split = pipeline.without("split_single_stream")
    with pytest.raises(PassOrderError, match="before insert_merge_nodes: fact 'single_streams_split'"):
        rewrite_for_engine(gm, flat, PassSettings(config, STRUCTURE), pipeline=no_split)
    no_rotary = pipeline.without("gather_rotary_positions")
    with pytest.raises(PassOrderError, match="before fix_token_shapes: fact 'rotary_per_token'"):
        rewrite_for_engine(gm, flat, PassSettings(config, STRUCTURE), pipeline=no_rotary)
