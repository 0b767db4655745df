"""NAS import past two cores: the whole ``craftflow-migrate`` (MIGRATION_MODE=nas-only) on a
corpus of large designs in a local folder, pinned to N cores, against its ideal at N, side by
side in one run.

The worker, its step processes and PostgreSQL are pinned to cores 0..N-1 (``taskset``,
``sched_setaffinity``), so one machine stands for machines of N cores; the service sees N usable
cores, as it would in a container's cpuset, and sizes its batch steps and the ``nas_sftp`` pool
by them. For each N it prints:

  the import's wall time against the ideal, single-core pHash CPU-s / N (the issue's ideal),
  and against the floor, N plain processes hashing the same files with no orchestration (what
  N cores of this machine do at once: shared caches, memory bandwidth, SMT siblings, clocks);
  where the time goes: the run's phases, and how long at most one core was busy (the serial
  part that stops the scaling).

    python -m benchmarks.bench_scaling [--gb 2.5] [--folders 16] [--cores 16,8,4,2] [--budget-s 420]

The corpus (RGBA PNGs and JPEGs, as :mod:`benchmarks.bench_nas_import`'s) is generated once
into ``--corpus`` by every core at once. A lent 16-core machine runs it as ``../shared/DEVICE.md``
says; the README's "Past two cores" holds the latest figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_nas_import import (
    LAST_COMMAND_SPAN,
    MB,
    _adopt_orphans,
    drop_shape_databases,
    fresh_env,
    ideal_cpu_seconds,
    machine_busy_seconds,
    nas_only,
    print_run,
    write_design,
)
from craftflow_migrations.nas.hashing import describe_image
from craftflow_migrations.settings import usable_cores

DEFAULT_CORPUS = Path(__file__).parent / ".corpus_scaling"


def _one_design(args: tuple[Path, int, int]) -> int:
    corpus, seed, folders = args
    folder = corpus / f"Shop {seed % folders // 4:02d}" / f"Template {seed % folders % 4}"
    folder.mkdir(parents=True, exist_ok=True)
    return write_design(folder, seed, digits=4).stat().st_size


def ensure_corpus(corpus: Path, gb: float, folders: int, workers: int) -> list[Path]:
    files = [p for p in corpus.rglob("*") if p.is_file()]
    total, seed = sum(p.stat().st_size for p in files), len(files)
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        while total < gb * 1024 * MB:
            # About 10 MB a design: a round of every core's worth, then look again.
            need = max(int((gb * 1024 * MB - total) / (10 * MB)) + 1, 1)
            seeds = range(seed, seed + min(need, 4 * workers))
            total += sum(pool.map(_one_design, [(corpus, s, folders) for s in seeds]))
            seed = seeds[-1] + 1
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    print(f"corpus: {len(files)} files, {sum(p.stat().st_size for p in files) / MB:,.0f} MB in "
          f"{len({p.parent for p in files})} shop/template folders ({corpus}; "
          f"{time.perf_counter() - started:.0f} s to make)", flush=True)
    return files


def _start_hashing(cores: set[int]) -> None:
    from craftflow_migrations.nas.memory import keep_freed_memory

    os.sched_setaffinity(0, cores)
    keep_freed_memory()  # as the import's batch steps
    describe_image(b"")  # imports are not hashing


def _hash_one(path: Path) -> float:
    data = path.read_bytes()
    started = time.process_time()
    describe_image(data)  # the import's own work on a file: sha256, pHash, thumbnail
    return time.process_time() - started


def parallel_floor(files: list[Path], cores: list[int]) -> tuple[float, float]:
    """Wall seconds for ``len(cores)`` plain processes, pinned there, to read, hash and
    thumbnail every file from local disk (the biggest first, each process taking the next),
    and their CPU-s: what these cores do at once with no orchestration."""
    order = sorted(files, key=lambda p: -p.stat().st_size)
    with ProcessPoolExecutor(len(cores), initializer=_start_hashing, initargs=(set(cores),)) as pool:
        list(pool.map(time.sleep, [0.2] * len(cores)))  # every process started and warm
        started = time.perf_counter()
        cpu = sum(pool.map(_hash_one, order, chunksize=1))
        return time.perf_counter() - started, cpu


class BusySampler:
    """How long at most about one core was busy (the serial part), from /proc/stat every 0.1 s."""

    def __init__(self) -> None:
        self.serial_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        last, last_t = machine_busy_seconds(), time.perf_counter()
        while not self._stop.wait(0.1):
            now, now_t = machine_busy_seconds(), time.perf_counter()
            if now - last <= 1.5 * (now_t - last_t):
                self.serial_s += now_t - last_t
            last, last_t = now, now_t

    def __enter__(self) -> BusySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class RunTimeline:
    """Seconds of each stretch of one command, from its nas_import run's event log."""

    before_run: float  # the command's start-up, listing and the run's creation
    to_first_batch: float  # the run's start, the plan step, the first batch step's launch
    launch_spread: float  # first to last batch step started
    batches: float  # every batch step, first start to last end
    finish_spread: float  # first to last batch step ended
    after_batches: float  # the summary step and the run's end
    after_run: float  # the duplicates, the report and exit
    steps: int
    most_at_once: int

    def line(self) -> str:
        return (f"timeline: start-up and listing {self.before_run:.1f} s, run start to first batch step "
                f"{self.to_first_batch:.1f}, batch steps {self.batches:.1f} ({self.steps} steps, at most "
                f"{self.most_at_once} at once; started over {self.launch_spread:.1f} s, ended over "
                f"{self.finish_spread:.1f} s), summary and run end {self.after_batches:.1f}, duplicates "
                f"and exit {self.after_run:.1f}")


