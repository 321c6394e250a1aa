"""bf16 and fp16 end to end: merge plans rank like float32, merged means accumulate in float32, and every engine kind
(eager, Inductor; ONNX Runtime in tests/deploy/test_export.py) matches the eager reference in the same dtype.

The tolerance, and why: a half-precision engine cannot match a half-precision reference bit for bit (Inductor fuses
and reorders, so roundings differ), and those differences compound over a generation. What a user needs is that the
engine adds no error beyond what the dtype itself costs: the engine's distance to the float32 reference is at most
1.5x the half-precision reference's own distance to it (``_within_half_precision_noise``).
"""

import copy
import dataclasses

import pytest
import torch

from sdtm_compile import SDTMConfig, ToMeSDConfig
from sdtm_compile.core.merge import MergePlan, bipartite_plan, merge
from sdtm_compile.methods.sdtm.plans import init_li, ssm_plan
from sdtm_compile.models import TINY_SD3, build_model, tiny_sd3_transformer
from sdtm_compile.models.sampling import GenerationInputs, generate, make_generation_inputs
from sdtm_compile.reference import reference_dispatcher
from tests.helpers import transformer_call

HALF = [torch.bfloat16, torch.float16]
CONFIG = SDTMConfig(ratio=0.5, deviation=0.0, buckets=(0.5,))


def _cast(inputs: GenerationInputs, dtype: torch.dtype) -> GenerationInputs:
    fields = dataclasses.fields(inputs)
    return dataclasses.replace(
        inputs,
        **{f.name: getattr(inputs, f.name).to(dtype) for f in fields if getattr(inputs, f.name).is_floating_point()},
    )


