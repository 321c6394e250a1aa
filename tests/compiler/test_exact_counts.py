"""``SDTMConfig(counts="exact")``: one engine per stage whose plans read their count from a count input.

Parity with the eager reference over whole generations of different step counts (no recompiles) on SD3 and Flux,
with the eager engine; one Inductor build, checked at every step and at both ends of its count range; the engine
cache key and the TensorRT lint of what a dynamic count adds.
"""

import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.compiler.backend import SDTMBackend
from sdtm_compile.compiler.buckets import BucketGraphs
from sdtm_compile.compiler.compiled import SDTMCompiledGraph
from sdtm_compile.core.counts import count_tensors, example_count_tensor, size_only_inputs
from sdtm_compile.core.schedule import Stage
from sdtm_compile.engines.cache import EngineCache
from sdtm_compile.engines.tensorrt import export_with_count_ranges
from sdtm_compile.models import TINY_FLUX, example_inputs, tiny_flux_transformer
from sdtm_compile.models.sampling import (
    diffusers_call,
    flux_generate,
    generate,
    make_flux_generation_inputs,
    make_generation_inputs,
)
from sdtm_compile.passes import lint_tensorrt, to_aten
from sdtm_compile.reference import reference_dispatcher
from tests.helpers import capture_dynamo_graph, compiled_and_reference

STEPS = (28, 20)  # two whole SD3 generations one after another, with different step counts


def _step_counts(graph: SDTMCompiledGraph) -> set[tuple[int, ...]]:
    """The count inputs' counts of every call in the graph's history."""
    kinds = [block.kind for block in graph.sites.blocks]
    return {graph.method.plan_counts(kinds, r.key, graph.sites.grid) for r in graph.dispatcher.history}


def _sd3_generations(model, inputs, config, engine, **options):
    backend = SDTMBackend({"method": config, "engine": engine, "history": 64, **options})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for steps in STEPS:
            got = generate(diffusers_call(compiled), inputs, num_steps=steps)
            want = generate(diffusers_call(reference_dispatcher(model, config)), inputs, num_steps=steps)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (graph,) = backend.compiled
    return graph


@pytest.mark.slow
@pytest.mark.parametrize("blocks", ["all", "staggered"])
def test_eager_generations_equal_the_reference_at_every_exact_count(sd3, blocks):
    spec, model = sd3
    config = SDTMConfig(counts="exact", blocks=blocks)
    graph = _sd3_generations(model, make_generation_inputs(spec, (32, 32)), config, "eager")
    assert sorted(key.stage for key in graph.engines) == [Stage.DETAIL, Stage.STRUCTURE]  # one engine per stage
    assert len(_step_counts(graph)) >= 5  # the counts change from step to step (the last generation's 7 steps)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, options",
    [
        (SDTMConfig(counts="exact", cache_fusion=True), {}),
        (SDTMConfig(counts="exact", size_aware_attention=True), {}),
        (SDTMConfig(counts="exact", blocks="first-unmerged:1"), {"step_cache": {"threshold": 0.0}}),
    ],
    ids=["cache-fusion", "size-aware", "step-cache-resuming"],
)
def test_exact_counts_compose_with_the_extensions_and_the_step_cache(sd35, config, options):
    """SD3.5 (attn2 merged too): cache fusion's protected steps run the unmerged engine, size-aware attention biases
    the merged keys by their sizes, and the step cache resumes the merged engines after its head with the count
    inputs between the state and the head's outputs."""
    spec, model = sd35
    _, backend = compiled_and_reference(model, make_generation_inputs(spec, (32, 32)), config, 10, **options)
    (graph,) = backend.compiled
    if "step_cache" in options:
        assert graph.resuming == frozenset(k for k in graph.engines if k.stage is not Stage.FULL)


@pytest.mark.slow
def test_flux_merged_attention_runs_exact_counts_through_one_engine_per_stage():
    model = tiny_flux_transformer(TINY_FLUX, seed=0)
    inputs = make_flux_generation_inputs(TINY_FLUX, (32, 32))
    config = SDTMConfig(counts="exact", merge_attention=True)  # the RoPE rows follow the merged count too
    backend = SDTMBackend({"method": config, "engine": "eager", "history": 64})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for steps in (20, 12):  # whole FLUX.1 generations, two step counts
            got = flux_generate(compiled, inputs, num_steps=steps)
            want = flux_generate(reference_dispatcher(model, config), inputs, num_steps=steps)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (graph,) = backend.compiled
    assert len(graph.engines) == 2
    assert len(_step_counts(graph)) >= 3


