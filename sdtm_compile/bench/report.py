"""One report for every kind of benchmark run: :class:`BenchReport`, what ``result.json`` holds.

A report is the run's kind (``bench``: the main variants with the sweep; ``methods``: methods at several ratios;
``variants``: a method's variants and step caches), when and where it was measured, the model, the settings, the
points (one :class:`~sdtm_compile.bench.record.Measurement` each) and the sections only some kinds have (the
benchmark's schedule, FLOPs, merge-op share, targets, sweep, merge maps and image measures; a variant comparison's
peers that did not run). :meth:`BenchReport.from_dict` also reads the layouts saved before this one (``bench.json``,
``methods.json``, ``variants.json``: :mod:`~sdtm_compile.bench.legacy`), so every saved result re-renders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .legacy import upgrade
from .record import (
    FlopSummary,
    ImageQuality,
    MachineInfo,
    Measurement,
    MergeTimeShare,
    ModelInfo,
    Record,
    RunSettings,
    ScheduleStep,
    Target,
    from_fields,
)

__all__ = ["BenchReport", "FORMAT_VERSION", "KINDS", "as_report"]

#: The layout version :meth:`BenchReport.to_dict` writes (1: the ``bench.json`` of the benchmark alone).
FORMAT_VERSION = 2
#: The kinds of run, with what each measures (the page titles use these).
KINDS = {
    "bench": "eager, Inductor, the sdtm backend and the eager reference, with a ratio sweep",
    "methods": "token-reduction methods compared at several ratios",
    "variants": "a method's variants and step caches compared",
}


@dataclass
class BenchReport(Record):
    """Everything one run measured (see the module docstring); ``to_json()`` is ``result.json``.

    Attributes:
        kind: one of :data:`KINDS`.
        measured_on: the date the run finished (``YYYY-MM-DD``); ``None`` where a saved result did not record it.
        rerendered_on: the date its page was last drawn again from the saved result (``None``: never).
        command: the command line that ran it (``None`` when called from Python without one).
        machine: where it ran.
        method: the main method config (``to_dict()``; a comparison's base config); ``method_description`` its
            :meth:`~sdtm_compile.core.method.TokenMethod.describe`.
        points: the benchmark's main variants (``eager``, ``inductor``, ``sdtm``, ``reference``), a method
            comparison's (method, ratio) points, or a variant comparison's variants, in table order.
        sweep: the benchmark's speed-up vs fidelity curve, by ratio.
        schedule: the ``sdtm`` engine per step; ``reference_schedule_matches`` says whether the eager reference
            picked the same ones.
        targets: the benchmark's targets by name (:mod:`~sdtm_compile.bench.assemble`).
        merge_maps: ``{step: {block: slot per token}}`` of a few steps (the merge-map picture).
        quality: image measures, for a pixel-space model (the trained testbed).
        not_run: a variant comparison's variants that could not run on the model, with their error.
        source: the saved result this report was read from, for a re-rendered page.
        files: the files of its page, by kind (``json``, ``page``, the pictures by name).
    """

    format_version: int
    kind: str
    measured_on: str | None
    command: str | None
    machine: MachineInfo | None
    model: ModelInfo
    settings: RunSettings
    method: dict[str, Any] | None
    method_description: str
    points: list[Measurement]
    sweep: list[Measurement] = field(default_factory=list)
    schedule: list[ScheduleStep] = field(default_factory=list)
    reference_schedule_matches: bool | None = None
    flops: FlopSummary | None = None
    merge_time_share: MergeTimeShare | None = None
    targets: dict[str, Target] = field(default_factory=dict)
    merge_maps: dict[int, dict[int, list[int]]] = field(default_factory=dict)
    quality: ImageQuality | None = None
    not_run: dict[str, str] = field(default_factory=dict)
    wall_time_s: float | None = None
    rerendered_on: str | None = None
    source: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind of benchmark report {self.kind!r}: expected one of {list(KINDS)}")

    def point(self, name: str) -> Measurement:
        """The point named ``name`` (a ``KeyError`` naming the points there are otherwise)."""
        for point in self.points:
            if point.name == name:
                return point
        raise KeyError(f"no point {name!r} in this report: {[p.name for p in self.points]}")

    @property
    def pixel_space(self) -> bool:
        """Whether the model works in pixel space (its points have image PSNR / SSIM)."""
        return any(p.image_psnr_db is not None for p in [*self.points, *self.sweep]) or self.quality is not None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchReport:
        """The report from its dict: this layout, or an older one (:func:`~sdtm_compile.bench.legacy.upgrade`);
        a ``ValueError`` names what is missing from something that is not a benchmark result."""
        data = upgrade(data)

        def section(name: str) -> Any:  # a field every report has
            if name not in data:
                raise ValueError(f"not a benchmark result: field {name!r} is missing")
            return data[name]

        def optional(name: str, record: type[Record]) -> Any:  # a section some kinds have: the record or None
            return record.from_dict(data[name]) if data.get(name) else None

        return from_fields(
            cls,
            data,
            machine=optional("machine", MachineInfo),
            model=ModelInfo.from_dict(section("model")),
            settings=RunSettings.from_dict(section("settings")),
            points=[Measurement.from_dict(point) for point in section("points")],
            sweep=[Measurement.from_dict(point) for point in data.get("sweep", [])],
            schedule=[ScheduleStep.from_dict(step) for step in data.get("schedule", [])],
            flops=optional("flops", FlopSummary),
            merge_time_share=optional("merge_time_share", MergeTimeShare),
            targets={name: Target.from_dict(target) for name, target in data.get("targets", {}).items()},
            merge_maps={  # JSON keys are strings: steps and blocks become ints again
                int(step): {int(block): list(slot) for block, slot in blocks.items()}
                for step, blocks in data.get("merge_maps", {}).items()
            },
            quality=optional("quality", ImageQuality),
        )

    def to_json(self) -> str:
        """``result.json``'s text (``inf`` as ``Infinity``, as Python's ``json`` writes it)."""
        return json.dumps(self.to_dict(), indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> BenchReport:
        """The report from a saved result's text (any layout :meth:`from_dict` reads)."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BenchReport:
        """The report saved at ``path`` (any layout :meth:`from_dict` reads), with ``source`` set to ``path``."""
        report = cls.from_json(Path(path).read_text())
        report.source = str(path)
        return report


def as_report(result: BenchReport | Mapping[str, Any]) -> BenchReport:
    """``result`` as a :class:`BenchReport` (a dict, e.g. a loaded JSON file of any layout, is converted)."""
    return result if isinstance(result, BenchReport) else BenchReport.from_dict(result)
