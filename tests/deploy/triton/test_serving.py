"""Serving on Triton: the step logic against diffusers' loop, the repository, and a real ``tritonserver`` under
concurrent clients, bad input, disconnects, a crash and a tampered repository.

The server tests start PyTriton's ``tritonserver`` 2.51 (Python backend) in a subprocess on free ports; they skip,
saying why, only where no server binary can run here.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from sdtm_compile.deploy.runner import OnnxTransformer
from sdtm_compile.deploy.triton import (
    RepositoryError,
    ServerStartError,
    ServerUnavailable,
    TritonServer,
    TritonSettings,
    export_triton,
    load,
    verify_repository,
)
from sdtm_compile.deploy.triton.repository import step_table
from sdtm_compile.deploy.triton.step_logic import RequestError, StepTable, denoise
from sdtm_compile.models import TINY_FLUX, TINY_SD3, flux_example_inputs
from sdtm_compile.models.sampling import GenerationInputs, flux_generate, generate

pytest.importorskip("onnxruntime")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import model_config_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MAX_STEPS = 40
KEYS = ("full", "structure@0.5", "detail@0.5")


def _ort_engines(repository, table: StepTable):
    """The engine model of a repository run in-process with ONNX Runtime: ``run_engine`` for ``denoise``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(repository / table.engine_model / "1" / "model.onnx"))

    def run_engine(name, feeds):
        assert name == table.engine_model
        return tuple(session.run(list(table.outputs), feeds))

    return run_engine


def _engines(table: StepTable) -> set[int]:
    return {step.engine for steps in table.steps.values() for step in steps}


@pytest.fixture(scope="module")
def repository(shared_sd3_bundle, tmp_path_factory):
    bundle, manifest = shared_sd3_bundle
    out = tmp_path_factory.mktemp("repository") / "repo"
    settings = TritonSettings(engine_backend="python", pipeline_instances=2, max_steps=MAX_STEPS)
    export_triton(bundle, out, settings)
    return bundle, manifest, out, StepTable.load(out / "sdtm" / "1")


# ------------------------------------------------------------------------------------------ step logic, no server


@pytest.mark.onnx
def test_step_logic_equals_the_bundle_in_diffusers_loop(repository):
    """The pipeline model's loop (numpy, the step table) = OnnxTransformer in diffusers' CFG loop, and each step
    runs the engine the dispatcher picks."""
    bundle, manifest, out, table = repository
    runner = OnnxTransformer(bundle, history=64)
    run_engine = _ort_engines(out, table)
    request = load.make_request(table, seed=5, num_steps=28, guidance_scale=4.5)
    want = load.reference_output(runner, table, request)
    graphs = {entry["key"]: entry["graph"] for entry in manifest["engines"]}
    picked = [graphs[str(record.key)] for record in runner.dispatcher.history]
    called = []
    got = denoise(
        table,
        np.load(out / "sdtm" / "1" / "initial_state.npy"),
        request.arrays,
        lambda name, feeds: (called.append(int(feeds["engine"][0])), run_engine(name, feeds))[1],
        num_steps=28,
        guidance_scale=4.5,
    )
    assert called == picked
    assert len(set(called)) == 3  # structure@0.6, detail@0.6 and detail@0.3 all ran
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # the sampler inputs as make_generation_inputs lays them out: the unconditional rows are zeros
    assert not request.arrays["encoder_hidden_states"][:1].any()
    assert request.arrays["encoder_hidden_states"][1:].any()


def _stand_in(name, feeds):
    """A deterministic stand-in transformer (a function of latent, timestep and prompt): the sampling loop without
    ONNX."""
    hidden, t = feeds["hidden_states"], feeds["timestep"]
    text = feeds["encoder_hidden_states"].reshape(hidden.shape[0], -1).mean(1)
    shape = (-1,) + (1,) * (hidden.ndim - 1)
    return (np.sin(hidden) * (t.reshape(shape) / 1000 + 0.1) + text.reshape(shape)).astype(np.float32), feeds["li"]


