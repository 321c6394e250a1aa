"""The eager reference of a whole transformer (SD3 / SD3.5 and Flux), in plain PyTorch: the oracle of every
compiled path (each engine, each bucket, ONNX, Triton).

* :func:`reference_forward`: one forward on the engine of a key, fed an engine state, returning the sample and
  the state every engine returns (:class:`~sdtm_compile.core.signature.EngineState`: the method's ``li`` and what
  its extensions add);
* :class:`ReferenceTransformer`: the same behind a :class:`~sdtm_compile.runtime.StageDispatcher`, called like the
  diffusers model (``pipe.transformer``'s keyword inputs, ``return_dict``), so a sampling loop or a pipeline
  drives it like the compiled model;
* :func:`model_layout`: the model as a method sees it, from the module (the passes read the same from the graph).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.config import MethodConfig
from ..core.extension import ReferenceHooks
from ..core.layout import BlockLayout, ModelLayout, band_grid
from ..core.merge import MergePlan
from ..core.method import TokenMethod, method_for
from ..core.schedule import FULL, EngineKey, resolve_for_model
from ..core.signature import EngineSignature, EngineState
from ..passes import image_grid
from ..runtime import StageDispatcher
from .blocks import BlockCall, flux_double_block_forward, flux_single_block_forward, sd3_block_forward

__all__ = [
    "ReferenceTransformer",
    "reference_dispatcher",
    "reference_engine",
    "reference_forward",
    "model_layout",
    "shard_layout",
    "sharded_signature",
    "token_grid",
]


def token_grid(transformer: nn.Module, latent: torch.Tensor) -> tuple[int, int]:
    """The image-token grid ``(grid_h, grid_w)`` of an SD3 latent ``[B, C, H, W]`` (``H / patch, W / patch``)."""
    patch = transformer.config.patch_size
    return latent.shape[-2] // patch, latent.shape[-1] // patch


def _is_flux(transformer: nn.Module) -> bool:
    return hasattr(transformer, "single_transformer_blocks")


def model_layout(
    transformer: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    img_ids: torch.Tensor | None = None,
) -> ModelLayout:
    """The :class:`~sdtm_compile.core.layout.ModelLayout` of ``transformer`` called with these inputs."""
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    batch, text = hidden_states.shape[0], encoder_hidden_states.shape[1]
    if _is_flux(transformer):
        if img_ids is None:
            raise ValueError("a Flux transformer needs img_ids [N, 3] (its token grid)")
        grid = image_grid(img_ids, hidden_states.shape[1])
        double = [BlockLayout(i, "double", ("attn", "ff")) for i in range(len(transformer.transformer_blocks))]
        single = [
            BlockLayout(len(double) + i, "single", ("attn", "mlp"))
            for i in range(len(transformer.single_transformer_blocks))
        ]
        return ModelLayout("flux", grid, text, (*double, *single), width, transformer.dtype, batch)
    blocks = tuple(
        BlockLayout(i, "joint", ("attn", "attn2", "ff") if block.use_dual_attention else ("attn", "ff"))
        for i, block in enumerate(transformer.transformer_blocks)
    )
    return ModelLayout("sd3", token_grid(transformer, hidden_states), text, blocks, width, transformer.dtype, batch)


def shard_layout(layout: ModelLayout, shards: int) -> ModelLayout:
    """One rank's layout when ``shards`` ranks split ``layout``'s sequence (context parallelism): a band of
    ``grid_h / shards`` grid rows (:func:`~sdtm_compile.core.layout.band_grid`) and ``T / shards`` text tokens
    (``None`` where ``shards`` does not divide the text: a real split would refuse it, the reference attends over the
    whole text anyway). ``shards == 1``: ``layout``."""
    if shards == 1:
        return layout
    text = layout.text_tokens
    text_part = None if text is None or text % shards else text // shards
    grid = band_grid(layout.grid, shards)
    return dataclasses.replace(layout, grid=grid, text_tokens=text_part, context_parallel=shards)


def sharded_signature(method: TokenMethod, layout: ModelLayout, shards: int) -> EngineSignature:
    """The engine contract of ``layout`` with each entry's fresh value laid out as ``shards`` ranks start theirs:
    every rank draws the fresh state of its own shard (the same seeded values on every rank), so the whole is
    that shard's value repeated along the token axis. ``shards == 1``: ``method.signature(layout)``."""
    signature = method.signature(layout)
    if shards == 1:
        return signature
    shard = method.signature(shard_layout(layout, shards))

    def tiled(name: str, axis: int) -> Callable[[torch.device | str | None], torch.Tensor]:
        return lambda device: torch.cat([shard[name].fresh(device)] * shards, dim=axis)

    entries = []
    for entry, local in zip(signature.tensors, shard.tensors):
        axes = [a for a, (whole, part) in enumerate(zip(entry.shape, local.shape)) if whole != part]
        if len(axes) > 1:
            raise ValueError(f"{entry.name}: {entry.shape} is not {shards} shards of {local.shape} along one axis")
        entries.append(dataclasses.replace(entry, initial=tiled(entry.name, axes[0])) if axes else entry)
    return EngineSignature(entries)


