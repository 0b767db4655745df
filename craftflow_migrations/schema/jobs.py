"""Startup and complex-migration jobs: one op per migration, edges from ``DEPENDS_ON``.

The UI graph shows the migration order, and a failed op skips exactly its dependents
(Dagster skips steps whose upstream failed) while independent ones still run.
"""


import dagster as dg

from ..resources import PostgresResource
from ..settings import get_settings
from . import ledger, runner
from .batched import collect_results
from .discovery import Migration, MigrationPlan

STARTUP_JOB = "startup"
COMPLEX_JOB = "complex_migrations"
PREFLIGHT = {"startup": "check_startup_migrations", "complex": "check_complex_migrations"}


def _preflight_op(kind: str, plan: MigrationPlan) -> dg.OpDefinition:
    names = [m.name for m in plan.of_kind(kind)]

    @dg.op(
        name=PREFLIGHT[kind],
        description=f"Validate the {kind} migration files and the ledger (checksum drift) before any runs.",
        out=dg.Out(dg.Nothing),
        required_resource_keys={"postgres"},
        tags={"kind": "migration"},
    )
    def preflight(context: dg.OpExecutionContext):
        if plan.errors:
            raise dg.Failure(description="; ".join(plan.errors))
        postgres: PostgresResource = context.resources.postgres
        engine = postgres.engine
        ledger.ensure_ledger_table(engine)
        try:
            runner.check_drift(engine, plan.of_kind(kind))
        except runner.ChecksumDrift as exc:
            raise dg.Failure(description=str(exc)) from None
        with engine.connect() as conn:
            done = ledger.applied(conn)
        pending = [n for n in names if n not in done]
        context.log.info(f"{len(names)} {kind} migrations, {len(pending)} pending: {', '.join(pending) or 'none'}")
        yield dg.Output(None, metadata={"migrations": len(names), "pending": len(pending),
                                        "pending_names": ", ".join(pending) or "none"})

    return preflight


def _migration_op(m: Migration, plan: MigrationPlan) -> dg.OpDefinition:
    by_name = plan.by_name()
    same_kind_deps = [d for d in m.depends_on if d in by_name and by_name[d].kind == m.kind]
    cross_kind_deps = [d for d in m.depends_on if d in by_name and by_name[d].kind != m.kind]
    ins = {"after_checks": dg.In(dg.Nothing)}
    ins.update({f"after_{dep}": dg.In(dg.Nothing) for dep in same_kind_deps})

    @dg.op(
        name=m.name,
        description=(m.description or m.name).splitlines()[0] if not m.load_error else m.load_error,
        ins=ins,
        out=dg.Out(dg.Nothing),
        required_resource_keys={"postgres"},
        tags={"kind": "migration", "migration_kind": m.kind, "transactional": str(m.transactional).lower()},
    )
    def apply_one(context: dg.OpExecutionContext):
        postgres: PostgresResource = context.resources.postgres
        engine = postgres.engine
        if cross_kind_deps:
            with engine.connect() as conn:
                done = ledger.applied(conn)
            missing = [d for d in cross_kind_deps if d not in done]
            if missing:
                raise dg.Failure(
                    description=f"Migration {m.name} needs {', '.join(missing)} applied first: run the startup job"
                )
        try:
            with collect_results() as batched:
                result = runner.apply_migration(engine, m, get_settings().migrations, context.run_id, context.log)
        except runner.MigrationError as exc:
            message = postgres.redact(str(exc))
            context.log.error(message)
            raise dg.Failure(description=message) from None
        if result.state == "skipped":
            context.log.info(f"Migration {m.name} already applied, skipped")
        yield dg.Output(
            None,
            metadata={
                "state": result.state,
                "duration_s": dg.MetadataValue.float(round(result.duration_s, 4)),
                "attempts": result.attempts,
                "checksum": m.checksum,
                "transactional": m.transactional,
                "statements": dg.MetadataValue.md("\n".join(f"    {s}" for s in result.statements) or "none"),
                "locks": dg.MetadataValue.text("\n".join(result.locks) or "none"),
                "rows_touched": result.rows,
                "risk_findings": dg.MetadataValue.text("\n".join(result.findings) or "none"),
                **({"batched_rows": sum(b.rows_seen for b in batched), "batches": sum(b.batches for b in batched),
                    "batched_rows_per_s": round(sum(b.rows_per_s for b in batched), 1)} if batched else {}),
            },
        )

    return apply_one


def build_migration_job(kind: str, plan: MigrationPlan, name: str) -> dg.JobDefinition:
    preflight = _preflight_op(kind, plan)
    migrations = plan.of_kind(kind)
    ops = [_migration_op(m, plan) for m in migrations]
    by_name = plan.by_name()
    deps: dict[str, dict[str, dg.DependencyDefinition]] = {}
    for m in migrations:
        edges = {"after_checks": dg.DependencyDefinition(preflight.name)}
        # With a cycle in the files there is no graph to draw; the preflight op fails the run.
        for dep in m.depends_on if not plan.errors else ():
            if dep in by_name and by_name[dep].kind == kind:
                edges[f"after_{dep}"] = dg.DependencyDefinition(dep)
        deps[m.name] = edges
    graph = dg.GraphDefinition(
        name=name,
        description=f"Apply pending {kind} migrations, one op per migration, in dependency order.",
        node_defs=[preflight, *ops],
        dependencies=deps,
    )
    # Migrations serialize on the runner lock anyway; in-process spares a process per op.
    return graph.to_job(name=name, executor_def=dg.in_process_executor, tags={"craftflow/kind": kind})
