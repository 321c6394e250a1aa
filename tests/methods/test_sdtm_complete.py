"""The rest of SDTM: cache fusion (as released), SDTM* (adaptive ratio) and size-aware attention (prompt
reweighting), each through torch.compile(backend='sdtm') on the eager engine against the eager reference."""

import dataclasses

import pytest
import torch

import sdtm_compile
from sdtm_compile import SDTMConfig
from sdtm_compile.compiler.backend import SDTMBackend
from sdtm_compile.compiler.buckets import BucketGraphs
from sdtm_compile.core.schedule import FULL, EngineKey, Stage, round_to_bucket
from sdtm_compile.core.signature import EngineState
from sdtm_compile.methods.sdtm.cache_fusion import sdtm_fuse
from sdtm_compile.methods.sdtm.plans import init_li
from sdtm_compile.methods.sdtm.size_aware import sdtm_key_bias
from sdtm_compile.models import (
    TINY_FLUX,
    TINY_SD35,
    example_inputs,
    flux_example_inputs,
    tiny_flux_transformer,
    tiny_sd3_transformer,
)
from sdtm_compile.models.sampling import flux_generate, generate, make_flux_generation_inputs, make_generation_inputs
from sdtm_compile.passes import lint_tensorrt, to_aten
from sdtm_compile.reference import ReferenceTransformer, reference_dispatcher, reference_forward
from tests.helpers import capture_dynamo_graph, transformer_call

BUCKETS = (0.3, 0.5, 0.7)
FUSION = SDTMConfig(ratio=0.5, buckets=BUCKETS, cache_fusion=True)  # the release's protect_every=3, mcw=0.1
ADAPTIVE = SDTMConfig(ratio=0.5, buckets=BUCKETS, adaptive_threshold=0.5)
SIZE_AWARE = SDTMConfig(ratio=0.5, buckets=BUCKETS, size_aware_attention=True, text_key_weight=2.0)
STEPS = 6


@pytest.fixture(scope="module")
def sd35():
    return tiny_sd3_transformer(TINY_SD35, seed=2), make_generation_inputs(TINY_SD35, (32, 32), seed=5)


def compiled_generation(model, inputs, config, steps=STEPS, runs=1):
    """``runs`` generations through torch.compile(backend='sdtm') on the eager engine, without recompiles."""
    backend = SDTMBackend({"sdtm": config, "engine": "eager", "history": 256})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        latents = [generate(transformer_call(compiled), inputs, num_steps=steps) for _ in range(runs)]
    assert len(backend.compiled) == 1
    return latents, backend.compiled[0]


def reference_generation(model, inputs, config, steps=STEPS):
    with torch.no_grad():
        reference = reference_dispatcher(model, config)
        return generate(transformer_call(reference), inputs, num_steps=steps), reference


# -- cache fusion --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cache_fusion_follows_the_reference_and_resets_between_generations(sd35):
    """SD3.5 (attn, attn2 and ff cached), CFG as batch 2, twice: the reference's latent both times; steps 0 and 3
    protected (run FULL and store), the others merged and fused."""
    model, inputs = sd35
    (got, again), compiled = compiled_generation(model, inputs, FUSION, runs=2)
    want, reference = reference_generation(model, inputs, FUSION)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, again)  # the second generation starts from a fresh state: nothing leaks
    records = compiled.dispatcher.history[:STEPS]
    assert [r.protected for r in records] == [s % 3 == 0 for s in range(STEPS)]  # steps 0 and 3
    assert all((r.key == FULL) == r.protected for r in records)
    assert [r.key for r in records] == [r.key for r in reference.history[:STEPS]]


