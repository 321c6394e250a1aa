import math

import pytest
import torch

from sdtm_compile import SDTMConfig
from sdtm_compile.core.method import engines_for_steps
from sdtm_compile.core.schedule import EngineKey, Stage, position_at_step, position_from_timestep, round_to_bucket
from sdtm_compile.methods.sdtm.schedule import (
    cra_ratio,
    engine_key_at,
    engines_for_trajectory,
    stage_at,
    token_counts,
)
from sdtm_compile.models.sampling import make_scheduler

pytestmark = pytest.mark.unit


def test_cra_endpoints_and_monotone():
    config = SDTMConfig(ratio=0.5, deviation=0.2)
    assert cra_ratio(0.0, config) == pytest.approx(0.7)
    assert cra_ratio(1.0, config) == pytest.approx(0.3)
    values = [cra_ratio(position_at_step(s, 50), config) for s in range(50)]
    assert all(b < a for a, b in zip(values, values[1:]))
    # the release's formula at step s of S
    assert values[10] == pytest.approx(0.3 + 0.4 * math.cos(math.pi / 2 * 10 / 49))


def test_stage_switch_is_a_fraction_of_the_trajectory():
    config = SDTMConfig(switch_at=0.4)
    stages = [stage_at(position_at_step(s, 50), config) for s in range(50)]
    assert stages[:20] == [Stage.STRUCTURE] * 20
    assert stages[20:] == [Stage.DETAIL] * 30
    stages = [stage_at(position_at_step(s, 10), config) for s in range(10)]
    assert stages.count(Stage.STRUCTURE) == 4
    assert stage_at(0.0, SDTMConfig(ratio=0.0, deviation=0.0)) is Stage.FULL


def test_bucket_rounding_goes_down():
    buckets = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    assert round_to_bucket(0.69, buckets) == 0.6
    assert round_to_bucket(0.7, buckets) == 0.7
    assert round_to_bucket(0.3 + 1e-12, buckets) == 0.3
    assert round_to_bucket(0.3 - 1e-12, buckets) == 0.3  # float noise does not drop a bucket
    assert round_to_bucket(0.05, buckets) == 0.0
    assert engine_key_at(1.0, SDTMConfig(ratio=0.1, deviation=0.1)) == EngineKey(Stage.FULL, 0.0)


@pytest.mark.parametrize("grid", [(32, 32), (64, 64), (24, 40), (33, 32), (31, 31)])
@pytest.mark.parametrize("bucket", [0.1, 0.3, 0.5, 0.6, 0.7, 0.75])
def test_token_counts_follow_release_rounding(grid, bucket):
    n = grid[0] * grid[1]
    windows = (grid[0] // 2) * (grid[1] // 2)
    ssm = token_counts(EngineKey(Stage.STRUCTURE, bucket), *grid)
    assert ssm.removed % 48 == 0
    assert ssm.removed <= 3 * windows
    assert ssm.removed == min(math.floor(n * bucket) // 48 * 48, windows // 16 * 48)
    assert ssm.attention == ssm.feed_forward == n - ssm.removed
    assert ssm.tokens == n
    idm = token_counts(EngineKey(Stage.DETAIL, bucket), *grid)
    assert idm.removed % 16 == 0
    assert idm.removed == min(n - windows, math.floor(n * bucket)) // 16 * 16
    assert idm.attention == n
    assert idm.feed_forward == n - idm.removed
    assert token_counts(EngineKey(Stage.FULL, 0.0), *grid).removed == 0


def test_token_counts_at_1024_squared():
    # 1024x1024 image -> 128x128 latent -> 64x64 = 4096 tokens: SSM k <= 1024, IDM <= 3072 (docs/design.md)
    assert token_counts(EngineKey(Stage.STRUCTURE, 0.7), 64, 64).removed == 2868 // 48 * 48
    assert token_counts(EngineKey(Stage.DETAIL, 0.75), 64, 64).removed == 3072


def test_engine_lists():
    config = SDTMConfig()
    for steps in (1, 2, 10, 28, 50, 100):
        keys = engines_for_steps(config, steps)
        assert 1 <= len(keys) <= 8
        assert set(keys) <= set(engines_for_trajectory(config))
    trajectory = engines_for_trajectory(config)
    assert len(trajectory) <= 8
    assert trajectory == sorted(
        [EngineKey(Stage.STRUCTURE, 0.6), EngineKey(Stage.STRUCTURE, 0.7)]
        + [EngineKey(Stage.DETAIL, b) for b in (0.3, 0.4, 0.5, 0.6)]
    )
    assert engines_for_trajectory(SDTMConfig(ratio=0.0, deviation=0.0)) == [EngineKey(Stage.FULL, 0.0)]
    # every engine any timestep of a real scheduler picks is in the trajectory list
    scheduler = make_scheduler(config.timestep_shift)
    for steps in (7, 28, 50):
        scheduler.set_timesteps(steps)
        assert {engine_key_at(position_from_timestep(t, config), config) for t in scheduler.timesteps} <= set(
            trajectory
        )


@pytest.mark.parametrize("steps", [10, 28, 50])
def test_position_from_timestep_matches_step_fraction(steps):
    config = SDTMConfig()
    scheduler = make_scheduler(config.timestep_shift)
    scheduler.set_timesteps(steps)
    for s, t in enumerate(scheduler.timesteps):
        assert position_from_timestep(t, config) == pytest.approx(position_at_step(s, steps), abs=0.005)
    assert position_from_timestep(torch.tensor([1000.0, 1000.0]), config) == 0.0
    with pytest.raises(ValueError, match="share one timestep"):
        position_from_timestep(torch.tensor([1000.0, 10.0]), config)