@pytest.mark.inductor
def test_one_inductor_engine_per_stage_serves_every_count_of_its_range(sd3):
    spec, model = sd3
    config = SDTMConfig(counts="exact")
    inputs = make_generation_inputs(spec, (32, 32))
    calls: list[tuple] = []
    record = SDTMCompiledGraph.__call__

    def recording(self, *args):  # keep the flat inputs of one call, to call the engines directly
        calls.append(args)
        return record(self, *args)

    SDTMCompiledGraph.__call__ = recording
    try:
        # this process and one compiler process (tests/conftest.py makes 1 the default): both build regions
        graph = _sd3_generations(model, inputs, config, "inductor", build_workers=2)
    finally:
        SDTMCompiledGraph.__call__ = record
    assert len(graph.engines) == 2

    # Both ends of each stage's range, against the eager rewritten graph (the reference of the engine itself)
    gm, flat = capture_dynamo_graph(model, example_inputs(spec, 2, (32, 32)))
    buckets = BucketGraphs(gm, flat, config)
    state = buckets.new_state()
    with torch.no_grad():
        for key, engine in graph.engines.items():
            low, high = buckets.count_range(key)
            assert low != high or key.stage is Stage.STRUCTURE  # the detail stage's count varies on this grid
            for counts in {low, high}:
                count_inputs = count_tensors(counts, buckets.sites.num_tokens)
                want = buckets.graph(key).gm(*calls[-1], *state, *count_inputs)
                got = engine(*calls[-1], *state, *count_inputs)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.unit
def test_the_engine_cache_key_names_the_counts_an_engine_serves(sd3, tmp_path):
    spec, model = sd3
    gm, flat = capture_dynamo_graph(model, example_inputs(spec, 2, (32, 32)))
    buckets = BucketGraphs(gm, flat, SDTMConfig(counts="exact"))
    (key,) = [k for k in buckets.keys if k.stage is Stage.DETAIL]
    graph = buckets.graph(key).gm
    inputs = buckets.engine_inputs(key)
    cache = EngineCache(tmp_path)
    narrower = [*inputs[:-1], example_count_tensor(128, (128,), buckets.sites.num_tokens)]
    assert cache.key(graph, inputs, "inductor") == cache.key(graph, buckets.engine_inputs(key), "inductor")
    assert cache.key(graph, inputs, "inductor") != cache.key(graph, narrower, "inductor")


@pytest.mark.slow
def test_the_tensorrt_lint_passes_the_graph_a_dynamic_count_makes(sd3):
    spec, model = sd3
    gm, flat = capture_dynamo_graph(model, example_inputs(spec, 2, (32, 32)))
    buckets = BucketGraphs(gm, flat, SDTMConfig(counts="exact"))
    for key in buckets.keys:
        rewritten = buckets.graph(key).gm
        assert size_only_inputs(rewritten)  # its count inputs, found structurally
        aten_graph = to_aten(rewritten, buckets.engine_inputs(key))
        values = [n.meta.get("val") for n in aten_graph.graph.nodes]
        shapes = [v.shape for v in values if isinstance(v, torch.Tensor)]
        symbolic = [shape for shape in shapes if any(isinstance(size, torch.SymInt) for size in shape)]
        if key.stage is Stage.DETAIL:  # its counts vary on this grid: the merged length is a symbolic size
            assert symbolic
        assert not [f for f in lint_tensorrt(aten_graph, key) if f.severity == "error"]


@pytest.mark.slow
def test_the_tensorrt_build_exports_each_count_input_with_its_range(sd3):
    """What the TensorRT build compiles from (torch-tensorrt itself needs CUDA): a program whose count input is a
    dynamic dimension over the lengths the stage serves, equal to the graph at the ends of that range."""
    spec, model = sd3
    gm, flat = capture_dynamo_graph(model, example_inputs(spec, 2, (32, 32)))
    buckets = BucketGraphs(gm, flat, SDTMConfig(counts="exact"))
    (key,) = [k for k in buckets.keys if k.stage is Stage.DETAIL]
    inputs = buckets.engine_inputs(key)
    program, ranges = export_with_count_ranges(buckets.graph(key).gm, inputs)
    tokens = buckets.sites.num_tokens
    low, high = buckets.count_range(key)
    assert ranges[-1] == (tokens - high[0], tokens - low[0]) and ranges[:-1] == [None] * (len(inputs) - 1)
    module = program.module()
    with torch.no_grad():
        for counts in (low, high):
            args = [*inputs[:-1], *count_tensors(counts, tokens)]
            for a, b in zip(module(*args), buckets.graph(key).gm(*args)):
                torch.testing.assert_close(a, b)
