"""Tiny diffusers transformers built from config: real architectures, random weights, no downloads.

They are the embedded default of the demo and the test subjects. Weights come from a fixed seed, so the same
call builds the same model in every process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TinySpec", "TINY_SD3", "TINY_SD35", "tiny_sd3_transformer", "example_inputs"]


@dataclass(frozen=True)
class TinySpec:
    """Config of a tiny ``SD3Transformer2DModel`` (inner dim = heads x head_dim = caption projection dim)."""

    num_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 8
    in_channels: int = 4
    joint_attention_dim: int = 32
    pooled_projection_dim: int = 32
    text_tokens: int = 8
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    pos_embed_max_size: int = 96

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


#: Plain SD3 (no dual attention).
TINY_SD3 = TinySpec()
#: SD3.5-style: dual attention (``attn2``) in the first blocks and RMS q/k norm.
TINY_SD35 = TinySpec(num_layers=3, dual_attention_layers=(0, 1), qk_norm="rms_norm")


def tiny_sd3_transformer(spec: TinySpec = TINY_SD3, seed: int = 0, dtype: torch.dtype = torch.float32):
    """An ``SD3Transformer2DModel`` of ``spec`` with seeded random weights, in eval mode."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=spec.in_channels,
            num_layers=spec.num_layers,
            attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads,
            joint_attention_dim=spec.joint_attention_dim,
            caption_projection_dim=spec.inner_dim,
            pooled_projection_dim=spec.pooled_projection_dim,
            out_channels=spec.in_channels,
            pos_embed_max_size=spec.pos_embed_max_size,
            dual_attention_layers=spec.dual_attention_layers,
            qk_norm=spec.qk_norm,
        )
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def example_inputs(
    spec: TinySpec, batch: int = 1, latent_hw: tuple[int, int] = (32, 32), seed: int = 0, timestep: float = 500.0
) -> dict[str, torch.Tensor]:
    """Seeded random transformer inputs: latent ``[B, C, H, W]``, prompt ``[B, T, D]``, pooled, timestep."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, spec.in_channels, *latent_hw, generator=g),
        "encoder_hidden_states": torch.randn(batch, spec.text_tokens, spec.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, spec.pooled_projection_dim, generator=g),
        "timestep": torch.full((batch,), float(timestep)),
    }
