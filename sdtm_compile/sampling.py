"""A flow-matching Euler sampling loop with classifier-free guidance, as the SD3 pipeline runs it.

Used by the demo, the tests and the benchmarks to run whole generations through any transformer callable
``call(hidden_states, encoder_hidden_states, pooled_projections, timestep) -> sample`` without a text encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

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
    """The latent ``[2, C, H, W]`` and timestep ``[2]`` of one CFG call.

    The timestep is the scalar expanded (stride 0), as the diffusers pipelines pass it. Compiled code guards
    on strides, so anything that probes a compiled transformer must lay it out the same way.
    """
    return torch.cat([latents, latents]), timestep.expand(2)


def make_scheduler(shift: float = 3.0):
    """The SD3 scheduler (``FlowMatchEulerDiscreteScheduler``, shift 3.0), built from config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


def denoising(
    call: TransformerCall,
    inputs: GenerationInputs,
    num_steps: int = 28,
    guidance_scale: float = 7.0,
    shift: float = 3.0,
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
    shift: float = 3.0,
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