@pytest.mark.unit
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_step_table_follows_the_diffusers_scheduler(family):
    """Table timesteps and Euler steps = what diffusers' scheduler loop feeds and takes (SD3 with CFG, FLUX.1-dev
    with its guidance): the same final latent with a stand-in transformer, for several step counts."""
    from sdtm_compile.core.schedule import resolve_for_model
    from sdtm_compile.methods.sdtm.config import SDTMConfig
    from sdtm_compile.models.sampling import FluxGenerationInputs

    if family == "sd3":
        spec, batch = TINY_SD3, 2
        text = [2, spec.text_tokens, spec.joint_attention_dim]
        shapes = {"hidden_states": [2, spec.in_channels, 16, 16], "timestep": [2], "encoder_hidden_states": text}
    else:
        spec, batch = TINY_FLUX, 1
        shapes = {name: list(value.shape) for name, value in flux_example_inputs(spec, 1, (16, 16)).items()}
    config = resolve_for_model(SDTMConfig(ratio=0.5, buckets=(0.5,)), family, 64)
    manifest = {
        "transformer_class": "FluxTransformer2DModel" if family == "flux" else "SD3Transformer2DModel",
        "config": config.to_dict(),
        "grid": [8, 8],
        "inputs": [{"name": n, "shape": s, "dtype": "float32"} for n, s in shapes.items()],
        "outputs": [{"name": "sample", "shape": shapes["hidden_states"], "dtype": "float32"}],
        "state": [{"name": "li", "output": "li_out", "shape": [batch, 64], "dtype": "int32"}],
        "engines": [{"key": k, "graph": number} for number, k in enumerate(KEYS)],
        "engine_input": "engine",
    }
    table = StepTable.from_dict(step_table(manifest, TritonSettings(max_steps=12)))
    assert table.cfg is (family == "sd3")
    assert table.guidance is (family == "flux")
    for steps in (1, 5, 12):
        seen = []

        def transformer(**kwargs):  # diffusers' loop calls the same stand-in
            feeds = {k: v.numpy() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            seen.append(float(feeds["timestep"][0]))
            return (torch.from_numpy(_stand_in("", {**feeds, "li": None})[0]),)

        request = load.make_request(table, seed=steps, num_steps=steps).arrays
        arrays = {k: torch.from_numpy(v) for k, v in request.items()}
        if family == "sd3":
            half = arrays["encoder_hidden_states"].chunk(2)
            gen = GenerationInputs(arrays["latents"], half[1], torch.zeros(1, 1), half[0], torch.zeros(1, 1))
            call = lambda h, e, p, t: transformer(hidden_states=h, encoder_hidden_states=e, timestep=t)[0]  # noqa: E731
            want = generate(call, gen, num_steps=steps, guidance_scale=4.5).numpy()
        else:
            names = ("latents", "encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids")
            want = flux_generate(transformer, FluxGenerationInputs(*(arrays[k] for k in names), 3.5), steps).numpy()
        state = np.zeros((batch, 64), np.int32)
        got = denoise(table, state, request, _stand_in, num_steps=steps, guidance_scale=4.5)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        assert [float(s.timestep) for s in table.schedule(steps)] == seen


@pytest.mark.onnx
def test_request_values_are_checked_before_any_engine_runs(repository):
    _, _, _, table = repository
    request = load.make_request(table, seed=0, num_steps=4).arrays

    def never(name, feeds):
        raise AssertionError("no engine may run for a refused request")

    state = np.zeros((2, 256), np.int32)
    with pytest.raises(RequestError, match=r"num_inference_steps=41 is outside 1\.\.40.*--max-steps"):
        denoise(table, state, request, never, num_steps=41)
    with pytest.raises(RequestError, match="NaN or infinity"):
        denoise(table, state, {**request, "latents": request["latents"] * np.nan}, never, num_steps=4)
    with pytest.raises(RequestError, match="finite"):
        denoise(table, state, request, never, num_steps=4, guidance_scale=float("inf"))


# ------------------------------------------------------------------------------------------------ the repository


@pytest.mark.onnx
def test_repository_configs_carry_the_static_shapes(repository, tmp_path):
    bundle, manifest, out, table = repository
    configs = {}
    for path in sorted(out.glob("*/config.pbtxt")):
        configs[path.parent.name] = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    assert set(configs) == {"sdtm", "sdtm_engines"}  # one engine model serves every engine of the bundle
    assert table.engine_model == "sdtm_engines"
    assert len(_engines(table)) == 3 and _engines(table) <= {e["graph"] for e in manifest["engines"]}
    assert list(table.engines) == [e["key"] for e in manifest["engines"]]
    pipeline = configs.pop("sdtm")
    assert pipeline.backend == "python"
    assert pipeline.max_batch_size == 0
    assert [(g.count, g.kind) for g in pipeline.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    shapes = {i.name: (list(i.dims), i.optional) for i in pipeline.input}
    assert shapes == {
        "latents": ([1, 4, 32, 32], False),
        "encoder_hidden_states": ([2, TINY_SD3.text_tokens, TINY_SD3.joint_attention_dim], False),
        "pooled_projections": ([2, TINY_SD3.pooled_projection_dim], False),
        "num_inference_steps": ([1], True),
        "guidance_scale": ([1], True),
    }
    want_inputs = {s["name"]: s["shape"] for s in manifest["inputs"]} | {"li": manifest["state"][0]["shape"]}
    engine = configs["sdtm_engines"]
    assert engine.backend == "python"
    for name in ("model.onnx", "weights.bin"):  # the bundle's files: the weights once
        assert (out / "sdtm_engines" / "1" / name).read_bytes() == (bundle / name).read_bytes()
    assert {i.name: list(i.dims) for i in engine.input} == want_inputs | {"engine": [1]}
    assert [o.name for o in engine.output] == ["sample", "li_out"]
    types = {i.name: i.data_type for i in engine.input}
    assert (types["li"], types["engine"]) == (model_config_pb2.TYPE_INT32, model_config_pb2.TYPE_INT64)
    # the stock layout: Triton's ONNX Runtime backend, on GPUs through its TensorRT provider
    stock = export_triton(
        bundle, tmp_path / "stock", TritonSettings(kind="gpu", tensorrt=True, engine_instances=2, max_steps=4)
    )
    config = text_format.Parse((stock / "sdtm_engines" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "onnxruntime"
    assert not (stock / "sdtm_engines" / "1" / "model.py").exists()
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP16"
    # a prebuilt TensorRT plan of model.onnx (layout only: no plan can be built here; these bytes are never loaded)
    plans = tmp_path / "plans"
    plans.mkdir()
    settings = TritonSettings(kind="gpu", tensorrt_plans=str(plans), max_steps=4)
    with pytest.raises(RepositoryError, match=r"tensorrt_plans: no .*model\.plan; build it from the bundle's model"):
        export_triton(bundle, tmp_path / "planned", settings)
    (plans / "model.plan").write_bytes(b"plan of model.onnx")
    planned = export_triton(bundle, tmp_path / "planned", settings)
    config = text_format.Parse((planned / "sdtm_engines" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "tensorrt"
    assert (planned / "sdtm_engines" / "1" / "model.plan").read_bytes() == b"plan of model.onnx"
    assert not list(planned.glob("*/1/model.onnx"))
    assert not list(planned.glob("*/1/weights.bin"))


@pytest.mark.onnx
def test_repository_checks_and_bad_settings(repository, tmp_path):
    bundle, _, out, _ = repository
    checked = verify_repository(out)
    assert "sdtm_engines/1/model.onnx" in checked["files"]
    assert "sdtm/config.pbtxt" in checked["files"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    table_file = copy / "sdtm" / "1" / "step_table.json"
    saved = table_file.read_text()
    table_file.write_text("{}")
    with pytest.raises(RepositoryError, match=r"sdtm/1/step_table.json: sha256 .* \(file corrupt or tampered\)"):
        verify_repository(copy)
    table_file.write_text(saved)
    (copy / "sdtm_engines" / "1" / "weights.bin").unlink()
    with pytest.raises(RepositoryError, match=r"sdtm_engines/1/weights.bin: listed in .* but missing"):
        verify_repository(copy)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(RepositoryError, match="not a repository written by export_triton"):
        export_triton(bundle, occupied)
    assert (occupied / "notes.txt").exists()
    with pytest.raises(ValueError, match="tensorrt needs kind='gpu'.*pipeline_instances must be >= 1"):
        TritonSettings(tensorrt=True, pipeline_instances=0)
    with pytest.raises(ValueError, match="Python engine runner is CPU only"):
        TritonSettings(engine_backend="python", kind="gpu")


# --------------------------------------------------------------------------------------------- a real tritonserver


@pytest.fixture(scope="module")
def fused(repository, tmp_path_factory):
    """A second pipeline, ``sdtm_fusion``: the shared bundle's model and schedule with cache fusion, written beside
    ``sdtm`` in a copy of the repository (one server, two pipelines): ``(bundle, repository, table)``."""
    from sdtm_compile.deploy.onnx import export_onnx
    from sdtm_compile.models import example_inputs, tiny_sd3_transformer
    from tests.conftest import SHARED_BUNDLE_CONFIG

    root = tmp_path_factory.mktemp("fused")
    bundle = root / "bundle"
    config = dataclasses.replace(SHARED_BUNDLE_CONFIG, cache_fusion=True)
    export_onnx(tiny_sd3_transformer(TINY_SD3, seed=0), example_inputs(TINY_SD3, 2, (32, 32)), config, bundle)
    settings = TritonSettings(name="sdtm_fusion", engine_backend="python", pipeline_instances=2, max_steps=MAX_STEPS)
    export_triton(bundle, root / "alone", settings)
    combined = root / "repo"
    shutil.copytree(repository[2], combined)
    for model in (root / "alone").iterdir():
        shutil.copytree(model, combined / model.name)
    return bundle, combined, StepTable.load(combined / "sdtm_fusion" / "1")


@pytest.fixture(scope="module")
def exact(fused, shared_exact_bundle, tmp_path_factory):
    """A third pipeline, ``sdtm_exact``: the tiny SD3 model with ``counts="exact"`` (one engine per stage, each
    step's counts fed as count inputs), written into the same repository as ``fused``: ``(bundle, table)``."""
    bundle, _ = shared_exact_bundle
    alone = tmp_path_factory.mktemp("exact") / "alone"
    settings = TritonSettings(name="sdtm_exact", engine_backend="python", pipeline_instances=2, max_steps=MAX_STEPS)
    export_triton(bundle, alone, settings)
    for model in alone.iterdir():
        shutil.copytree(model, fused[1] / model.name)
    return bundle, StepTable.load(fused[1] / "sdtm_exact" / "1")


@pytest.fixture(scope="module")
def server(fused, exact):
    try:
        server = TritonServer(fused[1])
    except ServerUnavailable as err:
        pytest.skip(f"no tritonserver can run here: {err}")
    with server:
        yield server
        server.kill()  # graceful shutdown (~4 s: the stubs unload) is exercised by the serve command's test


@pytest.fixture(scope="module")
def mix(repository):
    """Four requests (two seeds x 4 / 6 steps, CFG 7 and 4.5) and their references from the bundle."""
    bundle, _, _, table = repository
    runner = OnnxTransformer(bundle)
    requests = [load.make_request(table, seed, steps, 7.0 - seed * 2.5) for steps in (4, 6) for seed in (0, 1)]
    return requests, [load.reference_output(runner, table, r) for r in requests]


def _ok(server, mix, protocol="grpc"):
    requests, references = mix
    output = load.infer(protocol, load.client(protocol, getattr(server, f"{protocol}_url")), "sdtm", requests[0].arrays)
    np.testing.assert_allclose(output, references[0], rtol=0, atol=1e-5)


@pytest.mark.serving
def test_concurrent_clients_each_get_their_own_generation(server, mix):
    """4 concurrent clients over gRPC and over HTTP, interleaved seeds and step counts: every response equals its
    own reference (no li or latent crosses between requests), none lost."""
    requests, references = mix
    for protocol in ("grpc", "http"):
        url = server.grpc_url if protocol == "grpc" else server.http_url
        result = load.run_load(protocol, url, "sdtm", requests, references, concurrency=4, total=12)
        assert result.ok, result.errors + result.mismatches
        assert result.completed == result.requests == 12
        assert result.max_abs_error <= 1e-5
    # the references differ from each other: a response swapped between requests would have failed
    assert min(float(np.abs(a - b).max()) for i, a in enumerate(references) for b in references[i + 1 :]) > 0.1


@pytest.mark.serving
def test_a_cache_fusion_pipeline_beside_a_plain_one_keeps_each_requests_cache_apart(server, fused, mix):
    """Both pipelines of one server under concurrent clients at once, each cycling through seeds, step counts (4, 6:
    merged steps read the cache of steps 0 and 3) and guidance scales: every fused response equals its own bundle's
    output in diffusers' loop, so no request read another's cache; the plain pipeline's stay right beside them."""
    bundle, _, table = fused
    runner = OnnxTransformer(bundle)
    requests = [load.make_request(table, seed, steps, 7.0 - seed * 2.5) for steps in (4, 6) for seed in (0, 1)]
    references = [load.reference_output(runner, table, r) for r in requests]
    assert [step.protected for step in table.schedule(6)] == [True, False, False, True, False, False]
    results = {}

    def run(model, mix_requests, mix_references):
        results[model] = load.run_load("grpc", server.grpc_url, model, mix_requests, mix_references, 3, 12)

    threads = [
        threading.Thread(target=run, args=("sdtm_fusion", requests, references)),
        threading.Thread(target=run, args=("sdtm", *mix)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results.values():
        assert result.ok, result.errors + result.mismatches
        assert result.completed == 12 and result.max_abs_error <= 1e-5
    # fusion moves the output: a response served by the wrong pipeline would have failed
    assert min(float(np.abs(a - b).max()) for a, b in zip(references, mix[1])) > 1e-3


@pytest.mark.serving
def test_an_exact_counts_pipeline_feeds_each_step_its_own_counts(server, exact, mix):
    """The exact-counts pipeline beside the bucketed one, concurrent clients on both: its responses equal its
    bundle's output in diffusers' loop at 4 and 6 steps, where the steps' merged counts differ (one engine per
    stage, so only the counts the step table feeds tell the steps apart)."""
    bundle, table = exact
    assert table.count_inputs == ("count_0",)
    for steps in (4, 6):
        counts = [step.counts for step in table.schedule(steps)]
        assert len(set(counts)) >= 3, counts  # both stages, and the counts move within a stage
    runner = OnnxTransformer(bundle)
    requests = [load.make_request(table, seed, steps, 7.0) for seed, steps in ((0, 4), (1, 6))]
    references = [load.reference_output(runner, table, r) for r in requests]
    outcome: dict[str, load.LoadResult] = {}

    def plain() -> None:
        outcome["sdtm"] = load.run_load("grpc", server.grpc_url, "sdtm", *mix, concurrency=2, total=4)

    beside = threading.Thread(target=plain)
    beside.start()
    result = load.run_load("grpc", server.grpc_url, "sdtm_exact", requests, references, concurrency=2, total=4)
    beside.join()
    for got in (result, outcome["sdtm"]):
        assert got.ok, got.errors + got.mismatches
        assert got.completed == 4 and got.max_abs_error <= 1e-5


@pytest.mark.serving
def test_two_replicas_of_one_repository_serve_any_request(server, repository, mix):
    """A second server on the same repository, requests spread round-robin (what a load balancer does): a
    generation's result does not depend on the replica (no state outside the request)."""
    requests, references = mix
    with TritonServer(repository[2]) as second:
        urls = [server.grpc_url, second.grpc_url]
        result = load.run_load("grpc", urls, "sdtm", requests, references, concurrency=2, total=8)
        second.kill()
    assert result.ok, result.errors + result.mismatches
    assert result.replicas == 2, result.errors + result.mismatches


@pytest.mark.serving
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, mix, protocol):
    requests, _ = mix
    good = requests[0].arrays
    connection = load.client(protocol, getattr(server, f"{protocol}_url"))
    cases = {
        "wrong shape": (
            {**good, "latents": good["latents"][..., :16]},
            r"unexpected shape for input 'latents'.*Expected \[1,4,32,32\], got \[1,4,32,16\]",
        ),
        "wrong dtype": ({**good, "latents": good["latents"].astype(np.float64)}, r"latents.*FP64.*FP32|FP32.*FP64"),
        "missing input": (
            {k: v for k, v in good.items() if k != "pooled_projections"},
            r"input 'pooled_projections' is missing: send latents \[1, 4, 32, 32\], pooled_projections \[2, 32\]",
        ),
        "too many steps": (
            {**good, "num_inference_steps": np.array([MAX_STEPS + 1], np.int32)},
            r"num_inference_steps=41 is outside 1\.\.40",
        ),
        "NaN noise": ({**good, "latents": np.full_like(good["latents"], np.nan)}, "NaN or infinity"),
    }
    for arrays, message in cases.values():
        with pytest.raises(InferenceServerException, match=message):
            load.infer(protocol, connection, "sdtm", arrays)
        _ok(server, mix, protocol)  # and the next good request is served, correctly


@pytest.mark.serving
def test_a_client_that_disconnects_does_not_wedge_the_server(server, mix):
    requests, references = mix
    long = {**requests[1].arrays, "num_inference_steps": np.array([MAX_STEPS], np.int32)}  # ~0.4 s here
    # gRPC: the deadline passes mid-generation; Triton cancels the request and the pipeline stops at its next step
    with pytest.raises(InferenceServerException, match="Deadline Exceeded"):
        load.infer("grpc", load.client("grpc", server.grpc_url), "sdtm", long, client_timeout=0.05)
    # HTTP: the client closes its connection mid-generation (the server finishes that request and drops it)
    http = load.client("http", server.http_url, network_timeout=0.05, connection_timeout=5.0)
    with pytest.raises(Exception, match="(?i)timed? ?out"):
        load.infer("http", http, "sdtm", long)
    result = load.run_load("grpc", server.grpc_url, "sdtm", requests, references, concurrency=2, total=4)
    assert result.ok, result.errors + result.mismatches
    deadline = time.time() + 20
    while "cancelled by the client after" not in server.log() and time.time() < deadline:
        time.sleep(0.2)
    assert f"of {MAX_STEPS} steps" in server.log()  # the cancelled generation stopped early


@pytest.mark.serving
def test_a_killed_server_restarts_and_serves(repository, mix):
    _, _, out, _ = repository
    requests, references = mix
    server = TritonServer(out)
    with server:
        failures = []
        long = {**requests[1].arrays, "num_inference_steps": np.array([MAX_STEPS], np.int32)}

        def in_flight():
            try:
                load.infer("grpc", load.client("grpc", server.grpc_url), "sdtm", long)
            except InferenceServerException as err:
                failures.append(str(err))

        thread = threading.Thread(target=in_flight)
        thread.start()
        time.sleep(0.05)  # a 40-step generation takes ~0.4 s here
        server.kill()  # a crash mid-generation: the client gets an error, not a hang
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert failures
        server.start()
        result = load.run_load("http", server.http_url, "sdtm", requests, references, concurrency=2, total=4)
        server.kill()
        assert result.ok, result.errors + result.mismatches


@pytest.mark.serving
def test_a_tampered_repository_is_refused_at_load_naming_the_file(repository, tmp_path):
    """One byte of an engine flipped: the server does not start, and says which file (a missing file is refused the
    same way: test_repository_checks_and_bad_settings, offline)."""
    _, _, out, _ = repository
    copy = tmp_path / "repo"
    shutil.copytree(out, copy)
    path = copy / "sdtm_engines" / "1" / "weights.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    try:
        server = TritonServer(copy)
    except ServerUnavailable as err:
        pytest.skip(f"no tritonserver can run here: {err}")
    with pytest.raises(ServerStartError, match="failed to load") as failure:
        server.start(timeout=60)
    server.close()
    assert str(path) in str(failure.value)


@pytest.mark.serving
def test_serve_command_checks_a_bundle_over_both_protocols(repository, tmp_path, capsys):
    """``sdtm-compile serve --check``: repository, server, one request per protocol against the reference."""
    from sdtm_compile.cli import main
    from sdtm_compile.deploy.triton import find_tritonserver

    try:
        find_tritonserver(tmp_path / "probe")
    except ServerUnavailable as err:
        pytest.skip(f"no tritonserver can run here: {err}")
    bundle, _, _, _ = repository
    command = ["serve", "--check", "--bundle", str(bundle), "--work", str(tmp_path), "--max-steps", "8"]
    assert main([*command, "--pipeline-instances", "1"]) == 0  # one instance: a graceful stop in ~1.5 s
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["http", "grpc"]
    assert all(line.endswith("max |diff| vs reference 0") for line in lines), lines
