"""A Triton Inference Server model repository from an exported bundle (:func:`export_triton`).

The repository holds one engine model, the bundle's ``model.onnx`` with every engine and the weights once (served by
Triton's ONNX Runtime backend, or by our Python runner of the same file where a server has only the Python backend),
and one Python (BLS) model, the pipeline, that runs the sampling loop: for each step it calls the engine model with
the step's engine index, the latent, the timestep, the prompt inputs and the ``li`` state, combines CFG and takes
the Euler step (``step_logic.py``). A client sends noise and prompt embeddings and gets the denoised latent::

    repository/
      sdtm/                    the pipeline (Python backend)
        config.pbtxt
        1/model.py             pipeline_model.py of this package
        1/step_logic.py        the sampling loop, numpy only
        1/dlpack_io.py         tensors in and out of the stub
        1/step_table.json      every step count's engines, timesteps and Euler steps
        1/initial_state.npy    li at the start of a generation
        1/repository_manifest.json   sha256 of every other file of the repository, checked when the model loads
      sdtm_engines/            every engine (ONNX Runtime backend), one copy of the weights per instance
        config.pbtxt
        1/model.onnx
        1/weights.bin

Shapes are static (the bundle's): Triton rejects a request of another shape before it reaches our code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...core.config import config_from_dict
from ...core.method import method_for
from ...engines import sha256_file
from ...models.sampling import pipeline_timesteps
from ...runtime import StageDispatcher
from ..bundle import BundleError, read_bundle, signature_from_manifest, step_counts
from . import step_logic
from .step_logic import INITIAL_STATE, STEP_TABLE, TABLE_VERSION

__all__ = ["TritonSettings", "export_triton", "REPOSITORY_MANIFEST", "RepositoryError", "verify_repository"]

logger = logging.getLogger(__name__)

REPOSITORY_MANIFEST = "repository_manifest.json"
_HERE = Path(__file__).parent
_TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8",
}
#: The transformer inputs the pipeline fills itself (every other input is the client's, passed through).
_FILLED = ("hidden_states", "timestep", "guidance")


class RepositoryError(ValueError):
    """A model repository that must not be served; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TritonSettings:
    """How :func:`export_triton` lays out the repository. Every field is checked on construction.

    Attributes:
        name: the pipeline model's name; engine models are ``<name>_<engine>`` (e.g. ``sdtm_structure_r0_5``).
        engine_backend: ``"onnxruntime"``: the engines are served by Triton's ONNX Runtime backend (stock
            ``tritonserver`` images); ``"python"``: by our Python-backend runner of the same ONNX files with the
            ``onnxruntime`` package, for servers that have only the Python backend (PyTriton's wheel).
        kind: ``"cpu"`` or ``"gpu"``: the ``instance_group`` kind of the engine models (the pipeline model only
            orchestrates and always runs on the CPU).
        tensorrt: GPU engines only: ONNX Runtime runs them through its TensorRT execution provider (Triton's
            ``gpu_execution_accelerator: "tensorrt"``, FP16), which builds and caches TensorRT engines on first
            load. Needs ``kind="gpu"`` and ``engine_backend="onnxruntime"``.
        tensorrt_plans: a folder holding a prebuilt TensorRT plan of the bundle's ``model.onnx``, ``model.plan``
            (e.g. ``trtexec --onnx=bundle/model.onnx --saveEngine=plans/model.plan --fp16`` on the GPU that will
            serve it: every engine in one TensorRT engine, its ``If`` branches reading one copy of the weights): the
            engine model is then a ``tensorrt_plan`` model served by Triton's TensorRT backend. Needs
            ``kind="gpu"``. Plans are tied to the GPU and TensorRT version that built them.
        pipeline_instances: concurrent generations per server (instances of the pipeline model).
        engine_instances: instances of the engine model (concurrent transformer calls; each instance holds one
            copy of the weights).
        engine_threads: intra-op threads of each engine instance (0: ONNX Runtime's default, all cores).
        max_steps: the largest ``num_inference_steps`` a request may ask for (the step table covers 1..max_steps).
        default_steps: ``num_inference_steps`` when a request leaves it out (``None``: SD3 28, Flux 20).
        guidance_scale: the CFG scale when a request leaves it out (CFG pipelines).
        guidance: FLUX.1-dev's distilled guidance when a request leaves it out.
        cfg: whether the transformer batch is ``[uncond; cond]`` of the client's latent (``None``: SD3 bundles
            of even batch, as diffusers' SD3 pipelines run CFG; Flux never).
    """

    name: str = "sdtm"
    engine_backend: str = "onnxruntime"
    kind: str = "cpu"
    tensorrt: bool = False
    tensorrt_plans: str | None = None
    pipeline_instances: int = 4
    engine_instances: int = 1
    engine_threads: int = 0
    max_steps: int = 64
    default_steps: int | None = None
    guidance_scale: float = 7.0
    guidance: float = 3.5
    cfg: bool | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.name.replace("_", "").replace("-", "").isalnum():
            problems.append(f"name {self.name!r} must be letters, digits, '_' or '-'")
        if self.engine_backend not in ("onnxruntime", "python"):
            problems.append(f"engine_backend {self.engine_backend!r} must be 'onnxruntime' or 'python'")
        if self.kind not in ("cpu", "gpu"):
            problems.append(f"kind {self.kind!r} must be 'cpu' or 'gpu'")
        if self.tensorrt and (self.kind != "gpu" or self.engine_backend != "onnxruntime"):
            problems.append("tensorrt needs kind='gpu' and engine_backend='onnxruntime'")
        if self.tensorrt_plans is not None and (self.kind != "gpu" or self.engine_backend != "onnxruntime"):
            problems.append("tensorrt_plans need kind='gpu' and engine_backend='onnxruntime' (the stock layout)")
        if self.tensorrt_plans is not None and self.tensorrt:
            problems.append("give tensorrt (ONNX Runtime's TensorRT provider) or tensorrt_plans, not both")
        if self.engine_backend == "python" and self.kind != "cpu":
            problems.append("the Python engine runner is CPU only: use engine_backend='onnxruntime' on GPUs")
        for field in ("pipeline_instances", "engine_instances", "max_steps"):
            if getattr(self, field) < 1:
                problems.append(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.engine_threads < 0:
            problems.append(f"engine_threads must be >= 0, got {self.engine_threads}")
        if self.default_steps is not None and not 1 <= self.default_steps <= self.max_steps:
            problems.append(f"default_steps {self.default_steps} must be within 1..max_steps ({self.max_steps})")
        if problems:
            raise ValueError("invalid TritonSettings: " + "; ".join(problems))


def _engine_model_name(settings: TritonSettings) -> str:
    """The one engine model's name: ``<name>_engines``."""
    return f"{settings.name}_engines"


def _tensor_config(name: str, dtype: str, shape: list[int], optional: bool = False) -> str:
    if dtype not in _TRITON_TYPES:
        raise BundleError(f"tensor {name!r} has dtype {dtype}, which the repository exporter does not map")
    extra = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {_TRITON_TYPES[dtype]} dims: [ {", ".join(map(str, shape))} ]{extra} }}'


