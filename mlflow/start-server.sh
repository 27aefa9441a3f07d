#!/usr/bin/env bash
# MLflow tracking server: backend store and artifact destination from the environment, never from this file.
#   BACKEND_STORE_URI       e.g. postgresql+psycopg2://user:$PASSWORD@host:5432/mlflow
#   ARTIFACTS_DESTINATION   e.g. s3://distillery-mlflow/artifacts (MLFLOW_S3_ENDPOINT_URL + AWS_* for the endpoint)
#   MLFLOW_HOST             127.0.0.1 by default; 0.0.0.0 only inside a pod
#   MLFLOW_PORT             5000 by default
#   MLFLOW_WORKERS          2 by default
#   MLFLOW_AUTH_CONFIG_PATH optional: basic-auth config (see basic_auth.ini.template); turns authentication on.
#                           The admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD and the CSRF key from
#                           MLFLOW_FLASK_SERVER_SECRET_KEY (both secrets, the same on every replica), never a file.
# MLflow itself reads MLFLOW_SERVER_ALLOWED_HOSTS: clients that reach the server by a DNS name (a Service name
# such as mlflow.distillery.svc:5000) must be listed there, else they get 403 (only localhost and private IPs
# are allowed by default).
# Artifacts are proxied (--serve-artifacts): experiments without their own s3:// location store under
# ARTIFACTS_DESTINATION and clients need no object-store credentials for them.
set -euo pipefail
: "${BACKEND_STORE_URI:?set BACKEND_STORE_URI (postgresql+psycopg2://...)}"
: "${ARTIFACTS_DESTINATION:?set ARTIFACTS_DESTINATION (s3://bucket/prefix)}"
# MLflow's job runner (GenAI scorers, periodic tasks) starts ~8 more processes of ~250 MB each; nothing here
# uses it, and it would not fit the pod's memory limit. Opt back in with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
auth=()
if [ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
  [ -f "$MLFLOW_AUTH_CONFIG_PATH" ] || { echo "MLFLOW_AUTH_CONFIG_PATH=$MLFLOW_AUTH_CONFIG_PATH is not a file" >&2; exit 2; }
  : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?basic auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (a random secret)}"
  auth=(--app-name basic-auth)
fi
exec mlflow server \
  --backend-store-uri "$BACKEND_STORE_URI" \
  --artifacts-destination "$ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  "${auth[@]}"
