"""The options of the ``sdtm`` / ``sdtm_trt`` backends: :class:`BackendSettings`, every field documented and
validated when built (``torch.compile(..., options={...})``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import MethodConfig, config_from_dict
from ..core.method import method_for
from ..engines import default_cache_dir, tensorrt_options
from ..runtime import FirstBlockCacheConfig

__all__ = ["BackendSettings", "ENGINE_CHOICES", "load_tuned_options"]

ENGINE_CHOICES = ("auto", "tensorrt", "inductor", "eager")


@dataclass(frozen=True)
class BackendSettings:
    """Options of the ``sdtm`` / ``sdtm_trt`` backends (``torch.compile(..., options={...})``).

    Attributes:
        method: the token-reduction method and its settings: a config of :mod:`sdtm_compile.methods`
            (:class:`SDTMConfig`, ``ToMeSDConfig``, ``SiToConfig``, ``ToMAConfig``) or a dict of its fields with a
            ``"method"`` key (``"sdtm"``, ``"tomesd"``, ``"sito"``, ``"toma"``). ``None``: ``sdtm``'s.
        sdtm: the SDTM configuration (an :class:`SDTMConfig` or a dict of its fields); ``None``: the defaults.
            The same as ``method=SDTMConfig(...)``; give one of the two.
        engine: ``"auto"`` (``sdtm``: Inductor; ``sdtm_trt``: TensorRT if torch-tensorrt and CUDA are there,
            else Inductor with a warning), ``"tensorrt"`` (error if unavailable), ``"inductor"`` or ``"eager"``
            (the rewritten graph op by op, for debugging).
        on_unsupported: what to do with a model the passes cannot rewrite (no MMDiT block found, or any
            pass failing on a bucket graph): ``"error"`` (default) raises the pass's error
            (:class:`~sdtm_compile.passes.UnsupportedModelError`, ``TokenShapeError``, ...); ``"fallback"``
            warns, naming the reason, and compiles the unmodified graph with the chosen engine. A failed engine
            *build* is not covered: it falls back along the engine order, or raises ``EngineBuildError``.
        tensorrt: extra torch-tensorrt ``CompilationSettings`` fields for the TensorRT engines (checked
            against torch-tensorrt 2.13's fields before building; see :mod:`sdtm_compile.engines.tensorrt`).
        cache_dir: where built engines are cached (:mod:`sdtm_compile.engines.cache`): a path, ``None`` for the
            default (``$SDTM_CACHE_DIR`` or ``~/.cache/sdtm_compile``) or ``False`` for no cache.
        history: how many recent calls each compiled graph records outside a :func:`sdtm_compile.generation`
            context (``dispatcher.history``; 0, the default, records none). A context has its own history.
        build_workers: Inductor region engines built at once: this process and ``build_workers - 1`` compiler
            processes (``None``: ``$SDTM_BUILD_WORKERS``, else as many as CPU cores, at most 4; 1: build in this
            process only). Used for CPU inference builds of regional engines.
        regional: build engines region by region (:mod:`sdtm_compile.compiler.regions`): one engine per distinct block
            prefix / merged part / glue region, shared by every block and bucket with the same structure (much
            faster builds; the weights are engine inputs). ``False`` builds each bucket graph whole.
        step_cache: a step cache composed with the merging: a
            :class:`~sdtm_compile.runtime.FirstBlockCacheConfig` (or a dict of its fields) skips the blocks
            after the first when the first block's residual barely changed since the last computed step (SD3 /
            SD3.5; with SDTM's cache fusion it skips only unprotected steps).
            ``None`` (default): every step runs its engine.
    """

    method: MethodConfig | None = None
    sdtm: MethodConfig | None = None
    engine: str = "auto"
    on_unsupported: str = "error"
    tensorrt: Mapping[str, Any] = field(default_factory=dict)
    cache_dir: str | os.PathLike[str] | bool | None = None
    history: int = 0
    regional: bool = True
    build_workers: int | None = None
    step_cache: FirstBlockCacheConfig | None = None

    @property
    def config(self) -> MethodConfig:
        """The method configuration in force: ``method``, else ``sdtm``, else SDTM's defaults."""
        return self.method or self.sdtm or config_from_dict({})  # the default method's defaults

    def resolved_cache_dir(self) -> Path | None:
        """The engine cache directory in force, or ``None`` when caching is off."""
        if self.cache_dir is False:
            return None
        if self.cache_dir is None or self.cache_dir is True:
            return default_cache_dir()
        return Path(self.cache_dir)

    def resolved_build_workers(self) -> int:
        """Region engines built at once (see ``build_workers``)."""
        if self.build_workers is not None:
            return self.build_workers
        env = os.environ.get("SDTM_BUILD_WORKERS")
        if env:
            if not env.isdigit() or int(env) < 1:
                raise ValueError(f"SDTM_BUILD_WORKERS must be a number >= 1, got {env!r}")
            return int(env)
        return max(1, min(4, os.cpu_count() or 1))

    def __post_init__(self) -> None:
        if isinstance(self.sdtm, Mapping):
            object.__setattr__(self, "sdtm", config_from_dict({"method": "sdtm", **self.sdtm}))
        if self.sdtm is not None and not (isinstance(self.sdtm, MethodConfig) and self.sdtm.method == "sdtm"):
            raise ValueError(f"option 'sdtm' must be an SDTMConfig or a dict of its fields, got {self.sdtm!r}")
        if isinstance(self.method, Mapping):
            object.__setattr__(self, "method", config_from_dict(self.method))
        if self.method is not None and not isinstance(self.method, MethodConfig):
            raise ValueError(
                f"option 'method' must be a method config (sdtm_compile.SDTMConfig, ToMeSDConfig, SiToConfig, "
                f"ToMAConfig) or a dict of its fields with a 'method' key, got {self.method!r}"
            )
        if self.method is not None and self.sdtm is not None:
            raise ValueError(
                "options 'method' and 'sdtm' were both given: pass the configuration once, as "
                "method=<a method config> (sdtm=SDTMConfig(...) is the same as method=SDTMConfig(...))"
            )
        if self.engine not in ENGINE_CHOICES:
            raise ValueError(f"option 'engine'={self.engine!r} is invalid: choose one of {list(ENGINE_CHOICES)}")
        if self.on_unsupported not in ("error", "fallback"):
            raise ValueError(f"option 'on_unsupported'={self.on_unsupported!r} is invalid: 'error' or 'fallback'")
        if not isinstance(self.history, int) or self.history < 0:
            raise ValueError(f"option 'history' must be a number of calls >= 0, got {self.history!r}")
        if self.build_workers is not None and (not isinstance(self.build_workers, int) or self.build_workers < 1):
            raise ValueError(f"option 'build_workers' must be None or a number >= 1, got {self.build_workers!r}")
        if not isinstance(self.regional, bool):
            raise ValueError(f"option 'regional' must be True or False, got {self.regional!r}")
        if not isinstance(self.tensorrt, Mapping):
            raise ValueError(f"option 'tensorrt' must be a dict of torch-tensorrt settings, got {self.tensorrt!r}")
        if isinstance(self.step_cache, Mapping):
            object.__setattr__(self, "step_cache", FirstBlockCacheConfig.from_dict(self.step_cache))
        if self.step_cache is not None and not isinstance(self.step_cache, FirstBlockCacheConfig):
            raise ValueError(
                f"option 'step_cache' must be a sdtm_compile.FirstBlockCacheConfig or a dict of its fields, got "
                f"{self.step_cache!r}"
            )
        if self.step_cache is not None:
            for extension in method_for(self.config).extensions():
                if not extension.composes_with_step_cache:
                    raise ValueError(
                        f"options 'step_cache' and the method's {extension.name} were both given: they would cache "
                        "the same steps twice. Use one of them"
                    )
        tensorrt_options(self.tensorrt)  # fail now, not at the first build, on a key torch-tensorrt would drop

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> BackendSettings:
        """Validate a ``torch.compile`` options dict; unknown keys raise an error listing the valid ones."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for the SDTM backend; valid options: {valid}")
        return cls(**options)


def load_tuned_options(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``options`` of a ``sdtm-compile tune`` result file, checked, for ``torch.compile(..., backend="sdtm",
    options=load_tuned_options(path))`` (add ``engine`` or ``cache_dir`` as usual)."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the tuner result {path}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("options"), dict):
        raise ValueError(f"{path} is not a `sdtm-compile tune` result: it has no 'options' object")
    options = dict(data["options"])
    BackendSettings.from_options(options)  # invalid options fail here, naming the field
    return options