def _model_config(
    name: str,
    backend: str,
    inputs: list[str],
    outputs: list[str],
    instances: int,
    kind: str,
    parameters: dict[str, str],
    extra: str = "",
) -> str:
    """A ``config.pbtxt``: static shapes (``max_batch_size: 0``: the bundle's batch is part of every shape)."""
    lines = [
        f'name: "{name}"',
        f'backend: "{backend}"',
        "max_batch_size: 0",
        "input [\n" + ",\n".join(inputs) + "\n]",
        "output [\n" + ",\n".join(outputs) + "\n]",
        f"instance_group [ {{ count: {instances} kind: KIND_{kind.upper()} }} ]",
    ]
    lines += [f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in parameters.items()]
    return "\n".join(lines) + "\n" + extra


def _family(manifest: dict[str, Any]) -> str:
    return "flux" if manifest["transformer_class"].startswith("Flux") else "sd3"


def step_table(manifest: dict[str, Any], settings: TritonSettings) -> dict[str, Any]:
    """``step_table.json``: for every step count up to ``settings.max_steps``, each step's engine index (what
    :class:`StageDispatcher` picks from the step's timestep), the timestep fed to the transformer and the Euler
    step ``sigma_next - sigma`` of the scheduler the diffusers pipeline of the model family uses, each step's counts
    (exact counts) and whether it is protected (cache fusion); the engines' state beyond the method's."""
    config = config_from_dict(manifest["config"])
    dispatcher = StageDispatcher(config)
    family = _family(manifest)
    inputs = {spec["name"]: spec for spec in manifest["inputs"]}
    batch = inputs["hidden_states"]["shape"][0]
    cfg = settings.cfg if settings.cfg is not None else (family == "sd3" and batch % 2 == 0)
    if cfg and batch % 2:
        raise RepositoryError(f"cfg=True needs an even transformer batch (uncond + cond); the bundle's is {batch}")
    latent_shape = [batch // 2 if cfg else batch, *inputs["hidden_states"]["shape"][1:]]
    graphs = {entry["key"]: int(entry["graph"]) for entry in manifest["engines"]}
    names = {graph: key for key, graph in reversed(graphs.items())}  # a graph's first key names it
    num_tokens = int(np.prod(manifest["grid"]))
    method = method_for(config)
    count_inputs = [spec["name"] for spec in manifest.get("count_inputs", ())]
    steps: dict[str, list[list]] = {}
    for count in range(1, settings.max_steps + 1):
        fed, sigmas = pipeline_timesteps(family, count, num_tokens, config.timestep_shift)
        rows = []
        for i, (t, (key, notes)) in enumerate(zip(fed, dispatcher.plan([float(t) for t in fed]))):
            counts = list(step_counts(manifest, method, key))  # exact counts: the step's own; else empty
            engine = graphs[str(method.engine_of(key))]
            rows.append([engine, float(t), float(sigmas[i + 1] - sigmas[i]), counts, bool(notes.get("protected"))])
        steps[str(count)] = rows
    return {
        "version": TABLE_VERSION,
        "family": family,
        "engine_model": _engine_model_name(settings),
        "engine_input": manifest["engine_input"],
        "engines": [names[graph] for graph in range(len(names))],
        "steps": steps,
        "inputs": {name: spec["shape"] for name, spec in inputs.items() if name not in _FILLED},
        "latent_shape": latent_shape,
        "grid": list(manifest["grid"]),
        "batch": batch,
        "cfg": cfg,
        "guidance": "guidance" in inputs,
        "state": manifest["state"][0]["name"],
        "state_output": manifest["state"][0]["output"],
        "sample": manifest["outputs"][0]["name"],
        "default_steps": settings.default_steps or (20 if family == "flux" else 28),
        "default_guidance_scale": settings.guidance_scale,
        "default_guidance": settings.guidance,
        "count_inputs": count_inputs,
        "tokens": num_tokens,
        "extra_state": [
            {"name": e["name"], "output": e["output"], "shape": e["shape"], "dtype": e["dtype"]}
            for e in manifest["state"][1:]
        ],
    }


def _plan(settings: TritonSettings) -> Path | None:
    """The prebuilt TensorRT plan of ``model.onnx`` when ``settings.tensorrt_plans`` is given (it must exist)."""
    if settings.tensorrt_plans is None:
        return None
    plan = Path(settings.tensorrt_plans) / "model.plan"
    if not plan.is_file():
        raise RepositoryError(
            f"tensorrt_plans: no {plan}; build it from the bundle's model.onnx (every engine in one plan): "
            f"trtexec --onnx=<bundle>/model.onnx --saveEngine={plan} --fp16"
        )
    return plan


def initial_state(manifest: dict[str, Any]) -> np.ndarray:
    """The method's state at the start of every generation (SDTM: ``li`` zeros; ToMeSD / SiTo: seeded), from the
    engine contract the bundle records."""
    state = manifest["state"][0]
    signature = signature_from_manifest(manifest, method_for(config_from_dict(manifest["config"])))
    return signature[state["name"]].fresh("cpu").numpy().astype(state["dtype"])


def export_triton(bundle_dir: str | Path, out_dir: str | Path, settings: TritonSettings | None = None) -> Path:
    """Write a Triton model repository serving the bundle in ``bundle_dir`` (from :func:`~sdtm_compile.export_onnx`)
    to ``out_dir``; returns ``out_dir``.

    The bundle is checked first (format, every file's sha256). ``out_dir`` may exist only if it is empty or an
    earlier repository of ours (it is then replaced): nothing else is overwritten. The engine model takes and
    returns every state entry of the bundle (SDTM's ``li``; with cache fusion its cache too).
    """
    settings = settings or TritonSettings()
    bundle_dir, out = Path(bundle_dir), Path(out_dir)
    manifest = read_bundle(bundle_dir)
    if out.exists() and any(out.iterdir()):
        if not list(out.glob(f"*/1/{REPOSITORY_MANIFEST}")):
            raise RepositoryError(
                f"{out}: exists, is not empty and is not a repository written by export_triton; choose a new folder"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    table = step_table(manifest, settings)
    specs = {spec["name"]: spec for spec in manifest["inputs"]}
    sample = manifest["outputs"][0]

    engine_inputs = [_tensor_config(s["name"], s["dtype"], s["shape"]) for s in manifest["inputs"]]
    engine_inputs += [_tensor_config(s["name"], s["dtype"], s["shape"]) for s in manifest["state"]]
    engine_outputs = [_tensor_config(sample["name"], sample["dtype"], sample["shape"])]
    engine_outputs += [_tensor_config(s["output"], s["dtype"], s["shape"]) for s in manifest["state"]]
    engine_inputs.append(_tensor_config(manifest["engine_input"], "int64", [1]))
    # exact counts: each count input's length is the step's N - count, a dynamic dimension
    engine_inputs += [_tensor_config(spec["name"], "uint8", [-1]) for spec in manifest.get("count_inputs", ())]
    plan = _plan(settings)
    name = _engine_model_name(settings)
    version = out / name / "1"
    version.mkdir(parents=True)
    parameters: dict[str, str] = {}
    extra = ""
    if plan is not None:
        shutil.copyfile(plan, version / "model.plan")
        backend = "tensorrt"
    else:
        shutil.copyfile(bundle_dir / manifest["model"], version / "model.onnx")
        weights = manifest["weights"]["file"]  # model.onnx refers to its weights by this name, beside it
        shutil.copyfile(bundle_dir / weights, version / weights)
        if settings.engine_backend == "python":
            shutil.copyfile(_HERE / "engine_model.py", version / "model.py")
            shutil.copyfile(_HERE / "dlpack_io.py", version / "dlpack_io.py")
            parameters["intra_op_threads"] = str(settings.engine_threads)
            backend = "python"
        else:
            backend = "onnxruntime"
            if settings.engine_threads:
                parameters["intra_op_thread_count"] = str(settings.engine_threads)
            if settings.tensorrt:
                extra = (
                    "optimization { execution_accelerators { gpu_execution_accelerator : [ {\n"
                    '  name : "tensorrt"\n'
                    '  parameters { key: "precision_mode" value: "FP16" }\n'
                    '  parameters { key: "trt_engine_cache_enable" value: "1" }\n'
                    "} ] } }\n"
                )
    (out / name / "config.pbtxt").write_text(
        _model_config(
            name,
            backend,
            engine_inputs,
            engine_outputs,
            settings.engine_instances,
            settings.kind,
            parameters,
            extra,
        )
    )

    pipeline_inputs = [_tensor_config("latents", "float32", table["latent_shape"])]
    pipeline_inputs += [_tensor_config(n, specs[n]["dtype"], specs[n]["shape"]) for n in table["inputs"]]
    pipeline_inputs.append(_tensor_config("num_inference_steps", "int32", [1], optional=True))
    if table["cfg"]:
        pipeline_inputs.append(_tensor_config("guidance_scale", "float32", [1], optional=True))
    if table["guidance"]:
        pipeline_inputs.append(_tensor_config("guidance", "float32", [1], optional=True))
    version = out / settings.name / "1"
    version.mkdir(parents=True)
    shutil.copyfile(_HERE / "pipeline_model.py", version / "model.py")
    shutil.copyfile(Path(step_logic.__file__), version / "step_logic.py")
    shutil.copyfile(_HERE / "dlpack_io.py", version / "dlpack_io.py")
    (version / STEP_TABLE).write_text(json.dumps(table))
    np.save(version / INITIAL_STATE, initial_state(manifest))
    (out / settings.name / "config.pbtxt").write_text(
        _model_config(
            settings.name,
            "python",
            pipeline_inputs,
            [_tensor_config("denoised", "float32", table["latent_shape"])],
            settings.pipeline_instances,
            "cpu",
            {"source_bundle_sha256": sha256_file(bundle_dir / "manifest.json")},
        )
    )
    files = {
        path.relative_to(out).as_posix(): sha256_file(path)
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.name != REPOSITORY_MANIFEST and "__pycache__" not in path.parts
    }
    (version / REPOSITORY_MANIFEST).write_text(
        json.dumps({"settings": dataclasses.asdict(settings), "files": files}, indent=1)
    )
    logger.info(
        "wrote a Triton repository to %s: pipeline %r (%d instances) and engine model %r with %d engines (%s)",
        out,
        settings.name,
        settings.pipeline_instances,
        name,
        len(table["engines"]),
        "tensorrt plan" if plan is not None else settings.engine_backend,
    )
    return out


def verify_repository(repository: str | Path, name: str | None = None) -> dict[str, Any]:
    """Check every file a repository's manifest lists against its sha256 (what the pipeline model does when it
    loads); returns the manifest, or raises :class:`RepositoryError` naming the first bad file."""
    repository = Path(repository)
    manifests = sorted(repository.glob(f"{name or '*'}/1/{REPOSITORY_MANIFEST}"))
    if not manifests:
        raise RepositoryError(f"{repository}: no */1/{REPOSITORY_MANIFEST}; write the repository with export_triton")
    try:
        step_logic.verify_files(repository, manifests[0])
    except step_logic.RepositoryFileError as err:
        raise RepositoryError(str(err)) from None
    return json.loads(manifests[0].read_text())
