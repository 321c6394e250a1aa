"""What a rank's collectives move in one engine call, read off the engine's graph (the shapes Dynamo and the passes
recorded), not timed: CPU timings say nothing about a GPU interconnect, bytes do.

Ulysses attention sends q, k and v through one ``all_to_all_single`` each and the attention output through a
fourth: a rank holding ``S`` of the joint sequence's tokens sends ``(degree - 1) / degree`` of each ``[S, H, D]``
tensor to the other ranks. Merging a rank's image tokens to ``M`` shrinks ``S = T / degree + N / degree`` to
``T / degree + M`` in every merged attention. The output gather (``proj_out``) moves the unmerged image whatever
merges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..passes import collective, node_value

__all__ = ["CollectiveBytes", "collective_bytes"]


@dataclass(frozen=True)
class CollectiveBytes:
    """One engine call of one rank. ``all_to_all``: bytes of the tensors it hands to ``all_to_all_single`` (its own
    part included); ``sent``: what leaves the rank (``(degree - 1) / degree`` of that); ``all_gather``: bytes it
    contributes to gathers; ``calls``: the collectives it runs."""

    all_to_all: int
    sent: int
    all_gather: int
    calls: int

    def __add__(self, other: CollectiveBytes) -> CollectiveBytes:
        return CollectiveBytes(*(a + b for a, b in zip(self._values(), other._values())))

    def _values(self) -> tuple[int, int, int, int]:
        return self.all_to_all, self.sent, self.all_gather, self.calls


def _input_bytes(node: fx.Node) -> int:
    value = node_value(node.args[0])
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{node.name}: no recorded shape for the input of {node.target}")
    return value.numel() * value.element_size()


def collective_bytes(gm: fx.GraphModule, degree: int) -> CollectiveBytes:
    """The collectives of one call of ``gm`` (one rank's graph under context parallelism of ``degree`` ranks)."""
    to_all = gather = calls = 0
    for node in gm.graph.nodes:
        op = collective(node) or ""
        if op == "all_to_all_single":
            to_all += _input_bytes(node)
        elif op.startswith("all_gather"):
            gather += _input_bytes(node)
        else:
            continue
        calls += 1
    return CollectiveBytes(to_all, to_all * (degree - 1) // degree, gather, calls)
