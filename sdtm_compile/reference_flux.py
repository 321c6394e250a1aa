"""The eager reference of SDTM on Flux (``FluxTransformer2DModel``), in plain PyTorch: the oracle of every Flux
path (each engine, each bucket, ONNX).

It follows DESIGN §8's rule literally and keeps diffusers' own arithmetic, so ``Stage.FULL`` equals the
diffusers model:

* one plan per block from its image tokens after the first modulated norm: a double block's ``norm1`` image
  output; a single block's ``norm`` output at ``[:, T:]`` (the joint sequence is text first);
* ``li`` threads through the double blocks, then the single blocks, and across steps as on SD3;
* both stages merge the feed-forward (structure: SSM plan, detail: IDM plan): a double block's ``ff`` on the
  ``norm2``-modulated image tokens; a single block's MLP branch on its image tokens (``proj_mlp`` -> GELU -> the
  MLP columns of ``proj_out``, unmerged before the sum with the attention columns and the bias);
* attention runs on every token (the authors' choice for RoPE models); text is never merged.

With ``SDTMConfig(merge_attention=True)`` the structure stage also merges the attention of every block (the image
tokens of the joint sequence: queries, keys and values), each merged token rotated by its representative token's
RoPE position (:func:`merged_rotary_emb`).

Not handled: ControlNet residuals, IP-Adapter inputs, ``joint_attention_kwargs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import MethodConfig, SDTMConfig
from .merge import MergePlan, merge, merged_branches, merged_rotary_table, plan_for, unmerge
from .methods.base import plan_sources
from .reference import _keep_plan
from .schedule import FULL, EngineKey, Stage, resolve_for_model

__all__ = [
    "FluxReferenceTransformer",
    "flux_double_block_forward",
    "flux_reference_forward",
    "flux_single_block_forward",
    "merged_rotary_emb",
]

Rotary = tuple[torch.Tensor, torch.Tensor]


def merged_rotary_emb(rotary: Rotary, plan: MergePlan, text_tokens: int) -> Rotary:
    """RoPE ``(cos, sin)`` ``[T + N, D]`` -> ``[B, T + M, 1, D]`` each (see
    :func:`~sdtm_compile.merge.merged_rotary_table`: a merged token takes its representative's rotation)."""
    assert plan.members is not None
    return (
        merged_rotary_table(rotary[0], plan.members, text_tokens),
        merged_rotary_table(rotary[1], plan.members, text_tokens),
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`` with ``cos``/``sin`` already
    broadcast to ``[B, S, 1, D]``."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def _heads(attn: nn.Module, x: torch.Tensor, projections: tuple, norms: tuple) -> list[torch.Tensor]:
    """``[q, k, v]`` ``[B, S, H, D]`` of ``x`` through ``projections``, q and k through ``norms`` (RMS per head)."""
    q, k, v = (proj(x).unflatten(-1, (-1, attn.head_dim)) for proj in projections)
    return [norms[0](q), norms[1](k), v]


def _rotated_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """SDPA of ``[B, S, H, D]`` heads with per-row RoPE ``[B, S, 1, D]``, flattened back to ``[B, S, H * D]``."""
    cos, sin = rotary
    query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


def _merged_joint_attention(attn: nn.Module, image: torch.Tensor, text: torch.Tensor, rotary: Rotary):
    """``FluxAttnProcessor`` (double block) on merged image tokens ``[B, M, C]`` with per-row RoPE
    ``[B, T + M, 1, D]``: ``(image output [B, M, C], text output [B, T, C])``."""
    image_heads = _heads(attn, image, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
    text_heads = _heads(
        attn, text, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k)
    )
    query, key, value = (torch.cat(pair, dim=1) for pair in zip(text_heads, image_heads))
    out = _rotated_attention(query, key, value, rotary)
    text_out, image_out = out.split_with_sizes([text.shape[1], image.shape[1]], dim=1)
    return attn.to_out[1](attn.to_out[0](image_out.contiguous())), attn.to_add_out(text_out.contiguous())


def _merged_single_attention(attn: nn.Module, joint: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """``FluxAttnProcessor`` (single block, no output projection) on ``[B, T + M, C]`` with per-row RoPE."""
    query, key, value = _heads(attn, joint, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
    return _rotated_attention(query, key, value, rotary)


def _block_plan(
    key: EngineKey,
    tokens: torch.Tensor,
    li: torch.Tensor,
    grid: tuple[int, int],
    config: MethodConfig,
    plan: MergePlan | None,
    on_plan: Callable[[MergePlan], None] | None,
) -> tuple[MergePlan | None, torch.Tensor]:
    """The block's plan: none for ``FULL``, ``plan`` when reusing an earlier block's, else a new one from
    ``tokens`` ``[B, N, C]`` (advancing ``li``)."""
    if key.stage is Stage.FULL:
        return None, li
    if plan is None:
        plan, li = plan_for(key, tokens, li, grid[0], grid[1], config)
    if on_plan is not None:
        on_plan(plan)
    return plan, li


def flux_double_block_forward(
    block: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    rotary: Rotary,
    *,
    key: EngineKey,
    li: torch.Tensor,
    grid: tuple[int, int],
    config: MethodConfig,
    on_plan: Callable[[MergePlan], None] | None = None,
    plan: MergePlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``FluxTransformerBlock`` with the method at ``key``: ``(encoder_hidden_states, hidden_states, li)``.

    ``hidden_states`` ``[B, N, C]`` image tokens, ``encoder_hidden_states`` ``[B, T, C]`` text tokens, ``temb``
    ``[B, C]``, ``rotary`` the model's ``(cos, sin)`` ``[T + N, D]``, ``li`` ``[B, N]`` int32.
    """
    norm_hs, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    norm_enc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(encoder_hidden_states, emb=temb)
    merged = merged_branches(key.stage, "flux", config)
    plan, li = _block_plan(key, norm_hs, li, grid, config, plan, on_plan)

    if plan is not None and "attn" in merged:
        rotary_merged = merged_rotary_emb(rotary, plan, encoder_hidden_states.shape[1])
        attn_output, context_attn_output = _merged_joint_attention(
            block.attn, merge(norm_hs, plan), norm_enc, rotary_merged
        )
        attn_output = unmerge(attn_output, plan)
    else:
        attn_output, context_attn_output = block.attn(
            hidden_states=norm_hs, encoder_hidden_states=norm_enc, image_rotary_emb=rotary
        )
    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output

    ff_input = block.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    if plan is not None and "ff" in merged:
        ff_output = unmerge(block.ff(merge(ff_input, plan)), plan)
    else:
        ff_output = block.ff(ff_input)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output

    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    norm_enc = block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * block.ff_context(norm_enc)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states, li


def flux_single_block_forward(
    block: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    rotary: Rotary,
    *,
    key: EngineKey,
    li: torch.Tensor,
    grid: tuple[int, int],
    config: MethodConfig,
    on_plan: Callable[[MergePlan], None] | None = None,
    plan: MergePlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``FluxSingleTransformerBlock`` with the method at ``key``: ``(encoder_hidden_states, hidden_states,
    li)``."""
    text = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [B, T + N, C], text first
    residual = hidden_states
    norm_hs, gate = block.norm(hidden_states, emb=temb)
    plan, li = _block_plan(key, norm_hs[:, text:], li, grid, config, plan, on_plan)
    merged = merged_branches(key.stage, "flux", config)
    merge_mlp = plan is not None and "mlp" in merged
    image = merge(norm_hs[:, text:], plan) if plan is not None else None
    mlp_input = torch.cat([norm_hs[:, :text], image], 1) if merge_mlp else norm_hs
    mlp_hidden_states = block.act_mlp(block.proj_mlp(mlp_input))
    if plan is not None and "attn" in merged:  # the joint sequence with merged image tokens, RoPE rows per token
        joint = torch.cat([norm_hs[:, :text], image], 1)
        attn_output = _merged_single_attention(block.attn, joint, merged_rotary_emb(rotary, plan, text))
        attn_output = torch.cat([attn_output[:, :text], unmerge(attn_output[:, text:], plan)], 1)
    else:
        attn_output = block.attn(hidden_states=norm_hs, image_rotary_emb=rotary)
    if merge_mlp:  # proj_out by column blocks (the split_single_stream pass): attention + bias, then the MLP
        channels = attn_output.shape[-1]
        weight, bias = block.proj_out.weight, block.proj_out.bias
        mlp_out = F.linear(mlp_hidden_states, weight[:, channels:])
        mlp_out = torch.cat([mlp_out[:, :text], unmerge(mlp_out[:, text:], plan)], 1)
        projected = F.linear(attn_output, weight[:, :channels], bias) + mlp_out
    else:
        projected = block.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))
    hidden_states = residual + gate.unsqueeze(1) * projected
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text], hidden_states[:, text:], li


def flux_reference_forward(
    transformer: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: torch.Tensor | None = None,
    *,
    key: EngineKey,
    li: torch.Tensor,
    config: MethodConfig,
    on_plan: Callable[[int, MergePlan], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole ``FluxTransformer2DModel`` forward with every block run by the functions above.

    Args:
        hidden_states: ``[B, N, C_in]`` packed latent; ``img_ids`` ``[N, 3]`` its positions (row-major grid).
        encoder_hidden_states: ``[B, T, D_text]``; ``txt_ids`` ``[T, 3]``.
        timestep: ``[B]`` sigma in ``(0, 1]``; ``guidance``: ``[B]`` (FLUX.1-dev) or ``None`` (schnell).
        li: ``[B, N]`` int32.
        on_plan: ``on_plan(block_index, plan)`` for every block that merges (double blocks first).

    Returns ``(sample [B, N, C_out], li)``.
    """
    from .passes import image_grid

    grid = image_grid(img_ids, hidden_states.shape[1])
    x = transformer.x_embedder(hidden_states)
    timestep = timestep.to(x.dtype) * 1000
    if guidance is None:
        temb = transformer.time_text_embed(timestep, pooled_projections)
    else:
        temb = transformer.time_text_embed(timestep, guidance.to(x.dtype) * 1000, pooled_projections)
    context = transformer.context_embedder(encoder_hidden_states)
    rotary = transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    blocks = [(flux_double_block_forward, b, "double") for b in transformer.transformer_blocks]
    blocks += [(flux_single_block_forward, b, "single") for b in transformer.single_transformer_blocks]
    sources = plan_sources(config, [kind for _, _, kind in blocks], key)
    plans: dict[int, MergePlan] = {}
    for index, (forward, block, _) in enumerate(blocks):
        source = sources[index]
        context, x, li = forward(
            block,
            x,
            context,
            temb,
            rotary,
            key=key if source is not None else FULL,
            li=li,
            grid=grid,
            config=config,
            on_plan=_keep_plan(plans, index, on_plan),
            plan=plans.get(source) if source is not None and source != index else None,  # type: ignore[arg-type]
        )
    return transformer.proj_out(transformer.norm_out(x, temb)), li


class FluxReferenceTransformer:
    """The Flux eager reference behind a :class:`~sdtm_compile.runtime.StageDispatcher`, called like the diffusers
    model (keyword arguments, ``return_dict``), so a Flux sampling loop or ``FluxPipeline`` can drive it.

    The config's timestep mapping is resolved for the token count of each call (``resolve_for_model``), as the
    backend resolves it at compile time. ``engine_for(key)`` returns the engine of a key (replaceable);
    ``on_plan``, when set, is called as ``on_plan(block_index, plan)`` for every merging block (merge maps);
    ``history`` keeps the last ``history`` calls (a debugging oracle: on by default).
    """

    def __init__(self, transformer: nn.Module, config: MethodConfig, history: int = 1024) -> None:
        from .runtime import StageDispatcher

        if isinstance(config, SDTMConfig) and (config.adaptive or config.size_aware_attention or config.cache_fusion):
            raise NotImplementedError(
                "the Flux reference has no SDTM* (adaptive_threshold), size-aware attention or cache fusion: "
                "they are implemented and tested on SD3 / SD3.5"
            )
        self.transformer = transformer
        self.config = config
        self.dispatcher = StageDispatcher(config, history=history)
        self.on_plan: Callable[[int, MergePlan], None] | None = None
        self.engine_for: Callable[[EngineKey], Callable[..., Any]] = lambda key: (
            lambda *args, li: flux_reference_forward(
                transformer, *args, key=key, li=li, config=self.dispatcher.config, on_plan=self.on_plan
            )
        )

    @property
    def history(self):
        return self.dispatcher.history

    def reset(self) -> None:
        self.dispatcher.reset()

    def __call__(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ):
        if joint_attention_kwargs:
            raise ValueError("the Flux reference does not take joint_attention_kwargs")
        batch, tokens = hidden_states.shape[:2]
        self.dispatcher.config = resolve_for_model(self.config, "flux", tokens)
        inputs = (hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance)
        sample = self.dispatcher.run(
            timestep,
            (tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device),
            (batch, tokens),
            hidden_states.device,
            lambda key, state: self.engine_for(key)(*inputs, li=state.li),
        )
        if not return_dict:
            return (sample,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)
