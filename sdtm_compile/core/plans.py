"""The plan registry: which plan function an engine runs (:class:`PlanSpec`) and the functions by name.

A method registers its plan functions with :func:`plan_method`; the graph's ``sdtm_plan`` nodes name them, so a
compiled graph carries a name and static arguments, never a Python object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .merge import MergePlan

__all__ = ["PlanSpec", "PLAN_METHODS", "plan_method", "make_plan"]


class PlanSpec(NamedTuple):
    """Which plan one engine makes: ``method`` (a key of :data:`PLAN_METHODS`) and its static arguments."""

    method: str
    count: int  #: what the plan function's count means is its own: windows (SSM), sources (IDM), tokens, ...
    options: tuple[tuple[str, float], ...] = ()  #: keyword arguments of the plan function, e.g. ``a_s``


#: Plan functions by name: ``plan(x, state, grid_h, grid_w, count, **options) -> (MergePlan, state)``. Each method
#: registers its own from its module (:mod:`sdtm_compile.methods`).
PLAN_METHODS: dict[str, Callable[..., tuple[MergePlan, torch.Tensor]]] = {}


def plan_method(name: str) -> Callable[[Callable[..., tuple[MergePlan, torch.Tensor]]], Callable[..., tuple]]:
    """Decorator: register a plan function ``plan(x, state, grid_h, grid_w, count, **options) -> (plan, state)``
    under ``name`` (what :class:`PlanSpec` and the graph's ``sdtm_plan`` nodes name)."""

    def register(fn: Callable[..., tuple[MergePlan, torch.Tensor]]) -> Callable[..., tuple]:
        if name in PLAN_METHODS and PLAN_METHODS[name] is not fn:
            raise ValueError(f"a plan function named {name!r} is registered already")
        PLAN_METHODS[name] = fn
        return fn

    return register


def make_plan(
    spec: PlanSpec, x: torch.Tensor, state: torch.Tensor, grid_h: int, grid_w: int
) -> tuple[MergePlan, torch.Tensor]:
    """Run the plan function ``spec`` names on ``x`` ``[B, N, C]`` and the method's ``state`` ``[B, N]``."""
    plan = PLAN_METHODS.get(spec.method)
    if plan is None:
        raise ValueError(
            f"unknown merge plan {spec.method!r}: registered are {sorted(PLAN_METHODS)} (import the module that "
            "defines it; import sdtm_compile registers every method of the package)"
        )
    return plan(x, state, grid_h, grid_w, spec.count, **dict(spec.options))
