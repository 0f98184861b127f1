"""Run-config parsing: defaults, types, and one-line errors that name the key."""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import fields

import pytest

from fedkdlora_app.config import SETTINGS_GROUPS, ConfigError, NodeRun, RunConfig
from tests.helpers import GLUE_DIR, REPO, default_run_config, make_config


def test_shipped_defaults_are_valid() -> None:
    config = RunConfig.from_mapping(default_run_config())
    assert config.scheme == "fedkdlora" and config.student_layers == 3 and config.teacher_data_pct == 20.0
    floats = {
        k: float(v)
        for k, v in default_run_config().items()
        if k in ("teacher-data-pct", "teacher-pretrain-lr")
    }
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
        (
            {"server-student-signal": "soft"},
            "'server-student-signal' = 'soft': allowed: labels+teacher, labels",
        ),
        ({"kd-loss": "mse"}, "'kd-loss' = 'mse': allowed: kl, original"),
        (
            {"kd-loss": "original", "server-student-signal": "teacher"},
            "'kd-loss' = 'original': reproduces the original loss as a whole",
        ),
        ({"public-labelled-pct": 0}, "'public-labelled-pct' = 0.0: must be in (0, 100]"),
        ({"public-labelled-pct": 100.5}, "'public-labelled-pct' = 100.5"),
        ({"centralized-public": True, "teacher-data-pct": 0}, "'centralized-public' = true: needs a public"),
    ],
)
def test_bad_values_name_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        make_config(**overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_ints_are_accepted_for_floats() -> None:
    assert make_config(**{"lora-dropout": 0}).lora_dropout == 0.0


def _node(run_overrides: dict, node_config: dict) -> NodeRun:
    config = RunConfig.from_mapping({**default_run_config(), **run_overrides}, check_files=False)
    return NodeRun.from_node_config(config, {"partition-id": 0, "num-partitions": 2, **node_config})


def test_a_node_reads_its_own_data_not_the_servers_path() -> None:
    """Run-config paths name the server's files; a node on another host has its own."""
    server_only = {"data-dir": "/srv/only-on-server/glue", "student-model": "/srv/only-on-server/minilm"}
    with pytest.raises(ConfigError, match="'data-dir' = '/srv/only-on-server/glue': no file"):
        RunConfig.from_mapping({**default_run_config(), **server_only})  # the server checks its files
    node = _node(server_only, {"data-dir": str(GLUE_DIR), "student-model": ""})
    assert node.config.data_dir == str(GLUE_DIR) and node.config.student_model == ""
    assert (node.partition_id, node.num_partitions) == (0, 2)


@pytest.mark.parametrize(
    ("run_overrides", "node_config", "message"),
    [
        (
            {"data-dir": "/srv/glue"},
            {},
            "run-config key 'data-dir' = '/srv/glue': no file /srv/glue/sst2/train.tsv on this SuperNode "
            "(give it its own with node config 'data-dir')",
        ),
        (
            {},
            {"data-dir": "/node/glue"},
            "node config 'data-dir' = '/node/glue': no file /node/glue/sst2/train.tsv",
        ),
        (
            {"student-model": "/srv/model"},
            {},
            "run-config key 'student-model' = '/srv/model': no such local model folder on this SuperNode",
        ),
        (
            {"client-kd": True},
            {"teacher-path": "/node/teacher"},
            "node config 'teacher-path' = '/node/teacher'",
        ),
        ({}, {"partition-id": None}, None),
    ],
)
def test_a_node_missing_a_file_names_the_key_in_one_line(run_overrides, node_config, message) -> None:
    if message is None:  # a node config without partition-id
        config = RunConfig.from_mapping(default_run_config(), check_files=False)
        with pytest.raises(ConfigError, match="node config lacks 'partition-id'"):
            NodeRun.from_node_config(config, {"num-partitions": 2})
        return
    with pytest.raises(ConfigError) as error:
        _node({"data-dir": str(GLUE_DIR), **run_overrides}, node_config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_submitting_host_checks_values_but_not_the_servers_files(tmp_path) -> None:
    from fedkdlora_tools import launcher

    overrides = [
        "data-dir='/srv/only-on-server/glue' teacher-model='/srv/teacher' resume-from='/srv/run.json'"
    ]
    values = launcher.resolved_run_config(REPO, overrides, tmp_path, check_files=False)
    assert values["data-dir"] == "/srv/only-on-server/glue"
    with pytest.raises(ConfigError, match="'data-dir' = '/srv/only-on-server/glue'"):
        launcher.resolved_run_config(REPO, overrides, tmp_path)  # fedkdlora-run: this host is the server
    with pytest.raises(ConfigError, match=r"'round-timeout' = 0\.0: must be > 0"):
        launcher.resolved_run_config(REPO, ["round-timeout=0.0"], tmp_path, check_files=False)


def test_renamed_keys_keep_their_old_names_with_a_notice_and_old_results_resume(tmp_path, capsys) -> None:
    """`teacher-lr` is now `teacher-pretrain-lr`, `distill-lr` is `distill-teacher-lr`: the old names
    are accepted (the launcher says so in one line each), and a results file written with them resumes."""
    from fedkdlora_app.config import RENAMED_KEYS
    from fedkdlora_app.results import RunRecorder
    from fedkdlora_tools.launcher import resolved_run_config

    assert RENAMED_KEYS == {"teacher-lr": "teacher-pretrain-lr", "distill-lr": "distill-teacher-lr"}
    old = make_config(**{"teacher-lr": 3e-4, "distill-lr": 4e-5})
    assert (old.teacher_pretrain_lr, old.distill_teacher_lr) == (3e-4, 4e-5)
    assert old == make_config(**{"teacher-pretrain-lr": 3e-4, "distill-teacher-lr": 4e-5})
    values = resolved_run_config(REPO, [f"teacher-lr=3e-4 data-dir='{GLUE_DIR}'"], REPO)
    assert values["teacher-pretrain-lr"] == 3e-4 and "teacher-lr" not in values
    assert capsys.readouterr().err.strip().splitlines() == [
        "fedkdlora-run: run-config key 'teacher-lr' is now 'teacher-pretrain-lr'; the old name still works"
    ]

    # a results file from before the rename: its config names the old keys
    config = make_config(**{"results-dir": str(tmp_path)})
    recorder = RunRecorder(config)
    recorder.finish_round(0, {"student": {"accuracy": 0.5, "mcc": 0.0, "loss": 0.7}})
    data = json.loads(recorder.path.read_text())
    for old_key, new_key in RENAMED_KEYS.items():
        data["config"][old_key] = data["config"].pop(new_key)
    recorder.path.write_text(json.dumps(data))
    resumed = RunRecorder(make_config(**{"results-dir": str(tmp_path)}), resume=(recorder.path, 0))
    assert resumed.data["config"]["teacher-pretrain-lr"] == config.teacher_pretrain_lr


def test_run_config_declares_the_keys_in_pyprojects_groups_and_order() -> None:
    """A reader finds a key in the same group in `RunConfig` and in pyproject.toml's config table."""

    def groups(lines: list[str], comment: str, key: str) -> list[tuple[str, list[str]]]:
        found: list[tuple[str, list[str]]] = []
        for line in lines:
            if line.strip().startswith(comment):
                found.append((line.strip().removeprefix(comment).strip(), []))
            elif match := re.match(key, line):
                found[-1][1].append(match.group(1).replace("_", "-"))
        return found

    table = (REPO / "pyproject.toml").read_text().split("[tool.flwr.app.config]\n")[1].split("\n[")[0]
    source = [line for group in SETTINGS_GROUPS for line in inspect.getsource(group).splitlines()]
    pyproject = groups(table.splitlines(), "# ---", r"([a-z0-9-]+) = ")
    in_code = groups(source, "# ---", r"    ([a-z0-9_]+): ")
    assert len(pyproject) == 9 and in_code == pyproject
    # RunConfig is every group, its fields theirs in the same order: a function may take one group
    assert [f.name for f in fields(RunConfig)] == [f.name for g in SETTINGS_GROUPS for f in fields(g)]
    assert all(isinstance(make_config(), group) for group in SETTINGS_GROUPS)
