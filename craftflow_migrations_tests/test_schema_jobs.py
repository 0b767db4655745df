"""The startup job in Dagster: one op per migration, failures skip exactly their dependents."""

import shutil

import dagster as dg
from sqlalchemy import text

from craftflow_migrations.resources import PostgresResource
from craftflow_migrations.schema.discovery import discover
from craftflow_migrations.schema.jobs import build_migration_job

from .conftest import PACKAGE_MIGRATIONS


def test_startup_job_graph_mirrors_depends_on():
    plan = discover(PACKAGE_MIGRATIONS)
    job = build_migration_job("startup", plan, "startup")
    assert {n.name for n in job.nodes} == {"check_startup_migrations", *(m.name for m in plan.of_kind("startup"))}
    upstream = {
        node: {dep.node_name for deps in inputs.values() for dep in deps}
        for node, inputs in (
            (h.name, job.graph.dependency_structure.input_to_upstream_outputs_for_node(h.name))
            for h in job.nodes
        )
    }
    assert upstream["remove_shopify_unique_constraint"] == {"check_startup_migrations", "separate_platform_connections"}
    assert upstream["separate_platform_connections"] == {"check_startup_migrations", "add_multi_tenant_schema",
                                                         "add_etsy_shop_id"}


def test_failed_op_skips_dependents_and_secrets_stay_out_of_the_event_log(postgres_server, tmp_path, monkeypatch):
    # trust auth accepts any password, which lets the test prove it is never written down
    url = postgres_server.create_database().replace("postgres@", "postgres:Sup3rSecretPw@")
    monkeypatch.setenv("DATABASE_URL", url)
    folder = tmp_path / "migrations"
    shutil.copytree(PACKAGE_MIGRATIONS, folder, ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    (folder / "zz_bad.py").write_text(
        'from sqlalchemy import text\nDEPENDS_ON = ["add_design_images"]\n'
        'def upgrade(connection):\n    connection.execute(text("ALTER TABLE nope ADD COLUMN x int"))\n'
    )
    (folder / "zz_child.py").write_text('DEPENDS_ON = ["zz_bad"]\ndef upgrade(connection):\n    pass\n')
    job = build_migration_job("startup", discover(folder), "startup")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance, raise_on_error=False,
            resources={"postgres": PostgresResource(database_url=dg.EnvVar("DATABASE_URL"))},
        )
        assert not result.success
        failures = [e for e in result.all_events if e.is_step_failure]
        assert [e.step_key for e in failures] == ["zz_bad"]
        assert 'Migration failed: zz_bad: relation "nope" does not exist' in (
            failures[0].step_failure_data.user_failure_data.description)
        started = {e.step_key for e in result.all_events if e.is_step_start}
        assert "zz_child" not in started and "update_phash_hash_size" in started
        messages = [r.event_log_entry.user_message for r in instance.get_records_for_run(result.run_id).records]
        assert any("Dependencies for step zz_child failed: ['zz_bad']" in m for m in messages)
        outputs = {e.step_key: e.step_output_data.metadata for e in result.all_events if e.is_successful_output}
        assert outputs["update_phash_hash_size"]["state"].value == "applied"
        assert outputs["update_phash_hash_size"]["duration_s"].value >= 0
        records = instance.get_records_for_run(result.run_id).records
        dump = "".join(str(r.event_log_entry) for r in records)
        run = instance.get_run_by_id(result.run_id)
        assert "Sup3rSecretPw" not in dump and "Sup3rSecretPw" not in str(run.run_config)
    from craftflow_migrations.db import get_engine

    with get_engine(url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM craftflow_schema_migrations WHERE dagster_run_id = :r"),
                            {"r": result.run_id}).scalar() == len(discover(PACKAGE_MIGRATIONS).of_kind("startup"))
    get_engine(url).dispose()
    get_engine.cache_clear()
    postgres_server.drop_database(url)


def test_definitions_load_with_every_job_sensor_and_schedule():
    from craftflow_migrations.definitions import defs

    assert {j for j in ("startup", "complex_migrations", "nas_import") if defs.resolve_job_def(j)}
    assert {s.name for s in defs.sensors} == {"nas_scan_sensor", "import_after_startup"}
    assert [s.name for s in defs.schedules] == ["complex_migrations_weekly", "thumbnail_prune_weekly"]
    defs.validate_loadable(defs)
