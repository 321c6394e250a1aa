"""ONNX export of every bucket, OnnxTransformer in generations and in a real pipeline, and bundle faults."""

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
    assert manifest["format_version"] == 1
    keys = ["full", "detail@0.3", "detail@0.6", "structure@0.6"]
    assert [e["key"] for e in manifest["engines"]] == (keys if spec is TINY_SD3 else [keys[0], *keys[2:]])
    assert {e["file"] for e in manifest["engines"]} == set(manifest["files"])
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
    name = manifest["engines"][1]["file"]  # detail_r0.3.onnx (SD3), detail_r0.6.onnx (SD3.5)
    (path / name).unlink()
    with pytest.raises(BundleError, match=rf"{name}: listed in the manifest but missing"):
        OnnxTransformer(path)


@pytest.mark.onnx
def test_checksum_mismatch(bundle_copy):
    path, manifest = bundle_copy
    target = path / manifest["engines"][-1]["file"]  # structure_r0.6.onnx
    target.write_bytes(target.read_bytes()[:-100])  # truncated
    with pytest.raises(BundleError, match=rf"{target.name}: sha256 .* does not match the manifest"):
        OnnxTransformer(path)


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
def test_bundle_with_external_data_loads_checks_and_runs(tmp_path):
    """Weights in ``.onnx.data`` files (forced on a tiny model): listed, checksummed, loaded, and they must match."""
    spec = TinySpec(num_layers=1)
    config = SDTMConfig(ratio=0.3, deviation=0.0, buckets=(0.3,))
    model = tiny_sd3_transformer(spec, seed=4)
    manifest = export_onnx(model, example_inputs(spec, 2, (16, 16)), config, tmp_path, external_data=True)
    onnx_files = sorted(name for name in manifest["files"] if name.endswith(".onnx"))
    assert manifest["external_data"] is True
    assert len(onnx_files) == 3
    assert sorted(manifest["files"]) == sorted([*onnx_files, *(f"{name}.data" for name in onnx_files)])
    for name in onnx_files:  # the weights really are outside the graph file
        assert (tmp_path / f"{name}.data").stat().st_size > (tmp_path / name).stat().st_size

    runner = OnnxTransformer(tmp_path)
    inputs = make_generation_inputs(spec, (16, 16), seed=1)
    with torch.no_grad():
        got = generate(transformer_call(runner), inputs, num_steps=6)
        want = generate(transformer_call(reference_dispatcher(model, config)), inputs, num_steps=6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    data = tmp_path / f"{onnx_files[0]}.data"
    data.write_bytes(data.read_bytes()[:-64] + bytes(64))  # same size, other weights
    with pytest.raises(BundleError, match=rf"{data.name}: sha256 .* does not match the manifest"):
        OnnxTransformer(tmp_path)
    data.unlink()
    with pytest.raises(BundleError, match=rf"{data.name}: listed in the manifest but missing"):
        OnnxTransformer(tmp_path)
