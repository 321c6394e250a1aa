"""The engine contract: what an engine takes and returns besides the model's own inputs and outputs.

Every engine is called as ``engine(*model_inputs, *signature.engine_inputs(state))`` and returns
``(*model_outputs, *state_outputs)``. One :class:`EngineSignature` per compile owns the names, order, shapes,
dtypes and fresh values of those extra tensors, and splits an engine's outputs back
(:meth:`EngineSignature.split`). It is built by :meth:`TokenMethod.signature
<sdtm_compile.core.method.TokenMethod.signature>` from a :class:`~sdtm_compile.core.layout.ModelLayout`; every
consumer reads it - the passes that thread the state through a graph and check the outputs' shapes, the bucket
graphs and regional builds, the backend and the dispatcher, the eager reference, and the ONNX manifest (from which
the ONNX runner and the Triton step table read it back).

Its entries, in order:

* ``li``: the method's state ``[B, N]`` int32 (SDTM's "not attended" counter; the random state of ToMeSD and
  SiTo), carried: an input and an output of every engine, reset at the start of every generation;
* what a method's extensions add (:class:`~sdtm_compile.core.extension.Extension`), e.g. SDTM's cache fusion cache
  ``[K, B, N, C]`` (carried) and SDTM*'s statistic ``[B]`` (an output only);
* what a backend option adds, e.g. the first-block step cache's last-block output ``[B, N, C]`` (an output only).

Carried tensors come first (the engine's inputs, in the same order as its first outputs), then the output-only
ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["StateTensor", "EngineState", "EngineSignature", "METHOD_STATE"]

#: The name of the method's own state, the first entry of every signature.
METHOD_STATE = "li"


@dataclass(frozen=True)
class StateTensor:
    """One tensor of the contract.

    Attributes:
        name: its name (the graph's ``sdtm_<name>`` input, the ONNX input / ``<name>_out`` output).
        shape, dtype: static, as every engine of the compile takes or returns it.
        carried: an input *and* an output of every engine (the dispatcher feeds the output back); ``False``: an
            output only (a reading, or what a backend option keeps).
        initial: a fresh value (``device -> tensor``) at the start of a generation; ``None``: zeros.
        description: what it is and when it resets (written to the ONNX manifest).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    carried: bool = True
    initial: Callable[[torch.device | str | None], torch.Tensor] | None = field(default=None, compare=False)
    description: str = ""

    def fresh(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The value at the start of a generation."""
        if self.initial is not None:
            return self.initial(device)
        return torch.zeros(self.shape, dtype=self.dtype, device=device)


class EngineState(Mapping[str, torch.Tensor]):
    """The state tensors of one engine call, by name: ``state.li``, ``state.cache``, ``state["stat"]``.

    An attribute that names no tensor of this state is ``None`` (an engine without a cache has ``state.cache is
    None``), so callers can ask for what an extension may add without knowing whether it is on.
    """

    __slots__ = ("_values",)

    def __init__(self, li: torch.Tensor | None = None, **values: torch.Tensor | None) -> None:
        merged = {METHOD_STATE: li, **values}
        object.__setattr__(self, "_values", {k: v for k, v in merged.items() if v is not None})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> torch.Tensor | None:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._values.get(name)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("EngineState is immutable: use replace(...)")

    def replace(self, **values: torch.Tensor | None) -> EngineState:
        """A copy with ``values`` set (``None`` removes an entry)."""
        return EngineState(**{**self._values, **values})

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={list(v.shape)}" for k, v in self._values.items())
        return f"EngineState({parts})"


class EngineSignature:
    """The state tensors every engine of one compile takes and returns (see the module docstring).

    Args:
        tensors: the entries; the first is the method's state ``li`` (carried). Carried entries must come before
            output-only ones, and names must be unique.
    """

    def __init__(self, tensors: Sequence[StateTensor]) -> None:
        tensors = tuple(tensors)
        if not tensors or tensors[0].name != METHOD_STATE or not tensors[0].carried:
            raise ValueError(f"an engine signature starts with the method's carried state {METHOD_STATE!r}")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ValueError(f"state names must be unique, got {names}")
        carried = [t.carried for t in tensors]
        if carried != sorted(carried, reverse=True):
            raise ValueError(f"carried state must come before output-only state, got {names}")
        self.tensors = tensors

    @property
    def inputs(self) -> tuple[StateTensor, ...]:
        """What follows the model's inputs in an engine call (the carried entries, in order)."""
        return tuple(t for t in self.tensors if t.carried)

    @property
    def outputs(self) -> tuple[StateTensor, ...]:
        """What follows the model's outputs in an engine's result: every entry, in order."""
        return self.tensors

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> StateTensor:
        for tensor in self.tensors:
            if tensor.name == name:
                return tensor
        raise KeyError(f"no state {name!r} in this engine signature ({', '.join(self.names)})")

    def fresh(self, device: torch.device | str | None = None) -> EngineState:
        """The carried state at the start of a generation."""
        return EngineState(**{t.name: t.fresh(device) for t in self.inputs})

    def example_inputs(self, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Fresh values of the inputs, in order (for tracing, shape checks and builds)."""
        return [t.fresh(device) for t in self.inputs]

    def engine_inputs(self, state: EngineState) -> tuple[torch.Tensor, ...]:
        """The tensors of ``state`` an engine takes after the model's inputs, in order."""
        missing = [t.name for t in self.inputs if t.name not in state]
        if missing:
            raise ValueError(f"the engine needs state {missing}; the call carries {sorted(state)}")
        return tuple(state[t.name] for t in self.inputs)

    def split(self, outputs: Sequence[Any]) -> tuple[tuple[Any, ...], EngineState]:
        """An engine's outputs -> ``(model outputs, EngineState of every entry)``."""
        count = len(self.tensors)
        if len(outputs) <= count:
            raise ValueError(f"an engine returned {len(outputs)} outputs; this signature alone has {count}")
        head, tail = tuple(outputs[:-count]), outputs[-count:]
        return head, EngineState(**dict(zip(self.names, tail)))

    def output_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the outputs that follow the model's, in order."""
        return [tuple(t.shape) for t in self.tensors]

    def __repr__(self) -> str:
        parts = [f"{t.name} {list(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in self.tensors]
        outputs_only = [t.name for t in self.tensors if not t.carried]
        tail = f"; outputs only: {', '.join(outputs_only)}" if outputs_only else ""
        return f"EngineSignature({'; '.join(parts)}{tail})"
