"""The eager reference: SDTM on a diffusers ``JointTransformerBlock`` in plain PyTorch (the oracle).

Every compiled path (each engine, each bucket, ONNX) is tested for parity against this file. It follows
DESIGN §3 literally and keeps the diffusers block's own arithmetic, so at ratio 0 (``Stage.FULL``) it equals
the diffusers block:

* the plan is computed once per block from the image tokens after ``norm1`` and its AdaLN modulation;
* structure stage: the attention input, SD3.5's ``attn2`` input (same plan) and the FF input are merged;
* detail stage: attention (and ``attn2``) run on all tokens, the FF input is merged with the IDM plan;
* outputs are unmerged before the gate multiply and the residual add; the residual stream and the text
  tokens are never merged; ``li`` is updated once per block.

The other methods (:mod:`sdtm_compile.methods`) run through the same functions: the branches a method merges
come from :func:`~sdtm_compile.merge.merged_branches`, its plan from :func:`~sdtm_compile.merge.plan_for`, and a
block whose method leaves it unmerged runs as ``FULL`` or reuses an earlier block's plan
(:func:`~sdtm_compile.methods.base.plan_sources`).

Unlike the authors' release, SD3.5's dual attention stays on, the last (``context_pre_only``) block is
handled, and grids need not be square. Not handled: ControlNet residuals and IP-Adapter inputs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .config import MethodConfig, SDTMConfig
from .engine_state import EngineState
from .merge import (
    MergePlan,
    fuse_cached,
    key_size_bias,
    merge,
    merged_branches,
    plan_for,
    unmerge,
    window_score_fraction,
)
from .methods.base import plan_sources
from .schedule import FULL, EngineKey, Stage

__all__ = [
    "ReferenceTransformer",
    "reference_dispatcher",
    "reference_engine",
    "reference_forward",
    "sdtm_block_forward",
    "token_grid",
]


def token_grid(transformer: nn.Module, latent: torch.Tensor) -> tuple[int, int]:
    """The image-token grid ``(grid_h, grid_w)`` of a latent ``[B, C, H, W]`` (``H / patch, W / patch``)."""
    patch = transformer.config.patch_size
    return latent.shape[-2] // patch, latent.shape[-1] // patch


def _feed_forward(block: nn.Module, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``ff(x)``, chunked like the diffusers block when feed-forward chunking is on."""
    if block._chunk_size is not None:
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(ff, x, block._chunk_dim, block._chunk_size)
    return ff(x)


