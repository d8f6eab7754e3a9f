#!/usr/bin/env bash
# A second Ray node on this machine, joined to the local head (infra/local/up.sh): the
# two-node simulation. Its processes get their own session, so losing the node is one
# SIGKILL of that process group, as when a machine dies.
#   bash infra/local/node.sh up [CPUS]   # start it with CPUS (default 2) and a `node2` resource
#   bash infra/local/node.sh kill        # lose it: SIGKILL every process of the node
set -euo pipefail
cd "$(dirname "$0")/../.."
. infra/local/env.sh
export PATH="$PWD/.venv/bin:$PATH"
NODE2_PORT=${NODE2_PORT:-6391}  # its node manager port, which names its raylet
case "${1:-}" in
  up)
    # `ray start --address` refuses a second node while Ray is kept on loopback: see node2.py
    setsid python infra/local/node2.py "$RAY_PORT" "${2:-2}" "$NODE2_PORT" >>"$STACK_DIR/logs/node2.log" 2>&1 </dev/null
    raylet=$(pgrep -f -- "--node_manager_port=$NODE2_PORT" | head -1)
    [ -n "$raylet" ] || { echo "error: node 2 did not start (log: $STACK_DIR/logs/node2.log)" >&2; exit 1; }
    ps -o sid= -p "$raylet" | tr -d ' ' >"$STACK_DIR/node2.sid"
    echo "node 2 up: raylet $raylet, session $(cat "$STACK_DIR/node2.sid")"
    ;;
  kill)
    sid=$(cat "$STACK_DIR/node2.sid")
    pids=$(ps -eo pid=,sid= | awk -v s="$sid" '$2 == s {print $1}')
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    rm -f "$STACK_DIR/node2.sid"
    echo "node 2 killed: ${pids//$'\n'/ }"
    ;;
  *) echo "usage: node.sh up [CPUS] | kill" >&2; exit 2 ;;
esac
