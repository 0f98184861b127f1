"""Run-config parsing: defaults, types, and one-line errors that name the key."""

from __future__ import annotations

import pytest

from fedkdlora_app.config import ConfigError, RunConfig
from tests.conftest import default_run_config, make_config


def test_shipped_defaults_are_valid() -> None:
    config = RunConfig.from_mapping(default_run_config())
    assert config.scheme == "fedkdlora" and config.student_layers == 3 and config.teacher_data_pct == 20.0
    floats = {k: float(v) for k, v in default_run_config().items() if k in ("teacher-data-pct", "teacher-lr")}
    assert config.to_dict() == {**default_run_config(), **floats}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scheme": "fedprox"}, "'scheme' = 'fedprox': allowed: fedavg, fedlora, fedkdlora"),
        ({"task": "mnli"}, "'task' = 'mnli'"),
        ({"partitioning": "shards"}, "'partitioning'"),
        ({"lora-r": 0}, "'lora-r' = 0: must be >= 1"),
        ({"fraction-train": 1.5}, "'fraction-train' = 1.5"),
        ({"teacher-data-pct": 100}, "'teacher-data-pct'"),
        ({"lora-r": "8"}, "'lora-r' = '8': expected int, got str"),
        ({"data-dir": "/nonexistent"}, "'data-dir' = '/nonexistent': no file"),
        ({"lora-rank": 8}, "unknown run-config key(s): lora-rank"),
        (
            {"student-model": "./no/such/model"},
            "'student-model' = './no/such/model': no such local model folder",
        ),
        (
            {"teacher-base-model": "/no/model"},
            "'teacher-base-model' = '/no/model': no such local model folder",
        ),
        ({"local-epochs": -1}, "'local-epochs' = -1: must be >= 0"),
        ({"client-lr": -0.1}, "'client-lr' = -0.1: must be > 0"),
        ({"num-server-rounds": 0}, "'num-server-rounds' = 0: must be >= 1"),
        ({"fraction-evaluate": 0.0}, "'fraction-evaluate' = 0.0: must be in (0, 1]"),
    ],
)
def test_bad_values_name_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        make_config(**overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_ints_are_accepted_for_floats() -> None:
    assert make_config(**{"lora-dropout": 0}).lora_dropout == 0.0
