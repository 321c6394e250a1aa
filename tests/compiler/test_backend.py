"""The sdtm / sdtm_trt backends on real tiny diffusers models: parity with the eager reference, no recompiles."""

import importlib.util
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.compiler.backend import BackendSettings, SDTMBackend
from sdtm_compile.compiler.regions import RegionalBuilder
from sdtm_compile.core.schedule import FULL, EngineKey, Stage
from sdtm_compile.engines import ENGINES, EngineBuildError, engine_available
from sdtm_compile.methods.sdtm.plans import init_li
from sdtm_compile.methods.sdtm.schedule import engines_for_trajectory
from sdtm_compile.models import TINY_SD3, TINY_SD35, example_inputs, tiny_sd3_transformer
from sdtm_compile.models.sampling import generate, make_generation_inputs
from sdtm_compile.passes import PassSettings, UnsupportedModelError, rewrite_for_engine
from sdtm_compile.reference import reference_dispatcher, reference_forward
from tests.helpers import capture_dynamo_graph, transformer_call

CONFIG = SDTMConfig()
HERE = [name for name in ENGINES if engine_available(name, [torch.zeros(1)]) is None]
KEYS = [FULL, *engines_for_trajectory(CONFIG)]
CASES = [  # (spec, batch, latent): SD3 and SD3.5, square and non-square, batch 1 and 2
    (TINY_SD3, 1, (24, 40)),
    (TINY_SD35, 2, (32, 32)),
    (TINY_SD3, 2, (32, 32)),
    (TINY_SD35, 1, (24, 40)),
]
#: The eager engine runs every bucket of every case (non-square grids and batch 1 included: the passes' shapes).
#: An Inductor build costs ~10 s per distinct region cold on 2 cores, so Inductor runs one representative case
#: (SD3.5: attn2, batch 2, the shapes the generation test reuses from the engine cache) on one bucket of each stage:
#: every region kind of a merged graph (block prefixes, SSM and IDM merged parts, glue). All seven buckets and the
#: full graph with Inductor took 265 s of CI's 720; the other buckets differ from these only in their static
#: counts, which the eager engine checks on every bucket.
INDUCTOR_KEYS = [EngineKey(Stage.DETAIL, 0.6), EngineKey(Stage.STRUCTURE, 0.6)]
#: The Inductor generation's config: its schedule reaches exactly INDUCTOR_KEYS (a constant ratio 0.6: structure@0.6,
#: then detail@0.6), so its engines load from the parity test's cache. The unmodified graph under Inductor (FULL)
#: is plain Inductor's correctness, not ours: the eager engine checks FULL against the model on every case.
INDUCTOR_CONFIG = SDTMConfig(ratio=0.6, deviation=0.0, buckets=(0.6,))
#: The eager engine runs two cases that together cover both block kinds, batch 1 and 2, square and non-square:
#: SD3 at batch 1 / 24x40 and SD3.5 at batch 2 / 32x32 (the other two combinations, CI's budget).
ENGINE_CASES = [("eager", case, KEYS) for case in (CASES[0], CASES[1])] + [("inductor", CASES[1], INDUCTOR_KEYS)]
ENGINE_CASES = [c for c in ENGINE_CASES if c[0] in HERE]
#: The test lane of a case by its engine (tests/conftest.py): the eager engine builds nothing, but runs every bucket.
LANE = {"eager": pytest.mark.slow, "inductor": pytest.mark.inductor}
#: eager runs the rewritten graph op by op: bit-for-bit the reference's arithmetic. Inductor fuses and
#: reorders float ops.
TOLERANCE = {"eager": dict(rtol=0, atol=1e-6), "inductor": dict(rtol=1e-4, atol=1e-5)}


def _case_id(engine_case):
    engine, (spec, batch, latent), keys = engine_case
    scope = "all" if keys is KEYS else "+".join(map(str, keys))
    return f"{engine}-{'sd35' if spec.dual_attention_layers else 'sd3'}-b{batch}-{latent[0]}x{latent[1]}-{scope}"


