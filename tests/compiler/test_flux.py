"""SDTM on Flux (tiny FLUX.1-dev / -schnell layouts, 2 double + 2 single blocks): every bucket against the eager
reference, ratio 0 against the model, whole generations without recompiles, the timestep mapping against
diffusers' FLUX scheduler, the img_ids check, attention merging, ONNX."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import sdtm_compile
from sdtm_compile import SDTMConfig
from sdtm_compile.compiler.backend import BackendSettings, compiled_graphs
from sdtm_compile.compiler.buckets import BucketGraphs
from sdtm_compile.compiler.regions import RegionalBuilder
from sdtm_compile.core.schedule import FULL, EngineKey, Stage, position_from_timestep, resolve_for_model
from sdtm_compile.engines import ENGINES, engine_available
from sdtm_compile.methods.sdtm.schedule import engine_key_at, engines_for_trajectory, stage_at
from sdtm_compile.models import (
    TINY_FLUX,
    TINY_FLUX_SCHNELL,
    flux_example_inputs,
    flux_image_ids,
    tiny_flux_transformer,
)
from sdtm_compile.models.sampling import (
    flux_generate,
    flux_set_timesteps,
    make_flux_generation_inputs,
    make_flux_scheduler,
    psnr,
)
from sdtm_compile.passes import lint_tensorrt, to_aten
from sdtm_compile.reference import FluxReferenceTransformer, flux_reference_forward
from tests.helpers import capture_dynamo_graph

CONFIG = SDTMConfig()
INDUCTOR = engine_available("inductor", [torch.zeros(1)]) is None
CASES = [  # (spec, batch, unpacked latent): dev (guidance) non-square batch 1, schnell square batch 2
    (TINY_FLUX, 1, (20, 28)),  # 10x14 = 140 tokens
    (TINY_FLUX_SCHNELL, 2, (24, 24)),  # 12x12 = 144 tokens
]
#: Inductor is the product engine; its regional build costs ~10 s per distinct region cold on 2 cores, so it runs
#: one representative key on a 1 double + 1 single block model (every region kind, fewest regions): the structure
#: stage with merged attention (RoPE gathered per token, the joint split rewritten) and both feed-forwards merged
#: (the single block's split proj_out). The lint uses the same small model.
INDUCTOR_KEYS = [EngineKey(Stage.STRUCTURE, 0.7)]
ONE_OF_EACH = dataclasses.replace(TINY_FLUX_SCHNELL, num_layers=1, num_single_layers=1)
TOLERANCE = {"eager": dict(rtol=0, atol=1e-6), "inductor": dict(rtol=1e-4, atol=1e-5)}


def _case_id(case):
    spec, batch, latent = case
    return f"{'dev' if spec.guidance_embeds else 'schnell'}-b{batch}-{latent[0]}x{latent[1]}"


def _parity(engine, spec, batch, latent, config, keys=None):
    model = tiny_flux_transformer(spec, seed=1)
    inputs = flux_example_inputs(spec, batch, latent)
    gm, flat = capture_dynamo_graph(model, inputs)
    buckets = BucketGraphs(gm, flat, config, include_full=True)
    li = torch.randint(0, 4, (batch, buckets.sites.num_tokens), dtype=torch.int32)  # mid-generation, not zeros
    settings = BackendSettings(engine=engine)
    regional = RegionalBuilder(
        lambda region, region_inputs, name: ENGINES[engine].build(region, region_inputs, settings)
    )
    keys = keys or buckets.keys
    for key in keys:
        rewritten = buckets.graph(key)
        with torch.no_grad():
            built = regional.build(rewritten, [*flat, li])
            sample, li_out = built(*flat, li.clone())
            want, want_li = flux_reference_forward(model, **inputs, key=key, li=li.clone(), config=buckets.config)
            want_li = want_li.li
        torch.testing.assert_close(sample, want, **TOLERANCE[engine], msg=lambda m, k=key: f"{engine} {k}: {m}")
        assert torch.equal(li_out, want_li), f"{engine} {key}: li differs"
        if key == FULL:  # the reference at ratio 0 is the diffusers model, bit for bit
            with torch.no_grad():
                assert torch.equal(want, model(**inputs, return_dict=False)[0])
    return buckets


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_flux_bucket_matches_the_eager_reference(case):
    buckets = _parity("eager", *case, CONFIG)
    assert buckets.keys == [FULL, *engines_for_trajectory(buckets.config)]
    assert len(buckets.keys) == 7


@pytest.mark.slow
def test_flux_attention_merging_matches_the_reference():
    """merge_attention=True: every block's attention merged, RoPE gathered per merged token (only the
    structure stage merges attention; the detail buckets are the default's, tested above)."""
    keys = [EngineKey(Stage.STRUCTURE, 0.6), EngineKey(Stage.STRUCTURE, 0.7)]
    buckets = _parity("eager", *CASES[1], SDTMConfig(merge_attention=True), keys=keys)
    structure = buckets.counts(EngineKey(Stage.STRUCTURE, 0.7))
    assert structure.attention < structure.tokens  # attention really is merged


