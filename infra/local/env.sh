# Settings shared by the local stack, its tests and jobs. Source it: `. infra/local/env.sh`.
# Everything listens on 127.0.0.1 only. Credentials are the local S3 server's, never real ones.
export STACK_DIR=${STACK_DIR:-$PWD/.stack}
export S3_PORT=${S3_PORT:-8333}
export MLFLOW_PORT=${MLFLOW_PORT:-5055}
export RAY_PORT=${RAY_PORT:-6390}
export RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
export S3_BUCKET=${S3_BUCKET:-ensembles}
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-local-stack}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-local-stack-secret}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
export AWS_ENDPOINT_URL=${AWS_ENDPOINT_URL:-http://127.0.0.1:$S3_PORT}
export MLFLOW_S3_ENDPOINT_URL=$AWS_ENDPOINT_URL
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-http://127.0.0.1:$MLFLOW_PORT}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
export RAY_ADDRESS=${RAY_ADDRESS:-127.0.0.1:$RAY_PORT}
export RAY_DASHBOARD_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT
# Ray: loopback only, no token auth, quiet (see the "Ray" notes in README.md)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=disabled
export RAY_USAGE_STATS_ENABLED=0
export RAY_TRAIN_ENABLE_PRINT_PATCH=0
