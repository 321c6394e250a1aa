"""The typed records of a benchmark report: one :class:`Measurement` per timed thing, and the sections around them.

Every kind of run (the benchmark, a method comparison, a variant comparison) measures the same things about each
thing it times, so one record holds them: :class:`Measurement`. A field a kind does not measure is ``None`` (a
method comparison times no eager model, so its points have no ``speedup_vs_eager``). The sections: where it ran
(:class:`MachineInfo`, :func:`machine_info`), the model (:class:`ModelInfo`, :func:`model_info`), how it ran
(:class:`RunSettings`), and the benchmark's own: the engine per step (:class:`ScheduleStep`), FLOPs
(:class:`FlopSummary`), the merge ops' time (:class:`MergeTimeShare`), the targets (:class:`Target`) and the
image measures of a pixel-space model (:class:`ImageQuality`).

Each record converts to the JSON-ready dict of its fields, in declaration order (``to_dict``), and back
(``from_dict``; a field with a default may be missing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..models import MODEL_PRESETS, FluxSpec
from .flops import flux_block_flops, mmdit_block_flops

__all__ = [
    "FlopSummary",
    "ImageQuality",
    "MachineInfo",
    "Measurement",
    "MergeTimeShare",
    "ModelInfo",
    "RunSettings",
    "ScheduleStep",
    "SeedFidelity",
    "Target",
    "machine_info",
    "model_info",
    "plain",
]

_R = TypeVar("_R", bound="Record")


def plain(value: Any) -> Any:
    """A JSON-ready copy of ``value``: records become their ``to_dict()``, dicts and lists are copied."""
    if isinstance(value, (Record, Target)):
        return value.to_dict()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):  # tuples too: a record's dict is what its JSON reads back as
        return [plain(item) for item in value]
    return value


def from_fields(cls: type[_R], data: Mapping[str, Any], **parsed: Any) -> _R:
    """``cls`` from ``data``'s fields (``parsed`` overrides them); a field with a default may be missing, a field
    without one is a ``ValueError`` naming it."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in parsed:
            values[f.name] = parsed[f.name]
        elif f.name in data:
            values[f.name] = data[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"not a benchmark result: {cls.__name__} field {f.name!r} is missing")
    return cls(**values)


class Record:
    """Dict conversion for the report's dataclasses: fields in declaration order, as the JSON holds them."""

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[_R], data: Mapping[str, Any]) -> _R:
        """The record from a dict of its fields (as :meth:`to_dict` gives it)."""
        return from_fields(cls, data)


@dataclass
class MachineInfo(Record):
    """Where a benchmark ran."""

    cpu: str
    cores: int | None
    torch_threads: int
    python: str
    torch: str
    platform: str


