"""Old import paths keep working: ``sdtm_compile.schedule``, ``sdtm_compile.export``, ``sdtm_compile.triton``, ...

The package was laid out flat until it was grouped into subpackages (``core``, ``methods``, ``compiler``, ...).
A user's ``from sdtm_compile.schedule import EngineKey`` or ``import sdtm_compile.triton.load`` still imports:
this finder answers the old name with the new module (one new module), or with a module that looks names up in
the new ones (a module that was split), and warns once (``DeprecationWarning``) naming where it went.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

__all__ = ["ALIASES", "PREFIXES", "install"]

_P = "sdtm_compile."

#: Old module -> the new module(s) holding what it held (looked up in this order).
ALIASES: dict[str, tuple[str, ...]] = {
    "config": ("core.config", "methods.sdtm.config"),
    "schedule": ("core.schedule", "methods.sdtm.schedule", "core.method"),
    "merge": ("core.merge", "core.plans", "methods.sdtm.plans", "methods.sdtm.method", "methods.sdtm"),
    "ops": ("core.ops", "methods.sdtm.cache_fusion", "methods.sdtm.adaptive", "methods.sdtm.size_aware"),
    "engine_state": ("core.signature",),
    "backend": ("compiler.backend", "compiler.settings", "compiler.compiled"),
    "buckets": ("compiler.buckets",),
    "regions": ("compiler.regions",),
    "capture": ("compiler.capture",),
    "cache": ("engines.cache",),
    "tensorrt": ("engines.tensorrt",),
    "compile_worker": ("engines.compile_worker",),
    "step_cache": ("runtime.step_cache", "passes.step_cache"),
    "reference_flux": ("reference",),
    "export": ("deploy.onnx", "deploy.bundle", "deploy.runner"),
    "sampling": ("models.sampling",),
    "flops": ("bench.flops",),
    "plots": ("bench.plots",),
    "demo": ("cli.demo",),
}
#: Old package -> new package (its submodules follow: ``sdtm_compile.triton.load`` -> ``...deploy.triton.load``).
PREFIXES: dict[str, str] = {"triton": "deploy.triton", "testbed": "models.testbed"}


def _targets(fullname: str) -> tuple[str, ...] | None:
    if not fullname.startswith(_P):
        return None
    name = fullname[len(_P) :]
    if name in ALIASES:
        return tuple(_P + target for target in ALIASES[name])
    for old, new in PREFIXES.items():
        if name == old or name.startswith(old + "."):
            return (_P + new + name[len(old) :],)
    return None


def _warn_moved(fullname: str, targets: tuple[str, ...]) -> None:
    warnings.warn(
        f"{fullname} moved to {', '.join(targets)}; the old path keeps working for now",
        DeprecationWarning,
        stacklevel=3,
    )


class _Compat(types.ModuleType):
    """A split module's old name: attributes are looked up in the modules that hold its names now. ``warn_on_use``:
    warn at the first lookup (a module registered before anyone imported it, see :func:`install`)."""

    def __init__(self, name: str, targets: tuple[str, ...], warn_on_use: bool = False) -> None:
        super().__init__(name, f"moved to {', '.join(targets)}")
        self._targets = targets
        self._warn_on_use = warn_on_use

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # the import system's probes (__path__, __spec__ ...) are not a user's lookup
            raise AttributeError(attr)
        if self._warn_on_use:
            self._warn_on_use = False
            _warn_moved(self.__name__, self._targets)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self._targets)}) has no {attr!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for t in self._targets for n in dir(importlib.import_module(t))})


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, fullname: str, targets: tuple[str, ...]) -> None:
        self.fullname, self.targets = fullname, targets

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        _warn_moved(self.fullname, self.targets)
        if len(self.targets) == 1:
            return importlib.import_module(self.targets[0])
        return _Compat(self.fullname, self.targets)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the new modules are imported already (or on first attribute access)."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        targets = _targets(fullname)
        if targets is None:
            return None
        is_package = len(targets) == 1 and hasattr(importlib.import_module(targets[0]), "__path__")
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname, targets), is_package=is_package)


_FINDER = _AliasFinder()


def install(package: types.ModuleType) -> None:
    """Answer the old module names (idempotent; ``import sdtm_compile`` calls it). First in ``sys.meta_path``: a
    path-based finder would load an old package's submodule a second time under its old name.

    An old module whose name is also one of ``package``'s names (``merge``: the function and the module it lived in)
    is registered in ``sys.modules`` now: the import system binds a module it loads to its parent's attribute, so
    loading it later would turn ``sdtm_compile.merge`` into the module (the old layout kept the function)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    for name, targets in ALIASES.items():
        fullname = _P + name
        if hasattr(package, name) and fullname not in sys.modules:
            sys.modules[fullname] = _Compat(fullname, tuple(_P + target for target in targets), warn_on_use=True)