def upcast(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of a half-precision model: the same weights, computed in float32 (the error-free baseline)."""
    return copy.deepcopy(model).float()


def _within_half_precision_noise(got: torch.Tensor, want: torch.Tensor, want32: torch.Tensor) -> None:
    engine_error = (got.float() - want32).abs().max().item()
    dtype_error = (want.float() - want32).abs().max().item()
    assert torch.isfinite(got).all()
    assert engine_error <= 1.5 * dtype_error, f"engine {engine_error:.3g} vs the dtype's own {dtype_error:.3g}"


def _generations(dtype: torch.dtype, compiled_call, steps: int = 6):
    inputs = _cast(_cast(make_generation_inputs(TINY_SD3, (16, 16), seed=1), dtype), torch.float32)  # dtype's values
    model = tiny_sd3_transformer(TINY_SD3, seed=0, dtype=dtype)
    with torch.no_grad():
        want32 = generate(transformer_call(reference_dispatcher(upcast(model), CONFIG)), inputs, num_steps=steps)
        want = generate(transformer_call(reference_dispatcher(model, CONFIG)), _cast(inputs, dtype), num_steps=steps)
        torch._dynamo.reset()  # a fresh Dynamo cache: each test compiles its own model
        got = generate(transformer_call(compiled_call(model)), _cast(inputs, dtype), num_steps=steps)
    assert got.dtype == want.dtype == dtype
    return got, want, want32


@pytest.mark.unit
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_models_are_created_in_the_dtype_asked_for(dtype):
    model = build_model(TINY_SD3, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {dtype}  # position embedding too
    assert torch.get_default_dtype() == torch.float32  # restored after creating the model
    again = build_model(TINY_SD3, dtype=dtype)  # seeded: the same weights every time
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


@pytest.mark.unit
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_merge_plans_rank_half_precision_tokens_like_float32(dtype):
    """Similarities are computed in float32, so a half-precision engine merges exactly the tokens a float32 one
    would merge for the same (rounded) tokens."""
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    li = init_li(2, 64)
    half_plan, half_li = ssm_plan(x, li, 8, 8, 6, a_s=0.05)
    full_plan, full_li = ssm_plan(x.float(), li, 8, 8, 6, a_s=0.05)
    assert torch.equal(half_plan.slot, full_plan.slot) and torch.equal(half_li, full_li)
    dst_pos = torch.zeros(2, 16, 1, dtype=torch.long)  # the first token of each 2x2 window
    half_plan, half_merged = bipartite_plan(x, dst_pos, 8, 8, 20)
    full_plan, full_merged = bipartite_plan(x.float(), dst_pos, 8, 8, 20)
    assert torch.equal(half_plan.slot, full_plan.slot) and torch.equal(half_merged, full_merged)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_merged_means_accumulate_in_float32(dtype):
    """A slot that takes many tokens (ToMeSD's general form) gets their float32 mean, rounded once."""
    x = (1 + torch.rand(1, 64, 8, generator=torch.Generator().manual_seed(1))).to(dtype)
    slot = torch.zeros(1, 64, dtype=torch.long)  # every token into slot 0
    plan = MergePlan(slot, torch.full((1, 1), 1 / 64), None)
    got = merge(x, plan)
    assert got.dtype == dtype
    assert torch.equal(got, x.float().mean(dim=1, keepdim=True).to(dtype))


@pytest.mark.unit
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_eager_engine_generation_in_half_precision(dtype):
    compiled = {}

    def compile_(model):
        compiled["module"] = torch.compile(model, backend="sdtm", options={"method": CONFIG, "engine": "eager"})
        return compiled["module"]

    with torch._dynamo.config.patch(error_on_recompile=True):
        got, want, want32 = _generations(dtype, compile_)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the eager engine runs the reference's ops: exact
    _within_half_precision_noise(got, want, want32)


@pytest.mark.inductor
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_inductor_engines_in_half_precision(dtype):
    """Inductor engines (full, structure and detail buckets) over a 6-step generation, no recompiles. bfloat16, the
    CPU's half type: float16 runs the same merge ops (the eager engine's test above, the ONNX bundle's in
    tests/deploy), and its Inductor build cost CI 45-50 s."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        got, want, want32 = _generations(
            dtype, lambda model: torch.compile(model, backend="sdtm", options={"method": CONFIG, "engine": "inductor"})
        )
    _within_half_precision_noise(got, want, want32)


@pytest.mark.unit
def test_tomesd_eager_engine_in_fp16_uses_the_float32_accumulating_merge():
    config = ToMeSDConfig(ratio=0.5)
    inputs = make_generation_inputs(TINY_SD3, (16, 16), seed=2)
    model = tiny_sd3_transformer(TINY_SD3, seed=0, dtype=torch.float16)
    compiled = torch.compile(model, backend="sdtm", options={"method": config, "engine": "eager"})
    with torch.no_grad():
        got = generate(transformer_call(compiled), _cast(inputs, torch.float16), num_steps=3)
        want = generate(
            transformer_call(reference_dispatcher(model, config)), _cast(inputs, torch.float16), num_steps=3
        )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cache_fusion_keeps_its_cache_in_the_models_dtype(dtype):
    """The fusion cache is ``[K, B, N, C]`` in the blocks' dtype (half the memory of float32): the contract says so,
    the unmerged engine returns it so, and a half-precision generation with it equals the reference exactly."""
    fusion = dataclasses.replace(CONFIG, cache_fusion=True)
    inputs = _cast(make_generation_inputs(TINY_SD3, (16, 16), seed=1), dtype)
    model = tiny_sd3_transformer(TINY_SD3, seed=0, dtype=dtype)
    torch._dynamo.reset()
    from sdtm_compile.compiler.backend import SDTMBackend

    sdtm = SDTMBackend({"method": fusion, "engine": "eager", "history": 16})
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        got = generate(transformer_call(torch.compile(model, backend=sdtm, dynamic=False)), inputs, num_steps=6)
        want = generate(transformer_call(reference_dispatcher(model, fusion)), inputs, num_steps=6)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    graph = sdtm.compiled[0]
    cache = graph.signature["cache"]
    assert cache.dtype == dtype and cache.shape == (2 * TINY_SD3.num_layers, 2, 64, TINY_SD3.inner_dim)
    assert [r.protected for r in graph.dispatcher.history] == [s % 3 == 0 for s in range(6)]
    (layout,) = graph.dispatcher._default.layouts.values()  # the generation's state: what the engines returned
    (run,) = layout.runs
    assert run.caches[0].dtype == dtype and run.caches[0].shape == cache.shape
