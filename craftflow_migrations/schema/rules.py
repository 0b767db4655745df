"""Risk rules over the SQL a migration executed, each with the safe alternative.

Modelled on squawk's rule list, but applied to the statements a dry run *captured* (what
the migration really executed, after its own IF EXISTS checks and helpers), and knowing
which tables have rows. A migration acknowledges a finding by name, with a reason::

    ACKNOWLEDGE = {"index-without-concurrently": "printers has a few dozen rows"}
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    rule: str
    statement: str
    message: str
    acknowledged: str | None = None  # the migration's reason, when it acknowledged the rule

    def line(self) -> str:
        state = f" (acknowledged: {self.acknowledged})" if self.acknowledged else ""
        return f"[{self.rule}] {self.message}{state}"


_IDENT = r'"?([A-Za-z_][A-Za-z0-9_$]*)"?'
_TABLE = rf"(?:{_IDENT}\.)?{_IDENT}"


def _table(match: re.Match) -> str:
    return match.group(match.lastindex or 1)


def _index_without_concurrently(sql: str, with_rows: set[str]) -> str | None:
    m = re.match(rf"CREATE\s+(UNIQUE\s+)?INDEX\s+(?!CONCURRENTLY)(?:IF\s+NOT\s+EXISTS\s+)?\S+\s+ON\s+(?:ONLY\s+)?{_TABLE}",
                 sql, re.I)
    if m and m.group(m.lastindex) in with_rows:
        return (f"CREATE INDEX on {m.group(m.lastindex)}, which has rows, blocks its writes for the whole build: use "
                "CREATE INDEX CONCURRENTLY in a TRANSACTIONAL = False migration "
                "(helpers.create_index_concurrently)")
    return None


def _not_null_without_default(sql: str, with_rows: set[str]) -> str | None:
    m = re.match(rf"ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?{_TABLE}\s+(.*)", sql, re.I | re.S)
    if not m or m.group(m.lastindex - 1) not in with_rows:
        return None
    for clause in re.split(r",\s*(?=ADD\b|ALTER\b|DROP\b)", m.group(m.lastindex), flags=re.I):
        if re.match(r"ADD\s+(COLUMN\s+)?", clause, re.I) and re.search(r"\bNOT\s+NULL\b", clause, re.I) \
                and not re.search(r"\bDEFAULT\b", clause, re.I):
            return (f"a NOT NULL column without a default on {m.group(m.lastindex - 1)}, which has rows, fails on "
                    "existing rows: add it nullable (or with a DEFAULT), backfill in batches, then SET NOT NULL")
    return None


def _type_change(sql: str, with_rows: set[str]) -> str | None:
    m = re.match(rf"ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?{_TABLE}\s+.*\bALTER\s+(COLUMN\s+)?\S+\s+"
                 r"(SET\s+DATA\s+)?TYPE\b", sql, re.I | re.S)
    if m and m.group(2) in with_rows:
        return (f"changing a column's type on {m.group(2)} rewrites the table under an ACCESS EXCLUSIVE lock: add a "
                "new column, backfill it in batches, then switch readers over")
    return None


def _foreign_key_validated(sql: str, with_rows: set[str]) -> str | None:
    m = re.match(rf"ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?{_TABLE}\s+.*\bFOREIGN\s+KEY\b", sql, re.I | re.S)
    if m and not re.search(r"\bNOT\s+VALID\b", sql, re.I) and m.group(2) in with_rows:
        return (f"adding a foreign key on {m.group(2)} checks every row while both tables are locked: add it NOT VALID, "
                "then VALIDATE CONSTRAINT in a later migration")
    return None


def _lock_timeout_disabled(sql: str, _with_rows: set[str]) -> str | None:
    m = re.match(r"SET\s+(LOCAL\s+|SESSION\s+)?lock_timeout\s*(=|TO)\s*'?(0|0ms|0s)'?\s*$", sql, re.I)
    if m:
        return ("the migration turns lock_timeout off: a wait on a busy table then queues every API query behind it; "
                "keep the runner's lock_timeout (it retries with backoff)")
    return None


RULES: dict[str, Callable[[str, set[str]], str | None]] = {
    "index-without-concurrently": _index_without_concurrently,
    "not-null-without-default": _not_null_without_default,
    "column-type-change": _type_change,
    "foreign-key-not-valid": _foreign_key_validated,
    "lock-timeout-disabled": _lock_timeout_disabled,
}


def check_statements(statements: Iterable[str], tables_with_rows: set[str],
                     acknowledged: Mapping[str, str] | None = None) -> list[Finding]:
    acknowledged = acknowledged or {}
    findings = []
    for sql in statements:
        for name, rule in RULES.items():
            message = rule(sql.strip(), tables_with_rows)
            if message:
                findings.append(Finding(name, sql, message, acknowledged.get(name)))
    return findings
