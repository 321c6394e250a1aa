"""The ``sdtm`` and ``sdtm_trt`` torch.compile backends.

Dynamo traces the transformer once and hands its FX graph here. We find the MMDiT blocks, rewrite one copy
of the graph per (stage, ratio bucket) the schedule can reach, build one engine per copy, and return a
callable that picks the engine from the timestep on every call (:class:`SDTMCompiledGraph`)::

    pipe.transformer = torch.compile(pipe.transformer, backend="sdtm_trt",
                                     options={"sdtm": SDTMConfig(ratio=0.5)})

Another token-reduction method goes through the same passes and engines: ``options={"method":
sdtm_compile.ToMeSDConfig(ratio=0.5)}`` (likewise ``SiToConfig``, ``ToMAConfig``; ``SDTMConfig`` too).

Both names are declared in the ``torch_dynamo_backends`` entry-point group, so they work without importing
this package. ``sdtm`` builds Inductor engines by default; ``sdtm_trt`` builds TensorRT engines where
torch-tensorrt and CUDA exist and otherwise warns once and builds Inductor engines.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from .buckets import BucketGraphs, engine_token_counts
from .cache import default_cache_dir
from .config import MethodConfig, SDTMConfig, config_from_dict
from .engine_state import EngineState, split_engine_outputs
from .engines import ENGINES, EngineBuildError, build_inductor_parallel, engine_available
from .passes import FALLBACK_HINT, ModelSites, UnsupportedModelError
from .passes.fuse_cache import new_cache
from .passes.lint_tensorrt import lint_tensorrt, to_aten
from .regions import RegionalBuilder
from .runtime import FirstBlockCalls, StageDispatcher
from .schedule import FULL, EngineKey, TokenCounts
from .step_cache import FirstBlockCacheConfig, add_hidden_output, head_graph, out_graph, residual_sites

__all__ = ["BackendSettings", "SDTMBackend", "SDTMCompiledGraph", "compiled_graphs", "sdtm", "sdtm_trt"]

logger = logging.getLogger(__name__)

_GRAPHS: weakref.WeakSet[SDTMCompiledGraph] = weakref.WeakSet()  # every live SDTM graph, for compiled_graphs()


def compiled_graphs(model: torch.nn.Module) -> list[SDTMCompiledGraph]:
    """The :class:`SDTMCompiledGraph` s built for ``model`` (the ``torch.compile`` result or the module itself).

    Matched by the model's parameters, which Dynamo passes to the backend as graph inputs: correct with any
    number of compiled models in the process, whichever backend object or name built them. Empty before the
    first call (``torch.compile`` builds lazily).
    """
    module = getattr(model, "_orig_mod", model)
    params = {id(p) for p in module.parameters()}
    return [graph for graph in list(_GRAPHS) if graph.parameter_ids & params]


_ENGINE_CHOICES = ("auto", "tensorrt", "inductor", "eager")


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
            against torch-tensorrt 2.13's fields before building; see :mod:`sdtm_compile.tensorrt`).
        cache_dir: where built engines are cached (:mod:`sdtm_compile.cache`): a path, ``None`` for the
            default (``$SDTM_CACHE_DIR`` or ``~/.cache/sdtm_compile``) or ``False`` for no cache.
        history: how many recent calls each compiled graph records outside a :func:`sdtm_compile.generation`
            context (``dispatcher.history``; 0, the default, records none). A context has its own history.
        build_workers: compiler processes that build Inductor region engines in parallel (``None``: as many as
            CPU cores, at most 4; 1: build in this process). Used for CPU inference builds of regional engines.
        regional: build engines region by region (:mod:`sdtm_compile.regions`): one engine per distinct block
            prefix / merged part / glue region, shared by every block and bucket with the same structure (much
            faster builds; the weights are engine inputs). ``False`` builds each bucket graph whole.
        step_cache: a step cache composed with the merging: a
            :class:`~sdtm_compile.step_cache.FirstBlockCacheConfig` (or a dict of its fields) skips the blocks
            after the first when the first block's residual barely changed since the last computed step (SD3 /
            SD3.5; not with cache fusion). ``None`` (default): every step runs its engine.
    """

    method: MethodConfig | None = None
    sdtm: SDTMConfig | None = None
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
        return self.method or self.sdtm or SDTMConfig()

    def resolved_cache_dir(self) -> Path | None:
        """The engine cache directory in force, or ``None`` when caching is off."""
        if self.cache_dir is False:
            return None
        if self.cache_dir is None or self.cache_dir is True:
            return default_cache_dir()
        return Path(self.cache_dir)

    def resolved_build_workers(self) -> int:
        """Compiler processes for parallel region builds (see ``build_workers``)."""
        if self.build_workers is not None:
            return self.build_workers
        return max(1, min(4, os.cpu_count() or 1))

    def __post_init__(self) -> None:
        if isinstance(self.sdtm, Mapping):
            object.__setattr__(self, "sdtm", SDTMConfig.from_dict(self.sdtm))
        if self.sdtm is not None and not isinstance(self.sdtm, SDTMConfig):
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
        if self.engine not in _ENGINE_CHOICES:
            raise ValueError(f"option 'engine'={self.engine!r} is invalid: choose one of {list(_ENGINE_CHOICES)}")
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
        if self.step_cache is not None and getattr(self.config, "cache_fusion", False):
            raise ValueError(
                "options 'step_cache' and SDTMConfig(cache_fusion=True) were both given: they would cache the same "
                "steps twice. Use one of them"
            )
        from .tensorrt import tensorrt_options

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


