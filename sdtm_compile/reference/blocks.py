"""One block of the eager reference, per block class, all with one calling convention:
``forward(block, hidden_states, encoder_hidden_states, temb, rotary, li, call) -> (encoder_hidden_states,
hidden_states, li)``.

Each keeps the diffusers block's own arithmetic, so the ``FULL`` engine equals the diffusers block, and does what
the passes do to the compiled graph:

* the plan is made once per block (or an earlier block's is reused, as the method says) from the image tokens after
  the block's first modulated norm: ``norm1``'s image output (SD3 joint and Flux double blocks), ``norm``'s output at
  ``[:, T:]`` (Flux single blocks, whose joint sequence is text first);
* the branches the method merges in the engine's stage run on merged tokens and are unmerged before the gate
  multiply and the residual add; the residual stream and the text tokens are never merged;
* a merged Flux attention rotates each merged token by its representative's RoPE position;
* the method's extensions act through :class:`~sdtm_compile.core.extension.ReferenceHooks`: a key bias passed to a
  merged attention call, a gated branch output stored or blended.

SD3.5's dual attention stays on and the last (``context_pre_only``) block is handled, unlike the authors' release.
Not handled: ControlNet residuals, IP-Adapter inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.extension import ReferenceHooks
from ..core.merge import MergePlan, concat_plans, merge, unmerge
from ..core.method import TokenMethod
from ..core.schedule import EngineKey, Stage
from .attention import Rotary, flux_joint_attention, flux_single_attention, joint_attention, merged_rotary_emb

__all__ = ["BlockCall", "sd3_block_forward", "flux_double_block_forward", "flux_single_block_forward"]


@dataclass
class BlockCall:
    """What one block of one reference call needs besides its tensors.

    Attributes:
        index: the block's position in the model (Flux: double blocks first).
        key: the engine (``FULL`` for a block the method leaves unmerged).
        grid: the image-token grid.
        method: the token-reduction method.
        family: ``sd3`` or ``flux``.
        hooks: the method's extensions' hooks for this call.
        plan: an earlier block's plan to reuse; ``None``: the block makes its own (unless ``key`` is ``FULL``).
        on_plan: called with the block's plan (merge maps).
        kwargs: ``joint_attention_kwargs`` for the attention modules (SD3).
        made: the plan the block ran with, once it ran (for the blocks that reuse it).
        shards: the image tokens are this many bands of ``grid`` (context parallelism, one per rank), each planned
            on its own; the block's plan is theirs side by side (:func:`~sdtm_compile.core.merge.concat_plans`).
    """

    index: int
    key: EngineKey
    grid: tuple[int, int]
    method: TokenMethod
    family: str
    hooks: Sequence[ReferenceHooks] = ()
    plan: MergePlan | None = None
    on_plan: Callable[[MergePlan], None] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    made: MergePlan | None = None
    shards: int = 1

    @property
    def merged(self) -> tuple[str, ...]:
        """The branches merged in this block (none in the ``FULL`` engine)."""
        return () if self.key.stage is Stage.FULL else self.method.merged_branches(self.key.stage, self.family)

    def make_plan(self, tokens: torch.Tensor, li: torch.Tensor) -> tuple[MergePlan | None, torch.Tensor]:
        """The block's plan from ``tokens`` ``[B, N, C]`` and the state after it (a reused plan leaves ``li``)."""
        if self.key.stage is Stage.FULL:
            return None, li
        plan = self.plan
        if plan is None and self.shards == 1:
            plan, li = self.method.plan_for(self.key, tokens, li, *self.grid)
        elif plan is None:
            shards = zip(tokens.chunk(self.shards, dim=1), li.chunk(self.shards, dim=1))
            plans, states = zip(*(self.method.plan_for(self.key, x, state, *self.grid) for x, state in shards))
            plan, li = concat_plans(list(plans), tokens.shape[1] // self.shards), torch.cat(states, dim=1)
        if self.on_plan is not None:
            self.on_plan(plan)
        self.made = plan
        return plan, li

    def bias(self, plan: MergePlan, text_tokens: int, text_first: bool) -> torch.Tensor | None:
        """The extensions' additive key bias for a merged attention (``None`` without one)."""
        biases = [b for h in self.hooks if (b := h.attention_bias(plan, text_tokens, text_first)) is not None]
        return sum(biases[1:], biases[0]) if biases else None

    def observes(self, branch: str) -> bool:
        """Some extension must see this branch's gated output on its own (:meth:`ReferenceHooks.observes`)."""
        return any(hook.observes(self.index, branch) for hook in self.hooks)

    def gated(self, branch: str, value: torch.Tensor, li: torch.Tensor, plan: MergePlan | None) -> torch.Tensor:
        """A branch's gated output after the extensions (``li``: the state after this block's plan)."""
        merged_li = li if plan is not None and branch in self.merged else None
        for hook in self.hooks:
            value = hook.gated(self.index, branch, value, merged_li)
        return value


def _feed_forward(block: nn.Module, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``ff(x)``, chunked like the diffusers block when feed-forward chunking is on."""
    if getattr(block, "_chunk_size", None) is not None:
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(ff, x, block._chunk_dim, block._chunk_size)
    return ff(x)


def sd3_block_forward(
    block: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    rotary: Rotary | None,
    li: torch.Tensor,
    call: BlockCall,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One ``JointTransformerBlock`` (SD3 / SD3.5): ``hidden_states`` ``[B, N, C]`` image tokens,
    ``encoder_hidden_states`` ``[B, T, C]`` text tokens, ``temb`` ``[B, C]``, ``li`` ``[B, N]``; ``rotary`` unused.
    Returns ``encoder_hidden_states`` ``None`` for the last, ``context_pre_only`` block."""
    if block.use_dual_attention:
        norm_hs, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hs2, gate_msa2 = block.norm1(hidden_states, emb=temb)
    else:
        norm_hs, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    if block.context_pre_only:
        norm_enc = block.norm1_context(encoder_hidden_states, temb)
    else:
        norm_enc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
            encoder_hidden_states, emb=temb
        )
    plan, li = call.make_plan(norm_hs, li)

    def attention(name: str, attn: nn.Module, tokens: torch.Tensor, text: torch.Tensor | None) -> Any:
        """merge -> attention -> unmerge, if merged (with the extensions' key bias)"""
        if plan is None or name not in call.merged:
            return joint_attention(attn, tokens, text, kwargs=call.kwargs)
        bias = call.bias(plan, 0 if text is None else text.shape[1], text_first=False)
        out = joint_attention(attn, merge(tokens, plan), text, bias, call.kwargs)
        return (unmerge(out[0], plan), *out[1:]) if isinstance(out, tuple) else unmerge(out, plan)

    attn_output, context_attn_output = attention("attn", block.attn, norm_hs, norm_enc)
    hidden_states = hidden_states + call.gated("attn", gate_msa.unsqueeze(1) * attn_output, li, plan)
    if block.use_dual_attention:
        attn_output2 = attention("attn2", block.attn2, norm_hs2, None)
        hidden_states = hidden_states + call.gated("attn2", gate_msa2.unsqueeze(1) * attn_output2, li, plan)

    ff_input = block.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    if plan is not None and "ff" in call.merged:
        ff_output = unmerge(_feed_forward(block, block.ff, merge(ff_input, plan)), plan)
    else:
        ff_output = _feed_forward(block, block.ff, ff_input)
    hidden_states = hidden_states + call.gated("ff", gate_mlp.unsqueeze(1) * ff_output, li, plan)

    if block.context_pre_only:
        return None, hidden_states, li
    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    norm_enc = block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    context_ff = _feed_forward(block, block.ff_context, norm_enc)
    return encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff, hidden_states, li


def flux_double_block_forward(
    block: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    rotary: Rotary | None,
    li: torch.Tensor,
    call: BlockCall,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``FluxTransformerBlock``: ``hidden_states`` ``[B, N, C]`` image tokens, ``encoder_hidden_states``
    ``[B, T, C]`` text tokens, ``temb`` ``[B, C]``, ``rotary`` the model's ``(cos, sin)`` ``[T + N, D]``, ``li``
    ``[B, N]``."""
    assert rotary is not None
    norm_hs, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    norm_enc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(encoder_hidden_states, emb=temb)
    plan, li = call.make_plan(norm_hs, li)

    if plan is not None and "attn" in call.merged:
        text = encoder_hidden_states.shape[1]
        bias = call.bias(plan, text, text_first=True)
        rotary_merged = merged_rotary_emb(rotary, plan, text)
        attn_output, context_attn_output = flux_joint_attention(
            block.attn, merge(norm_hs, plan), norm_enc, rotary_merged, bias
        )
        attn_output = unmerge(attn_output, plan)
    else:
        attn_output, context_attn_output = block.attn(
            hidden_states=norm_hs, encoder_hidden_states=norm_enc, image_rotary_emb=rotary
        )
    hidden_states = hidden_states + call.gated("attn", gate_msa.unsqueeze(1) * attn_output, li, plan)

    ff_input = block.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    if plan is not None and "ff" in call.merged:
        ff_output = unmerge(block.ff(merge(ff_input, plan)), plan)
    else:
        ff_output = block.ff(ff_input)
    hidden_states = hidden_states + call.gated("ff", gate_mlp.unsqueeze(1) * ff_output, li, plan)

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
    rotary: Rotary | None,
    li: torch.Tensor,
    call: BlockCall,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``FluxSingleTransformerBlock`` on the image ``[B, N, C]`` and text ``[B, T, C]`` tokens (joined text
    first inside the block). Its attention and MLP are summed by one ``proj_out`` before the gate: their gated
    image rows pass the extensions' ``gated`` hook only when one observes them (``proj_out`` then by columns)."""
    assert rotary is not None
    text = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [B, T + N, C], text first
    residual = hidden_states
    norm_hs, gate = block.norm(hidden_states, emb=temb)
    plan, li = call.make_plan(norm_hs[:, text:], li)
    merge_mlp = plan is not None and "mlp" in call.merged
    image = merge(norm_hs[:, text:], plan) if plan is not None else None
    mlp_input = torch.cat([norm_hs[:, :text], image], 1) if merge_mlp else norm_hs
    mlp_hidden_states = block.act_mlp(block.proj_mlp(mlp_input))
    if plan is not None and "attn" in call.merged:  # the joint sequence with merged image tokens, RoPE rows per token
        joint = torch.cat([norm_hs[:, :text], image], 1)
        bias = call.bias(plan, text, text_first=True)
        attn_output = flux_single_attention(block.attn, joint, merged_rotary_emb(rotary, plan, text), bias)
        attn_output = torch.cat([attn_output[:, :text], unmerge(attn_output[:, text:], plan)], 1)
    else:
        attn_output = block.attn(hidden_states=norm_hs, image_rotary_emb=rotary)
    observed = call.observes("attn") or call.observes("mlp")
    if not (merge_mlp or observed):
        hidden_states = residual + gate.unsqueeze(1) * block.proj_out(torch.cat([attn_output, mlp_hidden_states], 2))
    else:  # proj_out by column blocks (the split_single_stream pass): attention + bias, then the MLP
        channels = attn_output.shape[-1]
        weight, bias_weight = block.proj_out.weight, block.proj_out.bias
        mlp_out = F.linear(mlp_hidden_states, weight[:, channels:])
        if merge_mlp:
            mlp_out = torch.cat([mlp_out[:, :text], unmerge(mlp_out[:, text:], plan)], 1)
        attn_out = F.linear(attn_output, weight[:, :channels], bias_weight)
        gate = gate.unsqueeze(1)
        update = gate * (attn_out + mlp_out)
        if observed:  # the columns' gated image rows, each seen (stored or blended) on its own
            image = [
                call.gated(name, gate * out[:, text:], li, plan) for name, out in (("attn", attn_out), ("mlp", mlp_out))
            ]
            if any(name in call.merged and call.observes(name) for name in ("attn", "mlp")):
                # a blended column: the image rows' update is the (blended) columns' sum
                update = torch.cat([update[:, :text], image[0] + image[1]], 1)
        hidden_states = residual + update
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text], hidden_states[:, text:], li
