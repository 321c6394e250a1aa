"""Diffusers transformers built from config: real architectures, random weights, no downloads.

The tiny ones are the embedded default of the demo and the test subjects. The ``SD3M_*`` specs are the
benchmark models: SD3-medium's block proportions at a size a CPU can run (see :data:`SD3M_1024`). Weights come
from a fixed seed, so the same call builds the same model in every process. Named presets: :mod:`.presets`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

__all__ = [
    "TinySpec",
    "TINY_SD3",
    "TINY_SD35",
    "SD3M_1024",
    "SD3M_4096",
    "TESTBED",
    "TESTBED12",
    "SD3_MEDIUM",
    "SD35_MEDIUM",
    "SD35_LARGE",
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "tiny_sd3_transformer",
    "example_inputs",
    "FluxSpec",
    "TINY_FLUX",
    "TINY_FLUX_SCHNELL",
    "FLUX_1024",
    "tiny_flux_transformer",
    "flux_image_ids",
    "flux_example_inputs",
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
    sample_size: int = 32  #: the config's default latent side (the model runs at any side up to pos_embed_max_size)
    #: Trained weights that ship with the package (``"testbed-1024"``: :mod:`sdtm_compile.models.testbed`); ``None``:
    #: seeded random weights. A spec with weights works in pixel space: its "latent" is the RGB image.
    weights: str | None = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_blocks(self) -> int:
        return self.num_layers

    def truncated(self, layers: int) -> TinySpec:
        """The same architecture with only its first ``layers`` blocks (dual attention kept where it was)."""
        _check_layers(layers, self.num_blocks)
        dual = tuple(i for i in self.dual_attention_layers if i < layers)
        return dataclasses.replace(self, num_layers=layers, dual_attention_layers=dual)


def _check_layers(layers: int, available: int) -> None:
    if not 1 <= layers <= available:
        raise ValueError(f"layers={layers}: keep between 1 and the model's {available} blocks")


#: Plain SD3 (no dual attention).
TINY_SD3 = TinySpec()
#: SD3.5-style: dual attention (``attn2``) in the first blocks and RMS q/k norm.
TINY_SD35 = TinySpec(num_layers=3, dual_attention_layers=(0, 1), qk_norm="rms_norm")


#: The benchmark model: SD3-medium's block proportions at 1024 image tokens (a 512^2 image).
#:
#: What decides how much SDTM can save is how a block's FLOPs split between what merging shrinks and what it
#: does not: per token, the linear layers cost ``24 C^2`` (q/k/v/out ``8 C^2`` + FF ``16 C^2``) and joint
#: attention ``4 (N + T) C``, so every share depends only on ``(N + T) / C`` (see
#: :func:`sdtm_compile.bench.flops.mmdit_block_flops`). SD3-medium at 1024^2 has ``C = 1536``, ``N = 4096`` image and
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

#: The trained testbed (:mod:`sdtm_compile.models.testbed`): SD3's architecture in pixel space, 64x64 RGB at patch 2, so
#: 1024 image tokens like :data:`SD3M_1024`; 4 blocks of 3 heads x 64 (hidden 192), sized to train on a 2-core
#: CPU in about an hour; 6 "text" tokens from a learned label embedding.
TESTBED = TinySpec(
    num_layers=4,
    num_attention_heads=3,
    attention_head_dim=64,
    in_channels=3,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    text_tokens=6,
    pos_embed_max_size=32,
    weights="testbed-1024",
)
#: The deep testbed: :data:`TESTBED`'s width with 12 blocks (SD3-medium's depth / 2), deep enough to tell block
#: schedules apart (which blocks merge); same data, objective and label prompt.
TESTBED12 = dataclasses.replace(TESTBED, num_layers=12, weights="testbed12-1024")


@dataclass(frozen=True)
class FluxSpec:
    """Config of a ``FluxTransformer2DModel`` built from config (inner dim = heads x head_dim).

    ``guidance_embeds``: FLUX.1-dev's guidance-distilled embedding (``True``) or FLUX.1-schnell's (``False``).
    ``axes_dims_rope`` must sum to ``attention_head_dim``. Latents are packed: 2x2 latent patches of
    ``latent_channels`` become one token of ``in_channels = 4 * latent_channels`` features.
    """

    num_layers: int = 2  #: double-stream blocks
    num_single_layers: int = 2  #: single-stream blocks
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    latent_channels: int = 4
    joint_attention_dim: int = 32
    pooled_projection_dim: int = 32
    text_tokens: int = 8
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def in_channels(self) -> int:
        return 4 * self.latent_channels

    @property
    def num_blocks(self) -> int:
        """Double- and single-stream blocks, in the order SDTM numbers them (merge maps, ``on_plan``)."""
        return self.num_layers + self.num_single_layers

    def truncated(self, layers: int) -> FluxSpec:
        """The first ``layers`` blocks in the model's order: double-stream blocks first, then single-stream."""
        _check_layers(layers, self.num_blocks)
        double = min(layers, self.num_layers)
        return dataclasses.replace(self, num_layers=double, num_single_layers=layers - double)


