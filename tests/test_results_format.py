"""The results JSON's layout (`results_format`): one definition, documented, and older files still read."""

from __future__ import annotations

import json
import re
import shutil
import types
import typing
from pathlib import Path

import pytest

from fedkdlora_app.config import RunConfig, with_current_names
from fedkdlora_app.results import ADDED_KEY_DEFAULTS, RunRecorder
from fedkdlora_app.results_format import SCHEMA_VERSION, ResultsDocument, load, upgrade
from fedkdlora_tools.report import RunResult, write_report
from tests.helpers import REPO

# A FedKDLoRA run written in schema_version 1 (kebab-case keys outside `config`), kept as evidence.
KEPT_V1 = REPO / "docs" / "evidence" / "sst2-quick" / "runs" / "fedkdlora_sst2_r8_20261202T005026Z.json"
FORMAT_DOC = REPO / "docs" / "results-format.md"


def fields(definition: type, prefix: str = "") -> dict[str, type]:
    """Every field of a TypedDict and of the TypedDicts inside it, by dotted path (`rounds[].server`)."""
    found = {}
    for name, hint in typing.get_type_hints(definition).items():
        path = f"{prefix}{name}"
        found[path] = hint
        inner = [hint, *typing.get_args(hint)]
        for arg in inner + [a for h in inner for a in typing.get_args(h)]:
            if typing.is_typeddict(arg):
                below = "[]." if typing.get_origin(hint) is list else "."
                found |= fields(arg, f"{path}{below}")
    return found


def keys(value: object) -> set[str]:
    """Every dict key in `value`, at every depth."""
    if isinstance(value, dict):
        return set(value) | {k for item in value.values() for k in keys(item)}
    if isinstance(value, list):
        return {k for item in value for k in keys(item)}
    return set()


def test_a_kept_version_1_file_reads_in_the_current_layout() -> None:
    old = json.loads(KEPT_V1.read_text())
    assert old["schema_version"] == 1 and "num-examples" in old["rounds"][1]["clients"]["train"]
    new = load(KEPT_V1)
    assert new["schema_version"] == SCHEMA_VERSION == 2
    assert new["config"] == old["config"]  # the run-config keeps its own (kebab-case) names
    assert not [k for k in keys({k: v for k, v in new.items() if k != "config"}) if "-" in k]
    first, old_first = new["rounds"][1], old["rounds"][1]
    assert first["clients"]["train"]["num_examples"] == old_first["clients"]["train"]["num-examples"]
    assert (
        first["distillation"]["last_step"]["kl_teacher_student"]
        == (old_first["distillation"]["last-step"]["kl-teacher-student"])
    )
    assert first["server"] == {
        role: {k.replace("-", "_"): v for k, v in m.items()} for role, m in old_first["server"].items()
    }
    assert list(new) == list(old)  # same order of sections


def test_an_unknown_schema_version_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="schema_version 99"):
        upgrade({"schema_version": 99})


def test_old_runs_plot_with_new_ones(tmp_path: Path) -> None:
    """`fedkdlora-plot` over a folder mixing a version-1 file and the same run in the current layout."""
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy(KEPT_V1, runs / "old.json")
    upgraded = load(KEPT_V1)
    (runs / "new.json").write_text(json.dumps(upgraded | {"config": {**upgraded["config"], "seed": 7}}))
    [old, new] = [RunResult.load(path) for path in sorted(runs.glob("*.json"), reverse=True)]
    assert old.data["rounds"] == new.data["rounds"]
    written = write_report([old, new], tmp_path / "report", target=0.7)
    assert (tmp_path / "report" / "accuracy_per_round.png") in written
    assert "fedkdlora" in (tmp_path / "report" / "comparison.md").read_text()


def test_a_version_1_run_resumes_and_is_rewritten_in_the_current_layout(tmp_path: Path) -> None:
    path = tmp_path / KEPT_V1.name
    shutil.copy(KEPT_V1, path)
    old = json.loads(KEPT_V1.read_text())
    values = {**ADDED_KEY_DEFAULTS, **with_current_names(old["config"])}
    config = RunConfig.from_mapping(values | {"num-server-rounds": 6}, check_files=False)
    recorder = RunRecorder(config, resume=(path, 3))
    on_disk = json.loads(path.read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION
    assert [entry["round"] for entry in on_disk["rounds"]] == [0, 1, 2, 3]
    assert on_disk["run"]["resumes"][-1]["discarded_unfinished_rounds"] == [4, 5]
    recorder.start_round(4)
    recorder.add_bytes(4, node_id=1, direction="up", stage="train", num_bytes=1000)
    recorder.finish_round(4, {"student": load(KEPT_V1)["rounds"][4]["server"]["student"]})
    round4 = json.loads(path.read_text())["rounds"][4]["communication"]
    assert round4["cumulative_up_bytes"] == old["rounds"][3]["communication"]["cumulative_up_bytes"] + 1000


def test_the_format_doc_names_every_field_and_the_current_version() -> None:
    doc = FORMAT_DOC.read_text()
    assert f"## Schema (`schema_version` {SCHEMA_VERSION})" in doc
    # every name in backticks, and each part of a backticked path such as `rounds[].server`
    named = {
        part.removesuffix("[]") for token in re.findall(r"`([a-z_.\[\]]+)`", doc) for part in token.split(".")
    }
    missing = [
        path for path in fields(ResultsDocument) if path.rsplit(".", 1)[-1].removesuffix("[]") not in named
    ]
    assert missing == []
    # every row's path in the schema table is a field of the definitions
    rows = re.findall(r"^\| `([a-z_.\[\]]+)`", doc, flags=re.M)
    defined = set(fields(ResultsDocument))
    assert rows and [row for row in rows if row not in defined] == []


def undefined_keys(value: object, hint: object, path: str = "") -> list[str]:
    """Paths in `value` that the type `hint` does not define (TypedDicts checked key by key)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if typing.is_typeddict(option) and isinstance(value, dict):
            hints = typing.get_type_hints(option)
            return [f"{path}.{k}" for k in value if k not in hints] + [
                bad
                for k, v in value.items()
                if k in hints
                for bad in undefined_keys(v, hints[k], f"{path}.{k}")
            ]
        if typing.get_origin(option) is dict and isinstance(value, dict):
            inner = typing.get_args(option)[1]
            return [bad for k, v in value.items() for bad in undefined_keys(v, inner, f"{path}.{k}")]
        if typing.get_origin(option) is list and isinstance(value, list):
            inner = typing.get_args(option)[0]
            return [bad for v in value for bad in undefined_keys(v, inner, f"{path}[]")]
    return []


def test_the_definitions_cover_what_a_run_writes(client_kd_run) -> None:
    """Every key of a run's results file (FedKDLoRA with client KD) and of a kept older one is defined."""
    assert client_kd_run["schema_version"] == SCHEMA_VERSION
    assert undefined_keys(client_kd_run, ResultsDocument) == []
    assert undefined_keys(load(KEPT_V1), ResultsDocument) == []
    assert undefined_keys({"rounds": [{"server": {"student": {"num-examples": 1}}}]}, ResultsDocument) == [
        ".rounds[].server.student.num-examples"
    ]