class SDTMCompiledGraph:
    """What the backend returns to Dynamo: one engine per (stage, bucket) and the dispatcher between them.

    Calling it with the graph's inputs reads the timestep, picks the engine, runs it with the ``li`` state and
    returns the graph's outputs. ``engines`` and ``dispatcher`` are public for inspection and tests.
    """

    def __init__(
        self,
        engines: dict[EngineKey, Callable[..., Any]],
        engine_names: dict[EngineKey, str],
        sites: ModelSites,
        config: MethodConfig,
        example_inputs: list[torch.Tensor] = (),  # type: ignore[assignment]
        history: int = 0,
        step_cache: FirstBlockCacheConfig | None = None,
        first_block: tuple[Callable[..., Any], Callable[..., Any]] | None = None,
    ) -> None:
        self.engines = engines
        self.engine_names = engine_names
        self.sites = sites
        self.config = config
        self.dispatcher = StageDispatcher(config, history=history, step_cache=step_cache)
        #: first-block cache: the (head, out) engines (:mod:`sdtm_compile.step_cache`); ``None`` without one
        self.first_block = first_block
        #: ids of the model parameters among the graph's inputs (how :func:`compiled_graphs` finds the model);
        #: the graph's engines keep the parameters alive, so the ids cannot be reused while it lives.
        self.parameter_ids = {id(t) for t in example_inputs if isinstance(t, torch.nn.Parameter)}
        #: Flux: the ``img_ids`` the token grid was read from; every call must bring the same ones
        self.image_ids = None
        if sites.image_ids_index is not None and example_inputs:
            self.image_ids = example_inputs[sites.image_ids_index].detach().clone()

    def _check_image_ids(self, ids: torch.Tensor) -> None:
        """Flux: the merge windows were laid on the grid of the compile-time ``img_ids``; a new layout with the
        same token count (e.g. 32x32 -> 16x64) would not recompile, so check the values."""
        assert self.image_ids is not None
        if ids.shape != self.image_ids.shape or not torch.equal(ids.to(self.image_ids.device), self.image_ids):
            raise ValueError(
                f"img_ids differ from the ones this model was compiled with (a {self.sites.grid[0]}x"
                f"{self.sites.grid[1]} token grid): the SDTM merge windows are laid on that grid. Keep the image "
                "height and width, or compile again for the new size (torch._dynamo.reset(), then a new "
                "torch.compile)"
            )

    def __call__(self, *args: Any) -> Any:
        latent = args[self.sites.latent_index]
        timestep = args[self.sites.timestep_index]
        if self.image_ids is not None:
            self._check_image_ids(args[self.sites.image_ids_index])  # type: ignore[index]

        def call(key: EngineKey, state: EngineState) -> tuple[Any, EngineState]:
            engine = self.engines.get(key)
            if engine is None:
                raise KeyError(f"no engine was built for {key}; built: {sorted(map(str, self.engines))}")
            outputs = engine(*args, *state.engine_inputs())
            if self.first_block is None:
                return split_engine_outputs(outputs, self.config)
            model_outputs, result = split_engine_outputs(outputs[:-1], self.config)
            return model_outputs, result._replace(hidden=outputs[-1])

        first_block = None
        if self.first_block is not None:
            head, out = self.first_block
            first_block = FirstBlockCalls(
                head=lambda state: tuple(head(*args, *state.engine_inputs())),  # type: ignore[arg-type]
                out=lambda state, hidden: tuple(out(*args, *state.engine_inputs(), hidden)),
            )

        return self.dispatcher.run(
            timestep,
            ("graph", id(self)),
            (latent.shape[0], self.sites.num_tokens),
            latent.device,
            call,
            new_cache=lambda: new_cache(self.sites, self.config, latent.shape[0], latent.device),  # type: ignore[arg-type]
            first_block=first_block,
        )

    def reset(self) -> None:
        """Forget the default generation state (``li``) explicitly (``generation`` contexts keep theirs)."""
        self.dispatcher.reset()

    def token_counts(self, key: EngineKey) -> TokenCounts:
        """Image tokens the attention and the feed-forward see in the engine of ``key`` (for tables and plots)."""
        return engine_token_counts(key, self.sites, self.config)


