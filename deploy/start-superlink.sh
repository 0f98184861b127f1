#!/usr/bin/env bash
# Start the SuperLink (Fleet, Control and Runtime APIs over HTTPS on one --host/--port),
# in the foreground. Secure by default: TLS with the certificates of generate-certs.sh and
# SuperNode authentication (only SuperNodes registered with `flwr supernode register` join).
# Runtime dependency installation (a `uv sync` per run) is always off: the app's
# dependencies come from this environment. Its state (registered SuperNodes, runs, their
# status) lives in an SQLite file, by default deploy/state/superlink.db, so a restarted
# SuperLink knows its nodes and runs again; `--database :flwr-in-memory:` keeps nothing.
#
#   deploy/start-superlink.sh [--certs DIR] [--host 0.0.0.0] [--port 9093] [--database FILE]
#   deploy/start-superlink.sh --insecure ...   # plain HTTP, no node authentication: loopback experiments only
set -euo pipefail
source "$(dirname "$0")/_common.sh"

CERTS="$DEPLOY_DIR/certs"
HOST=0.0.0.0
PORT=9093
DATABASE="$DEPLOY_DIR/state/superlink.db"
INSECURE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --certs) CERTS="$2"; shift 2 ;;
        --host) HOST="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --database) DATABASE="$2"; shift 2 ;;
        --insecure) INSECURE=1; shift ;;
        *) echo "usage: $0 [--certs DIR] [--host H] [--port P] [--database FILE] [--insecure]" >&2; exit 2 ;;
    esac
done

if [[ "$DATABASE" != :* ]]; then
    mkdir -p "$(dirname "$DATABASE")"
    echo "start-superlink: state in $DATABASE (kept across restarts)" >&2
fi
ARGS=(--host "$HOST" --port "$PORT" --database "$DATABASE" --disable-runtime-dependency-installation)
if [[ $INSECURE -eq 1 ]]; then
    echo "start-superlink: --insecure: no TLS and no SuperNode authentication" >&2
    ARGS+=(--insecure)
else
    for f in ca.crt server.pem server.key; do
        [[ -f "$CERTS/$f" ]] || { echo "start-superlink: $CERTS/$f missing: run deploy/generate-certs.sh" >&2; exit 2; }
    done
    ARGS+=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem"
           --ssl-keyfile "$CERTS/server.key" --enable-supernode-auth)
fi
exec flower-superlink "${ARGS[@]}"
