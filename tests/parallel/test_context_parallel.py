"""Token merging under diffusers' context parallelism (Ulysses degree 2) with two gloo processes on this machine.

Each rank compiles the model whose parallelism diffusers enabled and merges its own shard (a band of grid rows);
the oracle is the single-process eager reference merging the same bands the same way (``shards=2``), which sees no
collective at all. Two spawns: the eager-engine cases (slow lane) and one Inductor case (inductor lane); each rank
writes what it measured, the tests read both ranks. Plans concatenated shard by shard are checked without a
process group (unit lane).
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import sdtm_compile
from sdtm_compile import FirstBlockCacheConfig, SDTMConfig, SiToConfig, ToMAConfig, ToMeSDConfig
from sdtm_compile.core.merge import concat_plans, merge, unmerge
from sdtm_compile.core.method import method_for
from sdtm_compile.core.schedule import EngineKey, Stage
from sdtm_compile.models import TINY_FLUX, TINY_SD3, TINY_SD35, tiny_flux_transformer, tiny_sd3_transformer
from sdtm_compile.parallel import spawn_ranks
from sdtm_compile.reference import model_layout, shard_layout

WORLD = 2
#: the tiny models by family (SD3.5: dual attention in blocks 0 and 1, RMS q / k norms)
SPECS = {"flux": TINY_FLUX, "sd3": TINY_SD3, "sd35": TINY_SD35}
#: every method kind of plan: SSM (fan-in 4), IDM (bipartite), ToMeSD, SiTo (pruning), ToMA (soft, per tile)
PLAN_CASES = [
    (SDTMConfig(), EngineKey(Stage.STRUCTURE, 0.6)),
    (SDTMConfig(), EngineKey(Stage.DETAIL, 0.5)),
    (ToMeSDConfig(), EngineKey(Stage.DETAIL, 0.5)),
    (SiToConfig(), EngineKey(Stage.DETAIL, 0.5)),
    (ToMAConfig(), EngineKey(Stage.DETAIL, 0.5)),
]


@pytest.mark.unit
@pytest.mark.parametrize("config,key", PLAN_CASES, ids=lambda c: getattr(c, "method", None) or str(c))
def test_concatenated_plans_merge_each_shard_alone(config, key):
    """Merging with shard plans side by side = merging each shard with its own plan, then concatenating (and the
    same for unmerge); the merged count is the same on every shard."""
    method = method_for(config)
    key = method.engine_of(key) if hasattr(method, "engine_of") else key
    torch.manual_seed(0)
    grid, shards, channels = (8, 8), 2, 16
    x = torch.randn(2, grid[0] * grid[1], channels)
    state = method.init_state(2, x.shape[1] // shards)
    parts = [method.plan_for(key, part, state, grid[0] // shards, grid[1]) for part in x.chunk(shards, dim=1)]
    plan = concat_plans([p for p, _ in parts], x.shape[1] // shards)
    merged = merge(x, plan)
    each = [merge(part, p) for part, (p, _) in zip(x.chunk(shards, dim=1), parts)]
    torch.testing.assert_close(merged, torch.cat(each, dim=1), rtol=0, atol=0)
    y = torch.randn_like(merged)
    restored = [unmerge(part, p) for part, (p, _) in zip(y.chunk(shards, dim=1), parts)]
    torch.testing.assert_close(unmerge(y, plan), torch.cat(restored, dim=1), rtol=0, atol=0)


@pytest.mark.unit
def test_what_needs_the_whole_sequence_is_refused():
    """SDTM* and size-aware attention read more than a shard: refused on a rank's layout, naming the fix."""
    model = tiny_sd3_transformer(TINY_SD3, seed=0)
    layout = model_layout(model, torch.zeros(1, 4, 32, 32), torch.zeros(1, 8, 32))
    local = shard_layout(layout, WORLD)
    assert local.grid == (8, 16) and local.text_tokens == 4 and local.context_parallel == WORLD
    adaptive = method_for(SDTMConfig(adaptive_threshold=0.5)).check_model(local)
    assert "context parallelism" in adaptive and "adaptive_threshold=None" in adaptive
    sized = method_for(SDTMConfig(size_aware_attention=True, merge_attention=True)).check_model(local)
    assert "size_aware_attention=False" in sized
    for config in (SDTMConfig(cache_fusion=True), ToMeSDConfig(), SiToConfig(), ToMAConfig()):
        assert method_for(config).check_model(local) is None
    with pytest.raises(ValueError, match="token rows are a multiple of 3"):
        shard_layout(layout, 3)


