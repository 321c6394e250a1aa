"""The step caches of other libraries, measured beside ours in a variant comparison: diffusers' FirstBlockCache and
TaylorSeer hooks, and cache-dit's DBCache, each applied to a copy of the model and compiled with ``torch.compile``.

:func:`peer_specs` names them with how to build each; :class:`PeerCall` drives a hooked model as a pipeline does
(every call inside its cache context, its state reset when a generation starts) and records which calls ran the
model's tail. None of these libraries is a dependency: a peer that cannot be imported or run is reported by the
comparison, not dropped silently.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PeerCall", "PeerSpec", "peer_specs", "unpatched_first_block_cache_error"]


class PeerCall:
    """A hook-based cache driven as a pipeline drives it: every call inside its cache context, its state reset
    when a generation starts (a timestep above the last one), and whether each call ran the tail recorded."""

    def __init__(self, module: Any, model: torch.nn.Module, context: Any, reset: Any, computed: Any) -> None:
        self.module, self.model = module, model
        self.context, self.reset, self.computed = context, reset, computed
        self.last: float | None = None
        self.ran_tail: list[bool] = []  #: per call of the latest generation

    def __call__(self, **kwargs: Any) -> Any:
        """One transformer call through the hooked, compiled model; returns its output."""
        t = float(kwargs["timestep"].reshape(-1)[0])
        if self.last is not None and t > self.last:
            self.reset()
            self.ran_tail = []
        self.last = t
        with self.context():
            out = self.module(**kwargs)
        self.ran_tail.append(self.computed())
        return out


@dataclass(frozen=True)
class PeerSpec:
    """A peer: its name, what it is, and ``apply(model, backend)``: hook the model (a copy) and compile it with the
    given ``torch.compile`` backend."""

    name: str
    description: str
    apply: Callable[[torch.nn.Module, str], PeerCall]


def _patch_sd3_last_block(model: torch.nn.Module) -> None:
    """Our workaround for diffusers' FirstBlockCache on SD3: its tail hook subtracts from the last block's
    ``encoder_hidden_states``, which a ``context_pre_only`` block returns as ``None``; return the input instead
    (SD3 discards it after the last block)."""
    last = model.transformer_blocks[-1]
    forward = last.forward

    def patched(hidden_states, encoder_hidden_states=None, temb=None, joint_attention_kwargs=None):
        context, hidden = forward(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            temb=temb,
            joint_attention_kwargs=joint_attention_kwargs,
        )
        return (encoder_hidden_states if context is None else context), hidden

    last.forward = patched


def _diffusers_context(model: torch.nn.Module) -> tuple[Any, Any]:
    """diffusers' cache context of ``model`` (the conditional branch) and its state reset."""
    from diffusers.models.cache_utils import CacheMixin

    return (lambda: CacheMixin.cache_context(model, "cond")), (lambda: CacheMixin._reset_stateful_cache(model))


def _diffusers_first_block_cache(
    model: torch.nn.Module, threshold: float, patch_last_block: bool, backend: str
) -> PeerCall:
    """``model`` with diffusers' FirstBlockCache at ``threshold``, compiled with ``backend``, as a peer call."""
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersFBC
    from diffusers.hooks import apply_first_block_cache

    if patch_last_block:
        _patch_sd3_last_block(model)
    apply_first_block_cache(model, DiffusersFBC(threshold=threshold))
    head = model.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook").state_manager
    context, reset = _diffusers_context(model)
    compiled = torch.compile(model, dynamic=False, backend=backend)
    return PeerCall(compiled, model, context, reset, lambda: bool(head._state_cache["cond"].should_compute))


