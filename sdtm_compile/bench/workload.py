"""What one benchmark generation is, per model family: :class:`Workload`.

The benchmark times whole generations. An SD3 generation is the SD3 pipeline's loop: classifier-free guidance,
one batch-2 call per step. A Flux generation is FLUX.1-dev's: guidance-distilled, one batch-1 call per step,
sigmas shifted by ``mu`` from the token count. Everything else - compiling, timing, FLOPs, the sweep, the
report - is the same, so the harness only asks its workload for the model, the first call's inputs, a generation,
the eager reference and the first block's plan inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.config import MethodConfig
from ..models import FluxSpec, TinySpec, build_model
from ..models.sampling import (
    FluxGenerationInputs,
    GenerationInputs,
    diffusers_call,
    flux_call_inputs,
    flux_generate,
    generate,
    make_flux_generation_inputs,
    make_generation_inputs,
)
from ..reference import ReferenceTransformer
from .config import BenchConfig
from .harness import cfg_call_inputs

__all__ = ["Workload", "make_workload"]


@dataclass
class Workload:
    """One model family's benchmark generation.

    Attributes:
        family: ``sd3`` or ``flux``.
        model: the transformer (seeded random weights).
        inputs: noise and prompt embeddings of every generation.
        grid: the image-token grid ``(H, W)``.
        probe: the keyword inputs of one transformer call, laid out exactly as a generation passes them (the first,
            timed call of a compile; a probe laid out differently would make the first generation recompile).
        description: how a generation calls the transformer, for the report.
        testbed: the trained testbed (transformer and label prompt) when the model is one: its generations are
            images, so the benchmark adds image measures (:mod:`sdtm_compile.models.testbed.quality`).
    """

    family: str
    spec: TinySpec | FluxSpec
    model: nn.Module
    inputs: GenerationInputs | FluxGenerationInputs
    grid: tuple[int, int]
    probe: dict[str, Any]
    description: str
    testbed: Any = None

    @property
    def pixel_space(self) -> bool:
        """Whether the final latent is the image (the trained testbed)."""
        return self.testbed is not None

    def with_seed(self, seed: int) -> Workload:
        """This workload with the noise and prompt of ``seed`` (same shapes and layout: no recompile)."""
        side = self.grid[0] * 2  # the latent side: 2x2 patches (SD3) / packing (Flux) per token
        if self.testbed is not None:
            from ..models.testbed.quality import generation_inputs

            return dataclasses.replace(self, inputs=generation_inputs(self.testbed, seed, side))
        if self.family == "flux":
            inputs = make_flux_generation_inputs(self.spec, (side, side), seed=seed)
            if self.inputs.guidance is not None:  # type: ignore[union-attr]
                inputs = dataclasses.replace(inputs, guidance=self.inputs.guidance)  # type: ignore[union-attr]
            return dataclasses.replace(self, inputs=inputs)
        return dataclasses.replace(self, inputs=make_generation_inputs(self.spec, (side, side), seed=seed))

    @property
    def num_blocks(self) -> int:
        """The transformer's block count (Flux: double and single blocks)."""
        return self.spec.num_blocks

    def call_of(self, module: Callable[..., Any]) -> Callable[..., Any]:
        """What :meth:`generate` drives for a diffusers-signature module (the model, a compiled one)."""
        return diffusers_call(module) if self.family == "sd3" else module

    def reference(self, config: MethodConfig) -> Any:
        """The eager reference of the method of ``config`` for this model (it records its calls: ``history``),
        drivable by :meth:`generate`."""
        return ReferenceTransformer(self.model, config)

    def first_block_plan_inputs(self, config: BenchConfig) -> list[torch.Tensor]:
        """The first block's plan input (its ``norm1`` output, ``[B, N, C]``: the normalised image tokens a plan is
        made from) of every call of one unmodified generation, in order."""
        inputs: list[torch.Tensor] = []
        block = self.model.transformer_blocks[0]
        handle = block.norm1.register_forward_hook(lambda module, args, out: inputs.append(out[0].detach()))
        try:
            with torch.no_grad():
                self.generate(self.call_of(self.model), config)
        finally:
            handle.remove()
        return inputs

    def generate(
        self, call: Callable[..., Any], config: BenchConfig, on_step: Callable[[int, float], None] | None = None
    ) -> torch.Tensor:
        """One whole generation through ``call`` (from :meth:`call_of` or :meth:`reference`); the final latent."""
        if self.family == "sd3":
            return generate(
                call,
                self.inputs,  # type: ignore[arg-type]
                num_steps=config.steps,
                guidance_scale=config.guidance_scale,
                shift=config.method.timestep_shift,
                on_step=on_step,
            )
        return flux_generate(call, self.inputs, num_steps=config.steps, on_step=on_step)  # type: ignore[arg-type]


