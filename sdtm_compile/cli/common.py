"""What several commands share: the model and method arguments, and building the model and config they name."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..core.config import DEFAULT_METHOD, NAMED_CONFIGS, MethodConfig, config_from_dict, named_config
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
        default=None,
        help=f"the token-reduction method: {', '.join(method_names())} (default {DEFAULT_METHOD})",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="NAME|FILE",
        help=f"start from a named config ({', '.join(sorted(NAMED_CONFIGS))}) or a JSON file (a config dict, or "
        "`sdtm-compile tune`'s output); --method/--ratio/--deviation/--set given explicitly override it",
    )
    parser.add_argument("--ratio", type=float, default=None, help="default: the config's (0.5 without --config)")
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


def config_values(source: str) -> dict[str, Any]:
    """The config dict of ``--config``: a named config, a JSON config dict, or a tuner result (its ``options``'
    ``method``). Raises ``ValueError`` saying what is wrong."""
    import json
    from pathlib import Path

    if source in NAMED_CONFIGS:
        return named_config(source).to_dict()
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--config {source!r} is neither a named config ({sorted(NAMED_CONFIGS)}) nor a file")
    try:
        values = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"--config {path} is not valid JSON ({error})") from None
    if isinstance(values, dict) and "options" in values:  # `sdtm-compile tune` output
        values = values["options"].get("method") or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a JSON object of config fields")
    return values


def method_config(args: argparse.Namespace) -> MethodConfig:
    """The config ``--config``, ``--method``, ``--ratio``, ``--deviation`` and ``--set`` describe (a clear error
    otherwise)."""
    try:
        values: dict[str, Any] = config_values(args.config) if getattr(args, "config", None) else {}
        if args.method is not None:
            if values and values.get("method", DEFAULT_METHOD) != args.method:
                raise ValueError(
                    f"--method {args.method} contradicts --config {args.config} (a {values.get('method')} config): "
                    "give one of them"
                )
            values["method"] = args.method
        values.setdefault("method", DEFAULT_METHOD)
        if args.ratio is not None or "ratio" not in values:
            values["ratio"] = 0.5 if args.ratio is None else args.ratio
        if args.deviation is not None:
            values["deviation"] = args.deviation
        values.update(dict(args.set))
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
