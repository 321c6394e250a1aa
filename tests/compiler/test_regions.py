"""Regional engines: how bucket graphs are cut, what is shared, and the parallel compiler processes."""

import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.compiler.buckets import BucketGraphs
from sdtm_compile.compiler.regions import RegionalBuilder, region_partitions
from sdtm_compile.core.ops import sdtm_merge, sdtm_plan
from sdtm_compile.core.schedule import EngineKey, Stage
from sdtm_compile.engines.parallel import _CompilerPool, build_order
from sdtm_compile.models import TINY_SD3, TINY_SD35, example_inputs, tiny_sd3_transformer
from sdtm_compile.passes import module_stack
from tests.helpers import capture_dynamo_graph

DETAIL = EngineKey(Stage.DETAIL, 0.5)
STRUCTURE = EngineKey(Stage.STRUCTURE, 0.7)


@pytest.fixture(scope="module")
def buckets():
    """Tiny SD3.5 (blocks 0 and 1 with attn2, block 2 the last) at batch 2, 16x16 tokens."""
    model = tiny_sd3_transformer(TINY_SD35, seed=1)
    gm, flat = capture_dynamo_graph(model, example_inputs(TINY_SD35, 2, (32, 32)))
    return BucketGraphs(gm, flat, SDTMConfig())


def _partition_of(rewritten, predicate):
    partition = region_partitions(rewritten)
    return {partition[n] for n in rewritten.gm.graph.nodes if n in partition and predicate(n)}


@pytest.mark.unit
def test_a_detail_block_is_cut_before_its_first_merge(buckets):
    rewritten = buckets.graph(DETAIL)
    for block in rewritten.sites.blocks:
        inside = lambda n, b=block: any(p == b.path for p, _ in module_stack(n))  # noqa: E731
        attention = _partition_of(rewritten, lambda n, b=block: n in set(b.attn.nodes))
        merged = _partition_of(rewritten, lambda n, i=inside: i(n) and n.target in (sdtm_plan, sdtm_merge))
        # the whole attention (unmerged in the detail stage) is in the prefix; the plan goes with the FF merge
        assert len(attention) == 1
        assert len(merged) == 1
        assert attention != merged
        assert len(_partition_of(rewritten, inside)) == 2


@pytest.fixture(scope="module")
def sd3_buckets():
    """Tiny SD3: block 0 with a text feed-forward, block 1 the last (``context_pre_only``, none)."""
    model = tiny_sd3_transformer(TINY_SD3, seed=1)
    gm, flat = capture_dynamo_graph(model, example_inputs(TINY_SD3, 2, (32, 32)))
    return BucketGraphs(gm, flat, SDTMConfig())


@pytest.mark.unit
def test_the_text_feed_forward_is_prefix_so_the_last_block_shares_the_merged_part(sd3_buckets):
    detail = sd3_buckets.graph(DETAIL)
    first = detail.sites.blocks[0]
    text_ff = _partition_of(detail, lambda n: any(p == f"{first.path}.ff_context" for p, _ in module_stack(n)))
    attention = _partition_of(detail, lambda n: n in set(first.attn.nodes))
    assert text_ff == attention  # both in block 0's prefix, after its merge in graph order
    builder = RegionalBuilder(lambda region, inputs, name: region)
    builder.add(detail, sd3_buckets.engine_inputs())
    # glue in, block 0 (prefix, merged part), block 1 (its own prefix, block 0's merged part), glue out
    assert (builder.stats.call_sites, builder.pending) == (6, 5)
    # the structure stage's merged part holds its merged attention, with the text stream's q / k / v feeding it
    structure = sd3_buckets.graph(STRUCTURE)
    block = structure.sites.blocks[0]
    inside = lambda n: any(p == block.path for p, _ in module_stack(n))  # noqa: E731
    merged = _partition_of(structure, lambda n: inside(n) and n.target is sdtm_merge)
    assert _partition_of(structure, lambda n: n in set(block.attn.nodes)) == merged


@pytest.mark.unit
def test_a_region_sharing_plans_is_queued_after_the_first_jobs_not_last(sd3_buckets):
    builder = RegionalBuilder(lambda region, inputs, name: region)
    builder.add(sd3_buckets.graph(STRUCTURE), sd3_buckets.engine_inputs())
    jobs = list(builder._pending.values())
    merged = [i for i, job in enumerate(jobs) if any(n.target is sdtm_plan for n in job.region.graph.nodes)]
    assert len(merged) == 2  # block 0's merged part and the last block's make the same plans
    order = build_order(jobs, list(range(len(jobs))), workers=2)
    assert sorted(order) == list(range(len(jobs)))
    assert order.index(merged[1]) == 2  # right after the first job of each of the 2 processes
    assert order.index(merged[0]) < 2


@pytest.mark.unit
def test_regions_are_shared_across_blocks_and_buckets(buckets):
    builder = RegionalBuilder(lambda region, inputs, name: region)  # the eager engine: regions run op by op
    inputs = buckets.engine_inputs()
    builder.add(buckets.graph(DETAIL), inputs)
    # glue in, 3 blocks x (prefix, merged part), glue out; blocks 0 and 1 have the same structure
    assert (builder.stats.call_sites, builder.pending) == (8, 6)
    builder.add(buckets.graph(EngineKey(Stage.DETAIL, 0.3)), inputs)
    assert builder.pending == 6 + 2  # another detail bucket: only the two kinds of merged part are new
    builder.add(buckets.graph(STRUCTURE), inputs)
    queued = builder.pending
    builder.finish()
    assert builder.stats.built == queued
    assert builder.pending == 0
    assert builder.stats.call_sites == 3 * 8
    with pytest.raises(RuntimeError, match="not built yet"):
        RegionalBuilder(lambda r, i, n: r).add(buckets.graph(DETAIL), inputs)(*inputs)


@pytest.mark.unit
def test_regional_engine_equals_the_bucket_graph(buckets):
    li = torch.randint(0, 4, (2, 256), dtype=torch.int32)
    builder = RegionalBuilder(lambda region, inputs, name: region)
    for key in (DETAIL, STRUCTURE):
        rewritten = buckets.graph(key)
        engine = builder.build(rewritten, buckets.engine_inputs())
        with torch.no_grad():
            got, want = engine(*buckets.example_inputs, li), rewritten.gm(*buckets.example_inputs, li)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.slow
def test_a_failing_compiler_process_reports_the_error(tmp_path):
    (tmp_path / "bad.job").write_bytes(b"not a pickled graph")
    with _CompilerPool(1) as pool:
        pool.submit(0, str(tmp_path / "bad.job"), str(tmp_path / "bad.bin"))
        ((index, error),) = list(pool.results())
    assert index == 0
    assert "UnpicklingError" in error
