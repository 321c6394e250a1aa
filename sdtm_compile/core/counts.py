"""Exact counts: how a plan's token count enters an engine as a dynamic dimension.

With ``SDTMConfig(counts="exact")`` an engine serves every count of its stage, so a plan cannot bake its count
in. Instead each plan reads it from a *count input*: a tensor whose length says the count and whose values are
never read. Why a tensor's length, not a number: every engine kind already has a way to make a tensor dimension
dynamic and none to take a Python int as an input - Inductor compiles the dimension as a symbolic size, ONNX
export gives it a dynamic axis, TensorRT a shape range (``torch_tensorrt.Input(min_shape, opt_shape, max_shape)``).

The length is ``N - count`` (``N`` image tokens), not the count: the graph computes
``count = N - aten.sym_size.int(count_input, 0)``. Then every merged length is the symbol times a *positive*
coefficient plus a constant (SSM: ``N - 3 count = 3 length - 2N``; IDM: ``N - count = length``). With the count
itself as the symbol (``N - 3 count``), sympy rewrites ``Mod(64 (369 - s), 384 (369 - s))`` into a quotient over
``s - 369``, and Inductor's stride-order check for attention fails on it ("Exponent must be non-negative", torch
2.13); measured on a joint attention at sd3m-1024's shapes.

In a rewritten graph the count inputs are the last placeholders, ``sdtm_count_0``, ``sdtm_count_1``, ... (one per
fraction of the step's ratio the config's block schedule uses, :meth:`TokenMethod.count_slots
<sdtm_compile.core.method.TokenMethod.count_slots>`); an engine is called as
``engine(*model_inputs, *state, *count_inputs)``. Anything that builds an engine finds them structurally
(:func:`size_only_inputs`: inputs used only for their length), so a region cut from a graph keeps them.
A build records which lengths its engine must serve on its example count inputs (:func:`example_count_tensor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import fx

__all__ = [
    "CountRangeError",
    "symbolic_count_inputs",
    "check_count_guards",
    "trace_with_symbolic_counts",
    "COUNT_INPUT_PREFIX",
    "COUNT_DTYPE",
    "count_input_name",
    "count_tensor",
    "count_tensors",
    "example_count_tensor",
    "served_lengths",
    "count_length",
    "reachable_counts",
    "size_only_inputs",
    "is_size_read",
]

#: Count input ``j`` of a rewritten graph is the placeholder ``sdtm_count_<j>``.
COUNT_INPUT_PREFIX = "sdtm_count_"
#: A count input's dtype: one byte per entry, never read.
COUNT_DTYPE = torch.uint8


def count_input_name(slot: int) -> str:
    """The placeholder name of count input ``slot``."""
    return f"{COUNT_INPUT_PREFIX}{slot}"


@lru_cache(maxsize=1024)
def _cached(count: int, device: str) -> torch.Tensor:
    return torch.empty(count, dtype=COUNT_DTYPE, device=device)


def count_length(count: int, tokens: int) -> int:
    """The length of the count input that says ``count`` on a model of ``tokens`` image tokens: ``N - count``."""
    if not 0 <= count <= tokens:
        raise ValueError(f"a plan's count is between 0 and the {tokens} image tokens, got {count}")
    return tokens - int(count)


def count_tensor(count: int, tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The count input that tells an engine a plan's ``count`` (cached: a step allocates nothing)."""
    return _cached(count_length(count, tokens), str(torch.device(device)))