@dataclass
class _Run:
    """One reference call's plan for its blocks: the engine, the method, the extensions' hooks, each block's plan
    source, and what it reports."""

    key: EngineKey
    method: TokenMethod
    layout: ModelLayout
    hooks: list[ReferenceHooks]
    kwargs: dict[str, Any]
    on_plan: Callable[[int, MergePlan], None] | None
    skip_layers: list[int] | None = None
    shards: int = 1

    @property
    def plan_layout(self) -> ModelLayout:
        """What the method plans on: the whole layout, or one shard's (see :func:`shard_layout`)."""
        return shard_layout(self.layout, self.shards)

    def before_blocks(self, first_block: nn.Module, x: torch.Tensor, temb: torch.Tensor, li: torch.Tensor) -> None:
        """Block 0's plan input, before any block runs, for the hooks that read it (SDTM*)."""
        if any(type(h).before_blocks is not ReferenceHooks.before_blocks for h in self.hooks):
            plan_input = first_block.norm1(x, emb=temb)[0]
            for hook in self.hooks:
                hook.before_blocks(plan_input, li)

    def blocks(
        self,
        blocks: list[tuple[Callable[..., Any], nn.Module]],
        x: torch.Tensor,
        context: torch.Tensor,
        temb: torch.Tensor,
        rotary: Any,
        li: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block in order; a block reuses the plan of the block the method names (``None``: it stays
        unmerged). Skipped layers (skip-layer guidance) neither merge nor touch ``li``."""
        grid = self.plan_layout.grid
        sources = self.method.plan_sources(self.layout.kinds, self.key, grid)
        keys = self.method.block_keys(self.layout.kinds, self.key, grid)
        plans: dict[int, MergePlan | None] = {}
        for index, (forward, block) in enumerate(blocks):
            if self.skip_layers is not None and index in self.skip_layers:
                continue
            source = sources[index]
            report = (lambda plan, i=index: self.on_plan(i, plan)) if self.on_plan is not None else None
            call = BlockCall(
                index,
                keys[index] if source is not None else FULL,
                grid,
                self.method,
                self.layout.family,
                self.hooks,
                plans.get(source) if source not in (None, index) else None,  # type: ignore[arg-type]
                report,
                self.kwargs,
                shards=self.shards,
            )
            context, x, li = forward(block, x, context, temb, rotary, li, call)
            plans[index] = call.made
        return x, li


def reference_forward(
    transformer: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    img_ids: torch.Tensor | None = None,
    txt_ids: torch.Tensor | None = None,
    guidance: torch.Tensor | None = None,
    *,
    key: EngineKey,
    config: MethodConfig,
    state: EngineState | None = None,
    li: torch.Tensor | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
    skip_layers: list[int] | None = None,
    on_plan: Callable[[int, MergePlan], None] | None = None,
    shards: int = 1,
) -> tuple[torch.Tensor, EngineState]:
    """One forward of ``transformer`` (``SD3Transformer2DModel`` or ``FluxTransformer2DModel``) on the engine of
    ``key`` with the method of ``config``.

    Args:
        hidden_states: SD3: the latent ``[B, C_lat, H, W]``; Flux: the packed latent ``[B, N, C_in]``.
        encoder_hidden_states, pooled_projections, timestep: as the diffusers model takes them (Flux: the timestep is
            sigma in ``(0, 1]``); ``img_ids`` / ``txt_ids`` / ``guidance``: Flux's.
        state: the engine state fed (:class:`~sdtm_compile.core.signature.EngineState`: ``li`` ``[B, N]`` int32 and
            what the method's extensions carry); ``li``: shorthand for a state holding only it.
        skip_layers: SD3's skip-layer guidance: these blocks do not run (nor merge, nor touch ``li``).
        on_plan: called as ``on_plan(block_index, plan)`` for every block that merges.
        shards: merge the image tokens in this many equal bands of grid rows, each on its own, as context
            parallelism of that degree does (one band per rank; :func:`shard_layout`); the attention still sees
            every token, as Ulysses' does. ``1``: the whole sequence.

    Returns:
        ``(sample, state)``: the model's output and every state output of the engine contract.
    """
    if state is None:
        if li is None:
            raise ValueError("pass the engine state (state=EngineState(li, ...)) or li")
        state = EngineState(li)
    method = method_for(config)
    layout = model_layout(transformer, hidden_states, encoder_hidden_states, img_ids)
    problem = method.check_model(shard_layout(layout, shards))
    if problem is not None:
        raise ValueError(problem)
    hooks = [hook for ext in method.extensions() if (hook := ext.reference(state, key, layout)) is not None]
    run = _Run(key, method, layout, hooks, dict(joint_attention_kwargs or {}), on_plan, skip_layers, shards)
    if layout.family == "flux":
        if joint_attention_kwargs or skip_layers:
            raise ValueError("the Flux reference takes no joint_attention_kwargs or skip_layers")
        inputs = (hidden_states, encoder_hidden_states, pooled_projections, timestep)
        sample, li_out = _flux_forward(transformer, *inputs, (img_ids, txt_ids, guidance), state.li, run)
    else:
        inputs = (hidden_states, encoder_hidden_states, pooled_projections, timestep)
        sample, li_out = _sd3_forward(transformer, *inputs, state.li, run)
    outputs: dict[str, torch.Tensor] = {}
    for hook in hooks:
        outputs.update(hook.outputs())
    return sample, EngineState(li_out, **outputs)


def _sd3_forward(
    transformer: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled: torch.Tensor,
    timestep: torch.Tensor,
    li: torch.Tensor,
    run: _Run,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``SD3Transformer2DModel`` forward with every block run by :func:`sd3_block_forward`."""
    height, width = hidden_states.shape[-2:]
    x = transformer.pos_embed(hidden_states).contiguous()
    temb = transformer.time_text_embed(timestep, pooled)
    context = transformer.context_embedder(encoder_hidden_states)
    run.before_blocks(transformer.transformer_blocks[0], x, temb, li)
    blocks = [(sd3_block_forward, block) for block in transformer.transformer_blocks]
    x, li = run.blocks(blocks, x, context, temb, None, li)
    x = transformer.proj_out(transformer.norm_out(x, temb))
    (grid_h, grid_w), patch, out_channels = run.layout.grid, transformer.config.patch_size, transformer.out_channels
    x = x.reshape(x.shape[0], grid_h, grid_w, patch, patch, out_channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], out_channels, height, width), li


def _flux_forward(
    transformer: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled: torch.Tensor,
    timestep: torch.Tensor,
    ids: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    li: torch.Tensor,
    run: _Run,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``FluxTransformer2DModel`` forward: its double blocks, then its single blocks, as :mod:`.blocks` runs them.
    ``ids``: ``(img_ids, txt_ids, guidance)``."""
    img_ids, txt_ids, guidance = ids
    x = transformer.x_embedder(hidden_states)
    timestep = timestep.to(x.dtype) * 1000
    if guidance is None:
        temb = transformer.time_text_embed(timestep, pooled)
    else:
        temb = transformer.time_text_embed(timestep, guidance.to(x.dtype) * 1000, pooled)
    context = transformer.context_embedder(encoder_hidden_states)
    rotary = transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    if transformer.transformer_blocks:
        run.before_blocks(transformer.transformer_blocks[0], x, temb, li)
    blocks = [(flux_double_block_forward, block) for block in transformer.transformer_blocks]
    blocks += [(flux_single_block_forward, block) for block in transformer.single_transformer_blocks]
    x, li = run.blocks(blocks, x, context, temb, rotary, li)
    return transformer.proj_out(transformer.norm_out(x, temb)), li


def reference_engine(
    transformer: nn.Module,
    key: EngineKey,
    config: MethodConfig,
    on_plan: Callable[[int, MergePlan], None] | None = None,
    shards: int = 1,
) -> Callable[..., tuple[torch.Tensor, EngineState]]:
    """The eager reference as a dispatcher engine: ``engine(state, **inputs) -> (sample, state)``, the inputs being
    the diffusers model's keyword inputs (``shards``: see :func:`reference_forward`)."""

    def engine(state: EngineState, **inputs: Any) -> tuple[torch.Tensor, EngineState]:
        return reference_forward(
            transformer, **inputs, key=key, config=config, state=state, on_plan=on_plan, shards=shards
        )

    return engine


class ReferenceTransformer:
    """The eager reference behind a :class:`~sdtm_compile.runtime.StageDispatcher`, called like the diffusers model
    it wraps (SD3 or Flux): keyword inputs, ``return_dict``.

    The config's timestep mapping is resolved for the model and the token count of a call
    (``resolve_for_model``), as the backend resolves it at compile time; one dispatcher per resolution.
    ``engine_for(key)`` returns the engine of a key (replaceable, e.g. to observe calls); ``on_plan``, when set,
    is called as ``on_plan(block_index, plan)`` for every merging block (merge maps); ``history`` (the last
    ``history`` calls outside a ``generation`` context; this is a test and debugging oracle, so it is on) and
    ``reset`` are the dispatcher's. ``shards``: merge as context parallelism of that degree does, one band of rows
    per rank (:func:`reference_forward`), with each rank's fresh state (:func:`sharded_signature`).
    """

    def __init__(self, transformer: nn.Module, config: MethodConfig, history: int = 1024, shards: int = 1) -> None:
        self.transformer = transformer
        self.config = config
        self.shards = shards
        self.method: TokenMethod = method_for(config)
        self._history = history
        self._dispatchers: dict[MethodConfig, StageDispatcher] = {}
        self._latest: StageDispatcher | None = None
        self.on_plan: Callable[[int, MergePlan], None] | None = None
        self.engine_for: Callable[[EngineKey], Callable[..., Any]] = lambda key: reference_engine(
            transformer, key, config, self._report, shards
        )

    def _report(self, index: int, plan: MergePlan) -> None:
        if self.on_plan is not None:
            self.on_plan(index, plan)

    @property
    def dispatcher(self) -> StageDispatcher:
        """The dispatcher of the latest call's resolution (before any call: the config as given)."""
        if self._latest is None:
            self._latest = self._dispatcher_for(self.config)
        return self._latest

    def _dispatcher_for(self, config: MethodConfig) -> StageDispatcher:
        if config not in self._dispatchers:
            self._dispatchers[config] = StageDispatcher(config, history=self._history)
        return self._dispatchers[config]

    @property
    def history(self):
        return self.dispatcher.history

    def reset(self) -> None:
        for dispatcher in self._dispatchers.values():
            dispatcher.reset()

    def __call__(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ):
        inputs: dict[str, Any] = {
            "hidden_states": hidden_states,
            "encoder_hidden_states": encoder_hidden_states,
            "pooled_projections": pooled_projections,
            "timestep": timestep,
        }
        if _is_flux(self.transformer):
            inputs.update(img_ids=img_ids, txt_ids=txt_ids, guidance=guidance)
        if joint_attention_kwargs:
            raise ValueError("the reference takes no joint_attention_kwargs")
        layout = model_layout(self.transformer, hidden_states, encoder_hidden_states, img_ids)
        self._latest = self._dispatcher_for(resolve_for_model(self.config, layout.family, layout.num_tokens))
        signature: EngineSignature = sharded_signature(self.method, layout, self.shards)
        sample = self._latest.run(
            timestep,
            (tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device),
            signature,
            hidden_states.device,
            lambda key, state: self.engine_for(key)(state, **inputs),
        )
        if not return_dict:
            return (sample,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)


def reference_dispatcher(
    transformer: nn.Module, config: MethodConfig, history: int = 1024, shards: int = 1
) -> ReferenceTransformer:
    """The eager reference with the stage schedule and state of the compiled paths (a :class:`ReferenceTransformer`;
    ``shards``: merged as context parallelism of that degree merges)."""
    return ReferenceTransformer(transformer, config, history, shards)
