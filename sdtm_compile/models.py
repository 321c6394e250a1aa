"""Diffusers transformers built from config: real architectures, random weights, no downloads.

The tiny ones are the embedded default of the demo and the test subjects. The ``SD3M_*`` specs are the
benchmark models: SD3-medium's block proportions at a size this CPU can run (see :data:`SD3M_1024`). Weights
come from a fixed seed, so the same call builds the same model in every process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "TinySpec",
    "TINY_SD3",
    "TINY_SD35",
    "SD3M_1024",
    "SD3M_4096",
    "MODEL_PRESETS",
    "ModelPreset",
    "tiny_sd3_transformer",
    "example_inputs",
]


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


#: The benchmark model: SD3-medium's block proportions at 1024 image tokens (a 512^2 image).
#:
#: What decides how much SDTM can save is how a block's FLOPs split between what merging shrinks and what it
#: does not: per token, the linear layers cost ``24 C^2`` (q/k/v/out ``8 C^2`` + FF ``16 C^2``) and joint
#: attention ``4 (N + T) C``, so every share depends only on ``(N + T) / C`` (see
#: :func:`sdtm_compile.flops.mmdit_block_flops`). SD3-medium at 1024^2 has ``C = 1536``, ``N = 4096`` image and
#: ``T = 333`` text tokens: ``(N + T) / C = 2.88``. This model has ``C = 384`` (6 heads x 64, SD3's head
#: size), ``N = 1024`` and ``T = 83`` (SD3's 333 scaled by the same 1/4): ``(N + T) / C = 2.88``. So FF is
#: 45 % of block FLOPs, projections 23 % and attention 32 %, as in SD3-medium at 1024^2, while one CFG step
#: costs ~70 GFLOPs instead of ~18 TFLOPs. Six blocks instead of 24 scale every variant's time alike. Latent
#: channels (16) are SD3's; prompt and pooled widths are SD3's divided by 4.
SD3M_1024 = TinySpec(
    num_layers=6,
    num_attention_heads=6,
    attention_head_dim=64,
    in_channels=16,
    joint_attention_dim=1024,
    pooled_projection_dim=512,
    text_tokens=83,
)
#: The 1024^2-equivalent case: SD3-medium's real width (24 heads x 64 = 1536), 4096 image and 333 text
#: tokens, so its blocks *are* SD3-medium blocks at 1024^2 (only 2 of the 24, random weights). One 28-step
#: CFG generation costs about 40 TFLOPs: minutes per variant on this CPU.
SD3M_4096 = TinySpec(
    num_layers=2,
    num_attention_heads=24,
    attention_head_dim=64,
    in_channels=16,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
    text_tokens=333,
)


@dataclass(frozen=True)
class ModelPreset:
    """A named model built from config and the latent side it runs at (image side / 8)."""

    spec: TinySpec
    latent: int
    description: str


#: Models the CLI and the benchmark know by name.
MODEL_PRESETS: dict[str, ModelPreset] = {
    "tiny-sd3": ModelPreset(TINY_SD3, 64, "tiny SD3 (2 blocks, hidden 32)"),
    "tiny-sd35": ModelPreset(TINY_SD35, 64, "tiny SD3.5 (3 blocks, dual attention, RMS q/k norm)"),
    "sd3m-1024": ModelPreset(SD3M_1024, 64, "SD3-medium's block proportions at 1024^2, scaled: 6 blocks, hidden 384"),
    "sd3m-4096": ModelPreset(SD3M_4096, 128, "SD3-medium's blocks at 1024^2: 2 blocks, hidden 1536"),
}


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
    """Seeded random transformer inputs: latent ``[B, C, H, W]``, prompt ``[B, T, D]``, pooled, timestep ``[B]``.

    The timestep is one value expanded to the batch (stride 0), as diffusers' SD3 pipelines pass it, so engines
    built from these inputs (and cached) are the ones a generation uses: compiled engines assert input strides.
    """
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, spec.in_channels, *latent_hw, generator=g),
        "encoder_hidden_states": torch.randn(batch, spec.text_tokens, spec.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, spec.pooled_projection_dim, generator=g),
        "timestep": torch.full((1,), float(timestep)).expand(batch),
    }
