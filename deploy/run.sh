#!/usr/bin/env bash
# Submit the app to a running deployment and wait for its real outcome (flwr list):
# exit 0 only if the run finished:completed. Only types, ranges and choices are checked
# here. Relative run-config paths (data-dir, results-dir, resume-from, and model keys that
# name an existing local folder; defaults included) are made absolute against this
# repository, not the caller's folder (the script cds there); they name files on the
# SuperLink's host, which checks them at start (results-dir is created there).
#
#   deploy/run.sh CONNECTION [--run-config "scheme='fedlora' task='cola' data-dir='/data/glue'"]...
set -euo pipefail
source "$(dirname "$0")/_common.sh"

[[ $# -ge 1 ]] || { echo "usage: $0 CONNECTION [--run-config '...']... [--timeout S]" >&2; exit 2; }
CONNECTION="$1"; shift
cd "$REPO_DIR"
exec python -m fedkdlora_tools.deployment submit "$CONNECTION" --app "$REPO_DIR" "$@"