def _has_symbolic_shapes(gm: fx.GraphModule, example_inputs: list[torch.Tensor]) -> bool:
    values = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    values += [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    return any(isinstance(size, torch.SymInt) for v in values if isinstance(v, torch.Tensor) for size in v.shape)


class SDTMBackend:
    """A torch.compile backend object: ``torch.compile(model, backend=SDTMBackend({...}))``.

    ``compiled`` keeps every :class:`SDTMCompiledGraph` it produced (one per Dynamo graph / input shape).
    """

    def __init__(self, options: Mapping[str, Any] | None = None, *, name: str = "sdtm") -> None:
        self.settings = BackendSettings.from_options(options)
        self.name = name
        self.compiled: list[SDTMCompiledGraph] = []

    def _engine_order(self, example_inputs: list[torch.Tensor]) -> list[str]:
        """Engines to try, best first, after resolving ``auto``; warns once when TensorRT is not possible."""
        choice = self.settings.engine
        if choice == "auto" and self.name == "sdtm_trt":
            reason = engine_available("tensorrt", example_inputs)
            if reason is None:
                return ["tensorrt", "inductor"]
            warnings.warn(
                f"sdtm_trt: TensorRT is not usable here: {reason}. Building Inductor engines instead.",
                RuntimeWarning,
                stacklevel=3,
            )
            return ["inductor"]
        if choice == "auto":
            return ["inductor"]
        reason = engine_available(choice, example_inputs)
        if reason is not None:
            raise EngineBuildError(f"engine {choice!r} cannot be used: {reason}")
        return [choice] + (["inductor"] if choice == "tensorrt" else [])

    def _build(self, what: object, gm: fx.GraphModule, inputs: list[torch.Tensor], order: list[str]):
        """Build ``gm`` (a bucket graph or a region, named ``what``) with the first engine in ``order`` that works."""
        for position, name in enumerate(order):
            try:
                if name == "tensorrt":  # lint first: a graph TensorRT cannot convert must not half-build
                    lint_tensorrt(to_aten(gm, inputs), what)
                return name, ENGINES[name].build(gm, inputs, self.settings)
            except Exception as err:
                if position == len(order) - 1:
                    raise EngineBuildError(f"building the {name} engine for {what} failed: {err}") from err
                warnings.warn(
                    f"building the {name} engine for {what} failed ({type(err).__name__}: {err}); "
                    f"falling back to {order[position + 1]} for this engine",
                    RuntimeWarning,
                    stacklevel=2,
                )
        raise AssertionError("unreachable")

    def _unmodified(self, gm: fx.GraphModule, example_inputs: list[torch.Tensor], order: list[str], reason: str):
        """``on_unsupported='fallback'``: warn, naming why, and build the unmodified graph with the chosen engine."""
        warnings.warn(
            f"{self.name}: {reason}. Compiling the model WITHOUT token merging (on_unsupported='fallback').",
            RuntimeWarning,
            stacklevel=3,
        )
        return self._build(FULL, gm, example_inputs, order)[1]

    def _first_block_engines(self, buckets: BucketGraphs, graphs: list, inputs: list[torch.Tensor], order: list[str]):
        """The first-block cache's head and out engines (from the unmerged graph), and every bucket graph extended
        with the last block's output (:mod:`sdtm_compile.step_cache`)."""
        full = buckets.graph(FULL)
        names = residual_sites(full.sites)
        model_outputs = len(next(n for n in buckets.traced.graph.nodes if n.op == "output").args[0])
        head = head_graph(full.gm, names)
        out = out_graph(full.gm, names, model_outputs)
        for bucket in graphs:
            add_hidden_output(bucket.graph.gm, names)
        last = next(n for n in full.gm.graph.nodes if n.name == names.last_out).meta["example_value"]
        hidden = torch.zeros(last.shape, dtype=last.dtype, device=buckets.latent.device)
        logger.info("building the first-block cache's head and out engines with %s", order[0])
        return self._build("first-block head", head, inputs, order)[1], self._build(
            "out", out, [*inputs, hidden], order
        )[1]

    def __call__(self, gm: fx.GraphModule, example_inputs: list[torch.Tensor], **kwargs: Any) -> Callable[..., Any]:
        if "options" in kwargs:  # torch.compile(backend=<this object>, options=...) is not how we take options
            raise ValueError("pass options to SDTMBackend(options) or use backend='sdtm' with options={...}")
        example_inputs = list(example_inputs)
        if _has_symbolic_shapes(gm, example_inputs):
            raise UnsupportedModelError(
                "the SDTM backend needs static shapes (one set of engines per token count), but Dynamo traced "
                "this graph with dynamic shapes (it does so automatically when a compiled function sees a new "
                "shape). Compile with torch.compile(..., dynamic=False)."
            )
        order = self._engine_order(example_inputs)
        config = self.settings.config
        try:
            buckets = BucketGraphs(gm, example_inputs, config)
        except UnsupportedModelError as err:
            if self.settings.on_unsupported == "error":
                raise
            return self._unmodified(gm, example_inputs, order, _without_hint(err))

        graphs = []
        for keys in buckets.groups():  # rewrite every graph before building: a pass failure stops before any build
            try:
                graphs.append(buckets.distinct_graph(keys))
            except Exception as err:  # any pass failure: the graph is not one we can rewrite
                if self.settings.on_unsupported == "error":
                    raise
                reason = f"rewriting the graph for {keys[0]} failed ({type(err).__name__}: {_without_hint(err)})"
                return self._unmodified(gm, example_inputs, order, reason)

        engine_inputs = buckets.engine_inputs()
        first_block = None
        if self.settings.step_cache is not None:
            first_block = self._first_block_engines(buckets, graphs, engine_inputs, order)
        workers = self.settings.resolved_build_workers()
        parallel = (
            self.settings.regional
            and order == ["inductor"]
            and workers > 1
            and not torch.is_grad_enabled()  # the compiler processes build inference engines
            and all(t.device.type == "cpu" for t in engine_inputs if isinstance(t, torch.Tensor))
        )
        regional = RegionalBuilder(
            lambda region, inputs, name: self._build(name, region, inputs, order)[1],
            (lambda jobs: build_inductor_parallel(jobs, self.settings, workers)) if parallel else None,
        )
        engines, names = {}, {}
        total = time.perf_counter()
        for bucket in graphs:
            counts = bucket.counts
            logger.info(
                "%s %s (attention %d, FF %d of %d image tokens) with %s",
                "preparing" if self.settings.regional else "building",
                ", ".join(map(str, bucket.keys)),
                counts.attention,
                counts.feed_forward,
                counts.tokens,
                order[0],
            )
            if self.settings.regional:
                engine, name = regional.add(bucket.graph, engine_inputs), order[0]
            else:
                name, engine = self._build(bucket.keys[0], bucket.graph.gm, engine_inputs, order)
            for served in bucket.keys:
                engines[served], names[served] = engine, name
        if self.settings.regional:
            logger.info(
                "building %d distinct regions for %d call sites%s ...",
                regional.pending,
                regional.stats.call_sites,
                f" in {workers} compiler processes" if parallel else "",
            )
            regional.finish()
        logger.info(
            "%s: %d engines (%d distinct graphs, %d distinct regions for %d call sites) ready in %.1f s",
            self.name,
            len(engines),
            len(graphs),
            regional.stats.built,
            regional.stats.call_sites,
            time.perf_counter() - total,
        )
        compiled = SDTMCompiledGraph(
            engines,
            names,
            buckets.sites,
            buckets.config,
            example_inputs,
            self.settings.history,
            self.settings.step_cache,
            first_block,
        )
        self.compiled.append(compiled)
        _GRAPHS.add(compiled)
        return compiled


def _without_hint(err: Exception) -> str:
    """A pass's error message without its "pass on_unsupported='fallback'" advice (the fallback is running)."""
    return str(err).split(f". {FALLBACK_HINT}")[0]


def _no_extra_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    if kwargs:  # e.g. torch.compile(mode="max-autotune"): say so instead of silently ignoring it
        raise ValueError(
            f"the {name} backend takes only options={{...}}; got {sorted(kwargs)}. Inductor modes do not apply "
            "to SDTM engines"
        )


def sdtm(gm: fx.GraphModule, example_inputs: list[torch.Tensor], options: Mapping[str, Any] | None = None, **kw):
    """The ``sdtm`` backend: SDTM with Inductor engines (``engine`` option to change)."""
    _no_extra_kwargs("sdtm", kw)
    return SDTMBackend(options, name="sdtm")(gm, example_inputs)


def sdtm_trt(gm: fx.GraphModule, example_inputs: list[torch.Tensor], options: Mapping[str, Any] | None = None, **kw):
    """The ``sdtm_trt`` backend: SDTM with TensorRT engines where possible, Inductor otherwise (with a warning)."""
    _no_extra_kwargs("sdtm_trt", kw)
    return SDTMBackend(options, name="sdtm_trt")(gm, example_inputs)
