"""SDTM with ``counts="exact"``: the release's count at every step's own ratio, one engine per stage."""

import math

import pytest

from sdtm_compile import SDTMConfig
from sdtm_compile.core.method import method_for
from sdtm_compile.core.schedule import FULL, EngineKey, Stage, position_at_step
from sdtm_compile.methods.sdtm.schedule import cra_ratio

KINDS = ["joint"] * 6
GRID = (32, 32)  # sd3m-1024's token grid
N = GRID[0] * GRID[1]


def _release_count(stage: Stage, ratio: float) -> int:
    """The release's count: ``reduce_num = int(N * ratio_current)``, then ``// 48 * 16`` windows (SSM) or
    ``// 16 * 16`` sources, at most every source (IDM)."""
    reduce_num = int(N * ratio)
    if stage is Stage.STRUCTURE:
        return min(reduce_num // 48, N // 4 // 16) * 16
    return min(N - N // 4, reduce_num) // 16 * 16


@pytest.mark.unit
def test_the_counts_option_is_validated():
    assert SDTMConfig(counts="exact").exact_counts
    assert not SDTMConfig().exact_counts  # static buckets stay the default
    assert not SDTMConfig(ratio=0.0, deviation=0.0, counts="exact").exact_counts  # off is off
    with pytest.raises(ValueError, match="counts='rounded' is invalid.*'buckets'.*'exact'"):
        SDTMConfig(counts="rounded")
    with pytest.raises(ValueError, match="adaptive_threshold"):
        SDTMConfig(counts="exact", adaptive_threshold=0.9)


@pytest.mark.unit
@pytest.mark.parametrize("steps", [20, 28, 50])
def test_every_step_runs_the_release_count_at_its_own_ratio(steps):
    config = SDTMConfig(counts="exact")
    method = method_for(config)
    built = set(method.engines_for_trajectory())
    assert built == {EngineKey(Stage.STRUCTURE, 0.7), EngineKey(Stage.DETAIL, round(cra_ratio(0.4, config), 9))}
    bucketed = method_for(SDTMConfig())
    for step in range(steps):
        position = position_at_step(step, steps)
        key = method.engine_key_at(position)
        assert method.engine_of(key) in built  # one engine per stage serves every step
        assert key.bucket == pytest.approx(cra_ratio(position, config), abs=1e-9)
        (count,) = method.plan_counts(KINDS, key, GRID)
        assert count == _release_count(key.stage, cra_ratio(position, config))
        low, high = method.count_range(KINDS, key, GRID)
        assert low[0] <= count <= high[0]
        (rounded,) = bucketed.plan_counts(KINDS, bucketed.engine_key_at(position), GRID)
        assert count >= rounded  # a bucket rounds the ratio down: never more merging than the exact count


@pytest.mark.unit
def test_blocks_at_another_fraction_read_their_own_count_input():
    method = method_for(SDTMConfig(counts="exact", blocks="staggered"))  # fractions 0, 1, 0.5, 1, 0, 1
    key = EngineKey(Stage.STRUCTURE, 0.7)
    assert method.count_slots(KINDS, key, GRID) == [None, 0, 1, 0, None, 0]
    full, half = method.plan_counts(KINDS, key, GRID)
    assert (full, half) == (_release_count(Stage.STRUCTURE, 0.7), _release_count(Stage.STRUCTURE, 0.35))


@pytest.mark.unit
def test_a_stage_reaching_ratio_zero_also_builds_the_unmerged_engine():
    config = SDTMConfig(ratio=0.3, deviation=0.3, counts="exact")  # the last step's ratio is 0
    method = method_for(config)
    assert FULL in method.engines_for_trajectory()
    assert method.engine_key_at(1.0) == FULL
    assert math.isclose(cra_ratio(1.0, config), 0.0, abs_tol=1e-12)
