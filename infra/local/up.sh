#!/usr/bin/env bash
# Start the local stack on 127.0.0.1: an S3 server (SeaweedFS), an MLflow server (SQLite
# store, artifacts proxied to s3://$S3_BUCKET/mlflow) and a Ray head with its job server.
# Each pid goes to $STACK_DIR/*.pid; infra/local/down.sh stops exactly those.
#   bash infra/local/up.sh              # all three
#   bash infra/local/up.sh s3 mlflow    # some (the fault-injection tests restart a stopped one)
set -euo pipefail
cd "$(dirname "$0")/../.."
. infra/local/env.sh
export PATH="$PWD/.venv/bin:$PATH"  # Ray jobs run the python that was on PATH at `ray start`
mkdir -p "$STACK_DIR/s3" "$STACK_DIR/logs"

wait_port() {  # name port seconds
  for _ in $(seq 1 $(( $3 * 4 ))); do
    python -c "import socket,sys; s=socket.socket(); s.settimeout(0.5); sys.exit(s.connect_ex(('127.0.0.1', $2)))" && return 0
    sleep 0.25
  done
  echo "error: $1 did not open 127.0.0.1:$2 within $3 s (log: $STACK_DIR/logs)" >&2; return 1
}

start_s3() {
  if [ -n "${S3_FALLBACK_MOTO:-}" ]; then
    setsid moto_server -H 127.0.0.1 -p "$S3_PORT" >>"$STACK_DIR/logs/s3.log" 2>&1 &
  else
    setsid weed mini -dir="$STACK_DIR/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$S3_PORT" \
      -admin.ui=false >>"$STACK_DIR/logs/s3.log" 2>&1 &
  fi
  echo $! >"$STACK_DIR/s3.pid"
  wait_port "S3 server" "$S3_PORT" 60
  python - <<PY
import time, boto3
s3 = boto3.client("s3")
for _ in range(60):
    try:
        if "$S3_BUCKET" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket="$S3_BUCKET")
        break
    except Exception:  # server still starting
        time.sleep(0.5)
else:
    raise SystemExit("error: could not create bucket $S3_BUCKET")
PY
}

start_mlflow() {
  setsid mlflow server --backend-store-uri "sqlite:///$STACK_DIR/mlflow.db" \
    --artifacts-destination "s3://$S3_BUCKET/mlflow" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    >>"$STACK_DIR/logs/mlflow.log" 2>&1 &
  echo $! >"$STACK_DIR/mlflow.pid"
  wait_port "MLflow server" "$MLFLOW_PORT" 90
}

start_ray() {
  ray start --head --node-ip-address=127.0.0.1 --port="$RAY_PORT" --num-cpus="${RAY_NUM_CPUS:-2}" \
    --dashboard-host=127.0.0.1 --dashboard-port="$RAY_DASHBOARD_PORT" --object-store-memory=1000000000 \
    --disable-usage-stats >>"$STACK_DIR/logs/ray.log" 2>&1
  touch "$STACK_DIR/ray.started"
  wait_port "Ray job server" "$RAY_DASHBOARD_PORT" 60
}

services=("$@")
[ ${#services[@]} -gt 0 ] || services=(s3 mlflow ray)
for service in "${services[@]}"; do
  case "$service" in
    s3) start_s3 ;;
    mlflow) start_mlflow ;;
    ray) start_ray ;;
    *) echo "error: unknown service '$service'; valid choices: s3, mlflow, ray" >&2; exit 2 ;;
  esac
done
echo "stack up (${services[*]}): S3 $AWS_ENDPOINT_URL (bucket $S3_BUCKET), MLflow $MLFLOW_TRACKING_URI, Ray $RAY_DASHBOARD_ADDRESS"