# -- two ranks -----------------------------------------------------------------------------------------------------


def _models(family: str, spec=None):
    """``(plain, parallel)``: the same seeded model twice; the second gets diffusers' context parallelism."""
    from diffusers import ContextParallelConfig, ParallelConfig

    from sdtm_compile.parallel import prepare_sd3_context_parallel

    build = tiny_flux_transformer if family == "flux" else tiny_sd3_transformer
    spec = spec or SPECS[family]
    plain, parallel = build(spec, seed=1).eval(), build(spec, seed=1).eval()
    if family != "flux":
        prepare_sd3_context_parallel(parallel)
    parallel.enable_parallelism(
        config=ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=WORLD))
    )
    return plain, parallel


def _generation(family: str, latent=(32, 32), text=None):
    """``generate(transformer, steps)`` for ``family``'s tiny model."""
    from sdtm_compile.models.sampling import (
        diffusers_call,
        flux_generate,
        generate,
        make_flux_generation_inputs,
        make_generation_inputs,
    )

    if family == "flux":
        inputs = make_flux_generation_inputs(TINY_FLUX, latent)
        return lambda transformer, steps: flux_generate(transformer, inputs, num_steps=steps)
    spec = SPECS[family] if text is None else dataclasses.replace(SPECS[family], text_tokens=text)
    inputs = make_generation_inputs(spec, latent)
    return lambda transformer, steps: generate(diffusers_call(transformer), inputs, num_steps=steps)


def _compile(model, config, engine="eager", **options):
    torch._dynamo.reset()
    backend = sdtm_compile.SDTMBackend({"method": config, "engine": engine, **options})
    return torch.compile(model, backend=backend, dynamic=False), backend


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _generations(family, config, steps=(6, 4), engine="eager", whole=False):
    """Whole generations one after another (different step counts) under ``error_on_recompile``: the largest
    distance to the sharded reference (and, with ``whole``, to the whole-sequence reference)."""
    from sdtm_compile.reference import reference_dispatcher

    plain, parallel = _models(family)
    generate = _generation(family)
    compiled, _ = _compile(parallel, config, engine)
    sharded = reference_dispatcher(plain, config, shards=WORLD)
    whole_sequence = reference_dispatcher(plain, config)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        got = [generate(compiled, n) for n in steps]
    with torch.no_grad():
        distances = {"sharded": max(_diff(g, generate(sharded, n)) for g, n in zip(got, steps))}
        if whole:
            distances["whole"] = max(_diff(g, generate(whole_sequence, n)) for g, n in zip(got, steps))
    return distances


def _traffic(family, config):
    """Each engine's collectives and this rank's token counts, from the bucket graphs of the parallel model."""
    from sdtm_compile.compiler.buckets import BucketGraphs
    from sdtm_compile.compiler.capture import capture_dynamo_graph
    from sdtm_compile.models import example_inputs, flux_example_inputs
    from sdtm_compile.parallel import collective_bytes

    _, parallel = _models(family)
    inputs = flux_example_inputs(TINY_FLUX, 1, (32, 32)) if family == "flux" else example_inputs(TINY_SD3, 1, (32, 32))
    buckets = BucketGraphs(*capture_dynamo_graph(parallel, inputs), config, include_full=True)
    sent = {str(key): collective_bytes(buckets.graph(key).gm, WORLD).sent for key in buckets.keys}
    return {
        "grid": list(buckets.sites.grid),
        "tokens": buckets.sites.num_tokens,
        "context_parallel": buckets.sites.context_parallel,
        "merged": {str(key): buckets.counts(key).attention for key in buckets.keys},
        "sent": sent,
    }


