"""Facts: named checks on a rewritten graph that passes require and ensure (``torch.fx``'s ``requires`` /
``ensures``, checked on the graph itself rather than on bookkeeping)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx

__all__ = ["FACTS", "fact", "check_facts", "PassOrderError"]

#: ``check(gm, sites, settings) -> bool``
Fact = Callable[[fx.GraphModule, Any, Any], bool]
#: Facts a pass may require or ensure, by name (the generic passes' in :mod:`.pipeline`; an extension registers
#: its own beside its pass).
FACTS: dict[str, Fact] = {}


class PassOrderError(RuntimeError):
    """A pass ran without a fact it requires, or did not establish a fact it promises."""


def fact(name: str) -> Callable[[Fact], Fact]:
    """Decorator: register ``check`` as the fact ``name``."""

    def register(check: Fact) -> Fact:
        if name in FACTS and FACTS[name] is not check:
            raise ValueError(f"a fact named {name!r} is registered already")
        FACTS[name] = check
        return check

    return register


def check_facts(names: tuple[str, ...], gm: fx.GraphModule, sites: Any, settings: Any, what: str) -> None:
    """Raise :class:`PassOrderError` naming ``what`` and the first of ``names`` that does not hold."""
    for name in names:
        check = FACTS.get(name)
        if check is None:
            raise PassOrderError(f"{what}: no fact named {name!r} is registered")
        if not check(gm, sites, settings):
            raise PassOrderError(f"{what}: fact {name!r} does not hold on the graph ({settings.key})")
