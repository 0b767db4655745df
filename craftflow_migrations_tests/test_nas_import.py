"""The design_images asset for real: sshd, PostgreSQL and multiprocess Dagster runs."""

import copy
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import dagster as dg
import imagehash
import pytest
from PIL import Image
from sqlalchemy import text

from craftflow_migrations.db import get_engine
from craftflow_migrations.definitions import (
    nas_import_job_factory,
    nas_import_run_config,
    startup_job_factory,
)
from craftflow_migrations.nas.assets import nas_partitions
from craftflow_migrations.nas.partitions import SFTP_POOL
from craftflow_migrations.nas.resource import NasResource
from craftflow_migrations.resources import PostgresResource

from .conftest import cli_env
from .proxy import DroppingProxy
from .support import write_bad_files, write_corpus

SHOP = "Ünïcode 'Shop' \"Q\""
TEMPLATE = "Poster 50×70, matte"
KEY = f"{SHOP}/{TEMPLATE}"
DESIGN_IMAGES = dg.AssetKey("design_images")


def run_config(batch_mb: int = 500, min_batch_mb: int = 32, workers: int = 2) -> dict:
    config = copy.deepcopy(nas_import_run_config(workers))
    # Tests change the environment between runs; spawned steps see the current one, while a
    # forkserver would keep the environment of the first run (the CLI tests cover forkserver).
    config["execution"]["config"]["start_method"] = {"spawn": {}}
    config["ops"]["design_images"]["ops"]["plan_nas_batches"]["config"].update(
        batch_size_mb=batch_mb, min_batch_mb=min_batch_mb)
    return config


def import_partition(instance, key: str, config: dict) -> tuple[bool, str, list]:
    instance.add_dynamic_partitions(nas_partitions.name, [key])
    with dg.execute_job(dg.reconstructable(nas_import_job_factory), instance, run_config=config,
                        tags={"dagster/partition": key}) as result:
        return result.success, result.run_id, [e for e in result.all_events]


def materialization(instance, key: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=DESIGN_IMAGES, asset_partitions=[key]), limit=1).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def rows(url: str, shop: str = SHOP, template: str = TEMPLATE) -> dict[str, dict]:
    with get_engine(url).connect() as conn:
        result = conn.execute(text(
            "SELECT path, status::text AS status, phash, sha256, error, width, height, format, hash_algorithm "
            "FROM design_images WHERE shop = :s AND template = :t"), {"s": shop, "t": template})
        return {r.path: r._asdict() for r in result}


@pytest.fixture
def nas_base(tmp_path):
    base = tmp_path / "Graphics"
    write_corpus(base, {(SHOP, TEMPLATE): 10}, size=(640, 480))
    write_bad_files(base / SHOP / TEMPLATE / "bad")
    return base


@pytest.fixture
def sftp_env(sshd, nas_base, clean_nas_env):
    for name, value in sshd.env(nas_base).items():
        clean_nas_env.setenv(name, value)
    return nas_base


