"""How a batch reads its files: inline where reads are cheap, on a thread where they wait.

Real files in a real folder; the slow share is a local folder whose reads take as long as a
mounted share's over a real network, which is what the switch is for.
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from craftflow_migrations.nas import importer
from craftflow_migrations.nas.clients import LocalNasClient
from craftflow_migrations.nas.importer import fetch_in_order
from craftflow_migrations.nas.listing import NasFile, list_nas

from .support import SshfsMount, can_mount_sshfs, most_at_once, noise_image


class SlowShare(LocalNasClient):
    """A folder answering like a share across a network: 3 ms before each file's bytes."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.announces_reads = False  # as for an nfs, cifs or sshfs mount

    def read(self, rel: bytes, size: int | None = None) -> bytes:
        time.sleep(0.003)
        return super().read(rel, size)


def listed(root: Path) -> list[NasFile]:
    """The files as the import gets them: from the project's own listing, in path order."""
    listings, _ = list_nas(LocalNasClient(root))
    return sorted((f for li in listings.values() for f in li.files), key=lambda f: f.path)


def small_files(root: Path, count: int, size: tuple[int, int] = (48, 32)) -> list[NasFile]:
    folder = root / "Shop" / "All"
    folder.mkdir(parents=True)
    for i in range(count):
        noise_image(*size, seed=i, mode="RGB").save(folder / f"d{i:04d}.png")
    return listed(root)


@pytest.fixture
def threads_started(monkeypatch) -> list[int]:
    """How many files each read-ahead thread was given."""
    started: list[int] = []
    original = importer.ReadAhead.__init__

    def spy(self, client, files, budget):
        started.append(len(files))
        original(self, client, files, budget)

    monkeypatch.setattr(importer.ReadAhead, "__init__", spy)
    return started


def consume(reads, work_s: float = 0.0, holding_gil: bool = False) -> list[tuple[str, bytes | None, str | None]]:
    out = []
    for f, data, error in reads:
        if work_s and holding_gil:  # the caller's hashing, as Python code between the C calls
            until = time.perf_counter() + work_s
            while time.perf_counter() < until:
                pass
        elif work_s:
            time.sleep(work_s)  # the caller's hashing
        out.append((f.path, data, type(error).__name__ if error else None))
    return out


def test_cheap_local_reads_stay_on_the_hashing_thread(tmp_path, threads_started):
    files = small_files(tmp_path, 300)
    got = consume(fetch_in_order(LocalNasClient(tmp_path), files, 1 << 20), work_s=0.0005)
    assert [p for p, _, _ in got] == [f.path for f in files]
    assert all(data == (tmp_path / p).read_bytes() for p, data, _ in got)
    assert threads_started == []


def test_a_share_that_makes_reads_wait_moves_them_to_the_thread(tmp_path, threads_started):
    files = small_files(tmp_path, 300)
    got = consume(fetch_in_order(SlowShare(tmp_path), files, 1 << 20), work_s=0.0005)
    assert [p for p, _, _ in got] == [f.path for f in files]
    assert threads_started == [300 - 64]  # after one window of 64 files, the rest, in order


