#!/usr/bin/env bash
# Two "machines" on this one: two network namespaces joined by a veth pair, each with its own network stack,
# interface and address (no traffic leaves the machine). Needs root and iproute2's `ip`.
#   tests/two_nodes.sh up NAME     namespaces NAME-0 (10.231.0.1) and NAME-1 (10.231.0.2), each holding one
#                                  end of the pair named IFNAME (default fdg0) and its loopback, both up; the
#                                  hosts file each sees (/etc/netns/NAME-i/hosts) names both nodes NAME-0, NAME-1
#   tests/two_nodes.sh down NAME   SIGKILL every process left in them, then delete them (the pair goes too)
# Run a command on node i with `ip netns exec NAME-i COMMAND`; it sees the machine's files (a shared
# filesystem) but only its node's network. SUBNET (default 10.231.0) sets the first three bytes of the /24.
set -euo pipefail
usage="usage: tests/two_nodes.sh up|down NAME"
ACTION=${1:?$usage} NAME=${2:?$usage}
IFNAME=${IFNAME:-fdg0} SUBNET=${SUBNET:-10.231.0}

case "$ACTION" in
up)
  # the pair is made in this namespace under names unique to this call, then moved and renamed
  a="fdg${$}a" b="fdg${$}b"
  ip netns add "$NAME-0"
  ip netns add "$NAME-1"
  ip link add "$a" type veth peer name "$b"
  for i in 0 1; do
    end=$([ "$i" = 0 ] && echo "$a" || echo "$b")
    ip link set "$end" netns "$NAME-$i"
    ip -n "$NAME-$i" link set "$end" name "$IFNAME"
    ip -n "$NAME-$i" addr add "$SUBNET.$((i + 1))/24" dev "$IFNAME"
    ip -n "$NAME-$i" link set "$IFNAME" up
    ip -n "$NAME-$i" link set lo up
    # `ip netns exec` mounts it over /etc/hosts: names and reverse look-ups resolve, as on a cluster (IPv4 and
    # IPv4-mapped IPv6 forms: torch's stores look up the peers of their dual-stack sockets)
    mkdir -p "/etc/netns/$NAME-$i"
    { echo "127.0.0.1 localhost"
      for j in 0 1; do printf '%s %s\n::ffff:%s %s\n' "$SUBNET.$((j + 1))" "$NAME-$j" "$SUBNET.$((j + 1))" "$NAME-$j"; done
    } > "/etc/netns/$NAME-$i/hosts"
  done
  ;;
down)
  status=0
  for i in 0 1; do
    ns="$NAME-$i"
    rm -rf "/etc/netns/$ns"
    ip netns list | grep -qw "^$ns" || continue
    for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" || status=1
  done
  exit "$status"
  ;;
*) echo "$usage" >&2; exit 2 ;;
esac
