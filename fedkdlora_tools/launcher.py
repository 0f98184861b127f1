"""`fedkdlora-run`: one `flwr run` in simulation that tells the truth and cleans up.

Plain `flwr run . --stream` in Flower 1.42 starts a detached local SuperLink that keeps
running, does a `uv sync` of the app's dependencies per run (fails offline, or pulls a
CUDA torch), resolves relative paths from wherever the SuperLink happens to run, and
exits 0 even when the ServerApp raised. This wrapper runs the same command with a private
FLWR_HOME and free ports, dependency installation off and paths made absolute; then
reads the run's real status with `flwr list`, stops the SuperLink it started and exits
non-zero if the run did not complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import tomli_w
from flwr.common.config import parse_config_args

from fedkdlora_app.config import ConfigError, RunConfig, app_defaults, with_current_names
from fedkdlora_app.privacy import check_privacy_budget
from fedkdlora_app.tracking import attach_files, check_tracking
from fedkdlora_tools.flower_cli import (
    flower_env,
    install_federations,
    run_status,
    stage_app,
    stop_local_superlink,
)
from fedkdlora_tools.processes import ProcessError, exit_on_sigterm

# Run-config keys that name files or folders; relative values are taken from the cwd.
FEDERATIONS = "federations.toml"  # the app's saved federations (Flower 1.42 connections)
PATH_KEYS = ("data-dir", "results-dir", "resume-from", "student-model", "teacher-model", "teacher-base-model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedkdlora-run", description=__doc__.splitlines()[0])
    parser.add_argument("app", nargs="?", default=".", help="app directory (default: .)")
    parser.add_argument(
        "--run-config",
        "-c",
        action="append",
        default=[],
        help="run-config overrides, as for `flwr run` ('k=v k2=v2' or a TOML file)",
    )
    parser.add_argument(
        "--federation-config",
        action="append",
        default=[],
        help="e.g. 'num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=0.25'",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="after a completed run: draw its plots beside it and print where the results JSON, the plots "
        "and the saved model are, with the lines that load it",
    )
    parser.add_argument(
        "--federation",
        default=None,
        help="a saved federation: one of the app's federations.toml (e.g. fedkdlora-cpu-4, "
        "fedkdlora-4gpu-quarter), or with --flwr-home one of that Flower home's connections",
    )
    parser.add_argument(
        "--flwr-home",
        default=None,
        help="use this Flower home (e.g. ~/.flwr, with your saved connections) instead of a fresh "
        "temporary one; its local SuperLink is stopped after the run",
    )
    parser.add_argument(
        "--install-federations",
        action="store_true",
        help="copy the app's saved federations into the Flower home (--flwr-home, else $FLWR_HOME, "
        "else ~/.flwr), for plain `flwr run . <name>`, and exit",
    )
    return parser.parse_args(argv)


def format_overrides(values: dict[str, Any]) -> str:
    """Run-config values as one `--run-config` string (TOML literals: strings quoted)."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def resolved_run_config(app_dir: Path, overrides: list[str], cwd: Path, check_files: bool = True) -> dict:
    """Overrides with every path key absolute (defaults included, so results land here).

    The merged config is validated here, so a typo fails in one line before a
    SuperLink is started or a model loaded. `check_files=False` where this host only
    submits the run: the server's files are on the SuperLink's host and checked there.
    """
    defaults = app_defaults(app_dir)
    try:
        values = parse_config_args(overrides) if overrides else {}
    except (click.ClickException, ValueError) as error:  # e.g. scheme=fedavg: strings need quotes
        raise ConfigError(
            f"--run-config {' '.join(overrides)!r}: {error} Quote strings: scheme='fedavg'"
        ) from error
    values = with_current_names(values, notice=lambda line: print(f"fedkdlora-run: {line}", file=sys.stderr))
    for key in PATH_KEYS:
        value = values.get(key, defaults.get(key))
        if value and not Path(value).is_absolute() and (not key.endswith("model") or (cwd / value).exists()):
            values[key] = str((cwd / value).resolve())
    config = RunConfig.from_mapping({**defaults, **values}, check_files=check_files)
    check_privacy_budget(config)
    check_tracking(config)
    return values


class RunFailed(RuntimeError):
    """The run started but did not complete; the message gives Flower's status and details."""