def sdtm_block_forward(
    block: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    *,
    key: EngineKey,
    li: torch.Tensor,
    grid: tuple[int, int],
    config: MethodConfig,
    joint_attention_kwargs: dict[str, Any] | None = None,
    on_plan: Callable[[MergePlan], None] | None = None,
    plan: MergePlan | None = None,
    fusion: _Fusion | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One ``JointTransformerBlock`` forward with the method of ``config`` at engine ``key``.

    Args:
        hidden_states: ``[B, N, C]`` image tokens (residual stream, stays full length).
        encoder_hidden_states: ``[B, T, C]`` text tokens (never merged).
        temb: ``[B, C]`` timestep + pooled-text embedding.
        li: ``[B, N]`` int32 "not attended" counter from the previous block/step.
        grid: image-token grid ``(grid_h, grid_w)`` with ``grid_h * grid_w == N``.
        on_plan: called with the block's :class:`~sdtm_compile.merge.MergePlan` (for merge maps).
        plan: an earlier block's plan to reuse (a method that shares plans across blocks); ``li`` is then left
            as it is. ``None``: the block makes its own plan (unless ``key`` is ``FULL``).
        fusion: cache fusion for this block (``SDTMConfig.cache_fusion``): the ``FULL`` engine stores each
            cached branch's gated output into it, a merged engine blends its merged branches with it.

    Returns:
        ``(encoder_hidden_states, hidden_states, li)`` like the diffusers block plus the updated ``li``
        (``encoder_hidden_states`` is ``None`` for the last, ``context_pre_only`` block).
    """
    kwargs = joint_attention_kwargs or {}
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

    if key.stage is Stage.FULL:
        plan = None
    elif plan is None:
        plan, li = plan_for(key, norm_hs, li, grid[0], grid[1], config)
    if plan is not None and on_plan is not None:
        on_plan(plan)
    merged = merged_branches(key.stage, "sd3", config)
    size_aware = plan is not None and isinstance(config, SDTMConfig) and config.size_aware_attention

    def attention_branch(name: str, attn_input: torch.Tensor, run, text_tokens: int):
        """merge -> attention -> unmerge, if merged (with the size-aware key bias when on)"""
        if plan is not None and name in merged:
            if size_aware:
                bias = key_size_bias(plan.inv_count, text_tokens, False, math.log(config.text_key_weight))
                with _sdpa_bias(bias):
                    out = run(merge(attn_input, plan))
            else:
                out = run(merge(attn_input, plan))
            if isinstance(out, tuple):
                return (unmerge(out[0], plan), *out[1:])
            return unmerge(out, plan)
        return run(attn_input)

    def gated(name: str, gate: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``gate * output``, stored or blended with the cache (cache fusion)"""
        out = gate.unsqueeze(1) * output
        if fusion is not None:
            out = fusion.apply(name, out, li if plan is not None and name in merged else None)
        return out

    attn_output, context_attn_output = attention_branch(
        "attn",
        norm_hs,
        lambda h: block.attn(hidden_states=h, encoder_hidden_states=norm_enc, **kwargs),
        norm_enc.shape[1],
    )
    hidden_states = hidden_states + gated("attn", gate_msa, attn_output)

    if block.use_dual_attention:
        attn_output2 = attention_branch("attn2", norm_hs2, lambda h: block.attn2(hidden_states=h, **kwargs), 0)
        hidden_states = hidden_states + gated("attn2", gate_msa2, attn_output2)

    ff_input = block.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    if plan is not None and "ff" in merged:
        ff_output = unmerge(_feed_forward(block, block.ff, merge(ff_input, plan)), plan)
    else:
        ff_output = _feed_forward(block, block.ff, ff_input)
    hidden_states = hidden_states + gated("ff", gate_mlp, ff_output)

    if block.context_pre_only:
        encoder_hidden_states = None
    else:
        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
        norm_enc = block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context_ff = _feed_forward(block, block.ff_context, norm_enc)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff
    return encoder_hidden_states, hidden_states, li


def reference_forward(
    transformer: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    *,
    key: EngineKey,
    li: torch.Tensor,
    config: MethodConfig,
    joint_attention_kwargs: dict[str, Any] | None = None,
    skip_layers: list[int] | None = None,
    on_plan: Callable[[int, MergePlan], None] | None = None,
    cache: torch.Tensor | None = None,
    extras: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole ``SD3Transformer2DModel`` forward with every block run by :func:`sdtm_block_forward`.

    Args:
        hidden_states: ``[B, C_lat, H, W]`` latent.
        encoder_hidden_states: ``[B, T, D_text]`` prompt embeddings.
        pooled_projections: ``[B, D_pooled]``.
        timestep: ``[B]``.
        li: ``[B, N]`` int32 with ``N = (H / patch) * (W / patch)``.
        on_plan: called as ``on_plan(block_index, plan)`` for every block that merges.
        cache: cache fusion's ``[K, B, N, C]`` cache (read by merged engines; required when the config fuses).
        extras: filled with the engine's extra outputs (:mod:`~sdtm_compile.engine_state`): ``"cache"`` (cache
            fusion: what ``FULL`` stored, else ``cache`` itself) and ``"stat"`` (SDTM*).

    Returns:
        ``(sample [B, C_out, H, W], li)``. Skipped layers (skip-layer guidance) neither merge nor touch ``li``.
    """
    grid = token_grid(transformer, hidden_states)
    height, width = hidden_states.shape[-2:]
    x = transformer.pos_embed(hidden_states).contiguous()
    temb = transformer.time_text_embed(timestep, pooled_projections)
    context = transformer.context_embedder(encoder_hidden_states)
    blocks = transformer.transformer_blocks
    sources = plan_sources(config, ["joint"] * len(blocks), key)
    plans: dict[int, MergePlan] = {}
    sdtm = config if isinstance(config, SDTMConfig) else None
    if sdtm is not None and sdtm.adaptive and extras is not None:
        first = blocks[0].norm1(x, emb=temb)[0]  # block 0's plan input, before any block runs
        extras["stat"] = window_score_fraction(first, li, *grid, sdtm.a_s, float(sdtm.adaptive_threshold))  # type: ignore[arg-type]
    fusion = None
    if sdtm is not None and sdtm.fuses_cache:
        if cache is None:
            raise ValueError("cache fusion is on: pass the cache (StageDispatcher carries it)")
        fusion = _Fusion(blocks, sdtm, cache, store=key.stage is Stage.FULL)
    for index, block in enumerate(blocks):
        if skip_layers is not None and index in skip_layers:
            continue
        source = sources[index]
        context, x, li = sdtm_block_forward(
            block,
            x,
            context,
            temb,
            key=key if source is not None else FULL,
            li=li,
            grid=grid,
            config=config,
            joint_attention_kwargs=joint_attention_kwargs,
            on_plan=_keep_plan(plans, index, on_plan),
            plan=plans.get(source) if source is not None and source != index else None,  # type: ignore[arg-type]
            fusion=fusion.at(index) if fusion is not None else None,
        )
    if fusion is not None and extras is not None:
        extras["cache"] = fusion.result()
    x = transformer.proj_out(transformer.norm_out(x, temb))
    patch, out_channels = transformer.config.patch_size, transformer.out_channels
    x = x.reshape(x.shape[0], grid[0], grid[1], patch, patch, out_channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], out_channels, height, width), li


def _keep_plan(
    plans: dict[int, MergePlan], index: int, on_plan: Callable[[int, MergePlan], None] | None
) -> Callable[[MergePlan], None]:
    """An ``on_plan`` for block ``index`` that keeps its plan in ``plans`` (for blocks that reuse it) and passes it
    on to the caller's ``on_plan(index, plan)``."""

    def keep(plan: MergePlan) -> None:
        plans[index] = plan
        if on_plan is not None:
            on_plan(index, plan)

    return keep


def reference_engine(
    transformer: nn.Module,
    key: EngineKey,
    config: MethodConfig,
    on_plan: Callable[[int, MergePlan], None] | None = None,
):
    """The eager reference as a dispatcher engine: ``(latent, prompt, pooled, timestep, state) -> (sample, state)``
    (``state``: an :class:`~sdtm_compile.engine_state.EngineState`, or a bare ``li`` returned as one)."""

    def engine(hidden_states, encoder_hidden_states, pooled_projections, timestep, state):
        state = state if isinstance(state, EngineState) else EngineState(state)
        extras: dict[str, torch.Tensor] = {}
        sample, li = reference_forward(
            transformer,
            hidden_states,
            encoder_hidden_states,
            pooled_projections,
            timestep,
            key=key,
            li=state.li,
            config=config,
            on_plan=on_plan,
            cache=state.cache,
            extras=extras,
        )
        return sample, EngineState(li, extras.get("cache"), extras.get("stat"))

    return engine


class ReferenceTransformer:
    """The eager reference behind a :class:`~sdtm_compile.runtime.StageDispatcher`, called like ``sampling``'s
    transformer: ``(hidden_states, encoder_hidden_states, pooled_projections, timestep) -> sample``.

    ``engine_for(key)`` returns the engine of a key (replaceable, e.g. to observe calls); ``on_plan``, when set,
    is called as ``on_plan(block_index, plan)`` for every merging block (merge maps); ``history`` (the last
    ``history`` calls outside a ``generation`` context; this is a test and debugging oracle, so it is on) and
    ``reset`` are the dispatcher's.
    """

    def __init__(self, transformer: nn.Module, config: MethodConfig, history: int = 1024) -> None:
        from .runtime import StageDispatcher

        self.transformer = transformer
        self.dispatcher = StageDispatcher(config, history=history)
        self.on_plan: Callable[[int, MergePlan], None] | None = None
        self.engine_for = lambda key: reference_engine(transformer, key, config, on_plan=self.on_plan)

    @property
    def history(self):
        return self.dispatcher.history

    def reset(self) -> None:
        self.dispatcher.reset()

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep) -> torch.Tensor:
        grid_h, grid_w = token_grid(self.transformer, hidden_states)
        return self.dispatcher.run(
            timestep,
            (tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device),
            (hidden_states.shape[0], grid_h * grid_w),
            hidden_states.device,
            lambda key, state: self.engine_for(key)(
                hidden_states, encoder_hidden_states, pooled_projections, timestep, state
            ),
            new_cache=lambda: _Fusion.empty(self.transformer, self.dispatcher.config, hidden_states),  # type: ignore[arg-type]
        )


