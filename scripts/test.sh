#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up, then pytest against real PostgreSQL
# (127.0.0.1:5432, or an embedded server when none runs), a real sshd and real Dagster runs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/pytest "$@"