@pytest.mark.slow
def test_cache_fusion_with_every_step_protected_is_the_unmerged_model(sd35):
    model, inputs = sd35
    (got,), _ = compiled_generation(model, inputs, dataclasses.replace(FUSION, protect_every=1))
    want, _ = reference_generation(model, inputs, SDTMConfig(ratio=0.0, deviation=0.0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fused_engine_with_mcw_1_is_the_plain_engine_and_blends_only_merged_positions(sd35):
    """Every merged engine: with mcw=1 any cache is ignored (plain SDTM's output and li); with mcw=0 the merged
    positions take the cache. The FULL engine returns the stack of its gated branch outputs."""
    model, _ = sd35
    inputs = example_inputs(TINY_SD35, 2, (32, 32))
    gm, flat = capture_dynamo_graph(model, inputs)
    fused = BucketGraphs(gm, flat, dataclasses.replace(FUSION, mcw=1.0))
    plain = BucketGraphs(gm, flat, dataclasses.replace(FUSION, cache_fusion=False), include_full=True)
    li = torch.randint(0, 5, (2, 256), dtype=torch.int32)
    cache = torch.randn(fused.new_state()[1].shape)
    assert cache.shape == (3 * TINY_SD35.num_layers - 1, 2, 256, TINY_SD35.inner_dim)  # last block: no attn2
    with torch.no_grad():
        for key in plain.keys:
            *want, want_li = plain.graph(key).gm(*flat, li)
            *got, got_li, got_cache = fused.graph(key).gm(*flat, li, cache)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert torch.equal(got_li, want_li)
            if key == FULL:
                assert got_cache.shape == cache.shape
                assert not torch.equal(got_cache, cache)
            else:
                assert got_cache is cache
        # the reference blends too (so the parity above checks a fusion that happens): mcw 0.1 moves the output
        key = EngineKey(Stage.STRUCTURE, 0.5)
        blended, _ = reference_forward(model, **inputs, key=key, state=EngineState(li, cache=cache), config=FUSION)
        unblended, _ = reference_forward(model, **inputs, key=key, li=li, config=plain.config)
        assert (blended - unblended).abs().max() > 1e-3
        gated = torch.randn(2, 256, 8)
        li_after = torch.tensor([[0, 1, 3, 0]]).repeat_interleave(64, 1).expand(2, -1)
        blended = sdtm_fuse(gated, cache[0, ..., :8], li_after, 0.0)
        merged = (li_after > 0)[..., None]
        assert torch.equal(torch.where(merged, cache[0, ..., :8], gated), blended)


@pytest.fixture(scope="module")
def flux():
    # 16 x 16 image tokens: SSM's count at 0.6 is 48 (at 8 x 8 it rounds to 0, the release's //48*16)
    return tiny_flux_transformer(TINY_FLUX, seed=0), make_flux_generation_inputs(TINY_FLUX, (32, 32), seed=2)


FLUX_FUSION = SDTMConfig(buckets=(0.3, 0.6), cache_fusion=True)


@pytest.mark.slow
@pytest.mark.parametrize("merge_attention", [None, True], ids=["ff-mlp", "attention-too"])
def test_cache_fusion_on_flux_follows_the_reference_over_20_steps_then_12(flux, merge_attention):
    """Flux (double blocks' ff, single blocks' MLP columns; with merge_attention the attention branches too): 20
    steps then 12 through one compile with no recompiles, each equal to the reference; every 3rd step protected."""
    model, inputs = flux
    config = dataclasses.replace(FLUX_FUSION, merge_attention=merge_attention)
    backend = SDTMBackend({"sdtm": config, "engine": "eager", "history": 256})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        got = [flux_generate(compiled, inputs, steps) for steps in (20, 12)]
    assert len(backend.compiled) == 1
    for latent, steps in zip(got, (20, 12)):
        reference = ReferenceTransformer(model, config)
        with torch.no_grad():
            want = flux_generate(reference, inputs, steps)
        torch.testing.assert_close(latent, want, rtol=1e-5, atol=1e-5)
    records = backend.compiled[0].dispatcher.history[20:]
    assert [r.protected for r in records] == [s % 3 == 0 for s in range(12)]
    assert all((r.key == FULL) == r.protected for r in records)
    with torch.no_grad():  # the blend happens: without fusion the 12-step generation ends elsewhere
        plain = flux_generate(ReferenceTransformer(model, dataclasses.replace(config, cache_fusion=False)), inputs, 12)
    assert (got[1] - plain).abs().max() > 1e-3


@pytest.mark.slow
def test_flux_cache_fusion_with_every_step_protected_is_the_unmodified_model(flux):
    model, inputs = flux
    backend = SDTMBackend({"sdtm": dataclasses.replace(FLUX_FUSION, protect_every=1), "engine": "eager"})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        got = flux_generate(compiled, inputs, 8)
        want = flux_generate(model, inputs, 8)
    # the FULL engine computes proj_out by columns (to store the MLP's): equal up to float summation order
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_every_flux_fusion_engine_follows_the_reference_and_blends_only_merged_positions(flux):
    """Every engine of a Flux compile with merged attention, fed a random li and cache, against the reference
    forward; with mcw=1 the merged engines are plain SDTM's (up to the order of the gate's products)."""
    model, _ = flux
    inputs = flux_example_inputs(TINY_FLUX, 1, (32, 32))
    gm, flat = capture_dynamo_graph(model, inputs)
    config = dataclasses.replace(FLUX_FUSION, merge_attention=True)
    fused = BucketGraphs(gm, flat, config)
    ignored = BucketGraphs(gm, flat, dataclasses.replace(config, mcw=1.0))
    plain = BucketGraphs(gm, flat, dataclasses.replace(config, cache_fusion=False), include_full=True)
    li, cache = fused.new_state()
    # double blocks: attn, ff; single blocks: attn, mlp (K x B x N x C)
    assert cache.shape == (2 * (TINY_FLUX.num_layers + TINY_FLUX.num_single_layers), 1, 256, 32)
    li = torch.randint(0, 5, li.shape, dtype=li.dtype)
    cache = torch.randn(cache.shape)
    with torch.no_grad():
        for key in plain.keys:
            sample, got_li, got_cache = fused.graph(key).gm(*flat, li, cache)
            want, state = reference_forward(model, **inputs, key=key, state=EngineState(li, cache=cache), config=config)
            torch.testing.assert_close(sample, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(got_li, state.li)
            torch.testing.assert_close(got_cache, state.cache, rtol=1e-5, atol=1e-5)
            plain_sample, plain_li = plain.graph(key).gm(*flat, li)
            ignoring, _, _ = ignored.graph(key).gm(*flat, li, cache)
            torch.testing.assert_close(ignoring, plain_sample, rtol=1e-5, atol=1e-6)
            if key != FULL:
                assert got_cache is cache
                assert (sample - plain_sample).abs().max() > 1e-3  # mcw 0.1 moves the merged positions
            aten = to_aten(fused.graph(key).gm, fused.engine_inputs())  # what a TensorRT build would take
            assert [f for f in lint_tensorrt(aten, key) if f.severity == "error"] == []


# -- SDTM* ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sdtm_star_is_refused_by_the_onnx_export_and_by_a_step_plan(tmp_path):
    """Its bucket comes from each step's reading: no step table can hold it (cache fusion, decided by the step,
    can: tests/deploy/test_export.py)."""
    from sdtm_compile.deploy.onnx import export_onnx
    from sdtm_compile.runtime import StageDispatcher

    with pytest.raises(NotImplementedError, match=r"ONNX bundles cannot run \['adaptive_ratio'\]"):
        export_onnx(tiny_sd3_transformer(TINY_SD35, seed=0), example_inputs(TINY_SD35, 1, (32, 32)), ADAPTIVE, tmp_path)
    with pytest.raises(ValueError, match="choose engines from what the engines return"):
        StageDispatcher(ADAPTIVE).plan([1000.0, 500.0])
    planned = StageDispatcher(FUSION).plan([1000.0 - 100 * s for s in range(6)])
    assert [notes["protected"] for _, notes in planned] == [True, False, False, True, False, False]
    assert all((key == FULL) == notes["protected"] for key, notes in planned)


@pytest.mark.slow
def test_adaptive_ratio_follows_the_window_statistic(sd35):
    """Step 0 follows the CRA schedule; every later step runs the bucket 0.75 x (the previous step's smallest
    fraction of windows scoring >= the threshold) rounds down to, in the schedule's stage; all of them compiled.
    Size-aware attention is on too (its parity with the reference, in the same generation)."""
    model, inputs = sd35
    config = dataclasses.replace(ADAPTIVE, size_aware_attention=True, text_key_weight=2.0)
    (got,), compiled = compiled_generation(model, inputs, config)
    want, reference = reference_generation(model, inputs, config)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    records = compiled.dispatcher.history[:STEPS]
    assert [r.statistic for r in records] == [r.statistic for r in reference.history[:STEPS]]
    assert records[0].key == EngineKey(Stage.STRUCTURE, 0.7)  # CRA at step 0: 0.5 + 0.2
    for previous, record in zip(records, records[1:]):
        assert record.adaptive_ratio == pytest.approx(0.75 * previous.statistic)
        bucket = round_to_bucket(record.adaptive_ratio, BUCKETS)
        assert record.key.bucket == bucket
        assert record.key in compiled.engines
    assert len({r.key for r in records}) > 1  # the statistic moves the pick on this model


@pytest.mark.unit
def test_the_dispatcher_picks_the_bucket_of_the_previous_steps_smallest_reading():
    """Readings 0.9 / 0.5 (two calls of step 0: the smaller counts), 0.1, 0.7: ratios 0.375, 0.075, 0.525 ->
    structure@0.3, FULL (below every bucket), detail@0.5."""
    dispatcher = sdtm_compile.StageDispatcher(dataclasses.replace(ADAPTIVE, switch_at=0.5), history=16)
    readings = iter([0.9, 0.5, 0.1, 0.7, 0.2])

    def call(key, state):
        return key, EngineState(state.li, stat=torch.tensor([next(readings), 1.0]))

    picked = [
        dispatcher.run(t, ("layout",), (2, 4), torch.device("cpu"), call) for t in (1000.0, 1000.0, 900.0, 800.0, 50.0)
    ]
    assert picked == [
        EngineKey(Stage.STRUCTURE, 0.7),  # step 0: the CRA schedule (0.5 + 0.2)
        EngineKey(Stage.STRUCTURE, 0.7),  # the same step's second call
        EngineKey(Stage.STRUCTURE, 0.3),
        FULL,
        EngineKey(Stage.DETAIL, 0.5),
    ]
    assert [r.statistic for r in dispatcher.history] == pytest.approx([0.9, 0.5, 0.1, 0.7, 0.2])


# -- size-aware attention --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_size_aware_attention_off_leaves_the_graph_alone_and_on_follows_the_reference(sd35):
    model, _ = sd35
    example = example_inputs(TINY_SD35, 2, (32, 32))
    gm, flat = capture_dynamo_graph(model, example)
    key = EngineKey(Stage.STRUCTURE, 0.5)
    off = BucketGraphs(gm, flat, dataclasses.replace(SIZE_AWARE, size_aware_attention=False)).graph(key).gm
    on = BucketGraphs(gm, flat, SIZE_AWARE).graph(key).gm
    assert not any(n.target is sdtm_key_bias for n in off.graph.nodes)
    # every merged attention (attn and SD3.5's attn2 in every block) gets its bias
    assert sum(n.target is sdtm_key_bias for n in on.graph.nodes) == 2 * TINY_SD35.num_layers - 1
    li = init_li(2, 256)
    with torch.no_grad():
        assert (on(*flat, li)[0] - off(*flat, li)[0]).abs().max() > 1e-4  # the bias changes the attention
        # the reference with the bias is the graph with it (a whole generation: the SDTM* test above)
        want, _ = reference_forward(model, **example, key=key, li=li, config=SIZE_AWARE)
        torch.testing.assert_close(on(*flat, li)[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_every_variant_passes_the_tensorrt_lint(sd35):
    """Cache fusion (where), SDTM*'s statistic and the key bias (log, cat, SDPA with a mask) in one graph."""
    model, _ = sd35
    example = example_inputs(TINY_SD35, 1, (32, 32))
    gm, flat = capture_dynamo_graph(model, example)
    config = dataclasses.replace(FUSION, adaptive_threshold=0.5, size_aware_attention=True)
    buckets = BucketGraphs(gm, flat, config)
    targets = set()
    for key in (FULL, EngineKey(Stage.STRUCTURE, 0.5)):
        aten = to_aten(buckets.graph(key).gm, buckets.engine_inputs())
        assert [f for f in lint_tensorrt(aten, key) if f.severity == "error"] == []  # errors would raise, too
        targets |= {str(n.target) for n in aten.graph.nodes}
    assert {"aten.where.self", "aten.log.default", "aten.ge.Scalar"} <= targets  # fusion, bias, statistic
