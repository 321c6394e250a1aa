"""Whole generations of a candidate on a tiny model (eager paths): ratio 0 is the unmerged model, merging is
counted in FLOPs from the engines that served the steps, and the unmerged images are generated once per seed."""

import math

import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.bench.config import BenchConfig
from sdtm_compile.bench.instrument import CapturedBucketGraphs
from sdtm_compile.bench.quality import Candidate, QualitySampler, generation_flops
from sdtm_compile.bench.workload import make_workload

STEPS = 3


@pytest.fixture(scope="module")
def sampler():
    torch.manual_seed(0)
    return QualitySampler(
        make_workload(BenchConfig(model="tiny-sd3", steps=STEPS)), BenchConfig(model="tiny-sd3", steps=STEPS)
    )


@pytest.mark.unit
def test_ratio_zero_is_the_unmerged_model_and_counts_no_saving(sampler):
    workload = sampler.workload
    graphs = CapturedBucketGraphs(workload.model, workload.probe)
    off = Candidate("off", SDTMConfig(ratio=0.0, deviation=0.0))
    images, records = sampler.images(off, [0, 1], batch=2)
    assert torch.equal(images, sampler.unmerged([0, 1], batch=2))
    assert math.isinf(sampler.paired(images, [0, 1], batch=2)["psnr"])
    ratio, counts = generation_flops(records, off, graphs, STEPS, workload.num_blocks)
    assert ratio == pytest.approx(1.0) and counts == {"merged": 0, "unmerged": STEPS, "skipped": 0}


@pytest.mark.unit
def test_a_merged_candidate_saves_flops_and_moves_its_images(sampler):
    workload = sampler.workload
    graphs = CapturedBucketGraphs(workload.model, workload.probe)
    merged = Candidate("sdtm@0.5", SDTMConfig(ratio=0.5))
    images, records = sampler.images(merged, [0, 1], batch=2)
    ratio, counts = generation_flops(records, merged, graphs, STEPS, workload.num_blocks)
    assert ratio > 1.0 and counts == {"merged": STEPS, "unmerged": 0, "skipped": 0}
    quality = sampler.quality([images], [[0, 1]], batch=2)
    assert math.isfinite(quality["psnr"]) and "swd_added" not in quality  # random weights: no distribution measure
    cached = sampler.unmerged([1, 0], batch=2)
    assert torch.equal(cached, sampler.unmerged([0, 1], batch=2).flip(0))  # generated once, served by seed


@pytest.mark.unit
def test_the_step_cache_head_is_counted_where_the_engine_repeats_the_first_block(sampler):
    """Threshold 0 skips nothing: the unmerged engine resumes from the head (same FLOPs as the model); an engine
    that merges in its first block runs it again after the head (a block's worth more work on every step)."""
    workload = sampler.workload
    graphs = CapturedBucketGraphs(workload.model, workload.probe)

    def flops(candidate):
        _, records = sampler.images(candidate, [0], batch=1)
        return generation_flops(records, candidate, graphs, STEPS, workload.num_blocks), records

    (ratio, counts), records = flops(Candidate("unmerged+fbcache0", SDTMConfig(ratio=0.0, deviation=0.0), 0.0))
    assert ratio == pytest.approx(1.0) and counts["skipped"] == 0 and all(r.resumed for r in records)
    merged = SDTMConfig(ratio=0.5)
    (cached, _), records = flops(Candidate("sdtm@0.5+fbcache0", merged, 0.0))
    (plain, _), _ = flops(Candidate("sdtm@0.5", merged))
    assert not any(r.resumed for r in records)
    assert 1 / cached == pytest.approx(1 / plain + 1 / workload.num_blocks)  # the head: a block's worth, every step
