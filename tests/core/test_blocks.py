"""Block schedules: the forms, their fractions, what is refused (with the fix named), and the config round trip."""

import pytest

from sdtm_compile import SDTMConfig, ToMAConfig, ToMeSDConfig
from sdtm_compile.core.blocks import BlockScheduleError, block_fractions, normalize_block_schedule
from sdtm_compile.core.config import config_from_dict
from sdtm_compile.core.schedule import FULL, EngineKey, Stage
from sdtm_compile.methods import method_for


@pytest.mark.unit
@pytest.mark.parametrize(
    "schedule, fractions",
    [
        ("all", (1.0,) * 6),
        ("first-unmerged:2", (0.0, 0.0, 1.0, 1.0, 1.0, 1.0)),
        ("first-unmerged:0", (1.0,) * 6),
        ("staggered", (0.0, 1.0, 0.5, 1.0, 0.0, 1.0)),
        ("pattern:1, 0.25", (1.0, 0.25, 1.0, 0.25, 1.0, 0.25)),
        # the release's protect_layers_frequency=2: layers 0, 2, 4 and the last one
        ("protect-every:2", (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)),
        ((1, 0, 0.5, 1, 1, 0), (1.0, 0.0, 0.5, 1.0, 1.0, 0.0)),
    ],
)
def test_fractions_of_each_form(schedule, fractions):
    assert block_fractions(schedule, 6) == fractions


@pytest.mark.unit
@pytest.mark.parametrize(
    "schedule, message",
    [
        ("every-other", "unknown block schedule"),
        ("first-unmerged:-1", "not a positive block count"),
        ("protect-every:x", "not a positive block count"),
        ("pattern:1,two", "'two' is not a number"),
        ("pattern:1,1.5", "outside \\[0, 1\\]"),
        ([], "empty list"),
        ([1.0, float("nan")], "block 1: nan is not a number"),
        (3, "is a int"),
    ],
)
def test_bad_schedules_are_refused_with_the_forms_named(schedule, message):
    with pytest.raises(BlockScheduleError, match=message) as error:
        normalize_block_schedule(schedule)
    assert "'all'" in str(error.value) and "list of per-block fractions" in str(error.value)
    with pytest.raises(ValueError, match=f"SDTMConfig.blocks=.* is invalid: .*{message}"):
        SDTMConfig(blocks=schedule)


@pytest.mark.unit
def test_schedules_that_do_not_fit_the_model_name_the_block_count():
    with pytest.raises(BlockScheduleError, match="lists 3 fractions but the model has 4 blocks: give one fraction"):
        block_fractions((1, 0, 1), 4)
    with pytest.raises(BlockScheduleError, match="leaves every one of the model's 4 blocks unmerged.*ratio 0"):
        block_fractions("first-unmerged:4", 4)
    assert "has 2 blocks" in method_for(SDTMConfig(blocks=(1, 1, 1))).check_blocks(2)
    assert method_for(SDTMConfig(blocks=(1, 1))).check_blocks(2) is None


@pytest.mark.unit
def test_configs_round_trip_through_json_dicts():
    for config in (SDTMConfig(blocks=(1, 0.5, 0)), ToMeSDConfig(blocks="Staggered"), ToMAConfig(blocks="pattern:0,1")):
        values = config.to_dict()
        assert config_from_dict(values) == config
    assert SDTMConfig(blocks=[1, 0.5]).blocks == (1.0, 0.5)  # a JSON list becomes a tuple: configs stay hashable
    assert ToMeSDConfig(blocks="Staggered").blocks == "staggered"
    assert SDTMConfig().blocks == "all"


@pytest.mark.unit
def test_block_keys_scale_the_ratio_and_shared_plans_split_by_key():
    key = EngineKey(Stage.DETAIL, 0.6)
    sdtm = method_for(SDTMConfig(blocks=(1.0, 0.5, 0.0)))
    assert sdtm.block_keys(["joint"] * 3, key, (16, 16)) == [key, EngineKey(Stage.DETAIL, 0.3), FULL]
    assert sdtm.plan_sources(["joint"] * 3, key, (16, 16)) == [0, 1, None]
    assert sdtm.plan_sources(["joint"] * 3, FULL, (16, 16)) == [None] * 3
    # ToMA shares one plan per block kind: only blocks at the same key share it; the first of them makes it
    toma = method_for(ToMAConfig(share_plan=True, unmerged_double=0, unmerged_single=0, blocks=(0, 1, 1, 0.5, 1, 1)))
    kinds = ["double", "double", "double", "single", "single", "single"]
    merge = EngineKey(Stage.MERGE, 0.5)
    assert toma.plan_sources(kinds, merge, (16, 16)) == [None, 1, 1, 3, 4, 4]
