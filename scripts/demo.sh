#!/usr/bin/env bash
# The main job (MIGRATION_MODE=all) on an embedded default: set-up, an embedded PostgreSQL
# when DATABASE_URL is unset, and a generated sample NAS folder under demo_output/.
set -euo pipefail
cd "$(dirname "$0")/.."
CRAFTFLOW_SKIP_BROWSER=1 ./scripts/setup.sh
exec .venv/bin/craftflow-migrate demo "$@"
