"""Results saved before the one report layout: :func:`upgrade` turns them into it, so they re-render.

Three layouts came before :class:`~sdtm_compile.bench.report.BenchReport`'s (``format_version`` 2):

* ``bench.json`` (``format_version`` 1): the benchmark alone, its main variants in a ``variants`` dict, the sweep
  as ratio points, the method config under ``sdtm``;
* ``methods.json`` (no version): a method comparison, one point per (method, ratio) with ``flop_ratio_kept``;
* ``variants.json`` (no version): a variant comparison, one point per variant, and ``not_run``.

Each becomes the dict of the current layout, every measured number kept under the name the
:class:`~sdtm_compile.bench.record.Measurement` gives it. What those files did not record stays ``None`` (the date
measured, the step caches' threshold), or follows from what they did: the model's token counts from its preset,
the guidance scale and seed the command line could not change then, a sweep point's config from the main config and
the fields the point saved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.config import config_from_dict
from ..core.method import method_for
from ..models import MODEL_PRESETS
from .config import BASELINE, FIDELITY_REFERENCE, variant_description
from .record import Measurement, model_info

__all__ = ["canonical_config", "describe_config", "upgrade"]

#: The fields of a saved sweep point that are measurements; the others (the ratio and what it bounds) are config.
_MEASURED = {f for f in Measurement.__dataclass_fields__} | {"flop_ratio_kept"}


def canonical_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config dict as the method's config writes it today (``method`` first, every field); a dict a current
    config cannot take (a field since removed) is kept as saved."""
    try:
        return config_from_dict(values).to_dict()
    except (ValueError, TypeError):
        return dict(values)


def describe_config(values: Mapping[str, Any]) -> str:
    """The method's one-line description of a config dict (:meth:`TokenMethod.describe`), or its ratio."""
    try:
        return method_for(config_from_dict(values)).describe()
    except (ValueError, TypeError):
        return f"{values.get('method', 'method')} ratio {values.get('ratio')}"


def upgrade(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` in the current layout: a dict of the current layout as it is, an older one converted (see the
    module docstring); a ``ValueError`` for anything else."""
    version = data.get("format_version")
    if version == 2:
        return dict(data)
    if version == 1:
        return _from_bench_v1(data)
    if version is None and "points" in data and "not_run" in data:
        return _from_variants_v1(data)
    if version is None and "points" in data:
        return _from_methods_v1(data)
    raise ValueError(
        f"not a benchmark result: no layout this version reads (format_version {version!r}; fields {sorted(data)})"
    )


def _section(data: Mapping[str, Any], name: str) -> Any:
    """``data[name]``; a ``ValueError`` naming the field when it is missing."""
    if name not in data:
        raise ValueError(f"not a benchmark result: field {name!r} is missing")
    return data[name]


def _from_bench_v1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A ``bench.json`` of ``format_version`` 1."""
    method = canonical_config(_section(data, "sdtm"))
    description = describe_config(method)
    points = []
    for name, row in _section(data, "variants").items():
        values = {key: value for key, value in row.items() if key != "build_warm_s"}
        merged = name in ("sdtm", "reference")
        points.append(
            {
                **values,
                "name": name,
                "description": variant_description(name, description),
                "config": method if merged else None,
                "runs": len(row.get("seconds", [])),
                "build_s": row.get("build_warm_s"),
            }
        )
    sweep = []
    for point in _section(data, "sweep"):
        config = canonical_config({**method, **{k: v for k, v in point.items() if k not in _MEASURED}})
        measured = {k: v for k, v in point.items() if k in _MEASURED}
        sweep.append(
            {
                **measured,
                "name": f"sdtm@{config['ratio']:g}",
                "description": describe_config(config),
                "config": config,
                "speedup_over_flop_ratio": point["speedup_vs_inductor"] / point["flop_ratio"],
            }
        )
    return {
        **{key: value for key, value in data.items() if key not in ("sdtm", "bench", "variants", "sweep", "files")},
        "format_version": 2,
        "kind": "bench",
        "measured_on": None,
        "settings": _section(data, "bench"),
        "method": method,
        "method_description": description,
        "points": points,
        "sweep": sweep,
    }


def _settings(data: Mapping[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
    """The settings of a comparison saved before they were recorded: what its command line could set then."""
    preset = MODEL_PRESETS[data["model"]]
    return {
        "steps": data["steps"],
        "guidance_scale": preset.guidance_scale,  # no option changed it
        "runs": None,
        "warmup": 1,  # every point was timed after one warm-up generation
        "sweep_runs": points[0]["runs"] if points else None,
        "engine": data["engine"],
        "cold_caches": "--warm-caches" not in (data.get("command") or ""),
        "seed": 0,  # no option changed it
        "baseline": BASELINE,
        "fidelity_reference": FIDELITY_REFERENCE,
        "step_threshold": None,
    }


def _comparison(data: Mapping[str, Any], kind: str, points: list[dict[str, Any]], description: str) -> dict[str, Any]:
    """The current layout's dict of a comparison saved before it (``points`` already converted)."""
    return {
        "format_version": 2,
        "kind": kind,
        "measured_on": None,
        "command": data.get("command"),
        "machine": data.get("machine"),
        "model": model_info(data["model"], data["latent"]).to_dict(),
        "settings": _settings(data, points),
        "method": None,
        "method_description": description,
        "points": points,
        "not_run": dict(data.get("not_run", {})),
        "wall_time_s": data.get("wall_time_s"),
    }


def _from_methods_v1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A ``methods.json``: one point per (method, ratio)."""
    points = []
    for point in data["points"]:
        config = canonical_config(point["config"])
        values = {k: v for k, v in point.items() if k not in ("method", "ratio", "config", "flop_ratio_kept")}
        points.append(
            {
                **values,
                "name": f"{point['method']}@{point['ratio']:g}",
                "description": describe_config(config),
                "config": config,
                "speedup_over_flop_ratio": point["flop_ratio_kept"],
            }
        )
    methods = ", ".join(dict.fromkeys(point["method"] for point in data["points"]))
    return _comparison(data, "methods", points, f"methods {methods}")


def _from_variants_v1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A ``variants.json``: one point per variant (their fields are :class:`Measurement`'s already)."""
    return _comparison(data, "variants", [dict(point) for point in data["points"]], "")