def _diffusers_taylorseer(model: torch.nn.Module, backend: str) -> PeerCall:
    """``model`` with diffusers' TaylorSeer cache (its defaults), compiled with ``backend``, as a peer call."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    apply_taylorseer_cache(model, TaylorSeerCacheConfig())
    last = (
        model.single_transformer_blocks[-1]
        if hasattr(model, "single_transformer_blocks")
        else model.transformer_blocks[-1]
    )
    hook = last.attn._diffusers_hook.get_hook("taylorseer_cache").state_manager
    context, reset = _diffusers_context(model)

    def computed() -> bool:
        state = hook._state_cache["cond"]
        return bool(state.last_update_step == state.current_step)

    return PeerCall(torch.compile(model, dynamic=False, backend=backend), model, context, reset, computed)


def _cache_dit(model: torch.nn.Module, threshold: float, steps: int, backend: str) -> PeerCall:
    """``model`` with cache-dit's DBCache (F1B0 at ``threshold``), compiled with ``backend``, as a peer call."""
    import cache_dit  # optional: pip install cache-dit (not a dependency of ours)
    from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern

    logging.getLogger("cache_dit").setLevel(logging.WARNING)
    settings = DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2, residual_diff_threshold=threshold
    )
    if hasattr(model, "single_transformer_blocks"):  # Flux: cache-dit's own adapter
        cache_dit.enable_cache(model, cache_config=settings)
    else:  # SD3 is not in its registry: a BlockAdapter over the joint blocks
        blocks, pattern = model.transformer_blocks, ForwardPattern.Pattern_1
        cache_dit.enable_cache(
            BlockAdapter(transformer=model, blocks=blocks, forward_pattern=pattern), cache_config=settings
        )
    calls = {"n": 0}

    def computed() -> bool:
        calls["n"] += 1
        cached = cache_dit.summary(model, logging=False)[0].cached_steps or []
        return calls["n"] - 1 not in cached

    def reset() -> None:
        cache_dit.refresh_context(model, num_inference_steps=steps)
        calls["n"] = 0

    return PeerCall(
        torch.compile(model, dynamic=False, backend=backend), model, contextlib.nullcontext, reset, computed
    )


def peer_specs(family: str, step_threshold: float, steps: int) -> list[PeerSpec]:
    """The peers, at the step caches' ``step_threshold`` where they have one (SD3 models need our patch of the last
    block for diffusers' FirstBlockCache, and a BlockAdapter for cache-dit)."""
    patch = family == "sd3"
    return [
        PeerSpec(
            "diffusers-fbcache",
            f"diffusers' FirstBlockCacheConfig(threshold={step_threshold:g}) hook, Inductor"
            + (" (last block patched: see not_run)" if patch else ""),
            lambda model, backend: _diffusers_first_block_cache(model, step_threshold, patch, backend),
        ),
        PeerSpec(
            "diffusers-taylorseer",
            'diffusers\' TaylorSeerCacheConfig() hook (defaults: on a "skipped" step the attention outputs are '
            "forecast, the feed-forwards still run), Inductor",
            _diffusers_taylorseer,
        ),
        PeerSpec(
            "cache-dit",
            f"cache-dit DBCache (F1B0, residual threshold {step_threshold:g}, 2 warm-up steps)"
            + (" via a BlockAdapter" if family == "sd3" else "")
            + ", Inductor",
            lambda model, backend: _cache_dit(model, step_threshold, steps, backend),
        ),
    ]


def unpatched_first_block_cache_error(model: torch.nn.Module, probe: dict[str, Any], threshold: float) -> str:
    """What diffusers' FirstBlockCache does on an SD3 model as it ships (one eager call of a copy with ``probe``):
    the error, or ``ran (no error)``."""
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersFBC
    from diffusers.hooks import apply_first_block_cache

    model = copy.deepcopy(model)
    apply_first_block_cache(model, DiffusersFBC(threshold=threshold))
    context, _ = _diffusers_context(model)
    try:
        with torch.no_grad(), context():
            model(**probe, return_dict=False)
    except Exception as err:
        return (
            f"{type(err).__name__}: {str(err).splitlines()[0][:300]} (diffusers' FBCBlockHook on SD3's last, "
            "context_pre_only block, which returns encoder_hidden_states=None)"
        )
    return "ran (no error)"
