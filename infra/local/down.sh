#!/usr/bin/env bash
# Stop what infra/local/up.sh started: its pids (and their process groups), `ray stop`.
#   bash infra/local/down.sh            # all
#   bash infra/local/down.sh mlflow     # one service (the fault-injection tests stop one for a while)
cd "$(dirname "$0")/../.."
. infra/local/env.sh
services=("$@")
[ ${#services[@]} -gt 0 ] || services=(ray mlflow s3)
if [[ " ${services[*]} " == *" ray "* ]] && [ -f "$STACK_DIR/ray.started" ]; then
  .venv/bin/ray stop --force >/dev/null 2>&1 || true
  rm -f "$STACK_DIR/ray.started"
fi
for name in "${services[@]}"; do
  [ "$name" = ray ] && continue
  pidfile="$STACK_DIR/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
done
echo "stack down (${services[*]})"
