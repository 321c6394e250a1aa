"""ONNX export of every bucket, OnnxTransformer in generations and in a real pipeline, and bundle faults."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import sdtm_compile
from sdtm_compile import SDTMConfig
from sdtm_compile.compiler.backend import SDTMBackend
from sdtm_compile.core.schedule import resolve_for_model
from sdtm_compile.deploy.bundle import BundleError
from sdtm_compile.deploy.onnx import export_onnx
from sdtm_compile.deploy.runner import OnnxTransformer
from sdtm_compile.models import TINY_SD3, TINY_SD35, TinySpec, example_inputs, tiny_sd3_transformer
from sdtm_compile.models.sampling import generate, make_generation_inputs
from sdtm_compile.reference import reference_dispatcher
from tests.conftest import SHARED_BUNDLE_CONFIG
from tests.helpers import transformer_call

pytest.importorskip("onnxruntime")
#: The bundles export what their schedules reach (an ONNX export costs ~10-25 s per engine on 2 cores): SD3's the
#: full graph, two detail buckets and a structure bucket; SD3.5's (attn2 in the merged attention) one bucket per
#: stage and the full graph. The other buckets differ only in their static counts (tests/compiler/test_backend.py checks
#: every bucket on the eager engine).
SD3_CONFIG = SHARED_BUNDLE_CONFIG
SD35_CONFIG = SDTMConfig(buckets=(0.6,))
CONFIGS = {"sd3": SD3_CONFIG, "sd35": SD35_CONFIG}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=[TINY_SD3, TINY_SD35], ids=["sd3", "sd35"])
def bundle(request, tmp_path_factory):
    spec = request.param
    model = tiny_sd3_transformer(spec, seed=0)
    if spec is TINY_SD3:  # exported once per session, shared with tests/deploy/triton (conftest.py)
        out, manifest = request.getfixturevalue("shared_sd3_bundle")
        return spec, model, out, manifest
    out = tmp_path_factory.mktemp("bundle")
    manifest = export_onnx(model, example_inputs(spec, 2, (32, 32)), _config(spec), out)
    return spec, model, out, manifest


def _config(spec: TinySpec) -> SDTMConfig:
    return CONFIGS["sd35" if spec.dual_attention_layers else "sd3"]


@pytest.mark.onnx
def test_manifest_describes_every_engine(bundle):
    spec, model, out, manifest = bundle
    assert json.loads(json.dumps(manifest, default=str)) == json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    keys = ["full", "detail@0.3", "detail@0.6", "structure@0.6"]
    assert [e["key"] for e in manifest["engines"]] == (keys if spec is TINY_SD3 else [keys[0], *keys[2:]])
    assert [e["graph"] for e in manifest["engines"]] == list(range(len(manifest["engines"])))
    assert set(manifest["files"]) == {"model.onnx", "weights.bin"}
    assert (manifest["model"], manifest["engine_input"], manifest["weights"]["file"]) == (
        "model.onnx",
        "engine",
        "weights.bin",
    )
    for name, digest in manifest["files"].items():
        assert (out / name).exists()
        assert len(digest) == 64
    names = [spec_["name"] for spec_ in manifest["inputs"]]
    assert sorted(names) == ["encoder_hidden_states", "hidden_states", "pooled_projections", "timestep"]
    assert manifest["state"][0] | {"reset": None} == {
        "name": "li",
        "shape": [2, 256],
        "dtype": "int32",
        "output": "li_out",
        "reset": None,
    }
    assert manifest["outputs"] == [{"name": "sample", "shape": [2, 4, 32, 32], "dtype": "float32"}]
    # the config as given, with the model's timestep mapping filled in (SD3: shift 3.0, timesteps in [0, 1000])
    assert SDTMConfig.from_dict(manifest["config"]) == resolve_for_model(_config(spec), "sd3", 256)
    assert manifest["config"]["method"] == "sdtm"
    assert (manifest["config"]["timestep_shift"], manifest["config"]["num_train_timesteps"]) == (3.0, 1000)
    assert manifest["transformer_config"]["num_layers"] == spec.num_layers


@pytest.mark.onnx
def test_generation_through_onnx_equals_compiled_and_reference(bundle):
    spec, model, out, _ = bundle
    inputs = make_generation_inputs(spec, (32, 32), seed=7)
    runner = OnnxTransformer(out, history=64)
    with torch.no_grad():
        got = generate(transformer_call(runner), inputs, num_steps=28)
        want = generate(transformer_call(reference_dispatcher(model, _config(spec))), inputs, num_steps=28)
        torch._dynamo.reset()
        # the eager engine: the backend's own capture, passes and dispatcher without Inductor builds (Inductor's
        # generation parity is in test_backend, whose engine cache this file's worker does not share)
        backend = SDTMBackend({"sdtm": _config(spec), "engine": "eager", "history": 64})
        compiled = torch.compile(model, backend=backend, dynamic=False)
        via_backend = generate(transformer_call(compiled), inputs, num_steps=28)
    # ONNX Runtime and eager PyTorch order float ops differently: 1e-4 over 28 steps
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, via_backend, rtol=1e-4, atol=1e-4)
    steps = [r.key for r in runner.dispatcher.history]
    assert steps == [r.key for r in backend.compiled[0].dispatcher.history]
    assert len(set(steps)) == 3  # SD3: structure@0.6, detail@0.6, detail@0.3; SD3.5: full instead of detail@0.3


@pytest.mark.onnx
def test_onnx_transformer_in_a_real_pipeline(bundle):
    spec, _, out, _ = bundle
    if spec is not TINY_SD3:
        pytest.skip("the example pipeline is built around the tiny SD3 transformer")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from sd3_pipeline import generate as pipeline_generate
        from sd3_pipeline import tiny_sd3_pipeline
    finally:
        sys.path.pop(0)
    pipe = tiny_sd3_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = OnnxTransformer(out)
    with torch.no_grad(), sdtm_compile.generation(pipe.transformer, history=16) as run:
        image = pipeline_generate(pipe, steps=5, size=128, seed=0)  # 128 px -> 32x32 latent: the bundle's shape
    assert image.size == (128, 128)
    assert len(run.history) == 5
    assert pipe.transformer.dispatcher.history == []  # the context owned the state


@pytest.fixture
def bundle_copy(bundle, tmp_path):
    spec, _, out, manifest = bundle
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy, manifest


@pytest.mark.onnx
def test_wrong_format_version(bundle_copy):
    path, manifest = bundle_copy
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BundleError, match=r"manifest.json: format_version 99 is not supported"):
        OnnxTransformer(path)


@pytest.mark.onnx
def test_config_the_release_never_reads_is_refused(bundle_copy):
    # a bundle written when SDTMConfig still had a_d (our old detail-stage term) has other graphs: re-export it
    path, manifest = bundle_copy
    (path / "manifest.json").write_text(json.dumps({**manifest, "config": {**manifest["config"], "a_d": 0.05}}))
    with pytest.raises(BundleError, match=r"manifest.json: invalid method config .*\['a_d'\].*re-export the bundle"):
        OnnxTransformer(path)


@pytest.mark.onnx
def test_missing_file(bundle_copy):
    path, manifest = bundle_copy
    name = "weights.bin"
    (path / name).unlink()
    with pytest.raises(BundleError, match=rf"{name}: listed in the manifest but missing"):
        OnnxTransformer(path)


@pytest.mark.onnx
def test_checksum_mismatch(bundle_copy):
    path, manifest = bundle_copy
    for name in ("model.onnx", "weights.bin"):
        target = path / name
        original = target.read_bytes()
        target.write_bytes(original[:-64] + bytes(64))  # same size, other bytes
        with pytest.raises(BundleError, match=rf"{target.name}: sha256 .* does not match the manifest"):
            OnnxTransformer(path)
        target.write_bytes(original)


@pytest.mark.unit
def test_missing_manifest_and_bad_json(tmp_path):
    with pytest.raises(BundleError, match="no manifest"):
        OnnxTransformer(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        OnnxTransformer(tmp_path)


@pytest.mark.onnx
def test_shape_mismatch_at_call_time(bundle):
    spec, _, out, _ = bundle
    runner = OnnxTransformer(out)
    wrong = example_inputs(spec, 1, (32, 32))  # batch 1, the bundle is for batch 2
    with pytest.raises(BundleError, match=r"input 'hidden_states' has shape \[1, 4, 32, 32\].*\[2, 4, 32, 32\]"):
        runner(**wrong)
    with pytest.raises(ValueError, match="skip_layers"):
        runner(**example_inputs(spec, 2, (32, 32)), skip_layers=[1])


@pytest.mark.onnx
def test_bundle_holds_the_weights_once_and_bucket_graphs_share_them(tmp_path):
    """``weights.bin`` holds every weight once (<= 1.1x the model's), ``model.onnx`` only graphs; the standalone bucket
    graphs read the same file and give what ``model.onnx`` gives for their engine index."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    spec = TinySpec(num_layers=1)
    config = SDTMConfig(ratio=0.3, deviation=0.0, buckets=(0.3,))
    model = tiny_sd3_transformer(spec, seed=4)
    inputs = example_inputs(spec, 2, (16, 16))
    manifest = export_onnx(model, inputs, config, tmp_path, bucket_graphs=True)
    model_bytes = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    weights = manifest["weights"]
    assert weights["model_bytes"] == model_bytes
    assert model_bytes <= (tmp_path / "weights.bin").stat().st_size == weights["bytes"] <= 1.1 * model_bytes
    graph_files = [e["file"] for e in manifest["engines"]]
    assert graph_files == ["full.onnx", "detail_r0.3.onnx", "structure_r0.3.onnx"]
    assert sorted(manifest["files"]) == sorted(["model.onnx", "weights.bin", *graph_files])
    for name in ["model.onnx", *graph_files]:  # graphs only: every large initializer points into weights.bin
        proto = onnx.load(str(tmp_path / name), load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {
            "weights.bin"
        }
        assert (tmp_path / name).stat().st_size < weights["bytes"]

    combined = ort.InferenceSession(str(tmp_path / "model.onnx"))
    feeds = {spec_["name"]: inputs[spec_["name"]].contiguous().numpy() for spec_ in manifest["inputs"]}
    feeds["li"] = np.zeros(manifest["state"][0]["shape"], np.int32)
    for entry in manifest["engines"]:
        alone = ort.InferenceSession(str(tmp_path / entry["file"])).run(None, feeds)
        chosen = combined.run(None, {**feeds, "engine": np.array([entry["graph"]], np.int64)})
        for a, b in zip(alone, chosen):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    runner = OnnxTransformer(tmp_path)
    generation = make_generation_inputs(spec, (16, 16), seed=1)
    with torch.no_grad():
        got = generate(transformer_call(runner), generation, num_steps=6)
        want = generate(transformer_call(reference_dispatcher(model, config)), generation, num_steps=6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.onnx
def test_fp16_bundle_matches_the_fp16_reference_within_half_precision_noise(tmp_path):
    """An fp16 export (what TensorRT consumes) runs in ONNX Runtime: weights once in fp16, and a generation adds no
    error beyond fp16's own (tests/compiler/test_half_precision.py says why this tolerance)."""
    from tests.compiler.test_half_precision import _cast, _within_half_precision_noise, upcast

    spec, dtype = TinySpec(num_layers=1), torch.float16
    config = SDTMConfig(ratio=0.3, deviation=0.0, buckets=(0.3,))
    model = tiny_sd3_transformer(spec, seed=4, dtype=dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in example_inputs(spec, 2, (16, 16)).items()}
    manifest = export_onnx(model, inputs, config, tmp_path)
    assert manifest["weights"]["bytes"] <= 1.1 * manifest["weights"]["model_bytes"]
    assert manifest["weights"]["model_bytes"] == sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    assert {s["dtype"] for s in manifest["inputs"] if s["name"] != "timestep"} | {manifest["outputs"][0]["dtype"]} == {
        "float16"
    }
    generation = _cast(make_generation_inputs(spec, (16, 16), seed=1), dtype)
    with torch.no_grad():
        got = generate(transformer_call(OnnxTransformer(tmp_path)), generation, num_steps=6)
        want = generate(transformer_call(reference_dispatcher(model, config)), generation, num_steps=6)
        reference32 = reference_dispatcher(upcast(model), config)  # the same weights, in float32
        want32 = generate(transformer_call(reference32), _cast(generation, torch.float32), num_steps=6)
    _within_half_precision_noise(got, want, want32)


@pytest.mark.onnx
def test_an_exact_counts_bundle_serves_every_count_with_one_graph_per_stage(shared_exact_bundle, tmp_path):
    """``counts="exact"``: the count inputs are dynamic axes of every graph; a generation through ONNX Runtime
    equals the eager reference's, whose counts change from step to step."""
    config = SDTMConfig(counts="exact")
    model = tiny_sd3_transformer(TINY_SD3, seed=0)
    bundle, manifest = shared_exact_bundle  # the tiny SD3 model, seed 0, exported with this config
    assert [e["key"] for e in manifest["engines"]] == ["full", "detail@0.623607", "structure@0.7"]
    assert [c["name"] for c in manifest["count_inputs"]] == ["count_0"]
    detail = manifest["engines"][1]
    assert detail["plan_counts"] == [[64, 144]]  # the detail stage's IDM sources, ratio 0.6236 down to 0.3
    runner = OnnxTransformer(bundle, history=64)
    inputs = make_generation_inputs(TINY_SD3, (32, 32), seed=7)
    with torch.no_grad():
        got = generate(transformer_call(runner), inputs, num_steps=12)
        want = generate(transformer_call(reference_dispatcher(model, config)), inputs, num_steps=12)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    kinds, grid = manifest["block_kinds"], tuple(manifest["grid"])
    counts = {runner.method.plan_counts(kinds, r.key, grid) for r in runner.dispatcher.history}
    assert len(counts) >= 5  # many counts, three graphs

    # The Triton repository: the step table records each step's counts, and the pipeline model's numpy loop feeds
    # them to the engine model (run here in-process with ONNX Runtime) = the bundle in diffusers' loop

    from sdtm_compile.deploy.triton import TritonSettings, export_triton
    from sdtm_compile.deploy.triton.step_logic import StepTable

    repository = tmp_path / "repository"
    export_triton(bundle, repository, TritonSettings(engine_backend="python", max_steps=12))
    table = StepTable.load(repository / "sdtm" / "1")
    assert table.count_inputs == ("count_0",)
    assert len({step.counts for step in table.schedule(12)}) >= 5
    config = (repository / table.engine_model / "config.pbtxt").read_text()
    assert '{ name: "count_0" data_type: TYPE_UINT8 dims: [ -1 ] }' in config
    _pipeline_loop_equals_the_bundle(repository, table, runner)


def _fused_generations(family: str, tmp_path: Path):
    """A cache-fusion bundle of the tiny ``family`` model: its manifest, and one generation through
    OnnxTransformer, the compiled backend (eager engine) and the Triton step logic (the engine model in-process)."""

    from sdtm_compile.deploy.triton import TritonSettings, export_triton
    from sdtm_compile.deploy.triton.step_logic import StepTable
    from sdtm_compile.models import TINY_FLUX, flux_example_inputs, tiny_flux_transformer
    from sdtm_compile.models.sampling import flux_generate, make_flux_generation_inputs

    config = SDTMConfig(buckets=(0.3, 0.6), cache_fusion=True)
    if family == "sd3":
        model, example = tiny_sd3_transformer(TINY_SD3, seed=0), example_inputs(TINY_SD3, 2, (32, 32))
        inputs = make_generation_inputs(TINY_SD3, (32, 32), seed=7)
        run = lambda call: generate(transformer_call(call), inputs, num_steps=12)  # noqa: E731
    else:  # one double and one single block: both kinds of cached branch, half the export of the 2 + 2 model
        spec = dataclasses.replace(TINY_FLUX, num_layers=1, num_single_layers=1)
        model, example = tiny_flux_transformer(spec, seed=0), flux_example_inputs(spec, 1, (32, 32))
        inputs = make_flux_generation_inputs(spec, (32, 32), seed=2)
        run = lambda call: flux_generate(call, inputs, 12)  # noqa: E731
    manifest = export_onnx(model, example, config, tmp_path)
    runner = OnnxTransformer(tmp_path, history=64)
    torch._dynamo.reset()
    backend = SDTMBackend({"sdtm": config, "engine": "eager", "history": 64})
    with torch.no_grad():
        got, via_backend = run(runner), run(torch.compile(model, backend=backend, dynamic=False))
    repository = tmp_path / "repository"
    export_triton(tmp_path, repository, TritonSettings(engine_backend="python", max_steps=12))
    table = StepTable.load(repository / "sdtm" / "1")
    _pipeline_loop_equals_the_bundle(repository, table, runner)
    engine_config = (repository / table.engine_model / "config.pbtxt").read_text()
    return manifest, got, via_backend, runner, backend, table, engine_config


@pytest.mark.onnx
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_cache_fusion_bundle_carries_the_cache_through_onnx_and_triton(family, tmp_path):
    """The cache is engine state of the bundle (the unmerged graph writes it, merged graphs read it): a generation
    through ONNX Runtime equals the compiled backend's, protected steps included; the Triton step table marks the
    protected steps, and its numpy loop (the cache local to the request) equals the bundle in diffusers' loop."""
    manifest, got, via_backend, runner, backend, table, engine_config = _fused_generations(family, tmp_path)
    (li, cache) = manifest["state"]
    assert (li["name"], cache["name"], cache["output"], cache["dtype"]) == ("li", "cache", "cache_out", "float32")
    assert cache["shape"][1:] == [2 if family == "sd3" else 1, 256, 32]  # [K, B, N, C]
    torch.testing.assert_close(got, via_backend, rtol=1e-4, atol=1e-4)
    records = runner.dispatcher.history[:12]
    assert [r.protected for r in records] == [s % 3 == 0 for s in range(12)]
    assert [r.key for r in records] == [r.key for r in backend.compiled[0].dispatcher.history[:12]]
    assert [step.protected for step in table.schedule(12)] == [s % 3 == 0 for s in range(12)]
    full = next(e["graph"] for e in manifest["engines"] if e["key"] == "full")
    assert all((step.engine == full) == step.protected for step in table.schedule(12))
    assert table.extra_state == (("cache", "cache_out", tuple(cache["shape"]), "float32"),)
    dims = ", ".join(map(str, cache["shape"]))
    assert f'{{ name: "cache" data_type: TYPE_FP32 dims: [ {dims} ] }}' in engine_config
    assert f'{{ name: "cache_out" data_type: TYPE_FP32 dims: [ {dims} ] }}' in engine_config


def _pipeline_loop_equals_the_bundle(repository: Path, table, runner: OnnxTransformer) -> None:
    """The Triton pipeline model's numpy loop (12 steps, CFG 4.5), its engine model run in-process with ONNX Runtime,
    equals the bundle (``runner``) in diffusers' loop."""
    import numpy as np
    import onnxruntime as ort

    from sdtm_compile.deploy.triton import load
    from sdtm_compile.deploy.triton.step_logic import denoise

    session = ort.InferenceSession(str(repository / table.engine_model / "1" / "model.onnx"))
    request = load.make_request(table, seed=5, num_steps=12, guidance_scale=4.5)
    served = denoise(
        table,
        np.load(repository / "sdtm" / "1" / "initial_state.npy"),
        request.arrays,
        lambda name, feeds: tuple(session.run(list(table.outputs), feeds)),
        num_steps=12,
        guidance_scale=4.5,
    )
    np.testing.assert_allclose(served, load.reference_output(runner, table, request), rtol=0, atol=1e-6)
