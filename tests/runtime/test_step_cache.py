"""The first-block cache composed with merging (sdtm_compile.step_cache), through torch.compile(backend='sdtm')."""

import dataclasses

import pytest
import torch

from sdtm_compile import FirstBlockCacheConfig, SDTMConfig
from sdtm_compile.compiler.backend import BackendSettings, SDTMBackend
from sdtm_compile.models import TINY_FLUX, TINY_SD35, flux_example_inputs, tiny_flux_transformer, tiny_sd3_transformer
from sdtm_compile.models.sampling import generate, make_generation_inputs
from sdtm_compile.passes import find_mmdit_blocks
from sdtm_compile.passes.step_cache import residual_sites
from sdtm_compile.reference import reference_dispatcher
from tests.helpers import capture_dynamo_graph, compiled_and_reference, transformer_call

CONFIG = SDTMConfig(ratio=0.5, buckets=(0.3, 0.5, 0.7))
STEPS = 8


@pytest.fixture(scope="module")
def sd35():
    return tiny_sd3_transformer(TINY_SD35, seed=2), make_generation_inputs(TINY_SD35, (32, 32), seed=5)


def cached_generation(model, inputs, threshold, runs=1, config=CONFIG, steps=STEPS):
    backend = SDTMBackend({"sdtm": config, "engine": "eager", "history": 256, "step_cache": {"threshold": threshold}})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        latents = [generate(transformer_call(compiled), inputs, num_steps=steps) for _ in range(runs)]
    return latents, backend.compiled[0].dispatcher.history


@pytest.fixture(scope="module")
def uncached(sd35):
    """Threshold 0: every step computed (the head still runs)."""
    model, inputs = sd35
    return cached_generation(model, inputs, 0.0)


@pytest.mark.slow
def test_threshold_0_runs_every_step_fully(sd35, uncached):
    model, inputs = sd35
    (got,), history = uncached
    with torch.no_grad():
        want = generate(transformer_call(reference_dispatcher(model, CONFIG)), inputs, num_steps=STEPS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any(r.skipped for r in history)
    assert history[0].change is None
    assert all(r.change > 0 for r in history[1:STEPS])


@pytest.mark.slow
def test_steps_whose_first_block_barely_changed_are_skipped_and_counted(sd35, uncached):
    """A threshold between the measured changes: exactly the steps at or below it skip (their li stays), the
    others run their engine; the result moves away from the uncached one; a second generation repeats the first."""
    model, inputs = sd35
    (first, again), history = cached_generation(model, inputs, 0.35, runs=2)  # changes here: 0.30 to 0.43
    records = history[:STEPS]
    skipped = [r.step for r in records if r.skipped]
    assert skipped
    assert len(skipped) < STEPS - 1
    assert all((r.change is not None and r.change <= 0.35) == r.skipped for r in records)
    assert [r.skipped for r in history[STEPS:]] == [r.skipped for r in records]
    assert torch.equal(first, again)
    (full,), _ = uncached
    assert (first - full).abs().max() > 1e-4


@pytest.mark.unit
def test_bad_settings_are_refused(sd35):
    with pytest.raises(ValueError, match="threshold"):
        FirstBlockCacheConfig(threshold=-1)
    # cache fusion composes with it (tests below): both options are taken
    assert BackendSettings(sdtm=dataclasses.replace(CONFIG, cache_fusion=True), step_cache=FirstBlockCacheConfig())
    model = tiny_flux_transformer(TINY_FLUX, seed=0)
    inputs = flux_example_inputs(TINY_FLUX, 1, (16, 16))
    gm, flat = capture_dynamo_graph(model, inputs)
    with pytest.raises(ValueError, match="implemented for SD3"):
        residual_sites(find_mmdit_blocks(gm, flat))


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", [SDTMConfig(ratio=0.0, deviation=0.0), dataclasses.replace(CONFIG, blocks="first-unmerged:1")]
)
def test_engines_with_an_unmerged_first_block_resume_from_the_head(sd35, config):
    """Where an engine's first block runs unmerged, a computed step starts from the head's first-block outputs
    instead of running that block again: every computed step says so, and the generation is the reference's."""
    model, inputs = sd35
    _, backend = compiled_and_reference(model, inputs, config, STEPS, history=256, step_cache={"threshold": 0.0})
    graph = backend.compiled[0]
    assert graph.resuming == set(graph.engines)  # every engine's first block is unmerged here
    history = graph.dispatcher.history
    assert len(history) == STEPS and all(r.resumed and not r.skipped for r in history)


@pytest.mark.unit
def test_engines_merged_in_the_first_block_run_it_themselves(sd35, uncached):
    _, history = uncached
    assert not any(r.resumed for r in history)  # CONFIG merges every block: no engine can start after the first


@pytest.mark.slow
def test_cache_fusion_composes_with_the_step_cache(sd35):
    """The rule: a protected step always computes (the steps after it blend with what it stores), a skipped step
    runs nothing past the head, so it reads and writes no fusion cache. Threshold 0: every step computes, the
    generation is cache fusion's alone (the reference's). Threshold 0.35 (changes here 0.24 to 0.42): exactly the
    unprotected steps at or below it skip, protected steps at or below it compute; a second generation repeats the
    first (no cache crosses generations)."""
    model, inputs = sd35
    fusion = dataclasses.replace(CONFIG, cache_fusion=True)
    (got,), history = cached_generation(model, inputs, 0.0, config=fusion, steps=9)
    with torch.no_grad():
        want = generate(transformer_call(reference_dispatcher(model, fusion)), inputs, num_steps=9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [r.protected for r in history[:9]] == [s % 3 == 0 for s in range(9)]
    (first, again), history = cached_generation(model, inputs, 0.35, runs=2, config=fusion, steps=9)
    records = history[:9]
    below = [r.change is not None and r.change <= 0.35 for r in records]
    assert [r.skipped for r in records] == [low and not r.protected for low, r in zip(below, records)]
    assert any(r.skipped for r in records)
    assert any(low and r.protected for low, r in zip(below, records))  # a step the threshold alone would skip
    assert [r.skipped for r in history[9:18]] == [r.skipped for r in records]
    assert torch.equal(first, again)
    assert (first - got).abs().max() > 1e-4
