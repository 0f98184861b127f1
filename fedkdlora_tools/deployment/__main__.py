"""`python -m fedkdlora_tools.deployment`: connect, submit (deploy/run.sh), scenario, export-partition.

python -m fedkdlora_tools.deployment scenario --supernodes 2 --run-config "num-server-rounds=2"
python -m fedkdlora_tools.deployment scenario --supernodes 4 --netns --lose-node-in-round 2
python -m fedkdlora_tools.deployment submit CONNECTION --run-config "..."   # deploy/run.sh
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import tomli

from fedkdlora_app.config import ConfigError
from fedkdlora_tools.deployment.local import process_env
from fedkdlora_tools.deployment.partitions import config_with, export_partition
from fedkdlora_tools.deployment.scenarios import run_scenario
from fedkdlora_tools.flower_cli import submit_run, wait_for_run, write_connection
from fedkdlora_tools.launcher import resolved_run_config
from fedkdlora_tools.processes import exit_on_sigterm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedkdlora_tools.deployment", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    connect = commands.add_parser("connect", help="add a SuperLink connection to $FLWR_HOME/config.toml")
    connect.add_argument("name")
    connect.add_argument("address", help="HOST:PORT of the SuperLink")
    tls = connect.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", type=Path, help="CA certificate that signed the SuperLink's")
    tls.add_argument("--insecure", action="store_true", help="plain HTTP (loopback experiments only)")

    submit = commands.add_parser("submit", help="flwr run . CONNECTION, then wait for the real outcome")
    submit.add_argument("connection")
    submit.add_argument("--app", type=Path, default=Path("."))
    submit.add_argument("--run-config", "-c", action="append", default=[])
    submit.add_argument("--timeout", type=float, default=24 * 3600)

    scenario = commands.add_parser("scenario", help="a whole deployment on this machine, measured")
    scenario.add_argument("--supernodes", type=int, default=2)
    scenario.add_argument(
        "--netns", action="store_true", help="SuperLink and SuperNodes in network namespaces"
    )
    scenario.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication")
    scenario.add_argument(
        "--unregistered-node", action="store_true", help="also start an unregistered SuperNode"
    )
    scenario.add_argument(
        "--lose-node-in-round", type=int, default=0, help="stop the last SuperNode in round R"
    )
    scenario.add_argument("--restore-in-round", type=int, default=None, help="start it again in round R")
    scenario.add_argument("--kill", action="store_true", help="SIGKILL (a crash) instead of SIGTERM")
    scenario.add_argument(
        "--own-partitions", action="store_true", help="give each SuperNode a folder with only its partition"
    )
    scenario.add_argument(
        "--private-filesystems",
        action="store_true",
        help="each SuperNode in a mount namespace where the server's data and results are empty (root)",
    )
    scenario.add_argument("--run-config", "-c", action="append", default=[])
    scenario.add_argument("--app", type=Path, default=Path("."), help="app directory (default .)")
    scenario.add_argument(
        "--data-dir",
        default="../shared/data/glue",
        help="the server's GLUE folder (default ../shared/data/glue)",
    )
    scenario.add_argument("--work-dir", type=Path, default=None)
    scenario.add_argument("--server-cpus", help="taskset cores of the SuperLink and ServerApp, e.g. 0")
    scenario.add_argument("--node-cpus", help="taskset cores of the SuperNodes and ClientApps, e.g. 1")
    scenario.add_argument("--timeout", type=float, default=900)

    export = commands.add_parser("export-partition", help="write one SuperNode's own data folder")
    export.add_argument("--partition-id", type=int, required=True)
    export.add_argument("--num-partitions", type=int, required=True)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--app", type=Path, default=Path("."))
    export.add_argument("--run-config", "-c", action="append", default=[], help="the run's overrides")

    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    if args.command == "export-partition":
        try:
            app_dir = args.app.resolve()
            overrides = resolved_run_config(app_dir, args.run_config, Path.cwd())
            config = config_with(overrides, app_dir)
        except ConfigError as error:
            print(f"deployment: {error}", file=sys.stderr)
            return 2
        out = export_partition(config, args.partition_id, args.num_partitions, args.out)
        print(f"partition {args.partition_id}/{args.num_partitions} of {config.task} -> {out / config.task}")
        return 0
    if args.command == "connect":
        home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
        path = write_connection(home, args.name, args.address, args.root_certificates, args.insecure)
        default = tomli.loads(path.read_text())["superlink"]["default"]
        print(f"connection '{args.name}' -> {args.address} written to {path}")
        if default == args.name:
            print(f"'{args.name}' is now the default connection: `flwr run .` without a name uses it")
        else:
            print(f"the default connection stays '{default}': name this one, `flwr run . {args.name}`")
        return 0
    if args.command == "submit":
        env = process_env(Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")))
        app_dir = args.app.resolve()
        try:  # types, ranges and choices here; the server's paths are checked on its host
            overrides = resolved_run_config(app_dir, args.run_config, Path.cwd(), check_files=False)
        except ConfigError as error:
            print(f"deployment: {error}", file=sys.stderr)
            return 2
        started = time.monotonic()
        run_id = submit_run(env, args.connection, app_dir, overrides)
        print(f"deployment: run {run_id} submitted to '{args.connection}'", flush=True)
        status, details = wait_for_run(env, args.connection, run_id, args.timeout)
        print(
            f"deployment: run {run_id} {status} after {time.monotonic() - started:.0f} s {details}".rstrip()
        )
        return 0 if status == "finished:completed" else 1
    report = run_scenario(args)
    print(json.dumps(report, indent=2))
    return 0 if report["run"]["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