def run_timeline(home: Path, started_at: float, ended_at: float) -> RunTimeline:
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    os.environ["DAGSTER_HOME"] = str(home)  # the instance's dagster.yaml names its folder by it
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        run = instance.get_runs(dg.RunsFilter(job_name="nas_import"), limit=1)[0]
        records = instance.get_records_for_run(run.run_id).records
    # The run's first event: its record's create_timestamp has whole seconds in SQLite.
    created = min(record.event_log_entry.timestamp for record in records)
    starts, ends, edges, finished = [], [], [], created
    for record in records:
        entry, event = record.event_log_entry, record.event_log_entry.dagster_event
        if event is None:
            continue
        finished = max(finished, entry.timestamp)
        if event.step_key and "import_nas_batch" in event.step_key:
            if event.event_type_value == "STEP_START":
                starts.append(entry.timestamp)
                edges.append((entry.timestamp, 1))
            elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
                ends.append(entry.timestamp)
                edges.append((entry.timestamp, -1))
    running = most = 0
    for _, step in sorted(edges):
        running += step
        most = max(most, running)
    first, last = min(starts, default=created), max(ends, default=created)
    return RunTimeline(created - started_at, first - created, max(starts, default=first) - first, last - first,
                       last - min(ends, default=last), finished - last, ended_at - finished, len(starts), most)


def pin_postgres(cores: set[int]) -> None:
    """PostgreSQL's processes onto ``cores``; the backends it forks later inherit it."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as comm:
                if comm.read().startswith("postgres"):
                    os.sched_setaffinity(int(pid), cores)
        except OSError:
            continue


def pinned(n: int) -> tuple[str, ...]:
    """A command prefix that runs what follows on cores 0..n-1 (``taskset``, with no util-linux)."""
    return (sys.executable, "-c", f"import os, sys; os.sched_setaffinity(0, range({n})); os.execv(sys.argv[1], sys.argv[1:])")


def topology() -> str:
    siblings = set()
    for cpu in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*")):
        path = cpu / "topology" / "thread_siblings_list"
        if path.exists():
            siblings.add(path.read_text().strip())
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    return f"{usable_cores()} usable cores, {len(siblings)} physical ({model}); SMT siblings: {' '.join(sorted(siblings))}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.5)
    parser.add_argument("--folders", type=int, default=16)
    parser.add_argument("--cores", default="16,8,4,2", help="N to pin to, in this order")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no further N once this many seconds have passed")
    args = parser.parse_args()
    from craftflow_migrations_tests.support import PostgresServer

    begun = time.perf_counter()
    print(topology(), flush=True)
    files = ensure_corpus(args.corpus, args.gb, args.folders, usable_cores())
    sample = files[::6]
    alone = ideal_cpu_seconds(sample) * len(files) / len(sample)
    print(f"pHash alone, one process: {alone:.1f} CPU-s for every file ({len(sample)} sampled)", flush=True)
    server = PostgresServer()
    _adopt_orphans()
    rows = []
    try:
        for n in (int(c) for c in args.cores.split(",")):
            if n > usable_cores():
                continue
            if time.perf_counter() - begun > args.budget_s:
                print(f"N={n}: skipped, past the {args.budget_s:.0f} s budget")
                continue
            cores = set(range(n))
            floor_s, floor_cpu = parallel_floor(files, sorted(cores))
            env = fresh_env(server, args.corpus)
            pin_postgres(cores)
            with BusySampler() as sampler:
                wall, cpu, phases, out = nas_only(server, env, f"N={n}", pinned(n))
            pin_postgres(set(range(usable_cores())))
            ideal = alone / n
            print(f"\nN={n} cores:", flush=True)
            print_run(f"large designs, local folder ({len(files)} files)", wall, cpu, phases, ideal, 1.5, n)
            print(f"      floor, {n} plain processes hashing: {floor_s:.1f} s ({floor_cpu:.1f} CPU-s, "
                  f"{floor_cpu / alone:.2f}x the CPU alone) -> the import is {wall / floor_s:.2f}x its floor; "
                  f"at most one core busy for {sampler.serial_s:.1f} s of {wall:.1f}", flush=True)
            print(f"      {run_timeline(Path(env['DAGSTER_HOME']), *LAST_COMMAND_SPAN).line()}", flush=True)
            summary = [line for line in out.splitlines() if line.startswith("NAS import")]
            print(f"      {summary[0] if summary else out.strip().splitlines()[-1]}", flush=True)
            rows.append((n, wall, ideal, floor_s, sampler.serial_s))
        print("\n   N   import   ideal   x ideal   floor   x floor   serial")
        for n, wall, ideal, floor_s, serial in rows:
            print(f"{n:4d} {wall:7.1f} s {ideal:6.1f} s {wall / ideal:7.2f}x {floor_s:6.1f} s {wall / floor_s:7.2f}x "
                  f"{serial:6.1f} s")
    finally:
        drop_shape_databases(server)
        server.stop()


if __name__ == "__main__":
    main()
