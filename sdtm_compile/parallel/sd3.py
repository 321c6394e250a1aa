"""Context parallelism for SD3 / SD3.5: the plan and the attention path diffusers' ``SD3Transformer2DModel`` lacks.

diffusers' ``enable_parallelism`` splits a model's sequence across ranks by its ``_cp_plan`` and runs attention
through ``dispatch_attention_fn``, which does the Ulysses all-to-alls. ``SD3Transformer2DModel`` has no plan, and its
``JointAttnProcessor2_0`` calls ``scaled_dot_product_attention`` directly, so a plan alone attends within each
rank's shard only: silently wrong (1.7e-2 on a tiny model). :class:`SD3ContextParallelAttnProcessor` is that
processor's arithmetic with the attention call routed through ``dispatch_attention_fn`` (written to be upstreamed),
and :data:`SD3_CP_PLAN` splits the patch-embedded image tokens and the embedded text, and gathers ``proj_out``::

    from sdtm_compile.parallel import prepare_sd3_context_parallel
    prepare_sd3_context_parallel(transformer)  # the processor, the plan, the text-length check
    transformer.enable_parallelism(config=ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2)))

The image tokens are split in bands of rows, so the token grid's height must be a multiple of the degree; the text
(77 CLIP + ``max_sequence_length`` T5 tokens, 333 by default) must be too: the pipeline's ``max_sequence_length``
picks it (255 gives 332 tokens, a multiple of 2 and 4). A length the degree does not divide raises
:class:`ContextParallelTextError` before any rank splits anything.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "SD3ContextParallelAttnProcessor",
    "SD3_CP_PLAN",
    "ContextParallelTextError",
    "prepare_sd3_context_parallel",
    "sd3_cp_plan",
]

#: The CLIP tokens of SD3's joint text (77 from each of its two CLIP encoders, concatenated along channels).
SD3_CLIP_TOKENS = 77


class ContextParallelTextError(ValueError):
    """The text length is not a multiple of the context-parallel degree."""


def sd3_cp_plan() -> dict[str, Any]:
    """SD3's context-parallel plan: split ``pos_embed``'s output (the image tokens ``[B, N, C]``, after the patch
    embedding and the position table, so each rank embeds the whole latent) and ``context_embedder``'s output
    (the text ``[B, T, C]``) along the sequence; gather ``proj_out``'s output before the unpatchify."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    split = ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)
    return {  # a module's split outputs, by output index
        "pos_embed": {0: split},
        "context_embedder": {0: split},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


#: The plan as a value (``transformer.enable_parallelism(config=..., cp_plan=SD3_CP_PLAN)``).
SD3_CP_PLAN = sd3_cp_plan()


class SD3ContextParallelAttnProcessor:
    """``JointAttnProcessor2_0``'s arithmetic (SD3 / SD3.5 joint attention, SD3.5's image-only ``attn2``) with the
    attention computed by diffusers' ``dispatch_attention_fn``, so that ``enable_parallelism`` can give it a
    context-parallel config. Without one it is the plain attention (``backend=None``: the active backend).

    Shapes: ``hidden_states`` ``[B, N, C]`` (image first in the joint sequence, as SD3 orders it),
    ``encoder_hidden_states`` ``[B, T, C]``; the attention runs on ``[B, N + T, H, D]``.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if attention_mask is not None:
            raise ValueError("SD3ContextParallelAttnProcessor takes no attention mask (SD3's attention has none)")
        residual = hidden_states
        batch = hidden_states.shape[0]
        head_dim = attn.to_k.out_features // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, S, H * D] -> [B, S, H, D]
            return x.view(batch, -1, attn.heads, head_dim)

        query, key = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states))
        value = heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_query = heads(attn.add_q_proj(encoder_hidden_states))
            text_key = heads(attn.add_k_proj(encoder_hidden_states))
            text_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=1)
            key = torch.cat([key, text_key], dim=1)
            value = torch.cat([value, text_value], dim=1)

        hidden_states = dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _check_text_length(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: the text length must be a multiple of the context-parallel degree."""
    config = getattr(module, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None) if config is not None else None
    if cp is None:
        return
    degree = cp.ulysses_degree * cp.ring_degree
    text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    if text is None or text.shape[1] % degree == 0:
        return
    tokens = text.shape[1]
    t5 = tokens - SD3_CLIP_TOKENS
    fix = f"pad the prompt embeddings to a multiple of {degree} tokens"
    if t5 > degree:  # a pipeline's prompt: 77 CLIP tokens, then max_sequence_length T5 tokens
        fits = t5 - (tokens % degree)
        fix = (
            f"call the pipeline with max_sequence_length={fits} ({SD3_CLIP_TOKENS} CLIP + {fits} T5 = "
            f"{SD3_CLIP_TOKENS + fits} text tokens), or {fix}"
        )
    raise ContextParallelTextError(
        f"context parallelism splits the text across {degree} ranks, but it has {tokens} tokens, not a multiple of "
        f"{degree}: {fix}"
    )


def prepare_sd3_context_parallel(transformer: nn.Module) -> nn.Module:
    """Make an ``SD3Transformer2DModel`` ready for diffusers' ``enable_parallelism``: every attention gets
    :class:`SD3ContextParallelAttnProcessor`, the model :data:`SD3_CP_PLAN` as its ``_cp_plan``, and a pre-hook that
    checks the text length (:class:`ContextParallelTextError`). Call it before ``enable_parallelism``; returns the
    model. Without parallelism the model computes what it did (same arithmetic, through the active backend)."""
    if not hasattr(transformer, "transformer_blocks") or hasattr(transformer, "single_transformer_blocks"):
        raise TypeError(f"expected an SD3Transformer2DModel, got {type(transformer).__name__}")
    if getattr(transformer, "_parallel_config", None) is not None:
        raise RuntimeError("call prepare_sd3_context_parallel before enable_parallelism")
    transformer.set_attn_processor(SD3ContextParallelAttnProcessor())
    transformer._cp_plan = sd3_cp_plan()
    transformer.register_forward_pre_hook(_check_text_length, with_kwargs=True)
    return transformer
