"""The shape a newcomer relies on: what a SuperNode receives, and imports without side effects."""

from __future__ import annotations

import ast
import io
import os
import shutil
import subprocess
import sys
import zipfile

from flwr.cli.build import build_fab_from_disk

from fedkdlora_tools.flower_cli import stage_app
from tests.helpers import REPO


def test_the_fab_every_supernode_receives_holds_the_app_package_only() -> None:
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))).namelist()
    code = [name for name in names if name.endswith(".py")]
    assert "fedkdlora_app/server_app.py" in code and "fedkdlora_app/client_app.py" in code
    assert all(name.startswith("fedkdlora_app/") for name in code), code
    assert sorted(set(names) - set(code)) == [".info/CONTENT", "pyproject.toml"]


def test_importing_the_app_changes_nothing_for_other_code() -> None:
    """Importing every app module leaves transformers' logging and warnings filters as they were.

    The libraries it builds on are imported first: torch, peft and datasets add filters of their own.
    """
    modules = sorted(p.stem for p in (REPO / "fedkdlora_app").glob("*.py") if p.stem != "__init__")
    script = f"""
import warnings, transformers, torch, peft, datasets, flwr_datasets, flwr.serverapp, flwr.clientapp
before = (transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled(),
          list(warnings.filters))
import importlib
for name in {modules!r}:
    importlib.import_module("fedkdlora_app." + name)
after = (transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled(),
         list(warnings.filters))
assert before == after, (before[:2], after[:2], len(before[2]), len(after[2]))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_leaf_modules_import_nothing_from_the_app() -> None:
    """Constants and exceptions both sides use live in modules that depend on no other app module."""
    for leaf in ("protocol", "errors"):
        tree = ast.parse((REPO / "fedkdlora_app" / f"{leaf}.py").read_text())
        imported = [
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        ]
        assert not [m for m in imported if m.startswith("fedkdlora_app")], (leaf, imported)


def test_building_the_student_leaves_the_callers_random_state_alone() -> None:
    import torch

    from fedkdlora_app.models import build_student
    from tests.helpers import make_config

    config = make_config(scheme="fedlora")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_student(config)
    assert torch.equal(torch.rand(3), expected)  # as if the student had not been built
    second = build_student(config)  # and the student is the same, whatever the state before
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_the_wheel_carries_both_packages_and_the_deploy_scripts(tmp_path) -> None:
    """Installed from a wheel, the deployment harness finds deploy/ inside fedkdlora_tools."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    [wheel] = tmp_path.glob("fedkdlora_app-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"fedkdlora_app/server_app.py", "fedkdlora_tools/launcher.py"} <= names
    scripts = {name.rsplit("/", 1)[1] for name in names if name.startswith("fedkdlora_tools/deploy/")}
    assert {"start-superlink.sh", "start-supernode.sh", "run.sh", "netns-hosts.sh"} <= scripts
    mode = zipfile.ZipFile(wheel).getinfo("fedkdlora_tools/deploy/start-supernode.sh").external_attr >> 16
    assert mode & 0o111, oct(mode)  # the harness executes them
    assert not any(name.startswith("tests/") or name.startswith("bench/") for name in names)


def test_the_staged_app_builds_the_fab_the_repository_builds(tmp_path) -> None:
    """`flwr run` is given a folder holding only the FAB's files: the same FAB, without walking .venv."""
    staged = stage_app(REPO, tmp_path / "app")
    assert staged != REPO
    assert build_fab_from_disk(staged) == build_fab_from_disk(REPO)
    (tmp_path / "app" / "fedkdlora_app" / "stale.py").write_text("")
    assert build_fab_from_disk(stage_app(REPO, tmp_path / "app")) == build_fab_from_disk(REPO)


def _imported_modules(path) -> set[str]:
    """Every module a file imports, at any depth of its code (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_client_side_imports_no_server_code() -> None:
    """What a SuperNode runs (client_app and every app module it reaches) imports no server module
    and no server-side Flower code; Flower's own client package may load that, the app does not."""
    package = REPO / "fedkdlora_app"
    reached, todo = set(), ["client_app"]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo += [
            m.split(".")[1]
            for m in _imported_modules(package / f"{name}.py")
            if m.startswith("fedkdlora_app.")
        ]
    server_modules = {
        "server_app",
        "strategy",
        "aggregation",
        "bookkeeping",
        "distillation",
        "checkpoint",
        "results",
    }
    assert not reached & server_modules, sorted(reached & server_modules)
    for name in reached:
        flower = {
            m
            for m in _imported_modules(package / f"{name}.py")
            if m.startswith(("flwr.server", "flwr.serverapp"))
        }
        assert not flower, (name, flower)


def test_a_clientapp_process_loads_no_partitioner_or_metrics_library_it_does_not_use() -> None:
    """Flower 1.42 starts a fresh ClientApp process for every message on a SuperNode; one holding its
    own exported partition never partitions, so it never pays flwr-datasets' import (which loads
    its plotting helpers: seaborn, scipy.stats, matplotlib), and a train message computes no
    metrics, so it never pays scikit-learn's (about 0.7 s of CPU)."""
    unused = "{'flwr_datasets', 'sklearn'}"
    code = f"import sys, fedkdlora_app.client_app; print(sorted({unused} & sys.modules.keys()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]"


def test_the_tools_import_without_side_effects(tmp_path) -> None:
    """Importing the tools keeps the user's plotting backend and needs no deploy/ scripts (a copy
    without them imports; asking for the scripts then names where it looked)."""
    shutil.copytree(REPO / "fedkdlora_tools", tmp_path / "fedkdlora_tools")
    script = """
import matplotlib
import fedkdlora_tools.compare, fedkdlora_tools.report, fedkdlora_tools.evidence, fedkdlora_tools.launcher
import fedkdlora_tools.deployment.local, fedkdlora_tools.deployment.scenarios
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
from fedkdlora_tools.deployment.hosts import deploy_dir
try:
    deploy_dir()
except FileNotFoundError as error:
    print(error)
"""
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "MPLBACKEND": "svg"}
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"no deploy/ scripts in {tmp_path / 'fedkdlora_tools'} or beside it"
