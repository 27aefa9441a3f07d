#!/usr/bin/env bash
# MLflow tracking server: backend store and artifact destination from the environment, never from this file.
#   BACKEND_STORE_URI       e.g. postgresql+psycopg2://user:$PASSWORD@host:5432/mlflow
#   ARTIFACTS_DESTINATION   e.g. s3://distillery-mlflow/artifacts (MLFLOW_S3_ENDPOINT_URL + AWS_* for the endpoint)
#   MLFLOW_HOST             127.0.0.1 by default; 0.0.0.0 only inside a pod
#   MLFLOW_PORT             5000 by default
set -euo pipefail
: "${BACKEND_STORE_URI:?set BACKEND_STORE_URI (postgresql+psycopg2://...)}"
: "${ARTIFACTS_DESTINATION:?set ARTIFACTS_DESTINATION (s3://bucket/prefix)}"
exec mlflow server \
  --backend-store-uri "$BACKEND_STORE_URI" \
  --artifacts-destination "$ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}"