def simulate(
    app_dir: Path,
    overrides: list[str],
    federation_config: list[str],
    flwr_home: Path | None = None,
    federation: str | None = None,
) -> dict[str, Any]:
    """One run of the app in simulation; returns its resolved overrides (paths absolute).

    Raises ConfigError for bad settings, before anything starts, and RunFailed when the run
    did not complete (whatever `flwr run` exits with). `flwr_home`: default a fresh
    temporary folder, removed afterwards. `federation`: a saved federation, from the app's
    federations.toml into a temporary home, else from `flwr_home`'s own connections.
    """
    run_config = resolved_run_config(app_dir, overrides, Path.cwd())
    temporary_home = flwr_home is None
    flwr_home = Path(tempfile.mkdtemp(prefix="fedkdlora-flwr-")) if temporary_home else flwr_home
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = flower_env(flwr_home, local_superlink_ports=True)
    overrides_file = flwr_home / "run-config.toml"
    overrides_file.write_text(tomli_w.dumps(run_config))
    if federation and temporary_home:
        try:
            install_federations(flwr_home, app_dir / FEDERATIONS, [federation])
        except (OSError, ValueError) as error:
            raise ConfigError(f"--federation {federation}: {error}") from None
    staged = stage_app(app_dir, flwr_home / "app")
    command = ["flwr", "run", str(staged), *([federation] if federation else [])]
    command += ["--stream", "--run-config", str(overrides_file)]
    for federation in federation_config:
        command += ["--federation-config", federation]
    try:
        submitted = subprocess.run(command, env=env)
        try:
            status, details = run_status(env)
        except ProcessError as error:
            status, details = "unknown", str(error)
    finally:
        stop_local_superlink(flwr_home)
        if temporary_home:
            shutil.rmtree(flwr_home, ignore_errors=True)
    if submitted.returncode != 0 or status != "finished:completed":
        raise RunFailed(f"run did not complete (status {status}): {details}")
    return run_config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    started = time.time()
    flwr_home = Path(args.flwr_home).expanduser() if args.flwr_home else None
    app_dir = Path(args.app).resolve()
    if args.install_federations:
        home = flwr_home or Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
        names = install_federations(home, app_dir / FEDERATIONS)
        print(f"fedkdlora-run: {', '.join(names)} -> {home / 'config.toml'}; run one: flwr run . <name>")
        return 0
    try:
        run_config = simulate(app_dir, args.run_config, args.federation_config, flwr_home, args.federation)
    except ConfigError as error:
        print(f"fedkdlora-run: {error}", file=sys.stderr)
        return 2
    except RunFailed as error:
        print(f"fedkdlora-run: {error}", file=sys.stderr)
        return 1
    print(f"fedkdlora-run: run completed; results in {run_config['results-dir']}")
    if args.report:
        newest = newest_results(Path(run_config["results-dir"]), started)
        if newest is not None:
            print_run_summary(newest)
    return 0


def newest_results(results_dir: Path, since: float) -> Path | None:
    """The results JSON written last in `results_dir`, if written after `since` (a time.time())."""
    written = [p for p in results_dir.glob("*.json") if p.stat().st_mtime >= since]
    return max(written, key=lambda p: p.stat().st_mtime, default=None)


def print_run_summary(results_path: Path) -> None:
    """Draw the run's plots into `<run>/plots` and print where everything is and how to load the model."""
    from fedkdlora_tools.report import RunResult, write_report

    run = RunResult.load(results_path)
    plots = write_report([run], results_path.with_suffix("") / "plots")
    artifacts = run.data["artifacts"]
    print(f"results JSON: {results_path}")
    print("plots:        " + "\n              ".join(str(p) for p in plots if p.suffix == ".png"))
    if tracking := run.data["run"].get("tracking"):
        if problem := attach_files(tracking, plots, "plots"):
            print(problem, file=sys.stderr)
        print(f"tracked:      {tracking['backend']} run {tracking.get('run_id')} at {tracking['uri']}")
    print(f"model:        {artifacts['student']}")
    print("load it:")
    if "student_base" in artifacts:  # a PEFT adapter over the saved base student
        print("    from peft import PeftModel")
        print("    from transformers import AutoModelForSequenceClassification")
        print(
            f"    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained("
            f"{artifacts['student_base']!r}), {artifacts['student']!r})"
        )
    else:
        print("    from transformers import AutoModelForSequenceClassification")
        print(f"    model = AutoModelForSequenceClassification.from_pretrained({artifacts['student']!r})")


if __name__ == "__main__":
    sys.exit(main())