def test_multiprocess_import_over_sftp_then_incremental(migrated_url, instance, sftp_env, monkeypatch):
    base = sftp_env
    # Set, though the key logs in first: it must still never reach run config or the event log.
    monkeypatch.setenv("QNAP_PASSWORD", "NasPassw0rdNeverLogged")
    ok, run_id, events = import_partition(instance, KEY, run_config(batch_mb=2, min_batch_mb=1))
    assert ok
    dump = "".join(str(r.event_log_entry) for r in instance.get_records_for_run(run_id).records)
    assert "NasPassw0rdNeverLogged" not in dump
    assert "NasPassw0rdNeverLogged" not in str(instance.get_run_by_id(run_id).run_config)
    batch_steps = {e.step_key for e in events if e.is_step_success and "import_nas_batch" in e.step_key}
    assert len(batch_steps) >= 3
    # The executor has a slot more than the 2 workers (for the plan step's exiting process);
    # the batch steps' tag limit still keeps them to 2 at a time.
    running = peak = 0
    for record in instance.get_records_for_run(run_id).records:
        event = record.event_log_entry.dagster_event
        if event and event.step_key and "import_nas_batch" in event.step_key:
            running += 1 if event.is_step_start else -1 if (event.is_step_success or event.is_step_failure) else 0
            peak = max(peak, running)
    assert 1 <= peak <= 2
    # steps really ran in separate processes
    assert len({e.pid for e in events if e.is_step_start}) >= 3

    stored = rows(migrated_url)
    on_disk = sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
    assert sorted(stored) == on_disk
    for path, row in stored.items():
        if path.endswith(("notes.png", "truncated.png", "empty.jpg")):
            assert row["status"] == "failed" and row["error"], path
            continue
        expected = str(imagehash.phash(Image.open(base / path), hash_size=16))
        assert row["status"] == "ok" and row["phash"] == expected, path
        assert row["hash_algorithm"].endswith("phash:hash_size=16")
    meta = materialization(instance, KEY)
    assert meta["files_seen"] == 14 and meta["files_imported"] == 11 and meta["files_failed"] == 3
    assert meta["mb_read"] > 5 and meta["mb_per_s"] > 0 and "exact_duplicates" in meta

    # Unchanged: nothing is read again.
    ok, _, _ = import_partition(instance, KEY, run_config(batch_mb=2, min_batch_mb=1))
    meta = materialization(instance, KEY)
    assert ok and meta["files_imported"] == 0 and meta["files_unchanged"] == 14 and meta["mb_read"] == 0

    # One file removed, one replaced: marked removed, re-imported.
    (base / SHOP / TEMPLATE / "design 000.png").unlink()
    replaced = base / SHOP / TEMPLATE / "design 002.png"
    replaced.write_bytes((base / SHOP / TEMPLATE / "design 004.png").read_bytes())
    os.utime(replaced, (time.time() + 5, time.time() + 5))
    ok, _, _ = import_partition(instance, KEY, run_config())
    meta = materialization(instance, KEY)
    assert ok and meta["files_removed"] == 1 and meta["files_imported"] == 1 and meta["exact_duplicates"] == 2
    stored = rows(migrated_url)
    assert stored[f"{KEY}/design 000.png"]["status"] == "removed"


def test_import_refuses_an_old_schema(database_url, instance, nas_base, clean_nas_env):
    clean_nas_env.setenv("NAS_BASE_PATH", str(nas_base))
    ok, run_id, _ = import_partition(instance, KEY, run_config())
    assert not ok
    failures = [r.event_log_entry.dagster_event for r in instance.get_records_for_run(run_id).records
                if r.event_log_entry.dagster_event and r.event_log_entry.dagster_event.is_step_failure]
    description = failures[0].step_failure_data.user_failure_data.description
    assert description.startswith("Schema is not at head: pending startup migrations add_multi_tenant_schema")


def test_dropped_sftp_connection_is_retried(migrated_url, instance, sftp_env, sshd):
    # connection 1 lists the folder; connection 2 (the batch) is cut after 3 MB
    proxy = DroppingProxy(sshd.port, drop_connection=2, drop_after_bytes=3 * 1024 * 1024)
    # known_hosts must vouch for the proxy's port too: it is the same sshd behind it
    known = sshd.known_hosts.read_text().replace(f"[127.0.0.1]:{sshd.port}", f"[127.0.0.1]:{proxy.port}")
    (sshd.dir / "known_hosts_proxy").write_text(known)
    os.environ["QNAP_PORT"] = str(proxy.port)
    os.environ["QNAP_KNOWN_HOSTS"] = str(sshd.dir / "known_hosts_proxy")
    try:
        ok, run_id, events = import_partition(instance, KEY, run_config())
    finally:
        proxy.close()
    assert proxy.dropped == 1
    assert ok
    types = [r.event_log_entry.dagster_event.event_type_value for r in instance.get_records_for_run(run_id).records
             if r.event_log_entry.dagster_event]
    assert "STEP_UP_FOR_RETRY" in types
    stored = rows(migrated_url)
    assert len(stored) == 14 and sum(r["status"] == "ok" for r in stored.values()) == 11


