"""The README and docs cannot silently go stale: every flag they show exists, every link resolves."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from importlib.metadata import metadata

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]  # console script -> "module:function"
DEPLOYMENT = "python -m fedkdlora_tools.deployment"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _help(entry: str, *argv: str) -> str:
    """What `<entry> [argv] --help` prints, run in-process."""
    module, function = entry.split(":")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        getattr(importlib.import_module(module), function)([*argv, "--help"])
    assert exit_.value.code == 0
    return out.getvalue()


def _commands(text: str) -> list[tuple[str, str]]:
    """(tool, its command line) for every use of one of the app's tools in a document."""
    lines = text.replace("\\\n", " ").splitlines()
    found = []
    for line in lines:
        for name in [*SCRIPTS, DEPLOYMENT]:
            for match in re.finditer(re.escape(name) + r"(?![\w-])", line):
                found.append((name, re.split(r"`|\||;|&&| #", line[match.start() :])[0]))
    return found


def _documented_flags() -> dict[tuple[str, str], set[str]]:
    """(tool, subcommand) -> the flags the docs use with it."""
    used: dict[tuple[str, str], set[str]] = {}
    for doc in DOCS:
        for tool, command in _commands(doc.read_text()):
            key = (tool, "")
            if tool == DEPLOYMENT:
                subcommand = re.match(r"\s*([a-z][a-z-]*)", command[len(DEPLOYMENT) :])
                key = (DEPLOYMENT, subcommand.group(1) if subcommand else "")
            used.setdefault(key, set()).update(FLAG.findall(command))
    return used


def test_every_flag_the_docs_use_is_in_the_tools_help() -> None:
    used = _documented_flags()
    assert ("fedkdlora-compare", "") in used and ("fedkdlora-run", "") in used  # the docs were read
    for (tool, subcommand), flags in sorted(used.items()):
        if tool == DEPLOYMENT:
            text = _help("fedkdlora_tools.deployment.__main__:main", *([subcommand] if subcommand else []))
        else:
            text = _help(SCRIPTS[tool])
        known = set(FLAG.findall(text))
        assert flags <= known, f"{tool} {subcommand}: {sorted(flags - known)} not in its --help"


def test_every_console_script_answers_help() -> None:
    for name, entry in SCRIPTS.items():
        assert f"usage: {name}" in _help(entry), name


def test_every_make_target_the_docs_name_exists() -> None:
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.MULTILINE))
    # `make X` in inline code, or a code line starting with it
    pattern = re.compile(r"(?:^|`)make ([a-z][a-z-]*)", re.MULTILINE)
    named = {t for doc in DOCS for t in pattern.findall(doc.read_text())}
    assert {"demo", "test", "test-full"} <= named, named
    assert named <= targets, sorted(named - targets)


def test_every_relative_link_in_the_docs_resolves() -> None:
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)}: broken link {target}"


def test_the_python_requirement_is_not_looser_than_the_dependencies() -> None:
    """Every Python the project admits can install every dependency (flwr 1.42 needs >= 3.11)."""
    lowest = Version(re.search(r">=\s*([\d.]+)", PYPROJECT["project"]["requires-python"]).group(1))
    for requirement in map(Requirement, PYPROJECT["project"]["dependencies"]):
        needs = metadata(requirement.name).get("Requires-Python")
        if needs:
            assert lowest in SpecifierSet(needs), (
                f"{requirement.name} needs Python {needs}; project admits {lowest}"
            )
