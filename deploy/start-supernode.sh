#!/usr/bin/env bash
# Start one SuperNode (one client) in the foreground, holding partition I of N.
# Secure by default: TLS to the SuperLink (verified against the local CA) and authentication
# with this node's private key, whose public key must be registered on the SuperLink first
# (deploy/register-supernodes.sh).
#
#   deploy/start-supernode.sh --superlink HOST:9093 --partition-id I --num-partitions N \
#       [--key deploy/certs/node-I] [--certs DIR] [--data-dir DIR] [--student-model DIR] \
#       [--teacher-path DIR] [--cache-dir DIR] [--lora-r R] [--port 9094]
#   deploy/start-supernode.sh --insecure --superlink 127.0.0.1:9093 ...   # loopback experiments only
#
# The run-config's paths name the server's files; these name this host's, as node config:
# --data-dir: the GLUE copy, or this node's own partition (`python -m
# fedkdlora_tools.deployment export-partition`); --student-model: a local copy of the
# student's base model (when the run-config's is a folder on the server); --teacher-path: a
# local teacher for client-side KD (client-kd = true); --cache-dir: where a teacher the
# server ships is kept (default ~/.cache/fedkdlora/client-kd-teachers); --lora-r: this node's
# LoRA rank (lora-aggregation = "svd" only; <= the run-config's lora-r). --port is this SuperNode's
# local Runtime API port (its ClientApp talks to it on 127.0.0.1); give each SuperNode on
# one host its own.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

usage() {
    echo "usage: $0 --superlink HOST:PORT --partition-id I --num-partitions N [--key FILE] [--certs DIR]" \
         "[--data-dir DIR] [--student-model DIR] [--teacher-path DIR] [--cache-dir DIR] [--lora-r R]" \
         "[--port P] [--insecure]" >&2
    exit 2
}
CERTS="$DEPLOY_DIR/certs"
SUPERLINK=""; PARTITION=""; NUM_PARTITIONS=""; KEY=""; DATA_DIR=""; STUDENT=""; TEACHER=""; CACHE=""; RANK=""
PORT=9094; INSECURE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --superlink) SUPERLINK="$2"; shift 2 ;;
        --partition-id) PARTITION="$2"; shift 2 ;;
        --num-partitions) NUM_PARTITIONS="$2"; shift 2 ;;
        --key) KEY="$2"; shift 2 ;;
        --certs) CERTS="$2"; shift 2 ;;
        --data-dir) DATA_DIR="$2"; shift 2 ;;
        --student-model) STUDENT="$2"; shift 2 ;;
        --teacher-path) TEACHER="$2"; shift 2 ;;
        --cache-dir) CACHE="$2"; shift 2 ;;
        --lora-r) RANK="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --insecure) INSECURE=1; shift ;;
        *) usage ;;
    esac
done
[[ -n "$SUPERLINK" && -n "$PARTITION" && -n "$NUM_PARTITIONS" ]] || usage

NODE_CONFIG="partition-id=$PARTITION num-partitions=$NUM_PARTITIONS"
if [[ -n "$DATA_DIR" ]]; then NODE_CONFIG+=" data-dir=\"$(realpath "$DATA_DIR")\""; fi
if [[ -n "$STUDENT" ]]; then NODE_CONFIG+=" student-model=\"$(realpath "$STUDENT")\""; fi
if [[ -n "$TEACHER" ]]; then NODE_CONFIG+=" teacher-path=\"$(realpath "$TEACHER")\""; fi
if [[ -n "$CACHE" ]]; then NODE_CONFIG+=" cache-dir=\"$(realpath -m "$CACHE")\""; fi
if [[ -n "$RANK" ]]; then NODE_CONFIG+=" lora-r=$RANK"; fi

ARGS=(--superlink "$SUPERLINK" --node-config "$NODE_CONFIG" --port "$PORT")
if [[ $INSECURE -eq 1 ]]; then
    echo "start-supernode: --insecure: no TLS and no SuperNode authentication" >&2
    ARGS+=(--insecure)
else
    KEY="${KEY:-$CERTS/node-$PARTITION}"
    [[ -f "$CERTS/ca.crt" ]] || { echo "start-supernode: $CERTS/ca.crt missing: run deploy/generate-certs.sh" >&2; exit 2; }
    [[ -f "$KEY" ]] || { echo "start-supernode: private key $KEY missing" >&2; exit 2; }
    ARGS+=(--root-certificates "$CERTS/ca.crt" --auth-supernode-private-key "$KEY")
fi
exec flower-supernode "${ARGS[@]}"
