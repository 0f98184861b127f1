#!/usr/bin/env bash
# Add a SuperLink connection named NAME to the Flower CLI's config ($FLWR_HOME/config.toml,
# default ~/.flwr), for `flwr run . NAME`, `flwr list NAME`, `flwr supernode register ... NAME`.
#
#   deploy/connect.sh NAME HOST:PORT [--certs DIR]    # TLS, verified against DIR/ca.crt
#   deploy/connect.sh NAME HOST:PORT --insecure       # plain HTTP (loopback experiments only)
set -euo pipefail
source "$(dirname "$0")/_common.sh"

[[ $# -ge 2 ]] || { echo "usage: $0 NAME HOST:PORT [--certs DIR | --insecure]" >&2; exit 2; }
NAME="$1"; ADDRESS="$2"; shift 2
CERTS="$DEPLOY_DIR/certs"; INSECURE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --certs) CERTS="$2"; shift 2 ;;
        --insecure) INSECURE=1; shift ;;
        *) echo "usage: $0 NAME HOST:PORT [--certs DIR | --insecure]" >&2; exit 2 ;;
    esac
done
ARGS=(connect "$NAME" "$ADDRESS")
if [[ $INSECURE -eq 1 ]]; then ARGS+=(--insecure); else ARGS+=(--root-certificates "$(realpath "$CERTS/ca.crt")"); fi
exec python -m fedkdlora_tools.deployment "${ARGS[@]}"