class HalfCached(LocalNasClient):
    """A folder half of which has left the page cache: every other read waits on the disk."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.reads = 0

    def read(self, rel: bytes, size: int | None = None) -> bytes:
        self.reads += 1
        if self.reads % 2:
            time.sleep(0.003)
        return super().read(rel, size)


def test_a_folder_half_out_of_the_page_cache_stays_inline(tmp_path, threads_started):
    """Half the reads waiting is not a share that makes reads wait: the thread's hand-overs
    would cost every file, and on busy cores another step uses the core while one waits."""
    files = small_files(tmp_path, 300)
    got = consume(fetch_in_order(HalfCached(tmp_path), files, 1 << 20), work_s=0.0005)
    assert [p for p, _, _ in got] == [f.path for f in files]
    assert threads_started == []


class ColdDisk(LocalNasClient):
    """A local disk whose cache is cold: a read waits ``wait_s`` (0.2 ms) unless the file was
    announced (``will_read``, the kernel's read-ahead) before it."""

    def __init__(self, base: Path, announcing_helps: bool = True, wait_s: float = 0.0002) -> None:
        super().__init__(base)
        self.announces_reads = True  # a local file system, wherever the test's folder is
        self.announcing_helps, self.wait_s = announcing_helps, wait_s
        self.announced: list[bytes] = []
        self.calls = 0
        self.waited = 0

    def will_read(self, rels) -> None:
        self.calls += 1
        self.announced += rels
        if not self.announcing_helps:
            time.sleep(self.wait_s * len(rels))  # a share whose opens wait as long as its reads

    def read(self, rel: bytes, size: int | None = None) -> bytes:
        if not (self.announcing_helps and rel in self.announced):
            self.waited += 1
            time.sleep(self.wait_s)
        return super().read(rel, size)


def test_reads_from_a_cold_disk_are_announced_a_window_ahead(tmp_path, threads_started):
    """Too fast for the thread, too slow for the page cache: after one window of 64 reads, every
    later file is announced before its read, once, in order, and no read waits any more."""
    files = small_files(tmp_path, 300)
    client = ColdDisk(tmp_path)
    got = consume(fetch_in_order(client, files, 1 << 20), work_s=0.002)
    assert [p for p, _, _ in got] == [f.path for f in files]
    assert all(data == (tmp_path / p).read_bytes() for p, data, _ in got)
    assert threads_started == []
    assert client.announced == [f.rel for f in files[64:]] and client.waited == 64
    assert 2 <= client.calls <= 5  # a window at a time, not a call per file

    warm = ColdDisk(tmp_path)
    consume(fetch_in_order(warm, files, 1 << 20, cold_read_s=1.0), work_s=0.002)  # reads all "cached"
    assert warm.announced == []
    # The real announcement: a missing file or a folder among them is left to its read.
    (tmp_path / "Shop" / "All" / "sub").mkdir()
    LocalNasClient(tmp_path).will_read([b"Shop/All/gone.png", b"Shop/All/sub", files[0].rel])


def test_announcing_stops_where_it_does_not_make_reads_cheaper(tmp_path, threads_started):
    files = small_files(tmp_path, 300)
    client = ColdDisk(tmp_path, announcing_helps=False)
    got = consume(fetch_in_order(client, files, 1 << 20), work_s=0.002)
    assert len(got) == 300 and threads_started == []
    assert len(client.announced) <= 64 + 128  # judged after the window it was tried on, then stopped


def test_a_cold_disk_slower_than_the_hashing_is_announced_before_the_thread_is(tmp_path, threads_started):
    """Right after a cache is dropped a local disk's first reads can take longer than the
    hashing (0.28 ms against 0.17 on one machine): announcing is tried for a window first, and
    the thread, whose hand-overs cost every file, is not started where it made reads cheap."""
    files = small_files(tmp_path, 300)
    client = ColdDisk(tmp_path, wait_s=0.002)
    got = consume(fetch_in_order(client, files, 1 << 20), work_s=0.0005)
    assert [p for p, _, _ in got] == [f.path for f in files]
    assert threads_started == [] and client.waited == 64

    # Where announcing made reads no cheaper, the thread takes over after the window it was tried on.
    client = ColdDisk(tmp_path, announcing_helps=False, wait_s=0.002)
    got = consume(fetch_in_order(client, files, 1 << 20), work_s=0.0005)
    assert [p for p, _, _ in got] == [f.path for f in files]
    assert threads_started == [300 - 128] and len(client.announced) <= 2 * 128


def test_only_a_local_file_system_is_announced_first(tmp_path):
    """The file system under NAS_BASE_PATH, read from /proc/self/mountinfo: the innermost
    mount, the latest over the same point, escaped names unescaped."""
    from craftflow_migrations.nas.clients.local import filesystem_in, filesystem_of

    mountinfo = (b"22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
                 b"30 22 0:40 / /mnt/qnap\\040designs rw,relatime shared:9 - cifs //qnap/designs rw\n"
                 b"31 30 0:41 / /mnt/qnap\\040designs/cache rw - tmpfs tmpfs rw\n"
                 b"32 22 0:42 / /srv/nas rw - ext4 /dev/vdb rw\n"
                 b"33 22 0:43 / /srv/nas rw - nfs4 qnap:/share rw\n")
    assert filesystem_in(mountinfo, b"/mnt/qnap designs/Shop/All") == "cifs"
    assert filesystem_in(mountinfo, b"/mnt/qnap designs/cache") == "tmpfs"
    assert filesystem_in(mountinfo, b"/mnt/qnap designsX") == "ext4"  # a name that only begins alike
    assert filesystem_in(mountinfo, b"/srv/nas/Shop") == "nfs4"  # mounted over the ext4 one
    assert filesystem_of(b"/proc/self") == "proc"
    assert LocalNasClient(tmp_path).announces_reads == (filesystem_of(os.fsencode(tmp_path)) in
                                                        ("ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs"))


def test_large_files_are_read_ahead_from_the_start(tmp_path, threads_started):
    """On one read-ahead thread: the small files among them too, on a local disk (while a batch
    hashes, a read's wall time includes waiting for the GIL, which says nothing of the disk)."""
    folder = tmp_path / "Shop" / "Big"
    folder.mkdir(parents=True)
    for i in range(3):
        noise_image(1200, 900, seed=i, mode="RGB").save(folder / f"big{i}.png", compress_level=0)
    for i in range(20):
        noise_image(16, 16, seed=i, mode="RGB").save(folder / f"small{i:02d}.png")
    files = listed(tmp_path)
    assert sum(f.size for f in files) / len(files) > 256 * 1024
    client = LocalNasClient(tmp_path)
    most = most_at_once(client, "read")
    got = consume(fetch_in_order(client, files, 1 << 30), work_s=0.002, holding_gil=True)
    assert [p for p, _, _ in got] == [f.path for f in files]
    assert threads_started == [23] and most[0] == 1 and client.share_waits is None


def test_sequential_mode_never_starts_a_thread(tmp_path, threads_started):
    files = small_files(tmp_path, 200)
    got = consume(fetch_in_order(SlowShare(tmp_path), files, 1 << 20, may_thread=False))
    assert len(got) == 200 and threads_started == []


def test_a_file_that_cannot_be_read_is_handed_over_inline_as_on_the_thread(tmp_path, threads_started):
    files = small_files(tmp_path, 10)
    (tmp_path / files[3].path).unlink()
    for client in (LocalNasClient(tmp_path), SlowShare(tmp_path)):
        got = consume(fetch_in_order(client, files, 1 << 20, window_files=5), work_s=0.0005)
        assert [p for p, _, _ in got] == [f.path for f in files]
        assert got[3][1:] == (None, "FileNotFoundError")
        assert all(error is None for _, _, error in got[:3] + got[4:])
    assert threads_started == [5]  # the slow share, after its first window


def test_thumbnail_inputs_are_unchanged_by_the_way_files_are_read(tmp_path):
    files = small_files(tmp_path, 80, size=(300, 200))
    inline = consume(fetch_in_order(LocalNasClient(tmp_path), files, 1 << 20))
    threaded = consume(fetch_in_order(SlowShare(tmp_path), files, 1 << 20, window_files=8))
    assert inline == threaded
    assert Image.open(io.BytesIO(inline[0][1])).size == (300, 200)


def test_reads_timed_while_the_writer_is_busy_do_not_count(tmp_path, threads_started):
    """A flush being encoded makes every read wait for the GIL: those reads say nothing about
    the NAS. Here the writer is busy for the first 150 files of a slow share; the thread
    starts only after a whole window of 64 files read while it was idle."""
    files = small_files(tmp_path, 300)
    seen = 0

    def writer_idle() -> bool:
        return seen >= 150

    got = []
    for f, _data, _error in fetch_in_order(SlowShare(tmp_path), files, 1 << 20, fair=writer_idle):
        time.sleep(0.0005)
        seen += 1
        got.append(f.path)
    assert got == [f.path for f in files]
    # Files 150-213 are the first window timed: the thread takes the rest from file 214.
    assert threads_started == [300 - 150 - 64]


def test_a_page_cache_folder_stays_inline_while_a_writer_holds_the_gil(tmp_path, threads_started):
    """The real case: a thread running Python (as the writer encoding a flush does) while
    cheap local reads go on; told so by ``fair``, the reads stay on the hashing thread."""
    files = small_files(tmp_path, 300)
    busy = threading.Event()
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            busy.set()
            deadline = time.perf_counter() + 0.05
            while time.perf_counter() < deadline:
                pass  # holds the GIL, as encoding a COPY stream does
            busy.clear()
            time.sleep(0.01)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        got = consume(fetch_in_order(LocalNasClient(tmp_path), files, 1 << 20, fair=lambda: not busy.is_set()),
                      work_s=0.0005)
    finally:
        stop.set()
        thread.join()
    assert [p for p, _, _ in got] == [f.path for f in files]
    assert threads_started == []


def test_sftp_reads_go_to_the_thread_from_the_first_file(tmp_path, sshd, threads_started):
    """Every SFTP read waits a round trip: no window of files is timed inline first."""
    from .test_nas_client import open_sftp

    files = small_files(tmp_path, 40)
    client = open_sftp(sshd, tmp_path)
    try:
        got = consume(fetch_in_order(client, files, 1 << 20))
    finally:
        client.close()
    assert [data for _, data, _ in got] == [(tmp_path / f.path).read_bytes() for f in files]
    assert threads_started == [40]


@pytest.mark.skipif(can_mount_sshfs() is not None, reason=str(can_mount_sshfs()))
def test_a_mounted_share_reads_its_small_files_many_at_once(tmp_path, sshd, threads_started):
    """A share mounted across a network (sshfs over the loopback sshd): once a window of reads
    shows the waits, the read-ahead thread reads small files in groups on the share's threads,
    a large file alone; every file's bytes and errors as read one by one, in order."""
    files = small_files(tmp_path / "nas", 300)
    big = tmp_path / "nas" / "Shop" / "All" / "zz big.png"
    noise_image(700, 500, seed=9, mode="RGB").save(big, compress_level=0)
    files = listed(tmp_path / "nas")
    (tmp_path / "nas" / files[200].path).unlink()  # gone since the listing
    with SshfsMount(sshd, tmp_path / "nas", tmp_path / "mnt") as mounted, LocalNasClient(mounted) as client:
        most = most_at_once(client, "read")
        got = consume(fetch_in_order(client, files, 8 << 20), work_s=0.0002)
        assert client.share_waits is True
    assert [p for p, _, _ in got] == [f.path for f in files] and files[-1].path.endswith("zz big.png")
    assert got[200][1:] == (None, "FileNotFoundError")
    assert all(data == (tmp_path / "nas" / p).read_bytes() for p, data, _ in got[:200] + got[201:])
    assert threads_started == [len(files) - 64] and most[0] > 4, most
