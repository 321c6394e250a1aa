"""The engine contract (EngineSignature, EngineState) and the model layout it is built from: one definition that
the graph's sites and the diffusers module agree on, for every method and extension."""

import pytest
import torch

from sdtm_compile import SDTMConfig, ToMeSDConfig
from sdtm_compile.compiler import BucketGraphs
from sdtm_compile.core.layout import BlockLayout
from sdtm_compile.core.method import method_for
from sdtm_compile.core.signature import EngineSignature, EngineState, StateTensor
from sdtm_compile.models import (
    TINY_FLUX,
    TINY_SD35,
    example_inputs,
    flux_example_inputs,
    tiny_flux_transformer,
    tiny_sd3_transformer,
)
from sdtm_compile.passes import find_mmdit_blocks, hidden_state
from sdtm_compile.reference import model_layout
from tests.helpers import capture_dynamo_graph

pytestmark = pytest.mark.unit

EVERY_EXTENSION = SDTMConfig(cache_fusion=True, adaptive_threshold=0.5, size_aware_attention=True)


@pytest.fixture(scope="module")
def sd35_traced():
    model = tiny_sd3_transformer(TINY_SD35, seed=1)
    inputs = example_inputs(TINY_SD35, 2, (32, 32))
    return model, inputs, *capture_dynamo_graph(model, inputs)


def test_the_graph_and_the_module_give_one_layout(sd35_traced):
    model, inputs, gm, flat = sd35_traced
    from_graph = find_mmdit_blocks(gm, flat).layout()
    from_module = model_layout(model, inputs["hidden_states"], inputs["encoder_hidden_states"])
    assert from_graph == from_module
    assert from_graph.blocks[0] == BlockLayout(0, "joint", ("attn", "attn2", "ff"))
    assert from_graph.blocks[-1] == BlockLayout(2, "joint", ("attn", "ff"))  # SD3.5's last block: no attn2
    assert (from_graph.batch, from_graph.num_tokens, from_graph.width) == (2, 256, TINY_SD35.inner_dim)


def test_flux_layout_agrees_too():
    model = tiny_flux_transformer(TINY_FLUX, seed=0)
    inputs = flux_example_inputs(TINY_FLUX, 1, (16, 16))
    gm, flat = capture_dynamo_graph(model, inputs)
    from_graph = find_mmdit_blocks(gm, flat).layout()
    from_module = model_layout(model, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["img_ids"])
    assert from_graph == from_module
    assert from_graph.kinds == ("double", "double", "single", "single")


def test_the_contract_orders_carried_state_first_and_splits_outputs(sd35_traced):
    model, inputs, gm, flat = sd35_traced
    layout = find_mmdit_blocks(gm, flat).layout()
    signature = method_for(EVERY_EXTENSION).signature(layout, (hidden_state(layout),))
    assert signature.names == ("li", "cache", "stat", "hidden")
    assert [t.name for t in signature.inputs] == ["li", "cache"]
    assert signature["cache"].shape == (8, 2, 256, TINY_SD35.inner_dim)  # 3 blocks x (attn, attn2, ff), less 1 attn2
    assert signature.output_shapes() == [(2, 256), (8, 2, 256, TINY_SD35.inner_dim), (2,), (2, 256, 8 * 4)]
    fresh = signature.fresh()
    assert sorted(fresh) == ["cache", "li"]
    assert fresh.stat is None  # an output only: never fed
    model_outputs, state = signature.split(["sample", "li", "cache", "stat", "hidden"])
    assert model_outputs == ("sample",)
    assert (state.li, state.cache, state.stat, state.hidden) == ("li", "cache", "stat", "hidden")
    assert signature.engine_inputs(EngineState("a", cache="b", stat="c")) == ("a", "b")
    with pytest.raises(ValueError, match=r"needs state \['cache'\]"):
        signature.engine_inputs(EngineState("a"))


def test_the_contract_is_the_same_from_the_graph_and_from_the_module(sd35_traced):
    """The compiler builds it from the traced graph, the reference from the module: the same entries."""
    model, inputs, gm, flat = sd35_traced
    compiled = BucketGraphs(gm, flat, EVERY_EXTENSION).signature
    layout = model_layout(model, inputs["hidden_states"], inputs["encoder_hidden_states"])
    reference = method_for(EVERY_EXTENSION).signature(layout)
    assert compiled.tensors == reference.tensors  # names, shapes, dtypes, carried, descriptions
    state = compiled.fresh()
    assert torch.equal(state.li, torch.zeros(2, 256, dtype=torch.int32))
    assert not state.cache.any()


def test_a_method_without_extensions_carries_its_state_only(sd35_traced):
    _, _, gm, flat = sd35_traced
    signature = BucketGraphs(gm, flat, ToMeSDConfig()).signature
    assert signature.names == ("li",)
    first, again = signature.fresh()["li"], signature.fresh()["li"]
    assert torch.equal(first, again)  # ToMeSD's seeded random state, the same at every generation's start
    assert len(torch.unique(first)) > 1


def test_a_malformed_contract_is_refused():
    li = StateTensor("li", (1, 4), torch.int32)
    stat = StateTensor("stat", (1,), torch.float32, carried=False)
    with pytest.raises(ValueError, match="starts with the method's carried state"):
        EngineSignature([stat, li])
    with pytest.raises(ValueError, match="unique"):
        EngineSignature([li, li])
    with pytest.raises(ValueError, match="carried state must come before"):
        EngineSignature([li, stat, StateTensor("cache", (2,), torch.float32)])


def test_engine_state_is_immutable_and_names_what_it_lacks():
    state = EngineState(torch.zeros(1), cache=torch.ones(1))
    assert state.stat is None
    with pytest.raises(AttributeError, match="immutable"):
        state.li = torch.ones(1)
    replaced = state.replace(cache=None, stat=torch.ones(1))
    assert sorted(replaced) == ["li", "stat"]
    assert sorted(state) == ["cache", "li"]  # the original is untouched


def test_every_extension_runs_on_flux_and_cache_fusion_caches_its_merged_branches():
    every = method_for(EVERY_EXTENSION)
    model = tiny_flux_transformer(TINY_FLUX, seed=0)
    inputs = flux_example_inputs(TINY_FLUX, 1, (16, 16))
    layout = model_layout(model, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["img_ids"])
    assert every.check_model(layout) is None
    (cache,) = [t for t in every.signature(layout).tensors if t.name == "cache"]
    # double blocks' ff and single blocks' mlp (no merged attention by default), [K, B, N, C] in the model's dtype
    blocks = TINY_FLUX.num_layers + TINY_FLUX.num_single_layers
    assert cache.shape == (blocks, 1, 64, layout.width) and cache.dtype == layout.dtype
