"""What several commands share: the model and method arguments, and building the model and config they name."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..core.config import DEFAULT_METHOD, MethodConfig, config_from_dict
from ..methods import method_names
from ..models import MODEL_PRESETS, FluxSpec, TinySpec, build_model, example_inputs, flux_example_inputs

__all__ = ["ratios", "model_arguments", "method_config", "load_model", "fail"]


def fail(command: str, message: object) -> SystemExit:
    """A ``SystemExit`` whose message names the command (argparse style: the caller raises it)."""
    return SystemExit(f"sdtm-compile {command}: {message}")


def ratios(text: str) -> tuple[float, ...]:
    """``"0.3,0.5"`` -> ``(0.3, 0.5)`` (an argparse type)."""
    if not text.strip():
        return ()
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios like 0.3,0.5, got {text!r}") from None


def _field(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``; the value read as a Python literal where it is one (``0.3``, ``True``)."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--method`` and its fields, ``--batch``, ``--latent``, ``--layers``, ``--dtype``,
    ``--text-tokens``."""
    parser.add_argument(
        "--model",
        default="tiny-sd3",
        help=f"a preset ({', '.join(MODEL_PRESETS)}) or a local diffusers SD3Transformer2DModel folder",
    )
    parser.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"the token-reduction method: {', '.join(method_names())} (default {DEFAULT_METHOD})",
    )
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--deviation", type=float, default=None, help="SDTM's CRA deviation (default: the config's)")
    parser.add_argument(
        "--set",
        type=_field,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other field of the method's config, e.g. --set cache_fusion=True (repeatable)",
    )
    parser.add_argument("--batch", type=int, default=None, help="default: 2 for SD3 (CFG), 1 for Flux")
    parser.add_argument("--latent", type=int, default=64, help="latent side (image side / 8)")
    parser.add_argument("--layers", type=int, default=None, help="keep the model's first k blocks (presets)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="the model's dtype (default float32; fp16 is what TensorRT consumes)",
    )
    parser.add_argument("--text-tokens", type=int, default=None, help="prompt tokens (default: the tiny spec's)")


def method_config(args: argparse.Namespace) -> MethodConfig:
    """The config ``--method``, ``--ratio``, ``--deviation`` and ``--set`` describe (a clear error otherwise)."""
    values: dict[str, Any] = {"method": args.method, "ratio": args.ratio, **dict(args.set)}
    if args.deviation is not None:
        values["deviation"] = args.deviation
    try:
        return config_from_dict(values)
    except ValueError as err:
        raise fail(args.command, err) from None


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, torch.Tensor], MethodConfig]:
    """``(model, example inputs, config)`` for the export / lint / passes commands; never downloads."""
    config = method_config(args)
    dtype = getattr(torch, args.dtype)
    if args.model in MODEL_PRESETS:
        spec = MODEL_PRESETS[args.model].spec
        try:
            if args.layers is not None:
                spec = spec.truncated(args.layers)
            model = build_model(spec, dtype=dtype)
        except ValueError as err:
            raise fail(args.command, err) from None
    else:
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel.from_pretrained(args.model, local_files_only=True, torch_dtype=dtype).eval()
        cfg = model.config
        spec = TinySpec(
            in_channels=cfg.in_channels,
            joint_attention_dim=cfg.joint_attention_dim,
            pooled_projection_dim=cfg.pooled_projection_dim,
            text_tokens=args.text_tokens or 333,
        )
    if args.text_tokens:
        spec = type(spec)(**{**spec.__dict__, "text_tokens": args.text_tokens})
    if isinstance(spec, FluxSpec):
        inputs = flux_example_inputs(spec, args.batch or 1, (args.latent, args.latent), sigma=1.0)
    else:
        inputs = example_inputs(spec, args.batch or 2, (args.latent, args.latent), timestep=1000.0)
    return model, {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}, config
