"""The Dagster instance the worker records its runs in."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

LOCAL_HOME = Path.home() / ".craftflow_migrations" / "dagster_home"
# A local instance needs no server: SQLite storage under DAGSTER_HOME, plus the SFTP pool.
LOCAL_DAGSTER_YAML = """\
# Written by craftflow-migrate for local use; production uses the repository's dagster.yaml.
telemetry:
  enabled: false
python_logs:
  # Migration files log with logging.getLogger(__name__); these loggers reach the event log.
  managed_python_loggers: [craftflow_migrations]
  python_log_level: INFO
concurrency:
  pools:
    default_limit: 4
run_retries:
  enabled: true
  max_retries: 0
"""


def ensure_dagster_home() -> Path:
    """DAGSTER_HOME, or a local default created on first use."""
    home = os.environ.get("DAGSTER_HOME", "").strip()
    path = Path(home) if home else LOCAL_HOME
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():
        config.write_text(LOCAL_DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(path)
    return path


def get_instance() -> dg.DagsterInstance:
    ensure_dagster_home()
    return dg.DagsterInstance.get()
