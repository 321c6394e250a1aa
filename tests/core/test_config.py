import pytest

from sdtm_compile import SDTMConfig

pytestmark = pytest.mark.unit


def test_defaults_are_the_release_defaults():
    config = SDTMConfig()
    assert (config.ratio, config.deviation, config.switch_at, config.window, config.a_s) == (
        0.5,
        0.2,
        0.4,
        (2, 2),
        0.05,
    )
    assert config.enabled
    assert not SDTMConfig(ratio=0.0, deviation=0.0).enabled
    assert config.to_dict()["buckets"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


@pytest.mark.parametrize(
    "kwargs, field, fragment",
    [
        ({"ratio": -0.1}, "ratio", "0 <= ratio <= 0.75"),
        ({"ratio": 0.9}, "ratio", "0.75"),
        ({"ratio": float("nan")}, "ratio", "finite"),
        ({"ratio": "0.5"}, "ratio", "finite number"),
        ({"deviation": 0.6}, "deviation", "deviation <= ratio"),
        ({"ratio": 0.6, "deviation": 0.2}, "deviation", "ratio + deviation <= 0.75"),
        ({"deviation": -0.01}, "deviation", "0 <= deviation"),
        ({"switch_at": 1.5}, "switch_at", "0 <= switch_at <= 1"),
        ({"window": (4, 4)}, "window", "(2, 2) only"),
        ({"a_s": -1.0}, "a_s", "0 <= value <= 10"),
        ({"buckets": ()}, "buckets", "non-empty"),
        ({"buckets": (0.2, 0.1)}, "buckets", "strictly increasing"),
        ({"buckets": (0.1, 0.8)}, "buckets", "0.8 is not"),
        ({"buckets": (0.0, 0.5)}, "buckets", "0.0 is not"),
        ({"buckets": 0.5}, "buckets", "non-empty tuple"),
        ({"timestep_shift": 0.0}, "timestep_shift", "0.1 <= timestep_shift"),
        ({"num_train_timesteps": 0}, "num_train_timesteps", "int >= 1"),
        ({"num_train_timesteps": 1000.0}, "num_train_timesteps", "int >= 1"),
        ({"merge_attention": "yes"}, "merge_attention", "None (the model family's choice), True or False"),
        ({"scheduler": {"time_shift_type": "linear"}}, "scheduler", "'linear' is not supported"),
        ({"scheduler": {"shift": "3"}}, "scheduler", "a number for shift"),
        ({"sigmas": (0.5, 1.0)}, "sigmas", "non-increasing"),
        ({"sigmas": (1.0,)}, "sigmas", "at least 2 sigmas"),
    ],
)
def test_bad_values_name_field_value_and_range(kwargs, field, fragment):
    with pytest.raises(ValueError) as info:
        SDTMConfig(**kwargs)
    message = str(info.value)
    assert f"SDTMConfig.{field}=" in message
    assert repr(kwargs.get(field, kwargs.get("deviation"))) in message
    assert fragment in message


def test_lists_are_normalised_to_tuples():
    config = SDTMConfig(buckets=[0.25, 0.5], window=[2, 2], sigmas=[1.0, 0.5], scheduler={"shift": 3.0, "x": 1})
    assert config.buckets == (0.25, 0.5)
    assert config.window == (2, 2)
    assert config.sigmas == (1.0, 0.5)
    assert config.scheduler == (("shift", 3.0),)  # only the shift settings are kept
    hash(config)  # frozen and hashable: usable as a cache key
    assert SDTMConfig.from_dict(config.to_dict()) == config  # manifests round-trip


def test_release_arguments_that_are_not_fields_say_what_to_do():
    # the release's apply_SDTM takes a_d and never reads it: it is not a field, and the error says so
    with pytest.raises(ValueError) as info:
        SDTMConfig.from_dict({"ratio": 0.5, "a_d": 0.05})
    message = str(info.value)
    assert "no field(s) ['a_d']" in message
    assert "never read" in message
    assert "drop it" in message
    with pytest.raises(ValueError, match=r"\['switch_step'\].*Use switch_at"):
        SDTMConfig.from_dict({"switch_step": 20})
    assert SDTMConfig.from_dict({"ratio": 0.3, "deviation": 0.1}) == SDTMConfig(ratio=0.3, deviation=0.1)