def _sd3_probe(inputs: GenerationInputs) -> dict[str, Any]:
    """The first call of an SD3 generation (timestep 1000), laid out as :func:`generate` passes it."""
    return cfg_call_inputs(inputs, 1000.0)


def _flux_probe(inputs: FluxGenerationInputs) -> dict[str, Any]:
    """The first call of :func:`~sdtm_compile.models.sampling.flux_denoising` (sigma 1), laid out as it passes it."""
    batch = inputs.latents.shape[0]
    return flux_call_inputs(inputs, inputs.latents, torch.ones(batch, dtype=inputs.latents.dtype))


def make_workload(config: BenchConfig, device: torch.device | str | None = None) -> Workload:
    """The workload of ``config.model`` at ``config.latent_side``, seeded with ``config.seed``, in ``config.dtype``;
    ``device``: where the model and the generation inputs go (default: where they are made, the CPU)."""
    spec, latent = config.preset.spec, config.latent_side
    grid = (latent // 2, latent // 2)
    if isinstance(spec, TinySpec) and spec.weights is not None:
        from ..models.testbed.model import load_testbed
        from ..models.testbed.quality import generation_inputs

        testbed = load_testbed(name=spec.weights)
        testbed.transformer.to(device)
        inputs = _placed(generation_inputs(testbed, config.seed, latent), torch.float32, device)
        description = "CFG batch 2, pixel space, prompt = a held-out crop's labels"
        return Workload("sd3", spec, testbed.transformer, inputs, grid, _sd3_probe(inputs), description, testbed)
    if config.layers is not None:
        spec = spec.truncated(config.layers)
    model = build_model(spec, seed=config.seed, dtype=config.torch_dtype).to(device)
    if isinstance(spec, FluxSpec):
        flux = make_flux_generation_inputs(spec, (latent, latent), seed=config.seed)
        inputs = _placed(flux, config.torch_dtype, device)
        if spec.guidance_embeds:  # FLUX.1-dev embeds the guidance scale the benchmark asks for
            inputs = dataclasses.replace(inputs, guidance=config.guidance_scale)
        guidance = "" if inputs.guidance is None else f", guidance {inputs.guidance} embedded"
        return Workload(
            "flux", spec, model, inputs, grid, _flux_probe(inputs), f"batch 1 (guidance-distilled{guidance})"
        )
    inputs = _placed(make_generation_inputs(spec, (latent, latent), seed=config.seed), config.torch_dtype, device)
    return Workload("sd3", spec, model, inputs, grid, _sd3_probe(inputs), "CFG batch 2")


def _placed(inputs, dtype: torch.dtype, device: torch.device | str | None):
    """Generation inputs with their tensors on ``device`` and the floating ones in ``dtype``, as the pipelines keep
    latents, prompt embeddings and (Flux) position ids on the transformer's device and in its dtype."""
    values = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}
    placed = {
        name: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for name, value in values.items()
        if isinstance(value, torch.Tensor)
    }
    return dataclasses.replace(inputs, **placed)
