"""The on-disk engine cache: a second process with the same model and config loads engines, not rebuilds them.

Location: ``BackendSettings.cache_dir``, else ``$SDTM_CACHE_DIR``, else ``~/.cache/sdtm_compile``.
``cache_dir=False`` (or ``SDTM_CACHE_DIR=off``) turns it off.

An entry is ``<key>.bin`` (the engine) beside ``<key>.json`` (what it is and the blob's sha256). The key hashes
the engine name, the bucket graph's code (which holds every SDTM constant of the engine), each input's shape,
stride, dtype and device, whether gradients are on (Inductor then compiles a different graph), the compiler's
config (Inductor's), a digest of the source of the merge ops (the core and the methods, which the graph's
code only names) and the versions of torch, torch-tensorrt and sdtm-compile; weights are graph *inputs*, not
part of the engine, so one entry serves any checkpoint of the same architecture. A truncated or corrupt entry
is reported once (a warning), deleted and rebuilt - never loaded. TensorRT engines use torch-tensorrt's own
engine cache in ``<cache>/tensorrt``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import fx

__all__ = ["EngineCache", "default_cache_dir", "sha256_file", "versions"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
FORMAT = 1


def default_cache_dir() -> Path | None:
    """``$SDTM_CACHE_DIR`` (``off`` disables) or ``~/.cache/sdtm_compile``."""
    env = os.environ.get("SDTM_CACHE_DIR")
    if env is not None and env.lower() in ("", "0", "off", "false", "none"):
        return None
    return Path(env) if env else Path.home() / ".cache" / "sdtm_compile"


def versions() -> dict[str, str]:
    """Versions that invalidate a cached engine."""
    found = {"torch": torch.__version__}
    for dist in ("sdtm-compile", "torch-tensorrt"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "none"
    return found


@functools.lru_cache(maxsize=1)
def _graph_ops_digest() -> str:
    """A digest of the source of everything the ops the passes insert can run: the core (the ops, the merge
    primitives) and every method's module (its plan functions, its extensions' ops). A bucket graph's code only
    *names* them, so without this an edited plan would load an engine built from the old one."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*(package / "core").glob("*.py"), *(package / "methods").rglob("*.py")]):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _compiler_config(engine: str) -> str:
    """A digest of the engine compiler's own settings (e.g. ``torch._inductor.config``), so changing them
    (kernel profiling, autotuning, ...) builds a new engine instead of loading one built without them."""
    if engine != "inductor":
        return ""
    import torch._inductor.config as inductor_config

    settings = inductor_config.get_config_copy()
    return hashlib.sha256(repr(sorted((k, repr(v)) for k, v in settings.items())).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class EngineCache:
    """One cache directory. ``load`` returns ``None`` for a miss or a bad entry; ``store`` writes atomically."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def key(self, gm: fx.GraphModule, example_inputs: list[Any], engine: str) -> str:
        """Hash of the bucket graph, input shapes/strides/dtypes/devices, grad mode, engine name, compiler config,
        the source of the merge ops and versions.

        The SDTM config is not hashed on its own: every constant it puts into an engine (token counts,
        ``a_s``, the grid) is in the graph's code, while the schedule-only fields (``ratio``,
        ``deviation``, ``switch_at``) only choose *which* buckets are built. So a second ratio reuses the
        buckets it shares with the first.
        """
        # Strides too: a compiled engine asserts the strides it was built for (an expanded timestep has 0).
        # A count input also names the counts its engine serves (an engine checked for other counts is not this one)
        inputs = [
            (tuple(t.shape), tuple(t.stride()), str(t.dtype), t.device.type, getattr(t, "sdtm_lengths", None))
            if isinstance(t, torch.Tensor)
            else repr(t)
            for t in example_inputs
        ]
        payload = json.dumps(
            {
                "format": FORMAT,
                "engine": engine,
                "code": gm.code,
                "inputs": inputs,
                # grad mode decides what Inductor compiles: an inference graph, or a forward that saves for backward
                "grad": torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in example_inputs),
                "compiler": _compiler_config(engine),
                "graph_ops": _graph_ops_digest(),
                "versions": versions(),
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.bin", self.directory / f"{key}.json"

    def load(self, key: str, loader: Callable[[str], T]) -> T | None:
        """The cached engine of ``key`` via ``loader(path)``, or ``None`` (miss, or a bad entry now deleted)."""
        blob, meta = self._paths(key)
        if not blob.exists() and not meta.exists():
            return None
        try:
            info = json.loads(meta.read_text())
            if info.get("format") != FORMAT:
                raise ValueError(f"format {info.get('format')!r}, expected {FORMAT}")
            actual = sha256_file(blob)
            if actual != info.get("sha256"):
                raise ValueError(
                    f"sha256 {actual[:12]}... does not match the recorded {str(info.get('sha256'))[:12]}..."
                )
            engine = loader(str(blob))
        except Exception as err:
            warnings.warn(
                f"engine cache entry {blob} is unusable ({type(err).__name__}: {err}); deleting it and rebuilding",
                RuntimeWarning,
                stacklevel=2,
            )
            for path in (blob, meta):
                path.unlink(missing_ok=True)
            return None
        logger.info("loaded engine %s from the cache (%s)", key, blob)
        return engine

    def store(self, key: str, save: Callable[[str], None], description: dict[str, Any]) -> None:
        """Write the engine with ``save(path)`` and its metadata; a failure only logs (the engine still works)."""
        blob, meta = self._paths(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # one partial file per process: the ranks of a context-parallel run build the same engines at once
            partial = blob.with_suffix(f".bin.{os.getpid()}.partial")
            save(str(partial))
            digest = sha256_file(partial)
            os.replace(partial, blob)
            meta.write_text(json.dumps({"format": FORMAT, "sha256": digest, **description}, indent=1, default=str))
        except Exception as err:  # a read-only or full disk must not break compilation
            logger.warning("could not write engine cache entry %s: %s", blob, err)
