#!/usr/bin/env bash
# PostgreSQL, Ceph RGW (S3) and the MLflow tracking server on 127.0.0.1, in temp folders with fresh random
# credentials, for trying the production configuration by hand. Prints the variables to export; Ctrl-C (or
# SIGTERM) stops all three and deletes their data. The integration tests start their own copies.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/services/install.sh
exec "${PYTHON:-.venv/bin/python}" tests/integration/services.py up