def _error(fn) -> str:
    try:
        fn()
    except Exception as err:  # what the user sees
        return f"{type(err).__name__}: {err}"
    return ""


def _ratio_zero(family):
    """Ratio 0 on the parallel model, the parallel model itself and the single-process model, one call each."""
    from sdtm_compile.models import example_inputs, flux_example_inputs

    plain, parallel = _models(family)
    inputs = flux_example_inputs(TINY_FLUX, 1, (32, 32)) if family == "flux" else example_inputs(TINY_SD3, 1, (32, 32))
    compiled, _ = _compile(parallel, SDTMConfig(ratio=0.0, deviation=0.0))
    with torch.no_grad():
        single = plain(**inputs, return_dict=False)[0]
        unmodified = parallel(**inputs, return_dict=False)[0]
        merged_off = compiled(**inputs, return_dict=False)[0]
    return {"compiled_vs_parallel": _diff(merged_off, unmodified), "parallel_vs_single": _diff(unmodified, single)}


def _eager_ranks(rank: int, world: int, out: str) -> None:
    torch.manual_seed(0)
    results: dict = {
        "flux_sdtm": _generations("flux", SDTMConfig(merge_attention=True), whole=True),
        "sd3_fusion": _generations("sd3", SDTMConfig(merge_attention=True, cache_fusion=True)),
        "sd35_sdtm": _generations("sd35", SDTMConfig(merge_attention=True)),
        "flux_exact": _generations("flux", SDTMConfig(merge_attention=True, counts="exact"), steps=(6,)),
        "flux_tomesd": _generations("flux", ToMeSDConfig(), steps=(6,)),
        "sd3_sito": _generations("sd3", SiToConfig(), steps=(6,)),
        "flux_ratio0": _ratio_zero("flux"),
        "sd3_ratio0": _ratio_zero("sd3"),
        "flux_traffic": _traffic("flux", SDTMConfig(merge_attention=True)),
        "sd3_traffic": _traffic("sd3", SDTMConfig(merge_attention=True)),
    }
    # ToMA's plan carries the float noise of Ulysses' key order forward step after step (3.5e-3 after 8 steps):
    # compared per call (one-step generations), where it is float noise
    results["sd3_toma"] = _generations("sd3", ToMAConfig(), steps=(1,))
    _, parallel = _models("sd3")
    generate = _generation("sd3")
    adaptive, _ = _compile(parallel, SDTMConfig(adaptive_threshold=0.5))
    cached, _ = _compile(parallel, SDTMConfig(), step_cache=FirstBlockCacheConfig(0.1))
    with torch.no_grad():
        results["refused_adaptive"] = _error(lambda: generate(adaptive, 2))
        results["refused_step_cache"] = _error(lambda: generate(cached, 2))
        results["odd_text"] = _error(lambda: _generation("sd3", text=333)(parallel, 1))  # SD3's 77 + 256
        _, flux = _models("flux")
        rows, _ = _compile(flux, SDTMConfig())
        results["odd_rows"] = _error(lambda: _generation("flux", latent=(10, 32))(rows, 1))
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def _inductor_ranks(rank: int, world: int, out: str) -> None:
    """The structure-stage engine with merged attention of a 1 double + 1 single block Flux, built region by region
    with Inductor (one key: cold builds cost ~10 s a region here), fed a mid-generation state."""
    from sdtm_compile.compiler.backend import BackendSettings
    from sdtm_compile.compiler.buckets import BucketGraphs
    from sdtm_compile.compiler.capture import capture_dynamo_graph
    from sdtm_compile.compiler.regions import RegionalBuilder
    from sdtm_compile.engines import ENGINES
    from sdtm_compile.models import TINY_FLUX_SCHNELL, flux_example_inputs
    from sdtm_compile.reference import reference_forward

    spec = dataclasses.replace(TINY_FLUX_SCHNELL, num_layers=1, num_single_layers=1)
    plain, parallel = _models("flux", spec)
    inputs = flux_example_inputs(spec, 1, (32, 32))
    buckets = BucketGraphs(*capture_dynamo_graph(parallel, inputs), SDTMConfig(merge_attention=True))
    key = EngineKey(Stage.STRUCTURE, 0.7)
    li = torch.randint(0, 4, (1, buckets.sites.num_tokens), generator=torch.Generator().manual_seed(0)).int()
    settings = BackendSettings(engine="inductor")
    regional = RegionalBuilder(lambda region, args, name: ENGINES["inductor"].build(region, args, settings))
    with torch.no_grad():
        built = regional.build(buckets.graph(key), [*buckets.example_inputs, li])
        sample, li_out = built(*buckets.example_inputs, li.clone())
        # every rank drew the same li for its band: the whole image's is that band's, once per rank
        want, state = reference_forward(
            plain, **inputs, key=key, li=torch.cat([li] * world, dim=1), config=buckets.config, shards=world
        )
    result = {
        "diff": _diff(sample, want),
        "li": bool(torch.equal(li_out, state.li.chunk(world, dim=1)[rank])),
        "attention_tokens": buckets.counts(key).attention,
        "tokens": buckets.sites.num_tokens,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _spawned(target, tmp_path_factory, name):
    out = tmp_path_factory.mktemp(name)
    spawn_ranks(target, WORLD, str(out))
    return [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def eager_ranks(tmp_path_factory):
    return _spawned(_eager_ranks, tmp_path_factory, "cp-eager")


@pytest.mark.slow
def test_generations_equal_the_sharded_reference(eager_ranks):
    """Every rank's gathered output of whole generations (no recompiles) equals the single-process reference that
    merges the same bands; whole-sequence plans give another image (the shard boundary is real)."""
    for results in eager_ranks:
        for case in ("flux_sdtm", "sd3_fusion", "sd35_sdtm", "flux_exact", "flux_tomesd", "sd3_sito", "sd3_toma"):
            assert results[case]["sharded"] < 1e-5, (case, results[case])
        assert results["flux_sdtm"]["whole"] > 1e-3
    numbers = [{k: v for k, v in results.items() if isinstance(v, dict)} for results in eager_ranks]
    assert numbers[0] == numbers[1]  # the ranks computed the same gathered outputs


@pytest.mark.slow
def test_ratio_zero_is_the_parallel_model_which_is_the_single_process_model(eager_ranks):
    for results in eager_ranks:
        for family in ("flux", "sd3"):
            assert results[f"{family}_ratio0"]["compiled_vs_parallel"] < 1e-6
            assert results[f"{family}_ratio0"]["parallel_vs_single"] < 1e-5


@pytest.mark.slow
def test_each_rank_merges_its_band_and_sends_fewer_bytes(eager_ranks):
    """The sites describe the rank's band (16x16 grid: 8 rows each); every merged engine's all-to-alls send less
    than the unmerged one's, the same on both ranks."""
    for family in ("flux", "sd3"):
        traffic = [results[f"{family}_traffic"] for results in eager_ranks]
        assert traffic[0] == traffic[1]
        assert traffic[0]["grid"] == [8, 16] and traffic[0]["tokens"] == 128 and traffic[0]["context_parallel"] == 2
        sent = traffic[0]["sent"]
        full = sent.pop("full")
        merged_attention = [k for k, m in traffic[0]["merged"].items() if k != "full" and m < 128]
        assert merged_attention and all(sent[k] < full for k in merged_attention), traffic[0]


@pytest.mark.slow
def test_refusals_name_the_fix(eager_ranks):
    results = eager_ranks[0]
    assert "adaptive_threshold=None" in results["refused_adaptive"]
    assert "step_cache" in results["refused_step_cache"]
    assert "ContextParallelTextError" in results["odd_text"] and "max_sequence_length=255" in results["odd_text"]
    assert "multiple of 2" in results["odd_rows"], results["odd_rows"]


@pytest.mark.inductor
def test_inductor_engines_under_context_parallelism(tmp_path_factory):
    for results in _spawned(_inductor_ranks, tmp_path_factory, "cp-inductor"):
        assert results["diff"] < 1e-5 and results["li"], results
        assert results["attention_tokens"] < results["tokens"], results  # the attention really is merged