def machine_info() -> MachineInfo:
    """This machine: CPU model name, cores, torch threads, Python, torch and platform versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return MachineInfo(
        cpu=cpu,
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        platform=platform.platform(),
    )


@dataclass
class ModelInfo(Record):
    """The benchmarked model and its token counts.

    Attributes:
        spec: the model's spec (:class:`~sdtm_compile.models.TinySpec` or ``FluxSpec``) as a dict.
        latent: latent side; ``grid`` is the token grid ``[H, W]`` (latent / 2 each).
        block_flop_shares: each part's share of the blocks' FLOPs (SD3: one MMDiT block,
            :func:`~sdtm_compile.bench.flops.mmdit_block_flops`; Flux: all blocks,
            :func:`~sdtm_compile.bench.flops.flux_block_flops`).
    """

    name: str
    description: str
    spec: dict[str, Any]
    latent: int
    grid: list[int]
    image_tokens: int
    text_tokens: int
    hidden: int
    block_flop_shares: dict[str, float]

    @property
    def flux(self) -> bool:
        """Whether the model is a Flux transformer (double and single-stream blocks)."""
        return "num_single_layers" in self.spec


def model_info(name: str, latent: int) -> ModelInfo:
    """The :class:`ModelInfo` of preset ``name`` at latent side ``latent`` (all of it follows from the preset)."""
    preset = MODEL_PRESETS[name]
    spec = preset.spec
    grid = [latent // 2, latent // 2]
    n = grid[0] * grid[1]
    if isinstance(spec, FluxSpec):
        blocks = flux_block_flops(n, spec.text_tokens, spec.inner_dim, spec.num_layers, spec.num_single_layers)
    else:
        blocks = mmdit_block_flops(n, spec.text_tokens, spec.inner_dim)
    return ModelInfo(
        name=name,
        description=preset.description,
        spec=dataclasses.asdict(spec),
        latent=latent,
        grid=grid,
        image_tokens=n,
        text_tokens=spec.text_tokens,
        hidden=spec.inner_dim,
        block_flop_shares={part: flops / sum(blocks.values()) for part, flops in blocks.items()},
    )


@dataclass
class RunSettings(Record):
    """How a run went: the :class:`~sdtm_compile.bench.BenchConfig` fields the numbers depend on (``None``: not
    recorded by the run that saved the result)."""

    steps: int
    guidance_scale: float | None
    runs: int | None  #: timed generations per main variant (the benchmark)
    warmup: int
    sweep_runs: int | None  #: timed generations per sweep point / compared method or variant
    engine: str
    cold_caches: bool | None
    seed: int
    baseline: str
    fidelity_reference: str
    step_threshold: float | None = None  #: variant comparisons: the step caches' threshold


@dataclass
class Measurement(Record):
    """One timed thing (a main variant, a sweep point, a method at a ratio, a variant) and what was measured of it.

    Attributes:
        name: its name in the tables (``eager``, ``sdtm``, ``tomesd@0.3``, ``sdtm+fusion``, ...).
        description: what it is, in a line (a method's :meth:`~sdtm_compile.core.method.TokenMethod.describe`).
        config: the method config it ran with (``to_dict()``); ``None`` for the unmodified model and for a
            peer's cache hook.
        seconds: the timed generations (empty in results saved before they were kept); ``median_s`` (what every
            speed-up uses), ``min_s``, ``max_s`` and ``spread_pct`` (max - min over the median) summarise them;
            ``runs`` counts them.
        baseline_median_s: the Inductor baseline's median timed in the same rounds (where it was re-timed beside
            this one: a sweep point, a compared method).
        speedup_vs_inductor, speedup_vs_eager: the baseline's (eager's) median over this one's, same rounds.
        flops_per_generation: FLOPs of one generation; ``flop_ratio`` is the unmodified model's over these (a skipped
            step counts as its head, one block); ``speedup_over_flop_ratio`` the share of it the speed-up keeps.
        engines: the engine of each step of the last generation (``skip`` for a skipped step).
        merged_steps, unmerged_steps, skipped_steps: how the generation's steps ran.
        psnr_db, cosine: the final latent against the unmodified model's (``inf`` / 1.0 when identical).
        image_psnr_db, ssim: pixel-space models (the testbed): the final image against the unmodified model's,
            PSNR with peak 1 and SSIM (``None`` for latent-space models).
        build_cold_s, build_s: compile time in empty caches, and of the module timed (``None``: not compiled).
        peak_rss_mib: peak resident memory during a generation; ``peak_above_start_mib``, how far above the
            resident memory at its start.
        state_mib: what it carries between steps beyond the method's state (cache fusion, a step cache), MiB.
        deterministic: every timed generation gave the same latent (``None``: not checked).
    """

    name: str
    description: str = ""
    config: dict[str, Any] | None = None
    seconds: list[float] = field(default_factory=list)
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    spread_pct: float | None = None
    runs: int = 0
    baseline_median_s: float | None = None
    speedup_vs_inductor: float | None = None
    speedup_vs_eager: float | None = None
    flops_per_generation: int | None = None
    flop_ratio: float | None = None
    speedup_over_flop_ratio: float | None = None
    engines: list[str] = field(default_factory=list)
    merged_steps: int | None = None
    unmerged_steps: int | None = None
    skipped_steps: int | None = None
    psnr_db: float | None = None
    cosine: float | None = None
    image_psnr_db: float | None = None
    ssim: float | None = None
    build_cold_s: float | None = None
    build_s: float | None = None
    peak_rss_mib: float | None = None
    peak_above_start_mib: float | None = None
    state_mib: float | None = None
    deterministic: bool | None = None

    @property
    def ratio(self) -> float | None:
        """The method's ratio (``config["ratio"]``), or ``None`` for the unmodified model and peers."""
        return None if self.config is None else self.config.get("ratio")

    @property
    def method(self) -> str | None:
        """The method's name (``config["method"]``), or ``None`` for the unmodified model and peers."""
        return None if self.config is None else self.config.get("method")

    def fidelity(self, image: bool) -> float | None:
        """The fidelity the reports rank by: image PSNR on a pixel-space model (``image``), else latent PSNR."""
        return self.image_psnr_db if image and self.image_psnr_db is not None else self.psnr_db


