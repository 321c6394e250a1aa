"""ONNX export of every engine, a manifest, and :class:`OnnxTransformer`, a drop-in for ``pipe.transformer``.

The exported graphs are the backend's own per-bucket graphs (:class:`~sdtm_compile.buckets.BucketGraphs` of
the graph Dynamo traces, whole: ONNX Runtime and TensorRT's ONNX parser want one graph per engine), with the
weights stored in the ONNX files. ``manifest.json`` says which file serves which (stage, bucket), the inputs,
outputs and the ``li`` state tensor, the SDTM config and schedule, and the sha256 of every file.
:class:`OnnxTransformer` runs them with ONNX Runtime through the same
:class:`~sdtm_compile.runtime.StageDispatcher` as the compiled backend.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from .buckets import BucketGraphs
from .cache import sha256_file
from .capture import capture_dynamo_graph
from .config import MethodConfig, SDTMConfig, config_from_dict
from .engine_state import EngineState
from .runtime import StageDispatcher
from .schedule import EngineKey, Stage

__all__ = ["FORMAT_VERSION", "export_onnx", "read_bundle", "OnnxTransformer", "BundleError"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LI_NAME = "li"


class BundleError(ValueError):
    """An exported bundle that cannot be used: the message names the file and what is wrong."""


def _input_name(placeholder: str) -> str:
    """``L_kwargs_hidden_states_`` -> ``hidden_states``."""
    return re.sub(r"^[lL]_(kwargs_)?", "", placeholder).rstrip("_")


class _BucketModule(nn.Module):
    """A rewritten bucket graph with its weights as buffers: ``(model inputs..., li) -> (sample, li)``."""

    def __init__(self, gm: fx.GraphModule, flat: list[torch.Tensor], input_positions: list[int]) -> None:
        super().__init__()
        self.gm = gm
        self.input_positions = input_positions
        self.constant_positions = [i for i in range(len(flat)) if i not in input_positions]
        for number, position in enumerate(self.constant_positions):
            self.register_buffer(f"w{number}", flat[position].detach(), persistent=True)

    def forward(self, *model_inputs_and_li: torch.Tensor):
        args: list[Any] = [None] * (len(self.constant_positions) + len(self.input_positions))
        for number, position in enumerate(self.constant_positions):
            args[position] = getattr(self, f"w{number}")
        for value, position in zip(model_inputs_and_li[:-1], self.input_positions):
            args[position] = value
        return tuple(self.gm(*args, model_inputs_and_li[-1]))


def _spec(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", "")}


@torch.no_grad()
def export_onnx(
    transformer: nn.Module,
    example_inputs: dict[str, torch.Tensor],
    config: MethodConfig,
    out_dir: str | Path,
    *,
    opset: int | None = None,
    external_data: bool | None = None,
) -> dict[str, Any]:
    """Export one ONNX model per engine (full + each (stage, bucket)) and ``manifest.json`` to ``out_dir``.

    Args:
        transformer: a diffusers ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` (eval mode).
        example_inputs: the transformer's keyword inputs with the batch size and resolution to deploy (shapes
            are static, as in the compiled backend): ``hidden_states``, ``encoder_hidden_states``,
            ``pooled_projections``, ``timestep``; for Flux also ``img_ids``, ``txt_ids`` and (FLUX.1-dev)
            ``guidance``. Every tensor input becomes an input of every ONNX graph.
        config: the method's configuration (SDTM's or another method's); its schedule decides which engines are
            exported. The manifest stores it (with its ``method`` name)
            with the model's timestep mapping filled in (``resolve_for_model``).
        out_dir: created if missing; existing files of the same names are overwritten.
        external_data: passed to ``torch.onnx.export``: the weights go to a ``<file>.onnx.data`` file beside
            each graph (needed past ONNX's 2 GB protobuf limit, e.g. SD3.5-large). Default: only when the
            weights exceed 1.5 GB. Every ``.data`` file is listed and checksummed in the manifest, and
            :class:`OnnxTransformer` checks it on load. Tested on a tiny model with the flag forced on, not on a
            model past 2 GB.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).
    """
    if isinstance(config, SDTMConfig) and (config.fuses_cache or config.adaptive):
        raise NotImplementedError(
            "ONNX bundles carry li only: export with cache_fusion=False and adaptive_threshold=None (cache fusion "
            "and SDTM* run in the compiled backend: torch.compile(..., backend='sdtm'))"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gm, flat = capture_dynamo_graph(transformer, example_inputs)
    constants = {id(t) for t in (*transformer.parameters(), *transformer.buffers())}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    input_positions = [i for i, t in enumerate(flat) if id(t) not in constants]
    input_names = [_input_name(placeholders[i].name) for i in input_positions]
    buckets = BucketGraphs(gm, flat, config, include_full=True)
    sites = buckets.sites
    if external_data is None:
        external_data = sum(flat[i].nbytes for i in range(len(flat)) if i not in input_positions) > 1.5 * 2**30

    engines: list[dict[str, Any]] = []
    files: list[str] = []
    started = time.perf_counter()
    groups = buckets.groups()
    for number, keys in enumerate(groups, 1):
        bucket = buckets.distinct_graph(keys)
        file_name = f"{keys[0].slug}.onnx"
        logger.info("exporting %d/%d: %s -> %s ...", number, len(groups), ", ".join(map(str, keys)), file_name)
        start = time.perf_counter()
        module = _BucketModule(bucket.graph.gm, flat, input_positions).eval()
        args = tuple(flat[i] for i in input_positions) + (buckets.new_li(),)
        (out / f"{file_name}.data").unlink(missing_ok=True)  # a stale one from an earlier export
        with _quiet("onnx_ir", "onnxscript", "torch.onnx"):
            torch.onnx.export(
                module,
                args,
                str(out / file_name),
                dynamo=True,
                opset_version=opset,
                input_names=[*input_names, LI_NAME],
                output_names=["sample", f"{LI_NAME}_out"],
                external_data=external_data,
                verbose=False,
            )
        files.append(file_name)
        logger.info("  %s written in %.1f s", file_name, time.perf_counter() - start)
        counts = bucket.counts
        for key in keys:
            engines.append(
                {
                    "key": str(key),
                    "stage": key.stage.value,
                    "bucket": key.bucket,
                    "file": file_name,
                    "tokens": {
                        "image": counts.tokens,
                        "attention": counts.attention,
                        "feed_forward": counts.feed_forward,
                    },
                }
            )
    sample = transformer(**example_inputs, return_dict=False)[0]
    manifest = {
        "format_version": FORMAT_VERSION,
        "producer": {"sdtm_compile": _version(), "torch": torch.__version__},
        "config": buckets.config.to_dict(),
        "transformer_class": type(transformer).__name__,
        "transformer_config": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
        "grid": list(sites.grid),
        "inputs": [_spec(name, flat[i]) for name, i in zip(input_names, input_positions)],
        "outputs": [_spec("sample", sample)],
        "state": [
            {
                **_spec(LI_NAME, buckets.new_li()),
                "output": f"{LI_NAME}_out",
                "reset": "zeros at the start of every generation (a timestep above the previous one)",
            }
        ],
        "engines": engines,
        "external_data": bool(external_data),
        "files": {
            path.name: sha256_file(path)
            for name in sorted(files)
            for path in (out / name, out / f"{name}.data")
            if path.exists()
        },
    }
    text = json.dumps(manifest, indent=1, default=str)
    (out / MANIFEST).write_text(text)
    manifest = json.loads(text)  # what a reader of the file sees (tuples become lists)
    logger.info(
        "exported %d engines (%d files) to %s in %.1f s",
        len(engines),
        len(manifest["files"]),
        out,
        time.perf_counter() - started,
    )
    return manifest


@contextlib.contextmanager
def _quiet(*names: str):
    """The ONNX exporter's own INFO chatter (per-initializer logs) drowns our progress lines: raise its level."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _version() -> str:
    from . import __version__

    return __version__


def read_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """The manifest of an exported bundle, after checking its format version and that every file it lists exists
    and matches its sha256 (a :class:`BundleError` naming the file otherwise)."""
    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"{manifest_path}: no manifest; export a bundle with sdtm_compile.export_onnx")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{manifest_path}: not valid JSON ({err})") from err
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format_version {version!r} is not supported (this sdtm-compile reads "
            f"{FORMAT_VERSION}); re-export the bundle with this version"
        )
    for name, digest in manifest["files"].items():
        path = bundle_dir / name
        if not path.exists():
            raise BundleError(f"{path}: listed in the manifest but missing from the bundle")
        actual = sha256_file(path)
        if actual != digest:
            raise BundleError(
                f"{path}: sha256 {actual[:16]}... does not match the manifest's {digest[:16]}... "
                "(file corrupt or replaced); re-export the bundle"
            )
    return manifest


class _Config(dict):
    """The diffusers transformer config, readable as ``config.x`` and ``config["x"]`` (like ``FrozenDict``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class OnnxTransformer(nn.Module):
    """An ONNX Runtime replacement for ``pipe.transformer`` (``SD3Transformer2DModel`` or
    ``FluxTransformer2DModel``) from an exported bundle.

    Same keyword inputs and return type as the diffusers transformer; the engine of each call is picked by the
    same :class:`StageDispatcher` as the compiled backend. Loading checks the manifest's format version, that
    every file exists and matches its sha256; calls check the input shapes against the manifest (and, for Flux,
    that ``img_ids`` lay out the exported token grid). ``skip_layers``, ControlNet residuals and
    ``joint_attention_kwargs`` are not supported (a clear error).
    ``history``: how many recent calls ``dispatcher.history`` keeps outside a ``generation`` context (0: none).
    """

    def __init__(self, bundle_dir: str | Path, providers: list[str] | None = None, history: int = 0) -> None:
        super().__init__()
        import onnxruntime as ort

        self.bundle_dir = Path(bundle_dir)
        manifest = read_bundle(self.bundle_dir)
        manifest_path = self.bundle_dir / MANIFEST
        self.manifest = manifest
        try:
            self.sdtm_config = config_from_dict(manifest["config"])
        except ValueError as err:
            raise BundleError(f"{manifest_path}: invalid method config ({err}); re-export the bundle") from err
        self.config = _Config(manifest["transformer_config"])
        self.inputs = manifest["inputs"]
        self.state = manifest["state"][0]
        chosen = providers or ["CPUExecutionProvider"]
        self.sessions = {
            name: ort.InferenceSession(str(self.bundle_dir / name), providers=chosen)
            for name in manifest["files"]
            if name.endswith(".onnx")
        }
        self.files = {self._key(e): e["file"] for e in manifest["engines"]}
        self.dispatcher = StageDispatcher(self.sdtm_config, history=history)

    @staticmethod
    def _key(entry: dict[str, Any]) -> EngineKey:
        return EngineKey(Stage(entry["stage"]), float(entry["bucket"]))

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["outputs"][0]["dtype"])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def reset(self) -> None:
        """Forget the generation state explicitly."""
        self.dispatcher.reset()

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        block_controlnet_hidden_states: list | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
        controlnet_block_samples: list | None = None,
        controlnet_single_block_samples: list | None = None,
    ):
        controlnet = (block_controlnet_hidden_states, controlnet_block_samples, controlnet_single_block_samples)
        if any(c is not None for c in controlnet) or skip_layers or joint_attention_kwargs:
            raise ValueError(
                "OnnxTransformer runs the exported graphs only: ControlNet residuals, skip_layers and "
                "joint_attention_kwargs are not supported"
            )
        given = {
            "hidden_states": hidden_states,
            "encoder_hidden_states": encoder_hidden_states,
            "pooled_projections": pooled_projections,
            "timestep": timestep,
            "img_ids": img_ids,
            "txt_ids": txt_ids,
            "guidance": guidance,
        }
        if img_ids is not None:
            from .passes import UnsupportedModelError, image_grid

            try:
                grid = list(image_grid(img_ids.detach().cpu(), hidden_states.shape[1]))
            except UnsupportedModelError as err:
                raise BundleError(f"{self.bundle_dir / MANIFEST}: {err}") from err
            if grid != self.manifest["grid"]:
                raise BundleError(
                    f"{self.bundle_dir / MANIFEST}: img_ids lay out a {grid[0]}x{grid[1]} token grid, the bundle was "
                    f"exported for {self.manifest['grid'][0]}x{self.manifest['grid'][1]}; export a bundle for this size"
                )
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            value = given.get(spec["name"])
            if value is None:
                raise ValueError(f"OnnxTransformer needs the input {spec['name']!r}")
            if isinstance(value, (int, float)) or value.dim() == 0:
                value = torch.as_tensor(value).reshape(1).expand(spec["shape"][0])
            if list(value.shape) != spec["shape"]:
                raise BundleError(
                    f"{self.bundle_dir / MANIFEST}: input {spec['name']!r} has shape {list(value.shape)}, but the "
                    f"bundle was exported for {spec['shape']}; export a bundle for this batch size/resolution"
                )
            feeds[spec["name"]] = value.detach().cpu().to(getattr(torch, spec["dtype"])).numpy()

        def call(key: EngineKey, state: EngineState):
            file_name = self.files.get(key)
            if file_name is None:
                raise BundleError(f"{self.bundle_dir / MANIFEST}: no engine for {key}")
            sample, li_out = self.sessions[file_name].run(None, {**feeds, LI_NAME: state.li.numpy()})
            return torch.from_numpy(sample), torch.from_numpy(li_out)

        sample = self.dispatcher.run(
            timestep, ("onnx", tuple(hidden_states.shape)), tuple(self.state["shape"]), torch.device("cpu"), call
        ).to(hidden_states.device)
        if not return_dict:
            return (sample,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)
