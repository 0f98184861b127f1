#!/usr/bin/env bash
# Submit the app to a running deployment and wait for its real outcome (flwr list):
# exit 0 only if the run finished:completed. Paths in the run-config are made absolute
# here, and must exist on the SuperLink's host (data-dir, results-dir, teacher-model).
#
#   deploy/run.sh CONNECTION [--run-config "scheme='fedlora' task='cola' data-dir='/data/glue'"]...
set -euo pipefail
source "$(dirname "$0")/_common.sh"

[[ $# -ge 1 ]] || { echo "usage: $0 CONNECTION [--run-config '...']... [--timeout S]" >&2; exit 2; }
CONNECTION="$1"; shift
cd "$REPO_DIR"
exec python -m fedkdlora_tools.deployment submit "$CONNECTION" --app "$REPO_DIR" "$@"
