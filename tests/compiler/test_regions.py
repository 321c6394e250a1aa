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
def test_a_region_sharing_plans_waits_for_the_region_making_them(sd3_buckets):
    builder = RegionalBuilder(lambda region, inputs, name: region)
    builder.add(sd3_buckets.graph(STRUCTURE), sd3_buckets.engine_inputs())
    jobs = list(builder._pending.values())
    merged = [i for i, job in enumerate(jobs) if any(n.target is sdtm_plan for n in job.region.graph.nodes)]
    assert len(merged) == 2  # block 0's merged part and the last block's make the same plans
    order, waits_for = build_order(jobs, list(range(len(jobs))))
    assert sorted(order) == list(range(len(jobs)))
    assert order[0] == merged[0]  # the largest region goes first
    assert waits_for == {merged[1]: merged[0]}  # the last block's part is built after block 0's, not beside it


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
def test_a_failing_compiler_process_reports_the_error_and_a_waiting_job_goes_after_it(tmp_path):
    (tmp_path / "bad.job").write_bytes(b"not a pickled graph")
    with _CompilerPool(2) as pool:
        pool.submit(0, str(tmp_path / "bad.job"), str(tmp_path / "bad.bin"))
        pool.submit(1, str(tmp_path / "bad.job"), str(tmp_path / "bad.bin"), after=0)
        assert list(pool.busy.values()) == [0]  # a process is free, but job 1 waits for job 0
        pool.close_submissions()
        answers = []
        while len(answers) < 2:
            answers += pool.finished_jobs(wait=True)
    assert [index for index, _ in answers] == [0, 1]  # job 0's failure released job 1
    assert all("UnpicklingError" in error for _, error in answers)


@pytest.mark.unit
def test_this_process_takes_the_next_ready_job_and_a_waiting_one_after_its_source():
    with _CompilerPool(0) as pool:  # no compiler process: every job is this process's
        pool.submit(0, "0.job", "0.bin")
        pool.submit(1, "1.job", "1.bin", after=0)
        pool.submit(2, "2.job", "2.bin")
        pool.close_submissions()
        assert pool.take() == 0
        assert pool.take() == 2  # job 1 waits for job 0
        assert pool.take() is None
        pool.finish_here(0)
        assert pool.take() == 1
        assert list(pool.finished_jobs(wait=False)) == []  # no process answered anything
