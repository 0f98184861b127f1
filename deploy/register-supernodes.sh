#!/usr/bin/env bash
# Register SuperNode public keys with the SuperLink (needs --enable-supernode-auth there,
# the default of start-superlink.sh). Only SuperNodes whose key is registered can join.
#
#   deploy/register-supernodes.sh CONNECTION deploy/certs/node-0.pub deploy/certs/node-1.pub ...
set -euo pipefail
source "$(dirname "$0")/_common.sh"

[[ $# -ge 2 ]] || { echo "usage: $0 CONNECTION PUBLIC_KEY..." >&2; exit 2; }
CONNECTION="$1"; shift
for key in "$@"; do
    flwr supernode register "$key" "$CONNECTION"
done
