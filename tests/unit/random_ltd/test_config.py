"""Random-LTD config: layer-set parsing, defaults and validation against the model's size."""

from fractions import Fraction

import pytest

from megatron.core.errors import UserError
from megatron.core.random_ltd import RandomLTDConfig, default_ltd_layers, parse_layer_spec, ramp_iters_from_fraction


def test_default_layers_skip_first_and_last():
    assert default_ltd_layers(24) == tuple(range(1, 23))
    assert default_ltd_layers(3) == (1,)
    assert default_ltd_layers(2) == ()


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("1-22", tuple(range(1, 23))),
        ("1-5,7,9-10", (1, 2, 3, 4, 5, 7, 9, 10)),
        (" 3 , 1-2 ", (1, 2, 3)),
        ("0-23", tuple(range(24))),
        ("4,4,2-4", (2, 3, 4)),
    ],
)
def test_parse_layer_spec(spec, expected):
    assert parse_layer_spec(spec, 24) == expected


@pytest.mark.parametrize("spec, match", [("1-24", "out of range"), ("24", "out of range"), ("5-3", "backwards"),
                                         ("a", "cannot read"), ("1-", "cannot read"), ("-1", "cannot read"),
                                         ("", "empty"), ("1,,2", "cannot read")])
def test_parse_layer_spec_errors(spec, match):
    with pytest.raises(UserError, match=match):
        parse_layer_spec(spec, 24)


def test_validate_and_resolve_layers():
    cfg = RandomLTDConfig(enabled=True, ramp_iters=100).validate(24, 2048)
    assert cfg.ltd_layers(24) == tuple(range(1, 23))
    cfg = RandomLTDConfig(enabled=True, ramp_iters=100, layers=[7, 3, 3]).validate(24, 2048)
    assert cfg.layers == (3, 7) and cfg.ltd_layers(24) == (3, 7)
    assert RandomLTDConfig().ltd_layers(24) == ()


def test_disabled_config_is_not_checked():
    RandomLTDConfig(enabled=False).validate(num_layers=2, seq_length=64)  # default r_0 = 128 > s is fine


@pytest.mark.parametrize(
    "cfg, match",
    [
        (RandomLTDConfig(enabled=True, ramp_iters=100, layers=(1, 24)), "layer 24 is out of range"),
        (RandomLTDConfig(enabled=True, ramp_iters=100, layers=(-1,)), "out of range"),
        (RandomLTDConfig(enabled=True), "--random-ltd-ramp-iters"),
        (RandomLTDConfig(enabled=True, ramp_iters=100, start_seq_length=4096), "larger than --seq-length"),
    ],
)
def test_validate_errors(cfg, match):
    with pytest.raises(UserError, match=match):
        cfg.validate(24, 2048)


def test_no_layer_left_is_an_error():
    with pytest.raises(UserError, match="no layer"):
        RandomLTDConfig(enabled=True, ramp_iters=10, start_seq_length=16).validate(2, 64)
    RandomLTDConfig(enabled=True, ramp_iters=10, start_seq_length=16, layers=(0, 1)).validate(2, 64)


def test_ramp_fraction_is_exact_and_rounds_up():
    assert ramp_iters_from_fraction(0.7, 286_102) == 200_272  # 200271.4 -> 200272
    assert ramp_iters_from_fraction(0.7, 1000) == 700  # no binary-float drift to 701
    assert ramp_iters_from_fraction(Fraction(1, 3), 10) == 4
    assert ramp_iters_from_fraction("1", 5) == 5
    for bad in (0, -0.5, 1.5):
        with pytest.raises(UserError, match="ramp-fraction"):
            ramp_iters_from_fraction(bad, 100)
