#!/usr/bin/env bash
# Separate "hosts" on one machine for deployment experiments: one network namespace for the
# SuperLink and one per SuperNode, each with its own veth link into a bridge, on the
# project's own test subnet 10.77.0.0/24 (nothing else is touched):
#
#   fkl-link     10.77.0.1    SuperLink
#   fkl-node<i>  10.77.0.1<i> SuperNode i (i = 0..N-1, N <= 9)
#   fklbr0       10.77.0.254  bridge in the current namespace, where the `flwr` CLI runs
#
#   deploy/netns-hosts.sh up N      # create (idempotent: an existing set is removed first)
#   deploy/netns-hosts.sh down      # remove every fkl-* namespace, veth, the bridge and its iptables rule
#   deploy/netns-hosts.sh check     # exit 0 if namespaces and veth pairs can be created here
#
# Run a command on a "host": ip netns exec fkl-node0 deploy/start-supernode.sh --superlink 10.77.0.1:9093 ...
# Needs root (CAP_NET_ADMIN). Each namespace has its own loopback, so a SuperNode's local
# Runtime API (127.0.0.1:9094) does not clash with the others'.
set -euo pipefail

BRIDGE=fklbr0
SUBNET=10.77.0

down() {
    for ns in $(ip netns list | awk '{print $1}' | grep '^fkl-' || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -TERM 2>/dev/null || true
        ip netns delete "$ns"
    done
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep '^fkl-' || true); do
        ip link delete "$link" 2>/dev/null || true
    done
    ip link delete "$BRIDGE" 2>/dev/null || true
    # ... and the FORWARD rule `up` may have added for the bridge (each copy of it, if several)
    while iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null; do :; done
}

add_host() {  # namespace, address, host-side veth name
    local ns="$1" address="$2" veth="$3"
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$address/24" dev eth0
    ip -n "$ns" link set eth0 up
}

up() {
    local n="$1"
    [[ "$n" =~ ^[1-9]$ ]] || { echo "netns-hosts: N must be 1..9" >&2; exit 2; }
    down
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.254/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    add_host fkl-link "$SUBNET.1" fkl-link-h
    for ((i = 0; i < n; i++)); do
        add_host "fkl-node$i" "$SUBNET.1$i" "fkl-node$i-h"
    done
    # Bridged frames must not be dropped by a host firewall that filters bridged traffic.
    if [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]]; then
        iptables -C FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null \
            || iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null || true
    fi
    echo "netns-hosts: fkl-link ($SUBNET.1) and $n SuperNode namespace(s) up on $BRIDGE"
}

CHECK_NS="fkl-check-$$"
check() {
    ip netns add "$CHECK_NS" 2>/dev/null || exit 1
    trap 'ip netns delete "$CHECK_NS" 2>/dev/null || true' EXIT
    ip link add "fkl-chk$$" type veth peer name eth0 netns "$CHECK_NS" 2>/dev/null || exit 1
    ip link delete "fkl-chk$$" 2>/dev/null || true
}

case "${1:-}" in
    up) up "${2:?usage: $0 up N}" ;;
    down) down ;;
    check) check ;;
    *) echo "usage: $0 up N | down | check" >&2; exit 2 ;;
esac
