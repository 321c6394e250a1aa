"""Flow-matching Euler sampling loops as the SD3 and FLUX pipelines run them, without a text encoder.

* SD3 (:func:`generate`): classifier-free guidance, one batch-2 call per step, through any transformer callable
  ``call(hidden_states, encoder_hidden_states, pooled_projections, timestep) -> sample``.
* Flux (:func:`flux_generate`): FLUX.1-dev's guidance-distilled loop (batch 1, ``guidance`` embedded), sigmas
  ``linspace(1, 1/S, S)`` shifted by ``mu`` from the token count, through anything called like the diffusers
  ``FluxTransformer2DModel`` (the model, a compiled one, ``OnnxTransformer``, ``FluxReferenceTransformer``).

Used by the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .specs import flux_image_ids

__all__ = [
    "GenerationInputs",
    "make_generation_inputs",
    "generate",
    "denoising",
    "diffusers_call",
    "cfg_prompts",
    "cfg_batch",
    "psnr",
    "cosine_similarity",
    "FLUX_SCHEDULER_CONFIG",
    "FluxGenerationInputs",
    "make_flux_generation_inputs",
    "make_flux_scheduler",
    "flux_set_timesteps",
    "pipeline_timesteps",
    "flux_call_inputs",
    "flux_denoising",
    "flux_generate",
]

logger = logging.getLogger(__name__)

TransformerCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GenerationInputs:
    """Initial noise ``[1, C, H, W]`` and the conditional / unconditional prompt embeddings."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor


def make_generation_inputs(spec, latent_hw: tuple[int, int] = (32, 32), seed: int = 0) -> GenerationInputs:
    """Seeded noise and random "prompt embeddings" for a tiny model of ``spec`` (a :class:`TinySpec`)."""
    g = torch.Generator().manual_seed(seed)
    text = (1, spec.text_tokens, spec.joint_attention_dim)
    return GenerationInputs(
        latents=torch.randn(1, spec.in_channels, *latent_hw, generator=g),
        prompt_embeds=torch.randn(*text, generator=g),
        pooled_prompt_embeds=torch.randn(1, spec.pooled_projection_dim, generator=g),
        negative_prompt_embeds=torch.zeros(*text),
        negative_pooled_prompt_embeds=torch.zeros(1, spec.pooled_projection_dim),
    )


def diffusers_call(transformer: Callable[..., Any]) -> TransformerCall:
    """Adapt a diffusers-signature transformer (eager, compiled, ONNX runner) to :func:`generate`'s call."""

    def call(hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            return_dict=False,
        )[0]

    return call


