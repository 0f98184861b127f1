"""Saved federations (federations.toml): plain `flwr run . <name>` as the README tells a user, and
`fedkdlora-run --federation <name>`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import tomli
from flwr.cli.flower_config import parse_superlink_connection

from fedkdlora_app.results_format import load
from fedkdlora_tools import launcher
from fedkdlora_tools.flower_cli import flower_env, flwr_json, run_status, run_traffic, stop_local_superlink
from fedkdlora_tools.launcher import FEDERATIONS
from tests.helpers import GLUE_DIR, QUICK, REPO, tiny_models

SAVED = tomli.loads((REPO / FEDERATIONS).read_text())["superlink"]


def test_the_saved_federations_are_flower_connections_with_the_documented_resources() -> None:
    resources = {}
    for name, entry in SAVED.items():
        options = parse_superlink_connection(entry, name).options  # how Flower 1.42 reads them
        client = options.backend.client_resources
        resources[name] = (options.num_supernodes, client.num_cpus, client.num_gpus)
    assert resources == {
        "fedkdlora-cpu-2": (2, 1, 0.0),
        "fedkdlora-cpu-4": (4, 1, 0.0),
        "fedkdlora-4gpu-quarter": (16, 1, 0.25),
        "fedkdlora-4gpu-half": (8, 1, 0.5),
    }


def test_installing_keeps_the_users_own_connections(tmp_path: Path, capsys) -> None:
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "mine"\n\n[superlink.mine]\naddress = "h:9093"\n'
    )
    assert launcher.main([str(REPO), "--install-federations", "--flwr-home", str(home)]) == 0
    config = tomli.loads((home / "config.toml").read_text())["superlink"]
    assert config["default"] == "mine" and config["mine"] == {"address": "h:9093"}
    assert {name: config[name] for name in SAVED} == SAVED
    assert f"-> {home / 'config.toml'}" in capsys.readouterr().out


@pytest.mark.slow  # a full extra simulation; the fast tier has the same app through fedkdlora-run
def test_plain_flwr_run_with_a_saved_federation_completes(tmp_path: Path) -> None:
    """`fedkdlora-run --install-federations`, then `flwr run . fedkdlora-cpu-4` in the app folder: 4 nodes,
    not Flower's default 2."""
    home = tmp_path / "flwr"
    assert launcher.main([str(REPO), "--install-federations", "--flwr-home", str(home)]) == 0
    env = flower_env(home, local_superlink_ports=True)  # FLWR_HOME, no `uv sync`, free ports
    results = tmp_path / "results"
    values = {
        **QUICK,
        "scheme": "fedlora",
        "min-available-nodes": 4,  # round 1 waits for all four
        **tiny_models(),
        "data-dir": str(GLUE_DIR),
        "results-dir": str(results),
    }
    command = ["flwr", "run", ".", "fedkdlora-cpu-4", "--stream"]
    command += ["--run-config", launcher.format_overrides(values)]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        status, details = run_status(env)
        [run] = flwr_json(["list"], env)["runs"]
        traffic = run_traffic(env, None, int(run["run-id"]))
    finally:
        stop_local_superlink(home)
    assert done.returncode == 0 and status == "finished:completed", details + done.stdout[-2000:]
    [written] = results.glob("*.json")
    results = load(written)
    assert len(results["rounds"][1]["communication"]["per_node"]) == 4
    # Flower counts traffic in its Fleet API, which a simulation does not use: messages pass in-process
    assert traffic == (0, 0) and results["rounds"][1]["communication"]["up_bytes"] > 0


def test_fedkdlora_run_refuses_an_unknown_federation_in_one_line(tmp_path: Path, capsys) -> None:
    code = launcher.main([str(REPO), "--federation", "no-such", "--run-config", f"results-dir='{tmp_path}'"])
    assert code == 2
    assert "fedkdlora-run: --federation no-such: no federation no-such in" in capsys.readouterr().err
