#!/usr/bin/env bash
# Local TLS material and SuperNode authentication keys for a FedKDLoRA deployment.
#
# Writes into OUT (default: deploy/certs, git-ignored):
#   ca.crt, ca.key            a self-signed local CA (only for experiments; use your own PKI otherwise)
#   server.pem, server.key    the SuperLink's certificate, signed by that CA, valid for the SANs below
#   node-<i>, node-<i>.pub    ECDSA P-384 keys in OpenSSH format, one pair per SuperNode (i = 0..N-1):
#                             the private key stays on the SuperNode host (--auth-supernode-private-key),
#                             the public key is registered with `flwr supernode register`
#
# SANs always cover loopback (localhost, 127.0.0.1, ::1) and the project's network-namespace
# test hosts (10.77.0.1-10.77.0.20, see netns-hosts.sh); add real host names or IPs with --san.
# Existing files are kept (re-run with --force to replace them).
set -euo pipefail

usage() {
    echo "usage: $0 [--out DIR] [--nodes N] [--san DNS-or-IP]... [--force]" >&2
    exit 2
}

OUT="$(cd "$(dirname "$0")" && pwd)/certs"
NODES=4
FORCE=0
EXTRA_SANS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --nodes) NODES="$2"; shift 2 ;;
        --san) EXTRA_SANS+=("$2"); shift 2 ;;
        --force) FORCE=1; shift ;;
        *) usage ;;
    esac
done

mkdir -p "$OUT"
chmod 700 "$OUT"
cd "$OUT"

if [[ $FORCE -eq 1 ]]; then
    rm -f ca.crt ca.key ca.srl server.pem server.key server.csr node-* san.cnf
fi

if [[ ! -f ca.crt ]]; then
    openssl req -x509 -newkey rsa:2048 -sha256 -days 365 -nodes \
        -keyout ca.key -out ca.crt -subj "/CN=FedKDLoRA local CA" 2>/dev/null
fi

if [[ ! -f server.pem ]]; then
    sans="DNS:localhost,IP:127.0.0.1,IP:::1"
    for i in $(seq 1 20); do sans+=",IP:10.77.0.$i"; done
    for san in "${EXTRA_SANS[@]+"${EXTRA_SANS[@]}"}"; do
        if [[ "$san" =~ ^[0-9.]+$ || "$san" == *:* ]]; then sans+=",IP:$san"; else sans+=",DNS:$san"; fi
    done
    printf '[req]\ndistinguished_name=dn\n[dn]\n[ext]\nsubjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
        "$sans" > san.cnf
    openssl req -newkey rsa:2048 -sha256 -nodes -keyout server.key -out server.csr \
        -subj "/CN=fedkdlora-superlink" -config san.cnf 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
        -extfile san.cnf -extensions ext -out server.pem 2>/dev/null
    rm -f server.csr san.cnf
fi

for ((i = 0; i < NODES; i++)); do
    if [[ ! -f "node-$i" ]]; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedkdlora-node-$i" -f "node-$i"
    fi
done
chmod 600 ./*.key node-* 2>/dev/null || true
chmod 644 ca.crt server.pem node-*.pub
echo "certificates and $NODES SuperNode key pair(s) in $OUT"
