"""Attention as the eager reference runs it on merged tokens: diffusers' processors' arithmetic, written out so that
a merged call can take per-row rotary positions and an additive key bias through the attention call itself.

* SD3 / SD3.5 (:func:`joint_attention`): ``JointAttnProcessor2_0``, image tokens first in the joint sequence;
  without a bias the block's own module runs (its processor, unchanged);
* Flux (:func:`flux_joint_attention`, :func:`flux_single_attention`): ``FluxAttnProcessor`` with the RoPE table of
  the merged sequence (``[B, T + M, 1, D]``, a merged token rotated by its representative's position), text first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.merge import MergePlan, merged_rotary_table

__all__ = ["joint_attention", "flux_joint_attention", "flux_single_attention", "merged_rotary_emb", "Rotary"]

Rotary = tuple[torch.Tensor, torch.Tensor]


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention of ``[B, H, S, D]`` heads, with ``bias`` (``[B, 1, 1, S_k]``) as its mask."""
    mask = None if bias is None else bias.to(query.dtype)  # SDPA wants the query's dtype
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)


def joint_attention(
    attn: nn.Module,
    image: torch.Tensor,
    text: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """An SD3 attention (``attn``, or SD3.5's image-only ``attn2`` with ``text=None``) on ``image`` ``[B, M, C]``.

    Returns what the module returns: ``(image output, text output)`` for a joint attention (the text output is
    ``None`` past a ``context_pre_only`` block's projection), the image output alone for ``attn2``. ``bias``: an
    additive key bias ``[B, 1, 1, M + T]`` (image keys first); ``None`` runs the module itself with ``kwargs``.
    """
    if bias is None:
        if text is None:
            return attn(hidden_states=image, **(kwargs or {}))
        return attn(hidden_states=image, encoder_hidden_states=text, **(kwargs or {}))
    if kwargs:
        raise ValueError("an attention with a key bias (size-aware attention) takes no joint_attention_kwargs")
    batch = image.shape[0]

    def heads(x: torch.Tensor, proj: nn.Module) -> torch.Tensor:
        return proj(x).view(batch, -1, attn.heads, proj.out_features // attn.heads).transpose(1, 2)

    query, key, value = heads(image, attn.to_q), heads(image, attn.to_k), heads(image, attn.to_v)
    head_dim = key.shape[-1]
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if text is not None:
        text_query, text_key = heads(text, attn.add_q_proj), heads(text, attn.add_k_proj)
        text_value = heads(text, attn.add_v_proj)
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        query = torch.cat([query, text_query], dim=2)
        key = torch.cat([key, text_key], dim=2)
        value = torch.cat([value, text_value], dim=2)
    out = _sdpa(query, key, value, bias)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    text_out = None
    if text is not None:
        out, text_out = out[:, : image.shape[1]], out[:, image.shape[1] :]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
    out = attn.to_out[1](attn.to_out[0](out))
    return out if text is None else (out, text_out)


def merged_rotary_emb(rotary: Rotary, plan: MergePlan, text_tokens: int) -> Rotary:
    """RoPE ``(cos, sin)`` ``[T + N, D]`` -> ``[B, T + M, 1, D]`` each (see
    :func:`~sdtm_compile.core.merge.merged_rotary_table`: a merged token takes its representative's rotation)."""
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


def _rotated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rotary: Rotary, bias: torch.Tensor | None
) -> torch.Tensor:
    """SDPA of ``[B, S, H, D]`` heads with per-row RoPE ``[B, S, 1, D]``, flattened back to ``[B, S, H * D]``."""
    cos, sin = rotary
    query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
    out = _sdpa(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), bias)
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


def flux_joint_attention(
    attn: nn.Module, image: torch.Tensor, text: torch.Tensor, rotary: Rotary, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxAttnProcessor`` (double block) on merged image tokens ``[B, M, C]`` with per-row RoPE
    ``[B, T + M, 1, D]`` and an optional key bias ``[B, 1, 1, T + M]``: ``(image output [B, M, C], text output
    [B, T, C])``."""
    image_heads = _heads(attn, image, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
    text_heads = _heads(
        attn, text, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k)
    )
    query, key, value = (torch.cat(pair, dim=1) for pair in zip(text_heads, image_heads))
    out = _rotated_attention(query, key, value, rotary, bias)
    text_out, image_out = out.split_with_sizes([text.shape[1], image.shape[1]], dim=1)
    return attn.to_out[1](attn.to_out[0](image_out.contiguous())), attn.to_add_out(text_out.contiguous())


def flux_single_attention(
    attn: nn.Module, joint: torch.Tensor, rotary: Rotary, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``FluxAttnProcessor`` (single block, no output projection) on ``[B, T + M, C]`` with per-row RoPE and an
    optional key bias."""
    query, key, value = _heads(attn, joint, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
    return _rotated_attention(query, key, value, rotary, bias)
