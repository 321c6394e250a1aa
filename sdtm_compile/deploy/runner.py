"""Run an exported bundle: :class:`OnnxTransformer`, an ONNX Runtime drop-in for ``pipe.transformer``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.config import MethodConfig, config_from_dict
from ..core.counts import count_tensor
from ..core.method import method_for
from ..core.schedule import EngineKey, Stage
from ..core.signature import EngineState
from ..passes import UnsupportedModelError, image_grid
from ..runtime import StageDispatcher
from .bundle import MANIFEST, BundleError, read_bundle, signature_from_manifest, step_counts

__all__ = ["OnnxTransformer", "lean_session_options"]


def lean_session_options():
    """ONNX Runtime session options that keep one copy of the weights: no prepacking (each ``If`` branch of
    ``model.onnx`` would prepack its own copy of the MatMul weights) and no CPU memory arena (it grows to every
    engine's activations at once). Measured on ``sd3m-1024`` (7 engines, 133 MiB of weights; two runs): peak
    528-704 MiB against 814-1000 MiB with ONNX Runtime's defaults, calls 0-12 % slower (``scripts/weights_once.py``;
    docs/design.md)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False
    return options


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
    same :class:`~sdtm_compile.runtime.StageDispatcher` as the compiled backend, with the engine contract the
    manifest records (:func:`~.bundle.signature_from_manifest`). Loading checks the manifest's format version, that
    every file exists and matches its sha256; calls check the input shapes against the manifest (and, for Flux,
    that ``img_ids`` lay out the exported token grid). ``skip_layers``, ControlNet residuals and
    ``joint_attention_kwargs`` are not supported (a clear error).
    ``history``: how many recent calls ``dispatcher.history`` keeps outside a ``generation`` context (0: none).
    ``providers`` and ``session_options`` (an ``onnxruntime.SessionOptions``; default :func:`lean_session_options`)
    go to the one ONNX Runtime session that runs every engine of the bundle (``model.onnx``: the weights are in
    memory once).
    ``config`` is the transformer's (as on the diffusers model); ``method_config`` the bundle's method config.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        providers: list[str] | None = None,
        history: int = 0,
        session_options: Any = None,
    ) -> None:
        super().__init__()
        import onnxruntime as ort

        self.bundle_dir = Path(bundle_dir)
        manifest = read_bundle(self.bundle_dir)
        manifest_path = self.bundle_dir / MANIFEST
        self.manifest = manifest
        try:
            self.method_config = config_from_dict(manifest["config"])
        except ValueError as err:
            raise BundleError(f"{manifest_path}: invalid method config ({err}); re-export the bundle") from err
        self.config = _Config(manifest["transformer_config"])
        self.inputs = manifest["inputs"]
        #: the engine contract of the bundle's graphs
        self.signature = signature_from_manifest(manifest, method_for(self.method_config))
        chosen = providers or ["CPUExecutionProvider"]
        options = session_options or lean_session_options()
        #: one session for every engine: the weights are in memory once
        self.session = ort.InferenceSession(str(self.bundle_dir / manifest["model"]), options, providers=chosen)
        self.engine_input = manifest["engine_input"]
        self.graphs = {self._key(e): int(e["graph"]) for e in manifest["engines"]}
        self.dispatcher = StageDispatcher(self.method_config, history=history)
        self.method = method_for(self.method_config)
        #: exact counts: the bundle's count inputs (``count_<j>``; :mod:`sdtm_compile.core.counts`), else empty
        self.count_inputs = [spec["name"] for spec in manifest.get("count_inputs", ())]
        if self.count_inputs and not self.method.dynamic_counts:
            raise BundleError(f"{manifest_path}: count inputs without counts='exact' in the config; re-export")

    @staticmethod
    def _key(entry: dict[str, Any]) -> EngineKey:
        return EngineKey(Stage(entry["stage"]), float(entry["bucket"]))

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["outputs"][0]["dtype"])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def sdtm_config(self) -> MethodConfig:
        """The name :attr:`method_config` had when SDTM was the only method (kept for callers of the old name)."""
        return self.method_config

    def _count_feeds(self, key: EngineKey) -> dict[str, np.ndarray]:
        """Exact counts: the step's count inputs (every input the bundle declares; the unmerged engine reads none and
        gets count 0)."""
        if not self.count_inputs:
            return {}
        tokens = self.manifest["count_inputs"][0]["tokens"]
        counts = step_counts(self.manifest, self.method, key)
        return {name: count_tensor(c, tokens).numpy() for name, c in zip(self.count_inputs, counts)}

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

        signature = self.signature

        def call(key: EngineKey, state: EngineState):
            graph = self.graphs.get(self.method.engine_of(key))
            if graph is None:
                raise BundleError(f"{self.bundle_dir / MANIFEST}: no engine for {key}")
            state_feeds = {t.name: v.numpy() for t, v in zip(signature.inputs, signature.engine_inputs(state))}
            engine = {self.engine_input: np.array([graph], dtype=np.int64)}
            outputs = self.session.run(None, {**feeds, **state_feeds, **self._count_feeds(key), **engine})
            return signature.split([torch.from_numpy(value) for value in outputs])

        sample = self.dispatcher.run(
            timestep, ("onnx", tuple(hidden_states.shape)), signature, torch.device("cpu"), call
        )[0].to(hidden_states.device)
        if not return_dict:
            return (sample,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)