def count_tensors(counts: Sequence[int], tokens: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """:func:`count_tensor` of each count, in order."""
    return [count_tensor(count, tokens, device) for count in counts]


def reachable_counts(low: int, high: int, step: int) -> tuple[int, ...]:
    """Every count from ``low`` to ``high`` a schedule can reach, for a method whose counts are multiples of
    ``step`` (:attr:`TokenMethod.count_step <sdtm_compile.core.method.TokenMethod.count_step>`): both ends and the
    multiples of ``step`` between."""
    first = -(-low // step) * step
    return tuple(sorted({low, high, *range(first, high + 1, step)}))


def example_count_tensor(
    count: int, counts: Sequence[int], tokens: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A count input to build an engine with, saying ``count``; ``counts`` are every count the engine must serve,
    kept on the tensor as lengths (:func:`served_lengths`) so that a build checks its engine against all of them."""
    tensor = torch.empty(count_length(count, tokens), dtype=COUNT_DTYPE, device=device)
    lengths = {count_length(c, tokens) for c in (count, *counts)}
    tensor.sdtm_lengths = tuple(sorted(lengths))  # type: ignore[attr-defined]
    return tensor


def served_lengths(tensor: torch.Tensor) -> tuple[int, ...]:
    """The lengths an engine built with this count input must serve (its own length if it names none)."""
    return tuple(getattr(tensor, "sdtm_lengths", (tensor.shape[0],)))


def is_size_read(node: fx.Node) -> bool:
    """``node`` reads a tensor's size and nothing else (``aten.sym_size.int``, ``x.size(d)``)."""
    if node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size):
        return True
    return node.op == "call_method" and node.target == "size"


def size_only_inputs(gm: fx.GraphModule) -> list[int]:
    """Positions of ``gm``'s inputs that are used, and only for their size: the count inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, p in enumerate(placeholders) if p.users and all(is_size_read(u) for u in p.users)]


class CountRangeError(RuntimeError):
    """An engine traced with a symbolic count assumed something that does not hold at a count it must serve."""


def symbolic_count_inputs(example_inputs: Sequence[Any], positions: Sequence[int]) -> tuple[list[Any], Any, dict]:
    """Fake inputs whose count inputs (at ``positions``) have a symbolic length and every other size static;
    their shape environment; ``{symbol: (example length, lengths it must serve)}``. A count input that serves one
    length only stays static. Each symbol is bounded by the lengths it serves: Inductor's lowerings need bounded
    sizes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    fakes: list[Any] = []
    symbols: dict[Any, tuple[int, tuple[int, ...]]] = {}
    for index, value in enumerate(example_inputs):
        if not isinstance(value, torch.Tensor):
            fakes.append(value)
            continue
        lengths = served_lengths(value) if index in positions else ()
        dynamic = len(lengths) > 1 and min(lengths) > 1  # 0 and 1 are always specialised
        sizes = [DimDynamic.DYNAMIC if dynamic else DimDynamic.STATIC] * value.dim()
        context = StatelessSymbolicContext(dynamic_sizes=sizes, constraint_sizes=[None] * value.dim())
        fake = mode.from_tensor(value, symbolic_context=context)
        if dynamic:
            symbol = fake.shape[0].node.expr
            env.constrain_symbol_range(symbol, compiler_min=min(lengths), compiler_max=max(lengths))
            symbols[symbol] = (int(value.shape[0]), lengths)
        fakes.append(fake)
    return fakes, env, symbols


def check_count_guards(env: Any, symbols: dict) -> None:
    """Every shape guard of a trace with symbolic counts holds at every length each input must serve (the others
    at their example length); raise :class:`CountRangeError` naming the first that does not."""
    examples = {symbol: example for symbol, (example, _) in symbols.items()}
    for guard in env.guards:
        for symbol, (_, lengths) in symbols.items():
            for length in lengths:
                value = guard.expr.xreplace({**examples, symbol: length})
                if value not in (True, False) or not bool(value):
                    raise CountRangeError(
                        f"an engine traced with a symbolic token count assumed {guard.expr} (count input length "
                        f"{examples[symbol]}), which does not hold at length {length}: one engine cannot serve every "
                        "count of this schedule. Use SDTMConfig(counts='buckets') (static engines per bucket)"
                    )


def trace_with_symbolic_counts(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """``gm`` traced to aten (``make_fx``) with its count inputs' lengths symbolic, every other size static; its
    guards checked at every length the inputs must serve (:func:`check_count_guards`). The nodes keep their
    module stacks (for the TensorRT lint), and their ``example_value`` names the trace's shape environment (where
    ``standalone_compile(dynamic_shapes="from_graph")`` looks for it)."""
    from torch.fx import traceback as fx_traceback
    from torch.fx.experimental.proxy_tensor import make_fx

    fakes, env, symbols = symbolic_count_inputs(example_inputs, size_only_inputs(gm))

    def run(*args: Any) -> Any:
        with fx_traceback.preserve_node_meta():
            return fx.Interpreter(gm).run(*args)

    # Outside Dynamo's tracing context (a backend runs inside it): make_fx would otherwise trace in Dynamo's fake
    # mode and add our guards to Dynamo's shape environment
    with torch.no_grad(), torch._guards.tracing(None):
        graph = make_fx(run, tracing_mode="symbolic")(*fakes)
    check_count_guards(env, symbols)
    for node in graph.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]
    return graph