@dataclass
class FlopSummary(Record):
    """FLOPs of the full model per step (in total and per aten op), per generation, and per engine."""

    full_per_step: int
    full_by_op: dict[str, int]
    per_generation: dict[str, int]
    by_engine: dict[str, int]
    #: the FLOP ratio of the linear layers alone (attention excluded; the paper's W-MACs ratio); None in old results
    linear_ratio: float | None = None


@dataclass
class ScheduleStep(Record):
    """The engine of one step of the timed generation and the tokens it runs on."""

    engine: str
    stage: str
    bucket: float
    attention_tokens: int
    ff_tokens: int
    step: int
    timestep: float
    flops: int


@dataclass
class MergeTimeShare(Record):
    """Merge-op seconds per call of each engine (``per_engine``) and over one generation (``generation``, with
    ``plan_share``, ``merge_share``, ``unmerge_share`` and ``all_merge_ops_share``)."""

    per_engine: dict[str, dict[str, float]]
    generation: dict[str, float]


@dataclass
class Target:
    """One target the benchmark checks: the numbers it compares (``measured``) and whether it was ``met``.

    In the JSON a target is one dict: the measured numbers, then ``met``.
    """

    measured: dict[str, Any]
    met: bool

    def to_dict(self) -> dict[str, Any]:
        """``{**measured, "met": met}``, as the JSON holds it."""
        return {**plain(self.measured), "met": self.met}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Target:
        """The target from its JSON dict."""
        if "met" not in data:
            raise ValueError(f"not a benchmark result: a target has no 'met' field: {dict(data)!r}")
        return cls({key: value for key, value in data.items() if key != "met"}, data["met"])


@dataclass
class SeedFidelity(Record):
    """The ``sdtm`` backend's final image against ``eager``'s with the same seed."""

    seed: int
    psnr_db: float
    ssim: float


@dataclass
class ImageQuality(Record):
    """Image measures of a pixel-space model (the trained testbed, :mod:`sdtm_compile.models.testbed`).

    Attributes:
        losses: held-out flow-matching loss at fixed ``(x0, eps, sigma)``, merged (eager reference) vs unmerged:
            one dict per sigma (``sigma``, ``unmerged``, ``merged``, ``increase``, ``engine``; see
            :func:`sdtm_compile.models.testbed.quality.merged_losses`).
        seeds: paired PSNR / SSIM of the ``sdtm`` backend's final image vs ``eager``'s, one row per seed.
        psnr_db_mean, ssim_mean, psnr_db_min, ssim_min: over ``seeds`` (a mean PSNR over identical images is inf).
        image: ``eager``'s final image of the main seed, ``[H][W][3]`` uint8 (the merge maps' background).
    """

    losses: list[dict[str, Any]]
    seeds: list[SeedFidelity]
    psnr_db_mean: float
    ssim_mean: float
    psnr_db_min: float
    ssim_min: float
    image: list[Any]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageQuality:
        """The image measures from their JSON dict (the per-seed rows become :class:`SeedFidelity`)."""
        return from_fields(cls, data, seeds=[SeedFidelity.from_dict(row) for row in data.get("seeds", [])])
