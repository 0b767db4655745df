"""``craftflow-migrate``: the one-shot worker and the operator's commands.

Exit codes: 0 success, 1 a migration or import failed, 2 configuration or connection
problem (bad MIGRATION_MODE, DATABASE_URL missing or unreachable, NAS not configured).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import traceback
import uuid

from . import settings
from .db import DatabaseConnectionError, check_connection, error_line, get_engine, redact
from .forkserver import stop_forkserver
from .nas.clients.base import NasError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _out(line: str = "") -> None:
    print(line, flush=True)


def _database_url() -> str:
    url = settings.get_settings().require_database_url()
    check_connection(url)
    return url


def _print_outcome(title: str, outcome, applied: list[str] | None = None) -> None:
    state = "ok" if outcome.success else "FAILED"
    extra = f", applied: {', '.join(applied) if applied else 'nothing (already at head)'}" if applied is not None else ""
    _out(f"{title}: {state} (run {outcome.run_id}){extra}")
    for failure in outcome.failures:
        _out(f"  ❌ {failure}")
    if outcome.skipped:
        _out(f"  skipped because a dependency failed: {', '.join(outcome.skipped)}")


def cmd_run(args: argparse.Namespace) -> int:
    from functools import cache

    from . import worker
    from .instance import ensure_dagster_home, get_instance

    mode = args.mode or settings.get_settings().mode
    url = _database_url()
    # Opened (and Dagster imported) only when a run starts: not for an unchanged NAS.
    instance = cache(get_instance)
    _out(f"craftflow-migrate: MIGRATION_MODE={mode}, Dagster instance {ensure_dagster_home()}")
    ok = True
    if mode == "all":
        worker.warm_step_processes()  # its imports overlap the startup job

    if mode in ("all", "startup"):
        outcome = worker.run_startup(instance())
        _print_outcome("Startup migrations", outcome, worker.applied_in_run(url, outcome.run_id))
        ok &= outcome.success
        if not outcome.success and mode == "all":
            _out("NAS import and complex migrations not run: the schema is not at head")
            return EXIT_FAILED

    if mode in ("all", "nas-only"):
        try:
            listing = worker.scan_nas()
            outcomes = worker.unchanged_since_last_import(listing)
            if outcomes is None:
                worker.warm_step_processes()  # its imports overlap opening the instance
                outcomes = worker.run_nas_import(instance(), listing=listing, duplicates_next=True)
        except worker.NasNotConfigured as exc:
            if mode == "nas-only":
                _out(f"❌ NAS credentials not configured: {exc}")
                return EXIT_CONFIG
            _out("⚠️ NAS credentials not configured, skipping NAS migration")
            outcomes = None
        except worker.NasError as exc:
            _out(f"❌ NAS import failed: {exc}")
            return EXIT_FAILED if mode == "all" else EXIT_CONFIG
        if outcomes is not None:
            totals = {"files_imported": 0, "files_unchanged": 0, "files_failed": 0, "files_removed": 0}
            for o in outcomes:
                if o.unchanged:
                    continue
                for key in totals:
                    totals[key] += int(o.import_summary.get(key, 0) or 0)
                if not o.success:
                    _print_outcome(f"NAS import {o.partition}", o)
                ok &= o.success
            failed_runs = sum(1 for o in outcomes if not o.success)
            unchanged = sum(1 for o in outcomes if o.unchanged)
            _out(
                f"NAS import: {len(outcomes)} partitions ({unchanged} unchanged since their last import, "
                f"{failed_runs} failed), "
                + ", ".join(f"{v} {k.removeprefix('files_')}" for k, v in totals.items())
            )
            if not worker.duplicates_pending(url):
                # No image changed since the last grouping: no run, no global work.
                _out("Duplicate groups: unchanged (no image changed since they were last grouped)")
            else:
                dup = worker.run_duplicates(instance())
                meta = dup.metadata.get("design_duplicates", {})
                if dup.success:
                    _out(f"Duplicate groups: {meta.get('exact_groups', 0)} exact, {meta.get('near_groups', 0)} near "
                         f"(craftflow-migrate duplicates --shop NAME); report: {meta.get('report_path', '-')}")
                else:
                    _print_outcome("Duplicate detection", dup)
                ok &= dup.success

    if mode in ("all", "complex"):
        outcome = worker.run_complex(instance())
        _print_outcome("Complex migrations", outcome, worker.applied_in_run(url, outcome.run_id))
        ok &= outcome.success

    return EXIT_OK if ok else EXIT_FAILED


def cmd_import(args: argparse.Namespace) -> int:
    from . import worker
    from .instance import get_instance

    _database_url()
    instance = get_instance()
    batch_id = uuid.uuid4().hex[:8]
    run_config = None
    if args.batch_mb:
        from .definitions import nas_import_run_config

        run_config = nas_import_run_config()
        run_config["ops"]["design_images"]["ops"]["plan_nas_batches"]["config"].update(
            batch_size_mb=args.batch_mb, min_batch_mb=min(32, args.batch_mb))
    try:
        outcomes = worker.run_nas_import(instance, partitions=args.partition or None, shop=args.shop,
                                         extra_tags={"craftflow/import": batch_id}, force=args.force,
                                         run_config=run_config)
    except worker.NasNotConfigured as exc:
        _out(f"❌ NAS credentials not configured: {exc}")
        return EXIT_CONFIG
    except worker.NasError as exc:
        _out(f"❌ {exc}")
        return EXIT_CONFIG
    if not outcomes:
        _out(f"No partitions matched{f' shop {args.shop!r}' if args.shop else ''}")
        return EXIT_FAILED
    for o in outcomes:
        if o.unchanged:
            _out(f"{o.partition}: unchanged since its last import (use --force to run it anyway)")
            continue
        _out(f"{o.partition}: {'ok' if o.success else 'FAILED'} (run {o.run_id}) "
             + ", ".join(f"{k}={v}" for k, v in o.import_summary.items() if k.startswith("files_")))
        for failure in o.failures:
            _out(f"  ❌ {failure}")
    return EXIT_OK if all(o.success for o in outcomes) else EXIT_FAILED


def _plan():
    from .schema.discovery import discover

    return discover(settings.migrations_dir())


def cmd_status(args: argparse.Namespace) -> int:
    from .schema import ledger

    url = _database_url()
    plan = _plan()
    with get_engine(url).connect() as conn:
        rows = ledger.status(conn, plan.migrations)
    if args.json:
        _out(json.dumps([{**r.__dict__, "applied_at": r.applied_at.isoformat() if r.applied_at else None}
                         for r in rows], indent=2))
    else:
        _out(f"{'migration':45} {'kind':8} {'state':9} {'file sha256':14} {'ledger sha256':14} applied at")
        for r in rows:
            _out(f"{r.name:45} {r.kind:8} {r.state:9} {(r.file_checksum or '-')[:12]:14} "
                 f"{(r.ledger_checksum or '-')[:12]:14} {r.applied_at:%Y-%m-%d %H:%M:%S}" if r.applied_at else
                 f"{r.name:45} {r.kind:8} {r.state:9} {(r.file_checksum or '-')[:12]:14} {'-':14} -")
        for error in plan.errors:
            _out(f"❌ {error}")
        for m in plan.migrations:
            if m.load_error:
                _out(f"❌ {m.load_error}")
    bad = plan.errors or any(r.state in ("drifted", "broken") for r in rows)
    return EXIT_FAILED if bad else EXIT_OK


def cmd_downgrade(args: argparse.Namespace) -> int:
    from .schema import runner

    url = _database_url()
    try:
        undone = runner.downgrade_to(get_engine(url), _plan(), args.to, settings.get_settings().migrations)
    except runner.MigrationError as exc:
        _out(f"❌ {redact(str(exc), url)}")
        return EXIT_FAILED
    _out(f"Downgraded to {args.to}: rolled back {', '.join(undone) if undone else 'nothing'}")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    """What the next deploy will do: each pending migration dry-run in a rolled-back transaction."""
    from .schema.plan import dry_run

    url = _database_url()
    reports = dry_run(get_engine(url), _plan(), args.kind, settings.get_settings().migrations)
    if args.json:
        _out(json.dumps([{"name": r.name, "state": r.state, "statements": r.statements, "rows": r.rows,
                          "seconds": round(r.seconds, 4), "error": r.error,
                          "locks": [{"table": lk.table, "mode": lk.mode, "has_rows": lk.has_rows} for lk in r.locks],
                          "findings": [{"rule": f.rule, "message": f.message, "statement": f.statement,
                                        "acknowledged": f.acknowledged} for f in r.findings]} for r in reports],
                        indent=2))
    elif not reports:
        _out(f"No pending {args.kind} migrations: the database is at head")
    for r in reports if not args.json else ():
        _out(f"{r.name}: {r.state}" + (f", {r.rows} rows, {r.seconds * 1000:.0f} ms" if r.state == "dry-run" else ""))
        if r.error:
            _out(f"  {'❌' if r.state == 'failed' else '⚠️'} {redact(r.error)}")
        for statement in r.statements:
            _out(f"    SQL   {statement[:200]}{'…' if len(statement) > 200 else ''}")
        for lock in r.locks:
            mark = "  <- ACCESS EXCLUSIVE on a table with rows" if lock.stands_out else ""
            _out(f"    LOCK  {lock.table}: {lock.mode}{' (has rows)' if lock.has_rows else ''}{mark}")
        for finding in r.findings:
            _out(f"    {'ok  ' if finding.acknowledged else 'RISK'}  {finding.line()}")
    risky = [f for r in reports for f in r.unacknowledged]
    failed = [r for r in reports if r.state == "failed"]
    if risky or failed:
        _out(f"❌ plan: {len(risky)} unacknowledged risk finding(s), {len(failed)} failed dry run(s); fix the "
             "migration or acknowledge a finding with ACKNOWLEDGE = {\"rule-name\": \"reason\"}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_baseline(args: argparse.Namespace) -> int:
    """Adopt a database the old service migrated: verify what each migration creates, then record it."""
    from .schema.baseline import baseline

    url = _database_url()
    try:
        results = baseline(get_engine(url), _plan(), settings.get_settings().migrations, args.to)
    except ValueError as exc:
        _out(f"❌ {exc}")
        return EXIT_FAILED
    for r in results:
        detail = f" ({r.checked} objects checked)" if r.state == "recorded" else ""
        _out(f"{r.name}: {r.state}{detail}")
        for missing in r.missing:
            _out(f"  ❌ missing: {missing}" if r.state == "mismatch" else f"  ❌ {missing}")
    bad = [r for r in results if r.state in ("mismatch", "failed")]
    recorded = sum(r.state == "recorded" for r in results)
    _out(f"Baseline: {recorded} recorded, {len(bad)} not matching (not recorded: fix them, or apply them with "
         "MIGRATION_MODE=startup)" if bad else f"Baseline: {recorded} recorded; the startup job has nothing to do")
    return EXIT_FAILED if bad else EXIT_OK


def cmd_repair(args: argparse.Namespace) -> int:
    from .schema import ledger

    url = _database_url()
    by_name = _plan().by_name()
    if args.name not in by_name:
        _out(f"❌ No migration named {args.name!r} in {settings.migrations_dir()}")
        return EXIT_FAILED
    with get_engine(url).begin() as conn:
        changed = ledger.accept_checksum(conn, by_name[args.name])
    _out(f"Accepted the current file of {args.name}" if changed else f"{args.name}: ledger already matches the file")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """MIGRATION_MODE=all on an embedded default: no server to install, a generated sample NAS."""
    from pathlib import Path

    from .db import safe_url
    from .instance import ensure_dagster_home
    from .sample_nas import write_sample_nas

    workdir = Path(args.dir).resolve()
    supplied = settings.get_settings().database_url
    if supplied is None:
        from .embedded import embedded_database_url

        settings.set_database_url(embedded_database_url(workdir / "pgdata"))
        _out(f"Embedded PostgreSQL running with its data in {workdir / 'pgdata'}")
    settings.clear_nas_host()
    sample = write_sample_nas(workdir / "sample_nas")
    settings.set_nas_base_path(sample)
    if not settings.get_settings().dagster_home:
        settings.set_dagster_home(workdir / "dagster_home")
    home = ensure_dagster_home()
    _out(f"Sample NAS folder: {sample}")
    code = cmd_run(argparse.Namespace(mode="all"))
    url = settings.get_settings().require_database_url()
    # A URL the user supplied is theirs: its password is shown masked. The embedded server's
    # URL holds no password.
    shown_url = safe_url(url) if supplied is not None else url
    _out("")
    _out("Open the Dagster UI on the same data:")
    _out(f"  DAGSTER_HOME='{home}' DATABASE_URL='{shown_url}' \\")
    _out(f"  NAS_BASE_PATH='{sample}' .venv/bin/dagster dev -h 127.0.0.1 -p 3000")
    return code


def cmd_duplicates(args: argparse.Namespace) -> int:
    from .duplicates.report import bytes_freed, group_record, human_bytes, ordered
    from .duplicates.store import stored_groups

    url = _database_url()
    with get_engine(url).connect() as conn:
        groups = ordered(stored_groups(conn, args.shop))
    if args.json:
        _out(json.dumps([group_record(g) for g in groups], indent=2, ensure_ascii=False))
        return EXIT_OK
    if not groups:
        _out(f"No duplicate groups{f' for shop {args.shop!r}' if args.shop else ''}")
        return EXIT_OK
    for g in groups:
        keep = g.keep
        _out(f"{g.kind} group {g.id} ({len(g.members)} files, frees {human_bytes(bytes_freed(g))}): "
             f"keep {keep.shop}/{keep.template}/{keep.path.split('/')[-1]} - {g.keep_reason}")
        for m in g.members:
            mark = "keep" if m.id == keep.id else f"{g.distances[m.id]:>4}"
            _out(f"  {mark:>4}  {m.width}x{m.height} {m.format or '':5} {m.path}")
    return EXIT_OK


def cmd_thumbnails(args: argparse.Namespace) -> int:
    """Where thumbnails live, and whether every packed one reads back (after moving the folder);
    with ``--prune``, first give back the room of those no image shows."""
    from .nas.store import check_thumbnails

    nas = settings.get_settings().nas
    engine = get_engine(_database_url())
    if args.prune:
        from .nas.thumbnail_prune import PruneBusy, prune_thumbnails

        try:
            pruned = prune_thumbnails(engine, nas.thumbnail_folder,
                                      grace_s=args.grace_hours * 3600, dry_run=args.dry_run)
        except PruneBusy as exc:
            _out(f"❌ {exc}")
            return EXIT_FAILED
        _out(pruned.line())
        for line in pruned.problems[:20]:
            _out(f"  {line}")
    with engine.connect() as conn:
        check = check_thumbnails(conn, nas.thumbnail_folder)
    _out(f"Thumbnails: {check.in_postgres} in PostgreSQL, {check.in_packs} in {check.packs} pack(s) under "
         f"{nas.thumbnail_folder} ({check.pack_bytes / 2**20:,.1f} MB read back); new ones go to "
         f"{'packs' if nas.thumbnail_store == 'folder' else 'PostgreSQL'} (CRAFTFLOW_THUMBNAIL_STORE)")
    for line in check.problems[:20]:
        _out(f"  {line}")
    if check.unreadable:
        _out(f"❌ {check.unreadable} thumbnail(s) could not be read back: if the folder moved, set "
             "CRAFTFLOW_THUMBNAIL_DIR to it; otherwise `import --force` the folders they belong to")
        return EXIT_FAILED
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="craftflow-migrate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run MIGRATION_MODE (the default command)")
    run.add_argument("--mode", choices=settings.MODES, help="override MIGRATION_MODE")
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="applied, pending and drifted migrations with checksums")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    down = sub.add_parser("downgrade", help="roll back every migration applied after NAME")
    down.add_argument("--to", required=True, metavar="NAME")
    down.set_defaults(func=cmd_downgrade)
    plan = sub.add_parser("plan", help="dry-run pending migrations: SQL, locks, rows, time and risk findings")
    plan.add_argument("--kind", choices=("startup", "complex"), default="startup")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)
    base = sub.add_parser("baseline", help="adopt a database migrated by the old service (no ledger)")
    base.add_argument("--to", metavar="NAME", help="the last migration to record (default: all startup migrations)")
    base.set_defaults(func=cmd_baseline)
    repair = sub.add_parser("repair", help="accept the edited file of an applied migration (checksum drift)")
    repair.add_argument("name")
    repair.set_defaults(func=cmd_repair)
    imp = sub.add_parser("import", help="import NAS partitions now: all, one shop, or named ones")
    imp.add_argument("--shop", help="every <template> of this shop")
    imp.add_argument("--partition", action="append", help="a <shop>/<template> key (repeatable)")
    imp.add_argument("--force", action="store_true", help="run partitions whose listing is unchanged too")
    imp.add_argument("--batch-mb", type=int, help="batch size in MB (default 500)")
    imp.set_defaults(func=cmd_import)
    dups = sub.add_parser("duplicates", help="duplicate design groups (of one shop) and the copy to keep")
    dups.add_argument("--shop", help="only groups with a file in this shop")
    dups.add_argument("--json", action="store_true", help="machine-readable list of groups")
    dups.set_defaults(func=cmd_duplicates)
    thumbs = sub.add_parser("thumbnails", help="where thumbnails live; read every packed one back (after a move)")
    thumbs.add_argument("--prune", action="store_true",
                        help="first delete thumbnails no imported image shows, and delete or rewrite their packs")
    thumbs.add_argument("--grace-hours", type=float, default=24.0,
                        help="with --prune: leave packs written more recently than this (running imports' packs)")
    thumbs.add_argument("--dry-run", action="store_true", help="with --prune: count, change nothing")
    thumbs.set_defaults(func=cmd_thumbnails)
    demo = sub.add_parser("demo", help="run MIGRATION_MODE=all on an embedded PostgreSQL and a sample NAS")
    demo.add_argument("--dir", default="demo_output", help="where the embedded data and sample NAS live")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if not getattr(args, "func", None):
        args = build_parser().parse_args(["run", *(argv or [])])
    try:
        settings.get_settings()  # every variable, checked before anything runs
        settings.set_process_defaults()
        return args.func(args)
    except (settings.ConfigError, DatabaseConnectionError) as exc:
        _out(f"❌ {redact(str(exc))}")
        return EXIT_CONFIG
    except NasError as exc:
        _out(f"❌ {redact(str(exc))}")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        _out("❌ Interrupted")
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the last line an operator reads is always one clear line
        traceback.print_exc(file=sys.stderr)
        _out(f"❌ craftflow-migrate failed: {redact(error_line(exc))} (details above on stderr)")
        return EXIT_FAILED


def run() -> None:
    """The console script: :func:`main`, then an exit that skips the interpreter's teardown.

    Freeing Dagster's object graph module by module took 0.6-1 s of every invocation's wall
    time (the one-shot worker's too). The atexit handlers still run (logging, Dagster,
    SQLAlchemy pools, ``weakref.finalize``), and the streams are flushed.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    stop_forkserver()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


if __name__ == "__main__":
    run()
