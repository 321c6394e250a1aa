"""Count inputs: a plan's count as a tensor's length, found structurally, traced symbolically and range-checked."""

import operator

import pytest
import torch
from torch import fx

from sdtm_compile.core.counts import (
    CountRangeError,
    count_length,
    count_tensor,
    count_tensors,
    example_count_tensor,
    reachable_counts,
    served_lengths,
    size_only_inputs,
    trace_with_symbolic_counts,
)


def _graph(body) -> fx.GraphModule:
    """``(x [B, N, C], count input) -> body(graph, x, count)``: a graph whose count is ``N - length``."""
    graph = fx.Graph()
    x, counts = graph.placeholder("x"), graph.placeholder("sdtm_count_0")
    length = graph.call_function(torch.ops.aten.sym_size.int, (counts, 0))
    count = graph.call_function(operator.sub, (64, length))
    graph.output(body(graph, x, count))
    return fx.GraphModule(torch.nn.Module(), graph)


def _keep_first(graph, x, count):
    """``x[:, : N - count]`` times 2: a merged length that follows the count."""
    kept = graph.call_function(operator.sub, (64, count))
    head = graph.call_function(operator.getitem, (x, (slice(None), slice(None, kept))))
    return (graph.call_function(operator.mul, (head, 2.0)),)


@pytest.mark.unit
def test_a_count_is_said_by_its_complement_to_the_image_tokens():
    assert count_length(48, 256) == 208
    assert count_tensor(48, 256).shape == (208,)
    assert count_tensor(48, 256) is count_tensor(48, 256)  # cached: a step allocates nothing
    assert [t.shape[0] for t in count_tensors([0, 256], 256)] == [256, 0]
    with pytest.raises(ValueError, match="between 0 and the 256 image tokens"):
        count_length(300, 256)


@pytest.mark.unit
def test_reachable_counts_are_the_ends_and_the_multiples_of_16_between():
    assert reachable_counts(208, 224, 16) == (208, 224)
    assert reachable_counts(60, 100, 16) == (60, 64, 80, 96, 100)
    assert reachable_counts(48, 48, 16) == (48,)
    example = example_count_tensor(224, reachable_counts(208, 224, 16), 1024)
    assert example.shape == (800,)
    assert served_lengths(example) == (800, 816)
    assert served_lengths(torch.empty(5)) == (5,)  # an input that names nothing serves its own length


@pytest.mark.unit
def test_count_inputs_are_found_as_the_inputs_read_only_for_their_length():
    gm = _graph(_keep_first)
    assert size_only_inputs(gm) == [1]
    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    graph.output((graph.call_function(torch.add, (x, y)), graph.call_function(torch.ops.aten.sym_size.int, (y, 0))))
    assert size_only_inputs(fx.GraphModule(torch.nn.Module(), graph)) == []  # y is read for its values too


@pytest.mark.unit
def test_a_symbolic_trace_serves_every_count_of_its_range():
    gm = _graph(_keep_first)
    x = torch.randn(2, 64, 8)
    traced = trace_with_symbolic_counts(gm, [x, example_count_tensor(16, (16, 32, 48), 64)])
    output = next(n for n in traced.graph.nodes if n.op == "output").args[0][0]
    assert isinstance(output.meta["val"].shape[1], torch.SymInt)  # the merged length stays symbolic
    for count in (16, 32, 48):
        got = traced(x, count_tensor(count, 64))[0]
        torch.testing.assert_close(got, gm(x, count_tensor(count, 64))[0])
        assert got.shape == (2, 64 - count, 8)


@pytest.mark.unit
def test_a_trace_that_assumed_one_count_is_refused_for_the_others():
    def reshape_to_eight_rows(graph, x, count):  # only a count of 32 leaves 64 - 32 = 32 = 8 x 4 rows
        kept = graph.call_function(operator.sub, (64, count))
        head = graph.call_function(operator.getitem, (x, (slice(None), slice(None, kept))))
        return (graph.call_method("reshape", (head, 2, 8, 4, 8)),)

    gm = _graph(reshape_to_eight_rows)
    x = torch.randn(2, 64, 8)
    trace_with_symbolic_counts(gm, [x, example_count_tensor(32, (32,), 64)])  # one count: static, nothing to check
    with pytest.raises(CountRangeError, match="does not hold at length 48.*counts='buckets'"):
        trace_with_symbolic_counts(gm, [x, example_count_tensor(32, (16, 32), 64)])
