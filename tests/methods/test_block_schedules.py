"""Block schedules through the shared passes: every method's graphs under a mixed schedule match the eager
reference, each block merges at its own count, "no block merged" is the unmodified model, an equivalent schedule
builds the same graph (the same engine-cache key), and a whole generation runs without recompiles."""

import dataclasses

import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.compiler.backend import BackendSettings, SDTMBackend
from sdtm_compile.compiler.buckets import BucketGraphs
from sdtm_compile.core.ops import sdtm_merge, sdtm_plan
from sdtm_compile.core.schedule import FULL, EngineKey, Stage
from sdtm_compile.engines import ENGINES
from sdtm_compile.engines.cache import EngineCache
from sdtm_compile.methods import method_for
from sdtm_compile.models import TINY_SD35, tiny_sd3_transformer
from sdtm_compile.models.sampling import generate, make_generation_inputs
from sdtm_compile.passes import PassSettings, UnsupportedModelError, rewrite_for_engine
from sdtm_compile.reference import reference_dispatcher, reference_forward
from tests.helpers import compiled_and_reference, transformer_call
from tests.methods.cases import CASES, METHODS, captured

SDTM_KEYS = [EngineKey(Stage.STRUCTURE, 0.6), EngineKey(Stage.DETAIL, 0.6)]
#: per case: a schedule with an unmerged block, a block at half the ratio and a block at the full ratio
SCHEDULES = {"sd35-b2-32x32": (1.0, 0.0, 0.5), "flux-b2-24x24": (0.5, 1.0, 0.0, 1.0)}
CONFIGS = {**METHODS, "sdtm": SDTMConfig()}


def _plans(gm):
    return [n for n in gm.graph.nodes if n.target is sdtm_plan]


@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(SCHEDULES))
@pytest.mark.parametrize("name", ["sdtm", "tomesd-mlp", "sito", "toma"])
def test_mixed_schedule_matches_the_eager_reference(name, case):
    family, _, batch, _, keys = CASES[case]
    schedule = SCHEDULES[case]
    config = dataclasses.replace(CONFIGS[name], blocks=schedule)
    if name == "toma":  # ToMA leaves Flux's leading blocks unmerged by default: let the schedule decide alone
        config = dataclasses.replace(config, unmerged_double=0, unmerged_single=0)
    model, inputs, gm, flat = captured(case)
    buckets = BucketGraphs(gm, flat, config)
    method = method_for(buckets.config)
    state = method.init_state(batch, buckets.sites.num_tokens) * 7 % 65536
    kinds = [block.kind for block in buckets.sites.blocks]
    for key in SDTM_KEYS if name == "sdtm" else keys:
        rewritten = rewrite_for_engine(gm, flat, PassSettings(buckets.config, key), sites=buckets.sites)
        with torch.no_grad():
            engine = ENGINES["eager"].build(rewritten.gm, [*flat, state], BackendSettings(engine="eager"))
            sample, state_out = engine(*flat, state.clone())
            want, want_state = reference_forward(model, **inputs, key=key, li=state.clone(), config=buckets.config)
        torch.testing.assert_close(sample, want, rtol=0, atol=1e-6, msg=lambda m, k=key: f"{name} {k}: {m}")
        assert torch.equal(state_out, want_state.li), f"{name} {key}: state differs"
        # a plan per merged block (none for the unmerged one), each at its block's own count
        sources = method.plan_sources(kinds, key, buckets.grid)
        assert len(_plans(rewritten.gm)) == len({s for s in sources if s is not None})
        assert sources[schedule.index(0.0)] is None
        counts = buckets.block_counts(key)
        full, half = counts[schedule.index(1.0)], counts[schedule.index(0.5)]
        assert counts[schedule.index(0.0)].removed == 0
        assert 0 <= half.removed <= full.removed and full.removed > 0
        merged_lengths = {n.meta["val"].shape[1] for n in rewritten.gm.graph.nodes if n.target is sdtm_merge}
        assert full.tokens - full.removed in merged_lengths


@pytest.mark.unit
@pytest.mark.parametrize("name", ["sdtm", "tomesd", "sito", "toma"])
def test_no_block_merged_is_the_unmodified_model(name):
    config = dataclasses.replace(CONFIGS[name], blocks="pattern:0")
    model = tiny_sd3_transformer(TINY_SD35, seed=3)
    _, inputs, gm, flat = captured("sd35-b2-32x32")
    backend = SDTMBackend({"method": config, "engine": "eager"})
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=backend, dynamic=False)(**inputs, return_dict=False)[0]
        want = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    buckets = BucketGraphs(gm, flat, config)
    assert buckets.keys != [FULL]  # merged engines are built, and merge nothing
    assert all(not _plans(buckets.graph(key).gm) for key in buckets.keys)


@pytest.mark.unit
def test_the_engine_cache_key_changes_only_with_the_graph():
    _, _, gm, flat = captured("sd35-b2-32x32")
    key = SDTM_KEYS[1]

    def cache_key(blocks):
        buckets = BucketGraphs(gm, flat, SDTMConfig(blocks=blocks))
        graph = buckets.graph(key)
        return EngineCache("/nonexistent").key(graph.gm, buckets.engine_inputs(), "eager")

    assert cache_key("all") == cache_key((1, 1, 1)) == cache_key("pattern:1")
    assert cache_key("staggered") == cache_key((0, 1, 0.5)) != cache_key("all")


@pytest.mark.unit
def test_a_schedule_of_another_length_is_refused_when_compiling():
    _, _, gm, flat = captured("sd35-b2-32x32")
    with pytest.raises(UnsupportedModelError, match="lists 2 fractions but the model has 3 blocks"):
        BucketGraphs(gm, flat, SDTMConfig(blocks=(1, 0)))


def _generations(config, steps):
    """A tiny SD3.5 generation through torch.compile(backend='sdtm') on the eager engine without recompiles, the
    eager reference's, and the backend's compiled graph."""
    model = tiny_sd3_transformer(TINY_SD35, seed=2)
    inputs = make_generation_inputs(TINY_SD35, (32, 32), seed=5)
    got, backend = compiled_and_reference(model, inputs, config, steps, history=64)
    return got, model, inputs, backend.compiled[0]


@pytest.mark.unit
def test_staggered_generation_follows_the_reference_without_recompiles():
    got, model, inputs, compiled = _generations(SDTMConfig(buckets=(0.3, 0.6), blocks="staggered"), steps=8)
    with torch.no_grad():
        plain = generate(transformer_call(reference_dispatcher(model, SDTMConfig(buckets=(0.3, 0.6)))), inputs, 8)
    assert not torch.allclose(got, plain, atol=1e-4)  # the schedule changed what merges
    assert len({record.key for record in compiled.dispatcher.history}) >= 2


@pytest.mark.unit
def test_cache_fusion_keeps_slots_only_for_blocks_the_schedule_merges():
    config = SDTMConfig(buckets=(0.3, 0.6), blocks=(1.0, 0.0, 0.5), cache_fusion=True)
    _, _, _, compiled = _generations(config, steps=7)
    everything = BucketGraphs(*captured("sd35-b2-32x32")[2:], dataclasses.replace(config, blocks="all"))
    # blocks 0 and 2 keep their slots (attn, attn2 where the block has it, ff); block 1 none
    assert compiled.signature["cache"].shape[0] < everything.signature["cache"].shape[0]
    assert {r.key.stage for r in compiled.dispatcher.history} >= {Stage.FULL, Stage.STRUCTURE}