@pytest.mark.parametrize(
    "engine_case", [pytest.param(case, marks=LANE[case[0]], id=_case_id(case)) for case in ENGINE_CASES]
)
def test_every_bucket_matches_the_eager_reference(engine_case):
    engine, (spec, batch, latent), keys = engine_case
    model = tiny_sd3_transformer(spec, seed=1)
    inputs = example_inputs(spec, batch, latent)
    gm, flat = capture_dynamo_graph(model, inputs)
    n = (latent[0] // 2) * (latent[1] // 2)
    li = torch.randint(0, 4, (batch, n), dtype=torch.int32)  # a mid-generation counter, not zeros
    assert len(KEYS) == 7
    assert set(keys) <= set(KEYS)
    settings = BackendSettings(engine=engine)
    # Regional engines, as the backend builds them: one builder for every key, so regions are shared across them
    regional = RegionalBuilder(
        lambda region, region_inputs, name: ENGINES[engine].build(region, region_inputs, settings)
    )
    for key in keys:
        rewritten = rewrite_for_engine(gm, flat, PassSettings(CONFIG, key))
        # no_grad as in a pipeline: engines are built for inference (a grad-mode build compiles a backward too)
        with torch.no_grad():
            builds = {"regional": regional.build(rewritten, [*flat, li])}
            if engine == "eager":  # the whole-graph build (option regional=False) too; cheap on this engine
                builds["whole"] = ENGINES[engine].build(rewritten.gm, [*flat, li], settings)
            want, want_li = reference_forward(model, **inputs, key=key, li=li.clone(), config=CONFIG)
            want_li = want_li.li
            for how, built in builds.items():
                sample, li_out = built(*flat, li.clone())
                torch.testing.assert_close(sample, want, **TOLERANCE[engine], msg=lambda m, k=key: f"{how} {k}: {m}")
                assert torch.equal(li_out, want_li), f"{engine} {how} {key}: li differs"
    if keys is KEYS:  # block prefixes are shared by the detail buckets, glue regions by every bucket
        assert regional.stats.built < regional.stats.call_sites / 2


# Inductor: SD3.5 at batch 2 / 32x32 loads the engines the parity test built from the session's engine cache.
# The eager engine runs the same Dynamo capture, passes and dispatcher for SD3 (recompiles are Dynamo's, not the
# engine's).
@pytest.mark.parametrize(
    "spec, engine, config",
    [
        pytest.param(TINY_SD35, "inductor", INDUCTOR_CONFIG, marks=pytest.mark.inductor, id="sd35"),
        pytest.param(TINY_SD3, "eager", CONFIG, marks=pytest.mark.slow, id="sd3"),
    ],
)
def test_whole_generation_matches_reference_without_recompiles(spec, engine, config):
    model = tiny_sd3_transformer(spec, seed=2)
    inputs = make_generation_inputs(spec, (32, 32), seed=5)
    backend = SDTMBackend({"sdtm": config, "engine": engine, "history": 64})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        got = generate(transformer_call(compiled), inputs, num_steps=28)
        again = generate(transformer_call(compiled), inputs, num_steps=28)  # a second generation resets li
    reference = reference_dispatcher(model, config)
    with torch.no_grad():
        want = generate(transformer_call(reference), inputs, num_steps=28)
    assert len(backend.compiled) == 1  # one Dynamo graph, built once
    graph = backend.compiled[0]
    expected = set(INDUCTOR_KEYS) if engine == "inductor" else set(engines_for_trajectory(CONFIG))
    assert set(graph.engines) == expected
    assert set(graph.engine_names.values()) == {engine}
    assert [r.key for r in graph.dispatcher.history[:28]] == [r.key for r in reference.history]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


@pytest.mark.unit
def test_ratio_zero_equals_the_unmodified_model():
    model = tiny_sd3_transformer(TINY_SD35, seed=3)
    inputs = example_inputs(TINY_SD35, 2, (32, 32))
    backend = SDTMBackend({"sdtm": SDTMConfig(ratio=0.0, deviation=0.0), "engine": "eager"})
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(**inputs, return_dict=False)[0]
        want = model(**inputs, return_dict=False)[0]
    assert list(backend.compiled[0].engines) == [FULL]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_backends_are_found_by_name_in_a_fresh_process():
    script = textwrap.dedent(
        """
        import sys, warnings, torch
        from diffusers import SD3Transformer2DModel
        torch.manual_seed(0)
        model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
            pooled_projection_dim=16, out_channels=4, pos_embed_max_size=32).eval()
        assert "sdtm_compile" not in sys.modules
        compiled = torch.compile(model, backend="sdtm_trt", options={"engine": "eager"})
        with torch.no_grad():
            out = compiled(hidden_states=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 4, 16),
                           pooled_projections=torch.randn(1, 16), timestep=torch.tensor([900.0]),
                           return_dict=False)[0]
        assert "sdtm_compile" in sys.modules
        assert out.shape == (1, 4, 16, 16)
        import sdtm_compile
        (graph,) = sdtm_compile.compiled_graphs(compiled)
        print("engines:", len(graph.engines))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "engines: 6" in result.stdout


@pytest.mark.unit
def test_build_workers_come_from_the_option_then_the_environment(monkeypatch):
    monkeypatch.setenv("SDTM_BUILD_WORKERS", "3")
    assert BackendSettings().resolved_build_workers() == 3
    assert BackendSettings(build_workers=2).resolved_build_workers() == 2
    monkeypatch.setenv("SDTM_BUILD_WORKERS", "0")
    with pytest.raises(ValueError, match="SDTM_BUILD_WORKERS must be a number >= 1, got '0'"):
        BackendSettings().resolved_build_workers()


@pytest.mark.unit
def test_unknown_options_list_the_valid_ones():
    with pytest.raises(ValueError) as info:
        SDTMBackend({"ratio": 0.5, "enabled_precisions": {torch.half}})
    message = str(info.value)
    assert "['enabled_precisions', 'ratio']" in message
    valid = "['method', 'sdtm', 'engine', 'on_unsupported', 'tensorrt', 'cache_dir', 'history', 'regional', "
    valid += "'build_workers', 'step_cache']"
    assert f"valid options: {valid}" in message
    with pytest.raises(ValueError, match="'engine'='fast' is invalid"):
        SDTMBackend({"engine": "fast"})
    with pytest.raises(ValueError, match="SDTMConfig.ratio=2.0"):
        SDTMBackend({"sdtm": {"ratio": 2.0}})
    # through torch.compile, by name: Dynamo wraps our error, the message survives
    model = tiny_sd3_transformer(TINY_SD3)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown option"), torch.no_grad():
        torch.compile(model, backend="sdtm", options={"bogus": 1})(**example_inputs(TINY_SD3), return_dict=False)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="takes only options"), torch.no_grad():
        torch.compile(model, backend="sdtm", mode="max-autotune")(**example_inputs(TINY_SD3), return_dict=False)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

    def forward(self, x):
        return self.net(x)


@pytest.mark.unit
def test_unsupported_model_is_a_clear_error_or_a_loud_fallback():
    model, x = MLP().eval(), torch.randn(2, 8)
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(model, backend=SDTMBackend({"engine": "eager"}))(x)
    # Dynamo may wrap our error; its message must survive: what was looked for, what the graph holds, what to do
    message = str(info.value)
    assert isinstance(info.value, UnsupportedModelError) or "UnsupportedModelError" in repr(info.value)
    assert "no MMDiT block found: looked for JointTransformerBlock / FluxTransformerBlock" in message
    assert "(diffusers SD3 / SD3.5 and Flux)" in message
    assert "the graph holds: Linear, GELU" in message
    assert "options={'on_unsupported': 'fallback'}" in message
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="WITHOUT token merging"):
        out = torch.compile(model, backend=SDTMBackend({"engine": "eager", "on_unsupported": "fallback"}))(x)
    torch.testing.assert_close(out, model(x))


@pytest.mark.unit
def test_a_pass_failing_on_one_bucket_is_an_error_or_a_loud_fallback(monkeypatch):
    """A pass that fails on a bucket graph (injected here, as an extension of SDTM's: no real diffusers SD3 graph
    makes one fail) aborts with ``on_unsupported="error"`` and compiles the unmodified model, with a warning, under
    ``"fallback"``."""
    from sdtm_compile.core.extension import Extension
    from sdtm_compile.methods.sdtm import SDTMMethod
    from sdtm_compile.passes import GraphPass, TokenShapeError

    def failing_on_structure(gm, sites, settings):
        raise TokenShapeError("injected: a token-count constant was not recognised")

    class Failing(Extension):
        name = "failing"

        def passes(self):
            structure = lambda context: context.stage.value == "structure"  # noqa: E731
            return (GraphPass("fail", failing_on_structure, ensures=("merge_nodes_inserted",), applies=structure),)

    monkeypatch.setattr(SDTMMethod, "extensions", lambda self: (Failing(),))
    model = tiny_sd3_transformer(TINY_SD3)
    inputs = example_inputs(TINY_SD3, 1, (16, 16))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="injected: a token-count constant"), torch.no_grad():
        torch.compile(model, backend=SDTMBackend({"engine": "eager"}))(**inputs, return_dict=False)
    torch._dynamo.reset()
    backend = SDTMBackend({"engine": "eager", "on_unsupported": "fallback"})
    with pytest.warns(RuntimeWarning, match=r"rewriting the graph for structure@0.6 failed \(TokenShapeError: inj"):
        with torch.no_grad():
            got = torch.compile(model, backend=backend)(**inputs, return_dict=False)[0]
    with torch.no_grad():
        torch.testing.assert_close(got, model(**inputs, return_dict=False)[0], rtol=0, atol=0)
    assert backend.compiled == []  # no SDTM graph was made: the unmodified engine serves every call


@pytest.mark.inductor
@pytest.mark.skipif(engine_available("tensorrt", [torch.zeros(1)]) is None, reason="TensorRT is usable here")
def test_missing_tensorrt_warns_once_or_errors_when_asked_for():
    # the parity test's SD3.5 shapes: the Inductor engines sdtm_trt falls back to load from the engine cache
    model = tiny_sd3_transformer(TINY_SD35)
    inputs = example_inputs(TINY_SD35, 2, (32, 32))
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        backend = SDTMBackend({"engine": "auto", "sdtm": INDUCTOR_CONFIG}, name="sdtm_trt")  # engines in the cache
        torch.compile(model, backend=backend)(**inputs, return_dict=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len([m for m in messages if "TensorRT is not usable here" in m]) == 1
    reason = engine_available("tensorrt", [torch.zeros(1)])
    assert any(reason in m and "Inductor engines instead" in m for m in messages)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="engine 'tensorrt' cannot be used") as info, torch.no_grad():  # noqa: B017
        torch.compile(model, backend=SDTMBackend({"engine": "tensorrt"}))(**inputs, return_dict=False)
    assert reason in str(info.value)
    assert isinstance(info.value, EngineBuildError) or "EngineBuildError" in repr(info.value)


@pytest.mark.inductor
@pytest.mark.skipif(
    importlib.util.find_spec("torch_tensorrt") is None or not torch.cuda.is_available(),
    reason="needs torch-tensorrt and CUDA (run: pytest tests/compiler/test_backend.py -k tensorrt on a GPU machine)",
)
def test_tensorrt_engines_match_the_reference():  # pragma: no cover - needs a GPU
    model = tiny_sd3_transformer(TINY_SD35, seed=1).cuda()
    inputs = {k: v.cuda() for k, v in example_inputs(TINY_SD35, 2, (32, 32)).items()}
    gm, flat = capture_dynamo_graph(model, inputs)
    li = init_li(2, 256, "cuda")
    for key in [FULL, *engines_for_trajectory(CONFIG)]:
        rewritten = rewrite_for_engine(gm, flat, PassSettings(CONFIG, key))
        settings = BackendSettings(engine="tensorrt")
        regional = RegionalBuilder(
            lambda region, region_inputs, name: ENGINES["tensorrt"].build(region, region_inputs, settings)
        )
        built = regional.build(rewritten, [*flat, li])
        with torch.no_grad():
            sample, li_out = built(*flat, li)
            want, want_li = reference_forward(model, **inputs, key=key, li=li, config=CONFIG)
            want_li = want_li.li
        torch.testing.assert_close(sample, want, rtol=1e-3, atol=1e-3)
        assert torch.equal(li_out.to(want_li.dtype), want_li)


@pytest.mark.unit
def test_tensorrt_options_are_validated_against_2_13():
    from sdtm_compile.engines.tensorrt import tensorrt_options

    with pytest.raises(ValueError, match=r"\['enabled_precisions'\] \(removed in torch-tensorrt 2.13"):
        tensorrt_options({"enabled_precisions": {torch.half}})
    with pytest.raises(ValueError, match="would silently ignore"):
        tensorrt_options({"min_blok_size": 3})
    options = tensorrt_options({"workspace_size": 1 << 30})
    assert options["workspace_size"] == 1 << 30
    assert options["immutable_weights"] is False
    assert options["cache_built_engines"] is True
    assert options["pass_through_build_failures"] is True
    assert options["min_block_size"] == 1


@pytest.mark.unit
def test_dynamic_shapes_are_refused_with_advice():
    model = tiny_sd3_transformer(TINY_SD3)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"dynamic=False"), torch.no_grad():
        torch.compile(model, backend=SDTMBackend({"engine": "eager"}), dynamic=True)(
            **example_inputs(TINY_SD3), return_dict=False
        )
