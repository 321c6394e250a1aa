"""The TensorRT engine builder, written against torch-tensorrt 2.13 (thin on purpose: it cannot run in CI).

What it does on a CUDA machine with torch-tensorrt 2.13 installed:

* validates our ``tensorrt`` options against torch-tensorrt 2.13's ``CompilationSettings`` fields and its
  cache keys (torch-tensorrt itself silently drops unknown keys, e.g. ``enabled_precisions``, removed in
  2.13: precision now follows the dtypes of the model and inputs, so cast the transformer to fp16/bf16);
* calls ``aot_torch_tensorrt_aten_backend`` on the rewritten bucket graph from inside the Dynamo backend call
  (it needs Dynamo's fake mode and a *list* of inputs), with ``min_block_size=1`` and
  ``pass_through_build_failures=True`` so a failed build raises instead of silently running PyTorch;
* turns on torch-tensorrt's engine cache (which needs ``immutable_weights=False``);
* a graph with count inputs (``SDTMConfig(counts="exact")``): ``torch.export`` with a ``Dim`` per count input,
  then ``torch_tensorrt.dynamo.compile`` with ``Input(min_shape, opt_shape, max_shape)`` over the lengths it
  serves - one engine, one optimization profile (run outside Dynamo's tracing context, as the lint traces it).

Run its test on a GPU machine: ``pip install -e ".[dev,trt]" && pytest tests -k tensorrt``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from ..core.counts import served_lengths, size_only_inputs

__all__ = ["TENSORRT_SETTING_FIELDS", "tensorrt_options", "build_tensorrt_engine", "export_with_count_ranges"]

logger = logging.getLogger(__name__)

#: ``CompilationSettings`` fields of torch-tensorrt 2.13 (``dynamo/_settings.py``) plus the cache keys its
#: ``parse_dynamo_kwargs`` reads. Checked against the installed version's dataclass when it imports.
TENSORRT_SETTING_FIELDS = frozenset(
    {
        "workspace_size",
        "min_block_size",
        "pass_through_build_failures",
        "optimization_level",
        "truncate_double",
        "use_fp32_acc",
        "disable_tf32",
        "hardware_compatible",
        "version_compatible",
        "enable_experimental_decompositions",
        "decompose_attention",
        "attn_bias_is_causal",
        "assume_dynamic_shape_support",
        "require_full_compilation",
        "fallback_data_dependent_ops",
        "device",
        "timing_cache_path",
        "lazy_engine_init",
        "cache_built_engines",
        "reuse_cached_engines",
        "immutable_weights",
        "refit_identical_engine_weights",
        "strip_engine_weights",
        "use_fast_partitioner",
        "tiling_optimization_level",
        "debug",
        # cache keys read straight from the options by parse_dynamo_kwargs
        "engine_cache_dir",
        "engine_cache_size",
        "custom_engine_cache",
    }
)

_DEFAULTS = {
    "min_block_size": 1,
    "pass_through_build_failures": True,
    "immutable_weights": False,  # required for torch-tensorrt's engine cache
    "cache_built_engines": True,
    "reuse_cached_engines": True,
}


def tensorrt_options(user: Mapping[str, Any], known_fields: frozenset[str] = TENSORRT_SETTING_FIELDS) -> dict:
    """Our defaults updated with ``user``; raises ``ValueError`` on a key torch-tensorrt 2.13 would drop."""
    unknown = sorted(set(user) - known_fields)
    if unknown:
        hint = (
            " (removed in torch-tensorrt 2.13: cast the model to the dtype you want)"
            if ("enabled_precisions" in unknown)
            else ""
        )
        raise ValueError(
            f"unknown torch-tensorrt option(s) {unknown}{hint}; torch-tensorrt would silently ignore them. "
            f"Valid: {sorted(known_fields)}"
        )
    return {**_DEFAULTS, **user}


def _installed_fields() -> frozenset[str]:
    from dataclasses import fields

    from torch_tensorrt.dynamo import CompilationSettings

    return frozenset(f.name for f in fields(CompilationSettings)) | {
        "engine_cache_dir",
        "engine_cache_size",
        "custom_engine_cache",
        "debug",
    }


def build_tensorrt_engine(gm: fx.GraphModule, example_inputs: list[torch.Tensor], settings: Any):
    """Compile one rewritten bucket graph with torch-tensorrt; returns a callable over the same inputs."""
    try:
        import torch_tensorrt  # noqa: F401  (registers converters; raises without CUDA)
        from torch_tensorrt.dynamo.backend.backends import aot_torch_tensorrt_aten_backend
    except Exception as err:  # AssertionError / RuntimeError / OSError / ImportError without CUDA libraries
        raise RuntimeError(f"torch-tensorrt could not be imported: {type(err).__name__}: {err}") from err
    options = _options(settings)
    if size_only_inputs(gm):  # exact counts: one engine, one optimization profile over the counts it serves
        return _build_with_count_profile(gm, example_inputs, options)
    return aot_torch_tensorrt_aten_backend(gm, list(example_inputs), **options)


def _options(settings: Any) -> dict:
    """Our ``tensorrt`` options, checked, with the engine cache where the settings put ours."""
    options = tensorrt_options(getattr(settings, "tensorrt", {}) or {}, _installed_fields())
    cache_dir = settings.resolved_cache_dir() if hasattr(settings, "resolved_cache_dir") else None
    if cache_dir is None:
        options["cache_built_engines"] = options["reuse_cached_engines"] = False
    else:
        options.setdefault("engine_cache_dir", str(cache_dir / "tensorrt"))
    logger.debug("torch-tensorrt options: %s", options)
    return options


def export_with_count_ranges(
    gm: fx.GraphModule, example_inputs: list[torch.Tensor]
) -> tuple[Any, list[tuple[int, int] | None]]:
    """``torch.export`` of a graph with count inputs (:mod:`sdtm_compile.core.counts`), each a ``Dim`` over the
    lengths it serves; returns the program and each input's ``(min, max)`` length (``None``: static). What the
    TensorRT build starts from, and testable without CUDA."""
    positions = set(size_only_inputs(gm))
    dynamic_shapes: list[Any] = []
    ranges: list[tuple[int, int] | None] = []
    for index, value in enumerate(example_inputs):
        lengths = served_lengths(value) if index in positions else ()
        if len(lengths) > 1:
            ranges.append((min(lengths), max(lengths)))
            dynamic_shapes.append({0: torch.export.Dim(f"count_{index}", min=min(lengths), max=max(lengths))})
        else:
            ranges.append(None)
            dynamic_shapes.append(None)
    with torch._guards.tracing(None):  # called from inside the Dynamo backend: export in a context of its own
        program = torch.export.export(gm, tuple(example_inputs), dynamic_shapes=tuple(dynamic_shapes), strict=False)
    return program, ranges


def _build_with_count_profile(gm: fx.GraphModule, example_inputs: list[torch.Tensor], options: dict):
    """A graph with count inputs: :func:`export_with_count_ranges`, then ``torch_tensorrt.dynamo.compile`` with
    ``Input(min_shape, opt_shape, max_shape)`` for each count input and static inputs for the rest (one optimization
    profile)."""
    import torch_tensorrt

    program, ranges = export_with_count_ranges(gm, example_inputs)
    inputs = [
        torch_tensorrt.Input.from_tensor(value)
        if span is None
        else torch_tensorrt.Input(
            min_shape=(span[0],), opt_shape=(int(value.shape[0]),), max_shape=(span[1],), dtype=value.dtype
        )
        for value, span in zip(example_inputs, ranges)
    ]
    logger.debug("torch-tensorrt: %d count inputs with a shape range", sum(span is not None for span in ranges))
    return torch_tensorrt.dynamo.compile(program, arg_inputs=inputs, **options)
