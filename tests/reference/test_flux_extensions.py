"""One reference for both families: SDTM's extensions on Flux (SDTM*, size-aware attention on merged attention; cache
fusion in tests/methods/test_sdtm_complete.py) follow the eager reference over whole generations, and the reference is
called like the diffusers model on SD3 and Flux alike."""

import dataclasses

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from sdtm_compile import SDTMBackend, SDTMConfig
from sdtm_compile.models import TINY_FLUX, TINY_SD3, example_inputs, tiny_flux_transformer, tiny_sd3_transformer
from sdtm_compile.models.sampling import flux_generate, make_flux_generation_inputs
from sdtm_compile.reference import ReferenceTransformer

STEPS = 8
#: two buckets: every engine is rewritten once per compile, and a test of each extension needs no more
BUCKETS = (0.3, 0.6)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_transformer(TINY_FLUX, seed=0), make_flux_generation_inputs(TINY_FLUX, (16, 16), seed=2)


def _compiled_and_reference(model, inputs, config):
    torch._dynamo.reset()
    backend = SDTMBackend({"method": config, "engine": "eager", "history": 64})
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        got = flux_generate(compiled, inputs, STEPS)
    reference = ReferenceTransformer(model, config)
    with torch.no_grad():
        want = flux_generate(reference, inputs, STEPS)
    return got, want, backend.compiled[0].dispatcher.history[:STEPS], reference.history[:STEPS]


@pytest.mark.slow
def test_sdtm_star_on_flux_follows_the_reference(flux):
    model, inputs = flux
    got, want, compiled, reference = _compiled_and_reference(*flux, SDTMConfig(adaptive_threshold=0.3, buckets=BUCKETS))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [r.statistic for r in compiled] == [r.statistic for r in reference]
    assert [r.key for r in compiled] == [r.key for r in reference]
    assert all(r.statistic is not None for r in compiled)


@pytest.mark.slow
def test_size_aware_attention_on_merged_flux_attention_follows_the_reference(flux):
    model, inputs = flux
    config = SDTMConfig(merge_attention=True, size_aware_attention=True, text_key_weight=2.0, buckets=BUCKETS)
    got, want, _, _ = _compiled_and_reference(model, inputs, config)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the bias is applied, not a no-op: the reference without it (no second compile) ends elsewhere
    with torch.no_grad():
        plain = flux_generate(
            ReferenceTransformer(model, dataclasses.replace(config, size_aware_attention=False)), inputs, STEPS
        )
    assert (got - plain).abs().max() > 1e-4


@pytest.mark.unit
def test_the_reference_is_called_like_the_diffusers_model():
    model = tiny_sd3_transformer(TINY_SD3, seed=0)
    inputs = example_inputs(TINY_SD3, 2, (32, 32))
    reference = ReferenceTransformer(model, SDTMConfig(ratio=0.0, deviation=0.0))
    with torch.no_grad():
        output = reference(**inputs)
        (sample,) = reference(**inputs, return_dict=False)
        want = model(**inputs, return_dict=False)[0]
    assert isinstance(output, Transformer2DModelOutput)
    torch.testing.assert_close(output.sample, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sample, want, rtol=1e-5, atol=1e-6)