@pytest.mark.inductor
@pytest.mark.skipif(not INDUCTOR, reason="Inductor needs a C++ compiler")
def test_flux_inductor_buckets_match_the_reference():
    _parity("inductor", ONE_OF_EACH, 2, (24, 24), SDTMConfig(merge_attention=True), keys=INDUCTOR_KEYS)


@pytest.mark.slow
def test_flux_generation_has_no_recompiles_and_follows_the_reference():
    """A whole 20-step FLUX.1-dev generation through torch.compile(backend='sdtm'): no recompile, the same latent
    as the eager reference driven by the same schedule, state owned by a generation context."""
    spec = TINY_FLUX
    model = tiny_flux_transformer(spec, seed=1)
    inputs = make_flux_generation_inputs(spec, (24, 32), seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sdtm", dynamic=False, options={"sdtm": CONFIG, "engine": "eager"})
    reference = FluxReferenceTransformer(model, CONFIG)
    with torch._dynamo.config.patch(error_on_recompile=True):
        with sdtm_compile.generation(compiled, history=64) as gen:
            latent = flux_generate(compiled, inputs, 20)
        again = flux_generate(compiled, inputs, 20)  # a second generation, default state: same result
    want = flux_generate(reference, inputs, 20)
    torch.testing.assert_close(latent, want, rtol=0, atol=1e-5)
    assert torch.equal(latent, again)
    keys = [record.key for record in gen.history]
    assert keys == [record.key for record in reference.history][-20:]
    assert keys[0] == EngineKey(Stage.STRUCTURE, 0.7)
    assert keys[-1].stage is Stage.DETAIL
    graph = compiled_graphs(compiled)[0]
    assert graph.sites.family == "flux"
    assert graph.config.num_train_timesteps == 1
    assert psnr(latent, flux_generate(model, inputs, 20)) > 20  # merged, yet close to the unmerged model

    # a different token layout with the same count would not recompile: the img_ids check stops it
    call = flux_example_inputs(spec, 1, (24, 32))
    call["img_ids"] = flux_image_ids(16, 12)  # 12x16 -> 16x12, 192 tokens either way
    with torch.no_grad(), pytest.raises(ValueError, match="img_ids differ"):
        compiled(**call, return_dict=False)
    torch._dynamo.reset()


@pytest.mark.unit
def test_ratio_zero_is_the_unmodified_flux():
    model = tiny_flux_transformer(TINY_FLUX_SCHNELL, seed=2)
    inputs = flux_example_inputs(TINY_FLUX_SCHNELL, 1, (16, 16))
    torch._dynamo.reset()
    off = SDTMConfig(ratio=0.0, deviation=0.0)
    compiled = torch.compile(model, backend="sdtm", dynamic=False, options={"sdtm": off, "engine": "eager"})
    with torch.no_grad():
        assert torch.equal(compiled(**inputs, return_dict=False)[0], model(**inputs, return_dict=False)[0])
    assert list(compiled_graphs(compiled)[0].engines) == [FULL]
    torch._dynamo.reset()


@pytest.mark.unit
@pytest.mark.parametrize("latent", [(32, 32), (128, 128)], ids=["256px", "1024px"])
@pytest.mark.parametrize("steps", [4, 20, 28])
def test_flux_positions_follow_the_dynamic_shift(latent, steps):
    """The dispatcher's position of every FLUX timestep is the unshifted sigma's 1 - u = s / S (mu derived from the
    token count with FLUX.1's scheduler defaults; the user passes nothing), and each step's engine is built."""
    tokens = (latent[0] // 2) * (latent[1] // 2)
    scheduler = make_flux_scheduler()
    flux_set_timesteps(scheduler, steps, tokens)
    config = resolve_for_model(CONFIG, "flux", tokens)
    same = resolve_for_model(SDTMConfig(scheduler=scheduler), "flux", tokens)
    assert config.timestep_shift == pytest.approx(same.timestep_shift, rel=1e-12)
    trajectory = set(engines_for_trajectory(config))
    for step, t in enumerate(scheduler.timesteps):
        sigma = t.reshape(1) / 1000  # what FluxPipeline passes the transformer
        position = position_from_timestep(sigma, config)
        assert position == pytest.approx(step / steps, abs=1e-5)
        assert engine_key_at(position, config) in trajectory
        # float32 sigmas never move a step across the switch (20 steps: step 8 sits exactly on 0.4)
        assert stage_at(position, config) is stage_at(step / steps, config)
    # explicit sigmas give the release's step fraction s / (S - 1) exactly
    exact = resolve_for_model(SDTMConfig(sigmas=scheduler.sigmas[:-1].tolist()), "flux", tokens)
    for step, t in enumerate(scheduler.timesteps):
        assert position_from_timestep(t.reshape(1) / 1000, exact) == pytest.approx(step / (steps - 1))
    # an explicit shift wins; SD3 keeps its 3.0 and 1000
    assert resolve_for_model(SDTMConfig(timestep_shift=2.0), "flux", tokens).timestep_shift == 2.0
    sd3 = resolve_for_model(CONFIG, "sd3", tokens)
    assert (sd3.timestep_shift, sd3.num_train_timesteps) == (3.0, 1000)


@pytest.mark.slow
def test_flux_bucket_graphs_pass_the_tensorrt_lint():
    model = tiny_flux_transformer(ONE_OF_EACH, seed=1)
    inputs = flux_example_inputs(ONE_OF_EACH, 1, (24, 24))
    gm, flat = capture_dynamo_graph(model, inputs)
    # every kind of bucket graph: unmerged, detail (IDM), structure (SSM) with and without merged attention
    for config in (SDTMConfig(buckets=(0.5,)), SDTMConfig(merge_attention=True, buckets=(0.7,))):
        buckets = BucketGraphs(gm, flat, config, include_full=True)
        for bucket in buckets.distinct():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                aten = to_aten(bucket.graph.gm, buckets.engine_inputs())
            assert lint_tensorrt(aten, str(bucket.keys[0])) == [], bucket.keys


@pytest.mark.serving
def test_onnx_bundle_runs_a_flux_generation(tmp_path):
    pytest.importorskip("onnxruntime")
    from sdtm_compile.deploy.bundle import BundleError
    from sdtm_compile.deploy.onnx import export_onnx
    from sdtm_compile.deploy.runner import OnnxTransformer

    spec = dataclasses.replace(TINY_FLUX, num_layers=1, num_single_layers=1)  # FLUX.1-dev's layout, 1 + 1 blocks
    model = tiny_flux_transformer(spec, seed=1)
    # 2 engines (an export costs ~10 s per block kind): full, and structure@0.5 with merged attention (RoPE rows
    # gathered, the joint split rewritten, the single blocks' proj_out split). The IDM ops' ONNX path is tested on SD3.
    config = SDTMConfig(buckets=(0.5,), merge_attention=True, switch_at=1.0)
    manifest = export_onnx(model, flux_example_inputs(spec, 1, (24, 32)), config, tmp_path)
    assert [e["key"] for e in manifest["engines"]] == ["full", "structure@0.5"]
    names = sorted(i["name"] for i in manifest["inputs"])
    assert names == sorted(
        ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance"]
    )
    assert manifest["grid"] == [12, 16]
    assert manifest["config"]["num_train_timesteps"] == 1
    runner = OnnxTransformer(tmp_path, history=32)
    inputs = make_flux_generation_inputs(spec, (24, 32), seed=4)
    got = flux_generate(runner, inputs, 8)
    want = flux_generate(FluxReferenceTransformer(model, config), inputs, 8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert {str(r.key) for r in runner.dispatcher.history} == {"structure@0.5", "full"}
    wrong = flux_example_inputs(spec, 1, (24, 32))
    wrong["img_ids"] = flux_image_ids(16, 12)
    with pytest.raises(BundleError, match="16x12 token grid"):
        runner(**wrong)
    _serve_flux_bundle(tmp_path, runner)


def _serve_flux_bundle(bundle, runner):
    """The same bundle behind a real tritonserver: FLUX.1-dev's loop (no CFG, guidance filled, the non-square grid's
    position ids sent by the client) equals OnnxTransformer's, over gRPC."""
    from sdtm_compile.deploy.triton import ServerUnavailable, TritonServer, TritonSettings, export_triton, load
    from sdtm_compile.deploy.triton.step_logic import StepTable

    repository = export_triton(bundle, bundle / "repository", TritonSettings(engine_backend="python", max_steps=8))
    table = StepTable.load(repository / "sdtm" / "1")
    assert (table.cfg, table.guidance, table.grid) == (False, True, (12, 16))
    request = load.make_request(table, seed=4, num_steps=8)
    want = load.reference_output(runner, table, request)
    try:
        server = TritonServer(repository)
    except ServerUnavailable as err:
        pytest.skip(f"no tritonserver can run here: {err}")
    with server:
        got = load.infer("grpc", load.client("grpc", server.grpc_url), "sdtm", request.arrays)
        server.kill()  # no graceful shutdown needed (~4 s)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