def test_sequential_mode_gives_the_same_rows(migrated_url, instance, nas_base, clean_nas_env):
    clean_nas_env.setenv("NAS_BASE_PATH", str(nas_base))
    clean_nas_env.setenv("NAS_USE_BATCHED", "false")
    ok, _, events = import_partition(instance, KEY, run_config(batch_mb=1, min_batch_mb=1))
    assert ok
    assert len({e.step_key for e in events if e.is_step_success and "import_nas_batch" in e.step_key}) == 1
    stored = rows(migrated_url)
    assert len(stored) == 14 and sum(r["status"] == "failed" for r in stored.values()) == 3


def test_a_run_launched_without_the_worker_sets_the_sftp_pool_to_the_configured_concurrency(
        migrated_url, instance, nas_base, clean_nas_env):
    # A run from the UI, a backfill or a sensor: the pool was left at another limit (the
    # instance's default_limit, or an earlier NAS_MAX_CONCURRENT), and no worker ran first.
    instance.event_log_storage.set_concurrency_slots(SFTP_POOL, 1)
    clean_nas_env.setenv("NAS_BASE_PATH", str(nas_base))
    clean_nas_env.setenv("NAS_MAX_CONCURRENT", "3")
    ok, _, _ = import_partition(instance, KEY, run_config(batch_mb=1, min_batch_mb=1, workers=3))
    assert ok and instance.event_log_storage.get_concurrency_info(SFTP_POOL).slot_count == 3
    assert len(rows(migrated_url)) == 14


def test_killed_import_resumes_without_loss_or_duplicates(migrated_url, dagster_home, sshd, tmp_path):
    base = tmp_path / "G"
    write_corpus(base, {("Kill Shop", "T"): 60}, size=(800, 600))
    env = cli_env(**sshd.env(base), NAS_COMMIT_EVERY="2")
    cmd = [sys.executable, "-m", "craftflow_migrations.cli", "import", "--partition", "Kill Shop/T"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    engine = get_engine(migrated_url)
    count, deadline = 0, time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with engine.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM design_images WHERE shop = 'Kill Shop'")).scalar()
        if count >= 6:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < count < 60, "the import must be killed midway"
    with engine.connect() as conn:
        committed = conn.execute(text("SELECT count(*) FROM design_images WHERE shop = 'Kill Shop'")).scalar()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    stored = rows(migrated_url, "Kill Shop", "T")
    assert len(stored) == 60 and all(r["status"] == "ok" for r in stored.values())
    with engine.connect() as conn:
        imported = conn.execute(text(
            "SELECT count(*) FROM design_images WHERE shop = 'Kill Shop' AND imported_at > first_seen_at")).scalar()
    assert imported == 0  # nothing imported twice
    assert f"files_imported={60 - committed}, files_unchanged={committed}" in second.stdout


def _current_fingerprints(base) -> dict[str, str]:
    from craftflow_migrations.nas.clients import LocalNasClient
    from craftflow_migrations.nas.listing import list_nas

    with LocalNasClient(base) as client:
        return {k: li.fingerprint for k, li in list_nas(client)[0].items()}


def _materialize(instance, fingerprints: dict[str, str]) -> None:
    for key, fingerprint in fingerprints.items():
        instance.report_runless_asset_event(dg.AssetMaterialization(
            DESIGN_IMAGES, partition=key, metadata={"listing_fingerprint": fingerprint}))


def test_scan_sensor_requests_new_changed_and_failed_partitions(migrated_url, instance, tmp_path, clean_nas_env):
    from dagster._core.storage.dagster_run import DagsterRun

    from craftflow_migrations.definitions import defs

    base = tmp_path / "G"
    write_corpus(base, {("Shop A", "T1"): 2, ("Shop A", "T2"): 2, ("Shop B", "T1"): 2}, size=(64, 64))
    os.environ["NAS_BASE_PATH"] = str(base)
    resources = {"nas": NasResource(), "postgres": PostgresResource(database_url=migrated_url)}
    sensor = defs.get_sensor_def("nas_scan_sensor")

    cursor = None

    def tick():
        # The daemon hands each tick the cursor the last one left.
        nonlocal cursor
        context = dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor)
        result = sensor(context)
        cursor = context.cursor
        return result

    result = tick()
    # The three new folders are neighbours: one run for the range.
    [request] = result.run_requests
    assert request.partition_key_range == dg.PartitionKeyRange("Shop A/T1", "Shop B/T1")
    assert list(result.dynamic_partitions_requests[0].partition_keys) == ["Shop A/T1", "Shop A/T2", "Shop B/T1"]
    instance.add_dynamic_partitions(nas_partitions.name, list(result.dynamic_partitions_requests[0].partition_keys))

    _materialize(instance, _current_fingerprints(base))  # the run succeeded
    assert tick().run_requests == []

    write_corpus(base, {("Shop B", "T1"): 3}, size=(64, 64), seed=100)  # one file added, two rewritten
    changed = tick()
    assert [r.partition_key for r in changed.run_requests] == ["Shop B/T1"]
    # That run failed (no materialization): the next tick asks again, with a new run key.
    again = tick()
    assert [r.partition_key for r in again.run_requests] == ["Shop B/T1"]
    assert again.run_requests[0].run_key != changed.run_requests[0].run_key
    # While an import of it is queued or running, it is not requested twice.
    instance.add_run(DagsterRun(job_name="nas_import", run_id="in-flight-run", status=dg.DagsterRunStatus.STARTED,
                                tags={"dagster/partition": "Shop B/T1"}))
    assert tick().run_requests == []