def cfg_prompts(inputs: GenerationInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings ``[2, T, D]`` and pooled ``[2, P]`` of a CFG batch: unconditional row first."""
    prompt = torch.cat([inputs.negative_prompt_embeds, inputs.prompt_embeds])
    pooled = torch.cat([inputs.negative_pooled_prompt_embeds, inputs.pooled_prompt_embeds])
    return prompt, pooled


def cfg_batch(latents: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent ``[2B, C, H, W]`` and timestep ``[2B]`` of one CFG call of latents ``[B, C, H, W]`` (``B`` = 1:
    ``[2, C, H, W]`` and ``[2]``), the latents twice (rows of the unconditional half first, as
    :func:`cfg_prompts` orders the prompts).

    The timestep is the scalar expanded (stride 0), as the diffusers pipelines pass it. Compiled code guards
    on strides, so anything that probes a compiled transformer must lay it out the same way.
    """
    return torch.cat([latents, latents]), timestep.expand(2 * latents.shape[0])


def make_scheduler(shift: float | None = 3.0):
    """The SD3 scheduler (``FlowMatchEulerDiscreteScheduler``, shift 3.0; ``None`` also means 3.0, as an
    ``SDTMConfig.timestep_shift`` left to the model does on SD3), built from config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0 if shift is None else shift)


def denoising(
    call: TransformerCall,
    inputs: GenerationInputs,
    num_steps: int = 28,
    guidance_scale: float = 7.0,
    shift: float | None = 3.0,
) -> Iterator[tuple[float, torch.Tensor]]:
    """The CFG denoising loop of :func:`generate` one step at a time: yields ``(timestep, latent)`` after every
    step (one batch-2 call each), so callers can interleave generations call by call. Runs under ``no_grad``."""
    scheduler = make_scheduler(shift)
    scheduler.set_timesteps(num_steps)
    latents = inputs.latents.clone()
    prompt, pooled = cfg_prompts(inputs)
    for t in scheduler.timesteps:
        with torch.no_grad():
            latent_in, timestep = cfg_batch(latents, t)
            noise = call(latent_in, prompt, pooled, timestep)
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        yield float(t), latents


@torch.no_grad()
def generate(
    call: TransformerCall,
    inputs: GenerationInputs,
    num_steps: int = 28,
    guidance_scale: float = 7.0,
    shift: float | None = 3.0,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """Denoise ``inputs.latents`` for ``num_steps`` steps with CFG (one batch-2 call per step).

    Returns the final latent ``[1, C, H, W]``. ``on_step(step, timestep)`` runs after every step.
    """
    latents = inputs.latents.clone()
    for step, (t, latent) in enumerate(denoising(call, inputs, num_steps, guidance_scale, shift)):
        latents = latent
        if on_step is not None:
            on_step(step, t)
    return latents


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of ``x`` against ``reference``, with the reference's value range as the peak (inf if equal)."""
    mse = torch.mean((x.double() - reference.double()) ** 2).item()
    if mse == 0.0:
        return float("inf")
    peak = (reference.max() - reference.min()).double().item()
    return 10.0 * torch.log10(torch.tensor(peak**2 / mse)).item()


def cosine_similarity(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened."""
    return torch.nn.functional.cosine_similarity(x.double().reshape(1, -1), reference.double().reshape(1, -1)).item()


#: FLUX.1-dev's ``scheduler/scheduler_config.json`` (a ``FlowMatchEulerDiscreteScheduler``).
FLUX_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


@dataclass(frozen=True)
class FluxGenerationInputs:
    """Packed noise ``[1, N, C_in]``, prompt embeddings, position ids and the distilled guidance (``None``: schnell)."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    guidance: float | None


def make_flux_generation_inputs(spec, latent_hw: tuple[int, int] = (16, 16), seed: int = 0) -> FluxGenerationInputs:
    """Seeded packed noise and random "prompt embeddings" for a model of ``spec`` (a ``FluxSpec``); ``latent_hw``
    is the unpacked latent (image side / 8), packed into ``(H / 2) * (W / 2)`` tokens."""
    g = torch.Generator().manual_seed(seed)
    grid_h, grid_w = latent_hw[0] // 2, latent_hw[1] // 2
    return FluxGenerationInputs(
        latents=torch.randn(1, grid_h * grid_w, spec.in_channels, generator=g),
        prompt_embeds=torch.randn(1, spec.text_tokens, spec.joint_attention_dim, generator=g),
        pooled_prompt_embeds=torch.randn(1, spec.pooled_projection_dim, generator=g),
        img_ids=flux_image_ids(grid_h, grid_w),
        txt_ids=torch.zeros(spec.text_tokens, 3),
        guidance=3.5 if spec.guidance_embeds else None,
    )


def make_flux_scheduler():
    """FLUX.1-dev's scheduler, built from its config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)


def flux_set_timesteps(scheduler, num_steps: int, num_tokens: int) -> None:
    """What ``FluxPipeline`` does: sigmas ``linspace(1, 1/S, S)`` and ``mu = calculate_shift(N, ...)``."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    mu = calculate_shift(
        num_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)


def pipeline_timesteps(
    family: str, num_steps: int, num_tokens: int, shift: float | None = 3.0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What the diffusers pipeline of ``family`` (``sd3`` or ``flux``) feeds the transformer at each of ``num_steps``
    steps, float32 (FluxPipeline: the timestep / 1000, a float32 division, as :func:`flux_denoising` does), and its
    scheduler's sigmas (float32, ``num_steps + 1``). ``num_tokens``: Flux's image tokens (its shift depends on them);
    ``shift``: SD3's."""
    if family == "flux":
        scheduler = make_flux_scheduler()
        flux_set_timesteps(scheduler, num_steps, num_tokens)
        fed = [t.to(torch.float32) / 1000 for t in scheduler.timesteps]
    else:
        scheduler = make_scheduler(shift)
        scheduler.set_timesteps(num_steps)
        fed = [t.to(torch.float32) for t in scheduler.timesteps]
    return fed, scheduler.sigmas.to(torch.float32)


def flux_call_inputs(inputs: FluxGenerationInputs, latents: torch.Tensor, sigma: torch.Tensor) -> dict[str, Any]:
    """The keyword inputs of one FLUX.1 transformer call, laid out as ``FluxPipeline`` passes them: ``sigma``
    ``[B]`` as the timestep, the guidance (``None`` for schnell) expanded to the batch (stride 0)."""
    batch = latents.shape[0]
    return {
        "hidden_states": latents,
        "timestep": sigma,
        "guidance": None if inputs.guidance is None else torch.full((1,), inputs.guidance).expand(batch),
        "pooled_projections": inputs.pooled_prompt_embeds,
        "encoder_hidden_states": inputs.prompt_embeds,
        "txt_ids": inputs.txt_ids,
        "img_ids": inputs.img_ids,
    }


def flux_denoising(
    transformer: Callable[..., Any], inputs: FluxGenerationInputs, num_steps: int = 20
) -> Iterator[tuple[float, torch.Tensor]]:
    """The FLUX.1 denoising loop one step at a time (one batch-1 call per step): yields ``(timestep, latent)``."""
    scheduler = make_flux_scheduler()
    latents = inputs.latents.clone()
    flux_set_timesteps(scheduler, num_steps, latents.shape[1])
    batch = latents.shape[0]
    for t in scheduler.timesteps:
        with torch.no_grad():
            sigma = t.expand(batch).to(latents.dtype) / 1000  # FluxPipeline: timestep / 1000, a new tensor
            noise = transformer(**flux_call_inputs(inputs, latents, sigma), return_dict=False)[0]
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        yield float(t), latents


@torch.no_grad()
def flux_generate(
    transformer: Callable[..., Any],
    inputs: FluxGenerationInputs,
    num_steps: int = 20,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """Denoise ``inputs.latents`` for ``num_steps`` FLUX.1 steps; returns the packed latent ``[1, N, C_in]``."""
    latents = inputs.latents.clone()
    for step, (t, latent) in enumerate(flux_denoising(transformer, inputs, num_steps)):
        latents = latent
        if on_step is not None:
            on_step(step, t)
    return latents
