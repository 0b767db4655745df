"""The migration engine: discovery, ledger and runner. Knows nothing of Dagster or the NAS."""