def test_scan_sensor_waits_for_the_schema(database_url, instance, tmp_path, clean_nas_env):
    from craftflow_migrations.definitions import defs

    (tmp_path / "G" / "S" / "T").mkdir(parents=True)
    os.environ["NAS_BASE_PATH"] = str(tmp_path / "G")
    resources = {"nas": NasResource(),
                 "postgres": PostgresResource(database_url=database_url)}
    result = defs.get_sensor_def("nas_scan_sensor")(dg.build_sensor_context(instance=instance, resources=resources))
    assert isinstance(result, dg.SkipReason) and "Schema is not at head" in result.skip_message


def test_startup_success_triggers_import_of_pending_partitions(database_url, instance):
    from craftflow_migrations.definitions import defs

    instance.add_dynamic_partitions(nas_partitions.name, ["Shop A/T1", "Shop B/T1"])
    result = startup_job_factory().execute_in_process(instance=instance)
    assert result.success
    success = instance.get_records_for_run(result.run_id, of_type=dg.DagsterEventType.RUN_SUCCESS).records[0]
    sensor = defs.get_sensor_def("import_after_startup")
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_instance=instance,
        dagster_run=instance.get_run_by_id(result.run_id), dagster_event=success.event_log_entry.dagster_event,
    )
    [request] = sensor(context)
    assert request.partition_key_range == dg.PartitionKeyRange("Shop A/T1", "Shop B/T1")


