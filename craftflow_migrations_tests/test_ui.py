"""The Dagster UI for real: dagster-webserver on loopback, headless Chromium, GraphQL backfills."""

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from craftflow_migrations.nas.assets import nas_partitions
from craftflow_migrations.schema.discovery import discover

from .conftest import PACKAGE_MIGRATIONS, cli_env
from .support import free_port, write_corpus

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PARTITIONS = ["Shop A/T1", "Shop A/T2", "Shop B/T1"]

pytestmark = pytest.mark.slow


@pytest.fixture
def webserver(migrated_url, dagster_home, tmp_path):
    base = tmp_path / "G"
    write_corpus(base, {tuple(k.split("/")): 2 for k in PARTITIONS}, size=(64, 64))
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(nas_partitions.name, PARTITIONS)
    port = free_port()
    env = cli_env(NAS_BASE_PATH=str(base), DAGSTER_HOME=str(dagster_home), DATABASE_URL=migrated_url)
    proc = subprocess.Popen(
        [str(Path(os.sys.executable).parent / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
         "-w", str(ROOT / "workspace.yaml")],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    # The daemon dequeues launched runs (QueuedRunCoordinator) as in production.
    daemon = subprocess.Popen(
        [str(Path(os.sys.executable).parent / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/server_info", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()) from None
            time.sleep(0.5)
    yield url
    for p in (proc, daemon):
        p.terminate()
    for p in (proc, daemon):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"GraphQL {exc.code}: {exc.read().decode()[:2000]}") from None
    assert "errors" not in body, body
    return body["data"]


def rendered_dom(url: str) -> str:
    assert CHROMIUM, "chromium is not installed: run scripts/setup.sh"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={Path(os.environ.get('TMPDIR', '/tmp')) / f'cfm-chrome-{os.getpid()}-{time.time_ns()}'}",
         "--virtual-time-budget=30000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    )
    return result.stdout


def test_asset_page_lists_partitions_and_startup_job_shows_every_migration(webserver):
    dom = rendered_dom(f"{webserver}/assets/design_images?view=partitions")
    for key in PARTITIONS:
        assert key in dom, key
    dom = rendered_dom(f"{webserver}/locations/craftflow_migrations/jobs/startup")
    for migration in discover(PACKAGE_MIGRATIONS).of_kind("startup"):
        assert migration.name in dom, migration.name


BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId launchedRunIds }
    ... on PythonError { message }
  }
}
"""
RUN_STATUS = """
query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status tags { key value } } } }
"""


def test_graphql_backfill_of_one_shop(webserver, dagster_home):
    shop_a = [k for k in PARTITIONS if k.startswith("Shop A/")]
    # A backfill of the nas_import job's partition set, submitted by the webserver itself
    # (pure asset backfills are submitted by dagster-daemon instead).
    data = graphql(webserver, BACKFILL, {"params": {
        "selector": {
            "partitionSetName": "nas_import_partition_set",
            "repositorySelector": {"repositoryName": "__repository__", "repositoryLocationName": "craftflow_migrations"},
        },
        "partitionNames": shop_a,
        "forceSynchronousSubmission": True,
        "title": "Shop A",
    }})["launchPartitionBackfill"]
    assert data["__typename"] == "LaunchBackfillSuccess", data
    run_ids = data["launchedRunIds"]
    assert len(run_ids) == 2
    deadline = time.monotonic() + 240
    statuses = {}
    while time.monotonic() < deadline:
        statuses = {r: graphql(webserver, RUN_STATUS, {"id": r})["runOrError"]["status"] for r in run_ids}
        if all(s in ("SUCCESS", "FAILURE", "CANCELED") for s in statuses.values()):
            break
        time.sleep(1)
    assert set(statuses.values()) == {"SUCCESS"}, statuses
    with dg.DagsterInstance.get() as instance:
        assert instance.get_materialized_partitions(dg.AssetKey("design_images")) == set(shop_a)


BACKFILL_STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status runs { id status tags { key value } } }
    ... on PythonError { message }
  }
}
"""


def test_asset_backfill_of_one_shop_is_a_single_run(webserver, dagster_home):
    # A backfill of the design_images asset (the UI's "Materialize selected" on partitions),
    # run by dagster-daemon: its single-run backfill policy makes one run for the range.
    shop_a = [k for k in PARTITIONS if k.startswith("Shop A/")]
    data = graphql(webserver, BACKFILL, {"params": {
        "assetSelection": [{"path": ["design_images"]}],
        "partitionNames": shop_a,
        "title": "Shop A, asset backfill",
    }})["launchPartitionBackfill"]
    assert data["__typename"] == "LaunchBackfillSuccess", data
    deadline = time.monotonic() + 240
    backfill = {}
    while time.monotonic() < deadline:
        backfill = graphql(webserver, BACKFILL_STATUS, {"id": data["backfillId"]})["partitionBackfillOrError"]
        if backfill.get("status") not in ("REQUESTED", "CANCELING", "FAILING"):
            break
        time.sleep(1)
    assert backfill["status"] == "COMPLETED_SUCCESS", backfill
    assert len(backfill["runs"]) == 1, backfill["runs"]
    run = backfill["runs"][0]
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert run["status"] == "SUCCESS"
    assert (tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]) == tuple(shop_a)
    with dg.DagsterInstance.get() as instance:
        assert instance.get_materialized_partitions(dg.AssetKey("design_images")) == set(shop_a)
        for key in shop_a:
            record = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("design_images"), asset_partitions=[key]), limit=1).records[0]
            assert record.asset_materialization.metadata["files_seen"].value == 2


START_SENSOR = """
mutation($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) { __typename ... on PythonError { message } }
}
"""


def test_scan_sensor_launches_one_run_for_a_range(webserver, dagster_home):
    # dagster-daemon evaluates the scan sensor: the three folders are all new to its cursor and
    # neighbours in the partition order, so it asks for one run over the range, which succeeds.
    started = graphql(webserver, START_SENSOR, {"selector": {
        "repositoryName": "__repository__", "repositoryLocationName": "craftflow_migrations",
        "sensorName": "nas_scan_sensor"}})["startSensor"]
    assert started["__typename"] == "Sensor", started
    deadline = time.monotonic() + 240
    with dg.DagsterInstance.get() as instance:
        runs = []
        while time.monotonic() < deadline:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/sensor_name": "nas_scan_sensor"}))
            if runs and all(r.is_finished for r in runs):
                break
            time.sleep(1)
        assert len(runs) == 1, runs
        assert runs[0].status == dg.DagsterRunStatus.SUCCESS
        assert runs[0].tags["dagster/asset_partition_range_start"] == PARTITIONS[0]
        assert runs[0].tags["dagster/asset_partition_range_end"] == PARTITIONS[-1]
        assert instance.get_materialized_partitions(dg.AssetKey("design_images")) == set(PARTITIONS)
