"""What an exported bundle is: its manifest (format, files and their sha256, the engines, the engine contract) and
how it is read back (:func:`read_bundle`, :func:`signature_from_manifest`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..core.method import TokenMethod
from ..core.schedule import EngineKey, Stage
from ..core.signature import METHOD_STATE, EngineSignature, StateTensor
from ..engines import sha256_file

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "MODEL_FILE",
    "BundleError",
    "read_bundle",
    "manifest_state",
    "signature_from_manifest",
    "step_counts",
]

#: 2: one ``model.onnx`` holding every engine (picked by its ``engine`` input) and the weights once in
#: ``weights.bin``; 1 (sdtm-compile 0.1): one ONNX file per engine, each with its own copy of the weights.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"


class BundleError(ValueError):
    """An exported bundle that cannot be used: the message names the file and what is wrong."""


def manifest_state(signature: EngineSignature) -> list[dict[str, Any]]:
    """The manifest's ``state``: every entry of the engine contract (all carried: a bundle's engines take what they
    return) with its ONNX output name (``<name>_out``) and when it resets."""
    return [
        {
            "name": tensor.name,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).replace("torch.", ""),
            "output": f"{tensor.name}_out",
            "reset": tensor.description,
        }
        for tensor in signature.tensors
    ]


def signature_from_manifest(manifest: dict[str, Any], method: TokenMethod) -> EngineSignature:
    """The engine contract a bundle's graphs keep, read back from its manifest (the method's state starts as the
    method says; any other carried entry starts as zeros)."""
    entries = []
    for spec in manifest["state"]:
        shape, dtype = tuple(spec["shape"]), getattr(torch, spec["dtype"])
        if spec["name"] == METHOD_STATE:
            entries.append(method.state_tensor(*shape))
        else:
            entries.append(StateTensor(spec["name"], shape, dtype, True, None, spec.get("reset", "")))
    return EngineSignature(entries)


def read_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """The manifest of an exported bundle, after checking its format version and that every file it lists exists
    and matches its sha256 (a :class:`BundleError` naming the file otherwise)."""
    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"{manifest_path}: no manifest; export a bundle with sdtm_compile.export_onnx")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{manifest_path}: not valid JSON ({err})") from err
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format_version {version!r} is not supported (this sdtm-compile reads "
            f"{FORMAT_VERSION}); re-export the bundle with this version"
        )
    for name, digest in manifest["files"].items():
        path = bundle_dir / name
        if not path.exists():
            raise BundleError(f"{path}: listed in the manifest but missing from the bundle")
        actual = sha256_file(path)
        if actual != digest:
            raise BundleError(
                f"{path}: sha256 {actual[:16]}... does not match the manifest's {digest[:16]}... "
                "(file corrupt or replaced); re-export the bundle"
            )
    return manifest


def step_counts(manifest: dict[str, Any], method: TokenMethod, key: EngineKey) -> tuple[int, ...]:
    """Exact counts: the count of every count input of a bundle (``manifest["count_inputs"]``) at the schedule's
    ``key``; an input the step's engine does not read (the unmerged engine reads none) gets 0. Empty for a bundle
    of static buckets."""
    number = len(manifest.get("count_inputs", ()))
    if not number:
        return ()
    counts = (
        () if key.stage is Stage.FULL else method.plan_counts(manifest["block_kinds"], key, tuple(manifest["grid"]))
    )
    return (*counts, *[0] * (number - len(counts)))
