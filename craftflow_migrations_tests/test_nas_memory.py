"""keep_freed_memory: large buffers freed by one file are reused by the next, not faulted in again."""

import json
import os
import subprocess
import sys

import pytest

# Allocates and frees ten 40 MB buffers, as hashing ten files does, and counts page faults.
PROBE = """
import json, resource, sys
from craftflow_migrations.nas.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
bytearray(40 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    buffer = bytearray(40 * 2**20)
    del buffer
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**environ, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    plain, tuned = probe("plain"), probe("tuned")
    assert tuned["applied"]
    # 10 x 40 MB is 102,400 pages: each one faults without the tuning, almost none with it.
    assert plain["faults"] > 50_000
    assert tuned["faults"] < 5_000


def test_an_operators_own_malloc_settings_are_left_alone():
    assert probe("tuned", MALLOC_TRIM_THRESHOLD_="1048576")["applied"] is False
