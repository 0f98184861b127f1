#!/usr/bin/env bash
# Stop the SuperLink and SuperNodes started from this checkout's deploy/ scripts on this
# host (and their ServerApp / ClientApp children): SIGTERM, then SIGKILL after 10 s.
# SuperNodes deactivate themselves on SIGTERM, so the SuperLink stops sampling them at once.
#
#   deploy/stop.sh [supernode|superlink|all]     # default: all
set -euo pipefail
source "$(dirname "$0")/_common.sh"

WHAT="${1:-all}"
case "$WHAT" in
    supernode) NAMES=(flower-supernode) ;;
    superlink) NAMES=(flower-superlink) ;;
    all) NAMES=(flower-supernode flower-superlink) ;;
    *) echo "usage: $0 [supernode|superlink|all]" >&2; exit 2 ;;
esac
python - "$REPO_DIR" "${NAMES[@]}" <<'PY'
import sys

import psutil

venv_bin, names = sys.argv[1] + "/.venv/bin/", sys.argv[2:]
targets = []
for proc in psutil.process_iter(["cmdline"]):
    cmd = proc.info["cmdline"] or []
    # only this checkout's Flower processes, by their executable path
    if len(cmd) > 1 and any(cmd[1] == venv_bin + name for name in names):
        targets += [proc, *proc.children(recursive=True)]
for proc in targets:
    try:
        proc.terminate()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(targets, timeout=10)
for proc in alive:
    proc.kill()
print(f"stopped {len(targets)} process(es)")
PY