def reference_dispatcher(transformer: nn.Module, config: MethodConfig, history: int = 1024) -> ReferenceTransformer:
    """The eager reference with the stage schedule and ``li`` state of the compiled paths."""
    return ReferenceTransformer(transformer, config, history)


class _Fusion:
    """Cache fusion in the reference: the cached branches in the compiled graphs' order
    (:func:`~sdtm_compile.passes.cache_slots`: per block ``attn``, ``attn2`` where present, ``ff``)."""

    def __init__(self, blocks: nn.ModuleList, config: SDTMConfig, cache: torch.Tensor, store: bool) -> None:
        self.config, self.cache, self.store = config, cache, store
        self.slots = [
            (index, name)
            for index, block in enumerate(blocks)
            for name in ("attn", "attn2", "ff")
            if name != "attn2" or block.use_dual_attention
        ]
        self.stored: dict[tuple[int, str], torch.Tensor] = {}
        self.block = -1

    @staticmethod
    def empty(transformer: nn.Module, config: SDTMConfig, latent: torch.Tensor) -> torch.Tensor:
        blocks = transformer.transformer_blocks
        count = sum(3 if block.use_dual_attention else 2 for block in blocks)
        grid = token_grid(transformer, latent)
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        return latent.new_zeros(count, latent.shape[0], grid[0] * grid[1], width)

    def at(self, block: int) -> _Fusion:
        self.block = block
        return self

    def apply(self, name: str, gated: torch.Tensor, li: torch.Tensor | None) -> torch.Tensor:
        """Store ``gated`` (``FULL``), or blend it where the plan merged (``li`` after the plan; ``None``: this
        branch is not merged in this stage, so nothing is blended)."""
        slot = (self.block, name)
        if self.store:
            self.stored[slot] = gated
            return gated
        if li is None:
            return gated
        return fuse_cached(gated, self.cache[self.slots.index(slot)], li, self.config.mcw)

    def result(self) -> torch.Tensor:
        if not self.store:
            return self.cache
        return torch.stack([self.stored[slot] for slot in self.slots])


@contextlib.contextmanager
def _sdpa_bias(bias: torch.Tensor) -> Iterator[None]:
    """Run diffusers' attention processors with ``attn_mask=bias`` (they call
    ``F.scaled_dot_product_attention`` without a mask; this reference is eager, so patching the function is
    enough)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def biased(query, key, value, *args, **kwargs):
        if args or kwargs.get("attn_mask") is not None:
            raise ValueError("size-aware attention: the attention already has a mask")
        return original(query, key, value, attn_mask=bias.to(query.dtype), **kwargs)

    F.scaled_dot_product_attention = biased
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
