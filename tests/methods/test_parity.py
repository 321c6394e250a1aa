"""Every method through the shared passes: per-bucket parity of the eager engine with the eager reference on SD3,
SD3.5 and Flux, ratio 0, the configs, and a grid a method cannot merge.

The eager engine runs the rewritten graph op by op (the passes' shapes and the plan ops, bit for bit the
reference's arithmetic); Inductor builds are what SDTM's tests pay for once (tests/compiler/test_backend.py) - the
merge ops of every method are plain aten ops (gather, index_put, bmm), so a new method adds no Inductor-specific risk
that the eager engine would not show.
"""

import dataclasses
import re

import pytest
import torch

import sdtm_compile
from sdtm_compile import SDTMConfig, SiToConfig, ToMAConfig, ToMeSDConfig
from sdtm_compile.compiler.backend import BackendSettings, SDTMBackend
from sdtm_compile.compiler.buckets import BucketGraphs
from sdtm_compile.core.config import config_from_dict
from sdtm_compile.core.schedule import FULL
from sdtm_compile.engines import ENGINES
from sdtm_compile.methods import method_for
from sdtm_compile.models import TINY_SD3, example_inputs, tiny_sd3_transformer
from sdtm_compile.passes import PassSettings, rewrite_for_engine
from sdtm_compile.reference import reference_forward
from tests.methods.cases import CASES, METHODS, PARITY, captured

#: The case that runs every bucket (the others run one).
EVERY = "sd35-b2-32x32"


@pytest.mark.parametrize(
    "name, case",
    # every bucket of SD3.5 (~10 s a method on 2 cores) in the slow lane, one bucket of SD3 and of Flux in unit
    [
        pytest.param(name, case, id=f"{name}-{case}", marks=pytest.mark.slow if case == EVERY else pytest.mark.unit)
        for name, case in PARITY
    ],
)
def test_every_bucket_matches_the_eager_reference(name, case):
    family, _, batch, _, keys = CASES[case]
    config = METHODS[name]
    model, inputs, gm, flat = captured(case)
    buckets = BucketGraphs(gm, flat, config)
    method = method_for(buckets.config)
    # a mid-generation state: advanced a few blocks (random methods) rather than the fresh one
    state = method.init_state(batch, buckets.sites.num_tokens) * 7 % 65536
    settings = BackendSettings(engine="eager")
    for key in keys:
        rewritten = rewrite_for_engine(gm, flat, PassSettings(buckets.config, key), sites=buckets.sites)
        with torch.no_grad():
            sample, state_out = ENGINES["eager"].build(rewritten.gm, [*flat, state], settings)(*flat, state.clone())
            want, want_state = reference_forward(model, **inputs, key=key, li=state.clone(), config=buckets.config)
            want_state = want_state.li
        torch.testing.assert_close(sample, want, rtol=0, atol=1e-6, msg=lambda m, k=key: f"{name} {k}: {m}")
        assert torch.equal(state_out, want_state), f"{name} {key}: state differs"
        counts = method.token_counts(key, *buckets.grid, family)
        assert counts.removed == counts.tokens - method.merged_tokens(key, *buckets.grid) > 0
        with torch.no_grad():  # merged, so not the unmodified model
            assert not torch.allclose(want, model(**inputs, return_dict=False)[0], atol=1e-4)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["tomesd", "sito", "toma"])
def test_ratio_zero_is_the_unmodified_model(name):
    config = dataclasses.replace(METHODS[name], ratio=0.0)
    model = tiny_sd3_transformer(TINY_SD3, seed=3)
    inputs = example_inputs(TINY_SD3, 2, (32, 32))
    backend = SDTMBackend({"method": config, "engine": "eager"})
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=backend, dynamic=False)(**inputs, return_dict=False)[0]
        want = model(**inputs, return_dict=False)[0]
    assert list(backend.compiled[0].engines) == [FULL]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.unit
def test_configs_are_validated_and_round_trip():
    for config in [*METHODS.values(), SDTMConfig()]:
        assert config_from_dict(config.to_dict()) == config
        assert method_for(config).config is config
    assert config_from_dict({"ratio": 0.3}) == SDTMConfig(ratio=0.3)  # no "method" key: SDTM, as old manifests
    assert sdtm_compile.ToMeSDConfig is ToMeSDConfig
    assert sdtm_compile.ToMAConfig is ToMAConfig
    bad = [
        (lambda: ToMeSDConfig(ratio=0.8), "ToMeSDConfig.ratio=0.8 is invalid: allowed at most 1 - 1/(sx*sy) = 0.75"),
        (lambda: ToMeSDConfig(sx=5), "ToMeSDConfig.sx=5 is invalid"),
        (lambda: ToMeSDConfig(use_rand=1), "ToMeSDConfig.use_rand=1 is invalid: allowed True or False"),
        (lambda: ToMeSDConfig(merge_attn=False), "something must be merged"),
        (lambda: SiToConfig(noise_alpha=-1.0), "SiToConfig.noise_alpha=-1.0 is invalid"),
        (lambda: SiToConfig(seed=-2), "SiToConfig.seed=-2 is invalid"),
        (lambda: ToMAConfig(tile_size=1), "ToMAConfig.tile_size=1 is invalid"),
        (lambda: ToMAConfig(unmerged_double=-1), "ToMAConfig.unmerged_double=-1 is invalid"),
        (lambda: ToMAConfig(buckets=(0.5, 0.4)), "strictly increasing"),
        (lambda: config_from_dict({"method": "tome"}), "unknown token-reduction method 'tome'"),
        (lambda: ToMeSDConfig.from_dict({"merge_crossattn": True}), "ToMeSDConfig has no field(s) ['merge_crossattn']"),
        (lambda: ToMeSDConfig.from_dict({"method": "sito"}), "is the 'tomesd' method's config, not 'sito'"),
        (lambda: BackendSettings(method=SiToConfig(), sdtm=SDTMConfig()), "were both given"),
        (lambda: BackendSettings(method="sito"), "option 'method' must be a method config"),
    ]
    for make, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            make()
    assert BackendSettings(method={"method": "toma", "ratio": 0.3}).config == ToMAConfig(ratio=0.3)
    assert BackendSettings(sdtm={"ratio": 0.3}).config == SDTMConfig(ratio=0.3)
    assert BackendSettings().config == SDTMConfig()


@pytest.mark.unit
def test_a_grid_toma_tiles_do_not_cover_is_a_clear_error_or_a_loud_fallback():
    model = tiny_sd3_transformer(TINY_SD3, seed=0)
    inputs = example_inputs(TINY_SD3, 1, (18, 18))  # a 9x9 token grid
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sdtm", dynamic=False, options={"method": ToMAConfig(), "engine": "eager"})
    with torch.no_grad(), pytest.raises(Exception, match=r"ToMA tiles of 4x4 tokens do not cover the 9x9 token grid"):
        compiled(**inputs, return_dict=False)
    torch._dynamo.reset()
    options = {"method": ToMAConfig(), "engine": "eager", "on_unsupported": "fallback"}
    compiled = torch.compile(model, backend="sdtm", dynamic=False, options=options)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="do not cover the 9x9 token grid.*WITHOUT token merging"):
        got = compiled(**inputs, return_dict=False)[0]
        torch.testing.assert_close(got, model(**inputs, return_dict=False)[0], rtol=0, atol=1e-6)
    torch._dynamo.reset()