#: FLUX.1-dev's layout in miniature: 2 double + 2 single blocks, guidance embedding, 3-axis RoPE.
TINY_FLUX = FluxSpec()
#: FLUX.1-schnell's layout: no guidance embedding.
TINY_FLUX_SCHNELL = FluxSpec(guidance_embeds=False)
#: FLUX.1-dev's proportions at 1024^2, scaled like :data:`SD3M_1024`: what SDTM can save depends on
#: ``(N + T) / C``; FLUX.1-dev at 1024^2 has N = 4096 image tokens, T = 512 text tokens and C = 3072, so
#: ``(N + T) / C = 1.5``. Scaled by 1/4: N = 1024 (a 512^2 image), T = 128, C = 768 (6 heads x 128, Flux's head
#: size, RoPE axes 16/56/56 as FLUX.1). Double and single blocks in FLUX.1's 1:2 ratio (19:38 -> 2:4); latent
#: channels 16 as FLUX.1; prompt and pooled widths FLUX.1's divided by 4.
FLUX_1024 = FluxSpec(
    num_layers=2,
    num_single_layers=4,
    num_attention_heads=6,
    attention_head_dim=128,
    latent_channels=16,
    joint_attention_dim=1024,
    pooled_projection_dim=192,
    text_tokens=128,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


# Published architectures: the ``transformer/config.json`` of each model's diffusers repository on the Hugging Face
# Hub, written out here (nothing is downloaded). Text tokens are what the pipelines feed by default: SD3 77 CLIP +
# 256 T5 = 333; FLUX.1-dev 512 T5 tokens (``max_sequence_length``), FLUX.1-schnell 256.

#: stabilityai/stable-diffusion-3-medium-diffusers: 24 blocks, hidden 1536 (24 heads x 64), 2.0 B parameters.
SD3_MEDIUM = TinySpec(
    num_layers=24,
    num_attention_heads=24,
    attention_head_dim=64,
    in_channels=16,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
    text_tokens=333,
    pos_embed_max_size=192,
    sample_size=128,
)
#: stabilityai/stable-diffusion-3.5-medium: SD3-medium's width, dual attention (``attn2``) in blocks 0-12, RMS
#: q/k norm, position embedding up to 384 patches a side; 2.2 B parameters as diffusers builds it.
SD35_MEDIUM = dataclasses.replace(
    SD3_MEDIUM, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm", pos_embed_max_size=384
)
#: stabilityai/stable-diffusion-3.5-large: 38 blocks, hidden 2432 (38 heads x 64), RMS q/k norm; 8.1 B parameters.
SD35_LARGE = dataclasses.replace(SD3_MEDIUM, num_layers=38, num_attention_heads=38, qk_norm="rms_norm")
#: black-forest-labs/FLUX.1-dev: 19 double- + 38 single-stream blocks, hidden 3072 (24 heads x 128), guidance
#: embedding, RoPE axes 16/56/56; 11.9 B parameters.
FLUX_DEV = FluxSpec(
    num_layers=19,
    num_single_layers=38,
    num_attention_heads=24,
    attention_head_dim=128,
    latent_channels=16,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    text_tokens=512,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
#: black-forest-labs/FLUX.1-schnell: FLUX.1-dev without the guidance embedding, 256 prompt tokens.
FLUX_SCHNELL = dataclasses.replace(FLUX_DEV, guidance_embeds=False, text_tokens=256)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Parameters are created in ``dtype`` (no full-precision copy first: a 12 B model in fp32 is 48 GB)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _buffers_to(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the floating buffers diffusers creates in float32 whatever the default (position embeddings) to ``dtype``
    (``model.to`` would also do it, with diffusers' warning meant for pretrained checkpoints)."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                module._buffers[name] = buffer.to(dtype)
    return model


def tiny_sd3_transformer(spec: TinySpec = TINY_SD3, seed: int = 0, dtype: torch.dtype = torch.float32):
    """An ``SD3Transformer2DModel`` of ``spec`` with seeded random weights, created in ``dtype``, in eval mode."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]), _default_dtype(dtype):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(
            sample_size=spec.sample_size,
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
    return _buffers_to(model, dtype).eval()


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


def tiny_flux_transformer(spec: FluxSpec = TINY_FLUX, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``FluxTransformer2DModel`` of ``spec`` with seeded random weights, created in ``dtype``, in eval mode."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]), _default_dtype(dtype):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=spec.in_channels,
            num_layers=spec.num_layers,
            num_single_layers=spec.num_single_layers,
            attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads,
            joint_attention_dim=spec.joint_attention_dim,
            pooled_projection_dim=spec.pooled_projection_dim,
            guidance_embeds=spec.guidance_embeds,
            axes_dims_rope=spec.axes_dims_rope,
        )
    return _buffers_to(model, dtype).eval()


def flux_image_ids(grid_h: int, grid_w: int) -> torch.Tensor:
    """``[N, 3]`` position ids of a row-major ``grid_h x grid_w`` token grid, as ``FluxPipeline`` makes them."""
    ids = torch.zeros(grid_h, grid_w, 3)
    ids[..., 1] = torch.arange(grid_h)[:, None]
    ids[..., 2] = torch.arange(grid_w)[None, :]
    return ids.reshape(grid_h * grid_w, 3)


def flux_example_inputs(
    spec: FluxSpec, batch: int = 1, latent_hw: tuple[int, int] = (16, 16), seed: int = 0, sigma: float = 0.5
) -> dict[str, torch.Tensor]:
    """Seeded random ``FluxTransformer2DModel`` inputs, laid out as ``FluxPipeline`` passes them.

    ``latent_hw`` is the *unpacked* latent side (image side / 8); the packed latent has
    ``(H / 2) * (W / 2)`` tokens. The timestep is sigma in ``(0, 1]``, one per batch row (``FluxPipeline`` passes
    ``t.expand(B) / 1000``, a new contiguous tensor); guidance (FLUX.1-dev only) is 3.5 expanded (stride 0), as
    the pipeline passes it. Compiled engines guard on strides, so these match what a generation sends.
    """
    g = torch.Generator().manual_seed(seed)
    grid_h, grid_w = latent_hw[0] // 2, latent_hw[1] // 2
    inputs = {
        "hidden_states": torch.randn(batch, grid_h * grid_w, spec.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, spec.text_tokens, spec.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, spec.pooled_projection_dim, generator=g),
        "timestep": torch.full((batch,), float(sigma)),
        "img_ids": flux_image_ids(grid_h, grid_w),
        "txt_ids": torch.zeros(spec.text_tokens, 3),
    }
    if spec.guidance_embeds:
        inputs["guidance"] = torch.full((1,), 3.5).expand(batch)
    return inputs