def test_backfill_one_shop_from_the_cli(migrated_url, dagster_home, tmp_path):
    base = tmp_path / "G"
    write_corpus(base, {("Shop A", "T1"): 2, ("Shop A", "T2"): 2, ("Shop B", "T1"): 2}, size=(64, 64))
    env = cli_env(NAS_BASE_PATH=str(base))
    # T2 gets a third file, a byte copy of one in T1: counts differ between the two partitions.
    shutil.copy(base / "Shop A" / "T1" / "design 000.png", base / "Shop A" / "T2" / "copy of T1.png")
    result = subprocess.run([sys.executable, "-m", "craftflow_migrations.cli", "import", "--shop", "Shop A"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    with dg.DagsterInstance.get() as instance:
        assert instance.get_materialized_partitions(DESIGN_IMAGES) == {"Shop A/T1", "Shop A/T2"}
        assert set(instance.get_dynamic_partitions(nas_partitions.name)) == {"Shop A/T1", "Shop A/T2", "Shop B/T1"}
        # Both templates went in as one run (a partition range), each with its own materialization.
        runs = instance.get_run_records()
        assert len(runs) == 1
        assert runs[0].dagster_run.tags["dagster/asset_partition_range_start"] == "Shop A/T1"
        assert runs[0].dagster_run.tags["dagster/asset_partition_range_end"] == "Shop A/T2"
        # Listed once per run: the plan step read the worker's listing, which is gone afterwards.
        messages = [r.event_log_entry.user_message for r in instance.get_records_for_run(runs[0].dagster_run.run_id).records]
        assert any("listed by the worker" in m for m in messages)
        assert not list((dagster_home / "storage" / "listings").glob("*"))
        meta = {k: materialization(instance, k) for k in ("Shop A/T1", "Shop A/T2")}
        assert meta["Shop A/T1"]["files_seen"] == 2 and meta["Shop A/T2"]["files_seen"] == 3
        assert meta["Shop A/T1"]["files_imported"] == 2 and meta["Shop A/T2"]["files_imported"] == 3
        assert meta["Shop A/T2"]["exact_duplicates"] == 1
        assert meta["Shop A/T1"]["listing_fingerprint"] != meta["Shop A/T2"]["listing_fingerprint"]
        runs_before = len(instance.get_run_records())
    again = subprocess.run([sys.executable, "-m", "craftflow_migrations.cli", "import", "--shop", "Shop A"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert again.stdout.count("unchanged since its last import") == 2
    with dg.DagsterInstance.get() as instance:
        assert len(instance.get_run_records()) == runs_before  # a re-deploy costs a listing, not runs


def test_last_fingerprints_of_many_partitions_in_a_few_queries(instance):
    from craftflow_migrations.nas.partitions import last_fingerprints

    keys = [f"Shop {i // 10}/Template {i % 10}" for i in range(1500)]  # more than one chunk of ids
    instance.add_dynamic_partitions(nas_partitions.name, keys)
    for i, key in enumerate(keys[:1200]):
        instance.report_runless_asset_event(dg.AssetMaterialization(
            DESIGN_IMAGES, partition=key, metadata={"listing_fingerprint": f"old {i}"}))
    # The latest materialization wins; one without a fingerprint (an older release) counts as none.
    instance.report_runless_asset_event(dg.AssetMaterialization(
        DESIGN_IMAGES, partition=keys[0], metadata={"listing_fingerprint": "new"}))
    instance.report_runless_asset_event(dg.AssetMaterialization(DESIGN_IMAGES, partition=keys[1]))
    found = last_fingerprints(instance, keys)
    assert found[keys[0]] == "new" and keys[1] not in found
    assert found[keys[1199]] == "old 1199" and keys[1200] not in found
    assert len(found) == 1199
    assert last_fingerprints(instance, keys[5:7]) == {keys[5]: "old 5", keys[6]: "old 6"}


def test_partitions_to_import_are_cut_into_contiguous_ranges():
    from craftflow_migrations.nas.ranges import contiguous_ranges, partition_tags

    order = ["A/1", "A/2", "B/1", "B/2", "C/1"]
    assert contiguous_ranges(["B/2", "A/1", "A/2", "C/1"], order) == [["A/1", "A/2"], ["B/2", "C/1"]]
    assert contiguous_ranges(["A/1", "B/1"], order) == [["A/1"], ["B/1"]]
    assert contiguous_ranges([], order) == []
    assert partition_tags(["A/1"]) == {"dagster/partition": "A/1"}
    assert partition_tags(["A/1", "A/2"]) == {"dagster/asset_partition_range_start": "A/1",
                                              "dagster/asset_partition_range_end": "A/2"}


def test_a_first_attempt_trusts_the_plan_and_a_retry_skips_what_was_committed(migrated_url, tmp_path, monkeypatch):
    """The plan step knows which files had rows (changed ones): a batch's first attempt asks
    the database nothing and copies the new files' rows straight in; a retry asks, and
    skips what the first attempt committed."""
    from craftflow_migrations.nas import store
    from craftflow_migrations.nas.changes import scan_for_import
    from craftflow_migrations.nas.clients import LocalNasClient
    from craftflow_migrations.nas.importer import import_batch
    from craftflow_migrations.nas.listing import list_nas

    from .support import import_local_folder, noise_image

    base = tmp_path / "nas"
    paths = write_corpus(base, {("Plan Shop", "T"): 6}, size=(64, 48))
    import_local_folder(migrated_url, base)
    changed = [paths[0], paths[2]]  # PNGs: rewritten with other pixels under the same names
    for i, p in enumerate(changed):
        noise_image(64, 48, seed=1000 + i).save(p, compress_level=1)
        os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
    for i in range(2):
        noise_image(64, 48, seed=2000 + i).save(base / "Plan Shop" / "T" / f"new {i}.png")
    engine = get_engine(migrated_url)
    with engine.connect() as conn:
        listed_at = store.db_now(conn)
    client = LocalNasClient(base)
    listings, _ = list_nas(client)
    (scan,) = scan_for_import(listings, engine, listed_at, 2**30)
    assert len(scan.to_import) == 4
    assert scan.had_rows == {str(p.relative_to(base)) for p in changed}

    def no_query(*_args):
        raise AssertionError("a first attempt should not ask the database for the batch's rows")

    with monkeypatch.context() as m:
        m.setattr(store, "known_files", no_query)
        first = import_batch(client, engine, scan.to_import, listed_at, had_rows=scan.had_rows)
    assert (first.total.imported, first.total.skipped) == (len(scan.to_import), 0)
    retry = import_batch(client, engine, scan.to_import, listed_at)
    assert (retry.total.imported, retry.total.skipped) == (0, len(scan.to_import))
    with engine.connect() as conn:
        stored = {r.path: r for r in conn.execute(text(
            "SELECT path, sha256, status::text AS status, listed_at FROM design_images WHERE status = 'ok'"))}
    for f in scan.to_import:
        row = stored[f.path]
        assert row.listed_at == listed_at
        assert row.sha256 == hashlib.sha256((base / f.path).read_bytes()).hexdigest()
    assert len(stored) == 8


def test_a_step_process_opens_the_instance_without_importing_anything(dagster_home):
    """What the step forkserver preloads covers what opening the instance imports: the
    defs-state storage's universal_pathlib and fsspec were imported again by every step process."""
    code = (
        "import os, sys\n"
        "import craftflow_migrations.preload\n"
        "before = set(sys.modules)\n"
        "import dagster as dg\n"
        "from dagster._core.instance.ref import InstanceRef\n"
        "with dg.DagsterInstance.from_ref(InstanceRef.from_dir(os.environ['DAGSTER_HOME'])) as instance:\n"
        "    instance.get_runs(limit=1)\n"
        "print(sorted(m for m in set(sys.modules) - before if not m.startswith('importlib.')))\n"
    )
    assert _last_line_printed_by(code) == "[]"


def _last_line_printed_by(code: str) -> str:
    """What a fresh interpreter running ``code`` (with this test's environment) printed last."""
    out = subprocess.run([sys.executable, "-c", code], env=os.environ.copy(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_a_step_process_opens_the_instance_without_reading_the_storage_scripts_again(dagster_home):
    """Each SQLite storage checks its schema against Dagster's alembic scripts on opening, and
    alembic executed every revision file again for each check (0.2 CPU-s a step process); the
    forkserver reads them once, before any step forks."""
    code = (
        "import os\n"
        "import craftflow_migrations.preload\n"
        "from alembic.script import ScriptDirectory\n"
        "reads = []\n"
        "load = ScriptDirectory._load_revisions\n"
        "ScriptDirectory._load_revisions = lambda self: (reads.append(1), (yield from load(self)))[1]\n"
        "import dagster as dg\n"
        "from dagster._core.instance.ref import InstanceRef\n"
        "with dg.DagsterInstance.from_ref(InstanceRef.from_dir(os.environ['DAGSTER_HOME'])) as instance:\n"
        "    instance.get_runs(limit=1)\n"
        "    with instance.event_log_storage.run_connection('a-run-shard'):\n"
        "        pass\n"
        "print(len(reads))\n"
    )
    assert _last_line_printed_by(code) == "0"


def test_the_job_definitions_load_without_the_duplicates_libraries():
    """The worker and every step load the definitions; grouping, the thumbnail check and the
    report import their libraries (0.45 CPU-s) only when the duplicates run uses them."""
    code = ("import sys\nimport craftflow_migrations.definitions\n"
            "print(sorted(m for m in ('scipy.sparse', 'scipy.ndimage', 'jinja2') if m in sys.modules))\n")
    assert _last_line_printed_by(code) == "[]"


def test_the_worker_opens_the_instance_and_loads_the_job_without_a_full_collection(dagster_home):
    """Importing Dagster and the job's definitions only grows the heap, and CPython ran a full
    collection over all of it each time it grew by a quarter: 0.1-0.3 s of the worker's
    start-up, finding nothing. They are built under ``long_lived`` and frozen."""
    code = (
        "import gc\n"
        "full = []\n"
        "gc.callbacks.append(lambda phase, info: phase == 'start' and info['generation'] == 2 and full.append(1))\n"
        "from craftflow_migrations.instance import get_instance\n"
        "from craftflow_migrations.long_lived import long_lived\n"
        "instance = get_instance()\n"
        "with long_lived():\n"
        "    from craftflow_migrations.definitions import nas_import_job_factory\n"
        "nas_import_job_factory()\n"
        "print(len(full), gc.isenabled(), gc.get_freeze_count() > 100_000)\n"
    )
    assert _last_line_printed_by(code) == "0 True True"


def test_the_worker_loads_the_duplicates_libraries_before_the_run_only_when_they_follow(
        migrated_url, dagster_home, nas_base, clean_nas_env):
    """Loaded after the import, scipy.sparse and the report's templates were 0.2-0.6 s of the
    serial stretch before the duplicates run; before the run they overlap the step
    forkserver's imports. A backfill, which runs no duplicates, does not load them."""
    clean_nas_env.setenv("DATABASE_URL", migrated_url)
    clean_nas_env.setenv("NAS_BASE_PATH", str(nas_base))
    code = (
        "import sys\n"
        "from craftflow_migrations import worker\n"
        "from craftflow_migrations.instance import get_instance\n"
        "outcomes = worker.run_nas_import(get_instance(), duplicates_next={next})\n"
        "print(all(o.success for o in outcomes), 'scipy.sparse' in sys.modules, 'jinja2' in sys.modules)\n"
    )
    assert _last_line_printed_by(code.format(next=False)) == "True False False"
    (nas_base / SHOP / TEMPLATE / "design 000.png").unlink()  # something to import again
    assert _last_line_printed_by(code.format(next=True)) == "True True True"


def test_long_lived_restores_the_collector_as_it_found_it():
    import gc

    from craftflow_migrations.long_lived import long_lived

    frozen = gc.get_freeze_count()
    try:
        with long_lived():
            assert not gc.isenabled()
            kept = [[i] for i in range(1000)]
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(kept)
        gc.disable()
        with long_lived():
            pass
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()
        gc.unfreeze()  # the test process's own objects go back to the collector


def test_numpy_gets_one_blas_thread_unless_the_environment_says_otherwise():
    """OpenBLAS started a thread per core in every process importing numpy, spinning 0.1 s
    each (0.2 CPU-s in the worker and again in the forkserver); every process here is one
    core's worth of work. An operator's own OPENBLAS_NUM_THREADS is kept."""
    code = ("import threadpoolctl, craftflow_migrations.nas.hashing\n"
            "print(sorted({i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas'}))\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    for given, expected in ((None, "[1]"), ("2", "[2]")):
        run_env = env if given is None else {**env, "OPENBLAS_NUM_THREADS": given}
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == expected
