"""Reading the NAS over a real sshd: listing, odd names, symlinks, host keys."""

import os
import time
from pathlib import Path

import paramiko
import pytest

from craftflow_migrations.nas import listing as listing_module
from craftflow_migrations.nas.clients import HostKeyError, LocalNasClient, NasError
from craftflow_migrations.nas.clients.sftp import SftpNasClient, fingerprint
from craftflow_migrations.nas.listing import FOLDERS_AT_ONCE, list_nas

from .support import SshfsMount, can_mount_sshfs, most_at_once, noise_image

ODD_SHOP = "Ünïcode 'Shop' \"Q\" & co"
ODD_TEMPLATE = "Poster, 50×70 (matte)"


@pytest.fixture
def nas_tree(tmp_path):
    base = tmp_path / "Graphics"
    folder = base / ODD_SHOP / ODD_TEMPLATE
    (folder / "sub folder").mkdir(parents=True)
    noise_image(64, 48, 1).save(folder / "a design.png")
    noise_image(64, 48, 2).save(folder / "sub folder" / "b.png")
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / ".@__thumb").mkdir()
    (folder / ".@__thumb" / "t.png").write_bytes(b"thumb")
    (base / "Plain Shop" / "T1").mkdir(parents=True)
    noise_image(32, 32, 3).save(base / "Plain Shop" / "T1" / "x.png")
    (base / ".hidden shop" / "T").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    os.symlink(outside, folder / "escape")
    os.symlink(outside / "secret.png", folder / "escape.png")
    os.symlink(folder / "a design.png", folder / "alias.png")  # stays inside: followed
    return base


def open_sftp(sshd, base, **overrides):
    kwargs = dict(host="127.0.0.1", port=sshd.port, username=sshd.user, base_path=str(base),
                  key_file=str(sshd.user_key), known_hosts=str(sshd.known_hosts))
    kwargs.update(overrides)
    return SftpNasClient(**kwargs)


def open_client(backend, sshd, base):
    return open_sftp(sshd, base) if backend == "sftp" else LocalNasClient(base)


@pytest.mark.parametrize("backend", ["sftp", "local"])
def test_listing_ignores_hidden_entries_and_never_follows_links(backend, nas_tree, sshd):
    with open_client(backend, sshd, nas_tree) as client:
        listings, problems = list_nas(client)
        assert list(listings) == ["Plain Shop/T1", f"{ODD_SHOP}/{ODD_TEMPLATE}"]
        listing = listings[f"{ODD_SHOP}/{ODD_TEMPLATE}"]
        prefix = f"{ODD_SHOP}/{ODD_TEMPLATE}/"
        # alias.png points at a design.png, which is imported under its own path: once.
        assert [f.path for f in listing.files] == [prefix + "a design.png", prefix + "sub folder/b.png"]
        reasons = {p.path.removeprefix(prefix): p.reason for p in listing.problems}
        assert "outside NAS_BASE_PATH" in reasons["escape"] and "outside NAS_BASE_PATH" in reasons["escape.png"]
        assert "imported under its own path" in reasons["alias.png"]
        first = listing.files[0]
        assert client.read(first.rel) == (nas_tree / first.path).read_bytes()
        assert first.size == (nas_tree / first.path).stat().st_size


def test_listing_a_large_folder_takes_few_round_trips(tmp_path, sshd):
    folder = tmp_path / "G" / "Shop" / "Big"
    folder.mkdir(parents=True)
    for i in range(5000):
        (folder / f"f{i:05d}.png").write_bytes(b"x")
    client = open_sftp(sshd, tmp_path / "G")
    try:
        before = client.sftp.request_number
        files = list_nas(client, ["Shop/Big"])[0]["Shop/Big"].files
        requests = client.sftp.request_number - before
    finally:
        client.close()
    assert len(files) == 5000
    assert requests < 5000 / 50, f"{requests} SFTP requests for 5000 files"


def _recorded(obj, name: str, value) -> list:
    """Wrap the method ``obj.name``: after each call, ``value(*its arguments)`` is appended to the list returned."""
    seen, method = [], getattr(obj, name)

    def recording(*args, **kwargs):
        result = method(*args, **kwargs)
        seen.append(value(*args))
        return result

    setattr(obj, name, recording)
    return seen


def _as_compared(listings) -> dict:
    return {key: (li.files, li.problems, li.unlisted, li.missing, li.fingerprint) for key, li in listings.items()}


def test_many_partitions_listed_together_over_sftp_equal_the_local_listing(tmp_path, sshd):
    """Partitions are walked many at a time with their folders' requests in flight together;
    the listing is exactly the one-folder-at-a-time local one, problems and order included."""
    base = tmp_path / "G"
    for shop in range(40):
        for template in range(3):
            folder = base / f"Shop {shop:02d}" / f"T{template}"
            (folder / "sub" / "deeper").mkdir(parents=True)
            if (shop + template) % 7 == 0:
                continue  # an empty partition with empty subfolders
            for name in ("a.png", "b.png", "sub/c.png", "sub/deeper/d.png")[: 1 + (shop % 4)]:
                (folder / name).write_bytes(os.urandom(10 + shop))
            if shop % 5 == 0:
                os.symlink(".", folder / "sub" / "loop")
                os.symlink("/etc", folder / "outside")
    os.symlink(base / "Shop 01" / "T1", base / "Shop 02" / "linked template")
    (base / "Shop 03" / "a file, not a template").write_bytes(b"x")
    for path in base.rglob("*.png"):
        os.utime(path, (1_700_000_000, 1_700_000_000 + len(path.name)))  # SFTP v3 carries whole seconds
    client = open_sftp(sshd, base)
    in_flight = _recorded(client.requests, "send", lambda *_: len(client.requests.waiting))
    keys = ["Shop 39/T2", "Shop 00/T1", "Gone/Nowhere", "Shop 05/T0"]
    try:
        over_sftp, sftp_problems = list_nas(client)
        some_sftp = list_nas(client, keys)[0]
    finally:
        client.close()
    with LocalNasClient(base) as local:
        locally, local_problems = list_nas(local)
        some_local = list_nas(local, keys)[0]
    assert len(over_sftp) == 120 and sftp_problems == local_problems and len(local_problems) == 1
    assert _as_compared(over_sftp) == _as_compared(locally)
    assert list(some_sftp) == keys and _as_compared(some_sftp) == _as_compared(some_local)
    assert some_sftp["Gone/Nowhere"].missing
    assert max(in_flight) >= 16  # listed together, not one folder after another


def test_a_partition_of_many_subfolders_is_listed_with_its_folders_in_flight_together(tmp_path, sshd, monkeypatch):
    """A template folder of order folders (year/order/files, deeper folders, links, a loop) is
    listed a few dozen folders per exchange, never more than FOLDERS_AT_ONCE handles open at
    once, and equals the local listing and a one-folder-at-a-time walk, problems in the same
    order and the same fingerprint (an unchanged folder must stay unchanged)."""
    base = tmp_path / "G"
    orders = base / "Shop" / "Orders"
    for i in range(400):
        folder = orders / f"{2015 + i % 8}" / f"order {i:04d}"
        folder.mkdir(parents=True)
        for name in ("front.png", "back.png")[: 1 + i % 2]:
            (folder / name).write_bytes(os.urandom(5 + i % 7))
    (orders / "2016" / "order 0001" / "proofs" / "v1").mkdir(parents=True)
    (orders / "2016" / "order 0001" / "proofs" / "v1" / "p.png").write_bytes(b"proof")
    os.symlink("..", orders / "2017" / "order 0002" / "up")
    for i in range(0, 400, 37):
        os.symlink("front.png", orders / f"{2015 + i % 8}" / f"order {i:04d}" / "alias.png")
    os.mkfifo(orders / "2019" / "order 0004" / "pipe")
    (base / "Shop" / "Flat").mkdir()
    (base / "Shop" / "Flat" / "one.png").write_bytes(b"flat")
    for path in base.rglob("*.png"):
        os.utime(path, (1_700_000_000, 1_700_000_000))  # SFTP v3 carries whole seconds
    client = open_sftp(sshd, base)
    exchanges = _recorded(client, "scandir_each", len)
    try:
        over_sftp, _ = list_nas(client)
    finally:
        client.close()
    with LocalNasClient(base) as local:
        locally, _ = list_nas(local)
        monkeypatch.setattr(listing_module, "FOLDERS_AT_ONCE", 1)
        one_at_a_time, _ = list_nas(local)
    assert _as_compared(over_sftp) == _as_compared(locally) == _as_compared(one_at_a_time)
    listing = over_sftp["Shop/Orders"]
    assert len(listing.files) == 601 and listing.files[0].path == "Shop/Orders/2015/order 0000/front.png"
    reasons = [p.reason for p in listing.problems]
    assert len(reasons) == 13 and any("loop" in r for r in reasons) and any("not a regular file" in r for r in reasons)
    # 412 folders under the partition: a dozen exchanges, not 412 one after another.
    assert len(exchanges) <= 12 and max(exchanges) == FOLDERS_AT_ONCE, exchanges


def test_links_are_resolved_with_their_requests_in_flight_together(tmp_path, sshd):
    """Every kind of link (inside, outside, broken, a loop, to a folder, a chain) resolves as
    the local backend resolves it, a partition's links in one exchange, not two waits each, and
    so do shops and templates that are links."""
    base = tmp_path / "G"
    folder = base / "Shop" / "T"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"a")
    os.utime(folder / "a.png", (1_700_000_000, 1_700_000_000))  # SFTP v3 carries whole seconds
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"o")
    kinds = {"alias.png": "a.png", "chain.png": "alias.png", "out.png": str(outside), "broken.png": "gone.png",
             "loop.png": "loop.png", "dir link": "sub", "up": "..", "ping": "pong", "pong": "ping"}
    for i in range(30):
        for name, target in kinds.items():
            if i == 0 or name == "alias.png":
                os.symlink(target, folder / (name if i == 0 else f"{i} {name}"))
    os.symlink("Shop", base / "Alias Shop")  # a shop and a template that are links
    os.symlink("T", base / "Shop" / "Shared T")
    client = open_sftp(sshd, base)
    rels = sorted(p.relative_to(base).as_posix().encode() for p in folder.iterdir() if p.is_symlink())
    in_flight = _recorded(client.requests, "send", lambda *_: len(client.requests.waiting))
    calls = _recorded(client, "resolve_each", len)
    try:
        over_sftp = client.resolve_each(rels)
        listed, top = list_nas(client)
    finally:
        client.close()
    with LocalNasClient(base) as local:
        assert over_sftp == [local.resolve(rel) for rel in rels]
        locally, local_top = list_nas(local)
    assert _as_compared(listed) == _as_compared(locally) and top == local_top and len(top) == 2
    assert dict(zip(rels, over_sftp, strict=True))[b"Shop/T/chain.png"] == b"Shop/T/a.png"
    assert {over_sftp[rels.index(f"Shop/T/{n}".encode())] for n in ("broken.png", "loop.png", "ping")} == {None}
    assert max(in_flight) >= len(rels)  # all of them at once, not one after another
    assert calls == [len(rels), 2, len(rels)]  # the listing: the top level's links together, then the partition's


@pytest.mark.skipif(can_mount_sshfs() is not None, reason=str(can_mount_sshfs()))
def test_a_share_mounted_across_a_network_is_listed_with_its_folders_in_flight_together(tmp_path, sshd):
    """A NAS mounted over the network (here sshfs over the loopback sshd, as SMB or NFS would
    be) waits a round trip per folder: its folders are listed by threads, many at once, once
    the first ones show the waiting; a folder on this machine's own disk stays on one thread.
    Both list exactly the same, problems, odd names and fingerprints included."""
    base = tmp_path / "G"
    for shop in range(30):
        for template in range(2):
            folder = base / f"Shop {shop:02d}" / f"T{template}"
            for order in range(4):
                (folder / f"{2020 + order}" / f"order {order}").mkdir(parents=True)
                (folder / f"{2020 + order}" / f"order {order}" / "front.png").write_bytes(os.urandom(10 + order))
            (folder / "a.png").write_bytes(b"a")
            if shop % 5 == 0:
                os.symlink("a.png", folder / "alias.png")
                os.symlink("loop.png", folder / "2020" / "loop.png")  # (sshfs refuses to read a link to "../")
                (folder / "caf\xe9.png".encode("latin-1").decode("utf-8", "surrogateescape")).write_bytes(b"l1")
    os.symlink("Shop 00", base / "Alias Shop")
    for path in base.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (1_700_000_000, 1_700_000_000))  # SFTP v3 carries whole seconds
    with LocalNasClient(base) as local:
        locally_most = most_at_once(local, "scandir")
        locally, local_top = list_nas(local)
        assert local.share_waits is False and locally_most[0] == 1
    with SshfsMount(sshd, base, tmp_path / "mnt") as mounted_path, LocalNasClient(mounted_path) as mounted:
        most = most_at_once(mounted, "scandir")
        listed, top = list_nas(mounted)
        assert mounted.share_waits is True and most[0] > 4, most
    assert _as_compared(listed) == _as_compared(locally) and top == local_top
    assert sum(len(li.files) for li in listed.values()) == 60 * 5 + 12  # a.png, 4 orders, and 12 Latin-1 names
    reasons = {p.reason for li in listed.values() for p in li.problems}
    assert {"symbolic link that is broken or loops; not followed",
            "symbolic link to 'Shop 00/T0/a.png', imported under its own path; not followed"} <= reasons


def test_unknown_host_key_is_refused_with_how_to_trust_it(nas_tree, sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError, match=r"Unknown SSH host key for \[127.0.0.1\]:\d+ .*ssh-keyscan -p \d+ 127.0.0.1"):
        open_sftp(sshd, nas_tree, known_hosts=str(empty))


def test_changed_host_key_is_refused(nas_tree, sshd, tmp_path):
    other = paramiko.Ed25519Key.from_private_key_file(str(sshd.user_key))  # any other ed25519 key
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 {other.get_base64()}\n")
    with pytest.raises(HostKeyError, match="CHANGED"):
        open_sftp(sshd, nas_tree, known_hosts=str(wrong))


def test_pinned_fingerprint(nas_tree, sshd, tmp_path):
    host_key = paramiko.Ed25519Key.from_private_key_file(str(sshd.host_key))
    client = open_sftp(sshd, nas_tree, known_hosts=str(tmp_path / "none"), host_key_fingerprint=fingerprint(host_key))
    client.close()
    with pytest.raises(HostKeyError, match="not the pinned QNAP_HOST_KEY_FINGERPRINT"):
        open_sftp(sshd, nas_tree, host_key_fingerprint="SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")


def test_unreachable_host_and_bad_login_name_the_host(nas_tree, sshd, tmp_path):
    from .support import free_port

    port = free_port()
    with pytest.raises(NasError, match=rf"Cannot reach NAS 127.0.0.1:{port}"):
        open_sftp(sshd, nas_tree, port=port)
    import subprocess

    key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with pytest.raises(NasError, match=r"refused the login .* check QNAP_USERNAME"):
        open_sftp(sshd, nas_tree, key_file=str(key))


def test_password_login(sshd):
    if not sshd.password_user:
        pytest.fail("password logins need a throwaway account, which only root can create here")
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="cfm-pw-"))  # readable by the throwaway account
    try:
        (base / "Shop" / "T1").mkdir(parents=True)
        noise_image(32, 32, 5).save(base / "Shop" / "T1" / "x.png")
        for path in [base, *base.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        client = SftpNasClient("127.0.0.1", sshd.port, sshd.password_user, str(base), password=sshd.password,
                               known_hosts=str(sshd.known_hosts))
        try:
            assert list(list_nas(client)[0]) == ["Shop/T1"]
            assert client.read(b"Shop/T1/x.png") == (base / "Shop" / "T1" / "x.png").read_bytes()
        finally:
            client.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    with pytest.raises(NasError, match="refused the login of 'cfm_sftp_test': check QNAP_USERNAME and QNAP_PASSWORD"):
        SftpNasClient("127.0.0.1", sshd.port, sshd.password_user, "/", password="wrong",
                      known_hosts=str(sshd.known_hosts))


def test_reads_use_aes_gcm_and_the_servers_read_limit(tmp_path, sshd, monkeypatch):
    from craftflow_migrations.nas.clients import sftp as nas_client

    base = tmp_path / "G"
    (base / "S" / "T").mkdir(parents=True)
    payload = os.urandom(3 * 1024 * 1024 + 12345)
    (base / "S" / "T" / "big.bin").write_bytes(payload)
    (base / "S" / "T" / "small.bin").write_bytes(payload[:1000])
    # Ask for more per request than OpenSSH serves (255 KB): the client must notice the short
    # answer and use the server's size, or prefetched chunks would leave holes.
    monkeypatch.setattr(nas_client, "READ_REQUEST_SIZE", 1024 * 1024)
    client = open_sftp(sshd, base)
    try:
        assert client.transport.remote_cipher.endswith("-gcm@openssh.com")
        assert client.read(b"S/T/small.bin") == payload[:1000]
        assert client.read(b"S/T/big.bin") == payload
        assert 4096 <= client.read_request_size < 1024 * 1024
        assert client.read(b"S/T/big.bin") == payload  # the probed size, reused
    finally:
        client.close()


def _descendants_open_fds(pid: int) -> int:
    """Open file descriptors of every process under ``pid`` (sshd's sessions, internal-sftp)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        todo.extend(children.get(child, []))
        try:
            total += len(os.listdir(f"/proc/{child}/fd"))
        except OSError:
            pass
    return total


def test_local_reads_are_the_file_as_it_is_now(tmp_path):
    """Grown, shrunk or emptied since the listing, read alone or in groups on the share's
    threads: the whole file as it is now. A file replaced since by a link or a named pipe is
    that file's error at once (a pipe was waited on forever: no writer ever comes)."""
    folder = tmp_path / "G" / "S" / "T"
    folder.mkdir(parents=True)
    payload = os.urandom(3 * 1024 * 1024)
    files = {"exact.bin": payload[:1000], "grew.bin": payload[:5000], "shrank.bin": payload[:10],
             "emptied.bin": b"", "empty.bin": b"", "large.bin": payload}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    listed = {"exact.bin": 1000, "grew.bin": 1000, "shrank.bin": 1000, "emptied.bin": 1000, "empty.bin": 0,
              "large.bin": 1024 * 1024}
    os.symlink("exact.bin", folder / "now a link.bin")
    os.mkfifo(folder / "now a pipe.bin")
    with LocalNasClient(tmp_path / "G") as client:
        for name, size in listed.items():
            assert client.read(f"S/T/{name}".encode(), size) == files[name], name
            assert client.read(f"S/T/{name}".encode()) == files[name], name
        for name in ("now a link.bin", "now a pipe.bin"):
            with pytest.raises(OSError):
                client.read(f"S/T/{name}".encode(), 10)
        for waits in (None, True):
            client.share_waits = waits
            wanted = [*listed.items(), ("now a pipe.bin", 10), ("missing.bin", 10), *listed.items()]
            got = list(client.read_each((f"S/T/{name}".encode(), size) for name, size in wanted))
            for (name, _), (data, error) in zip(wanted, got, strict=True):
                if name == "missing.bin":
                    assert data is None and isinstance(error, FileNotFoundError)
                elif name == "now a pipe.bin":
                    assert data is None and "no longer a regular file" in str(error)
                else:
                    assert (data, error) == (files[name], None), name


def test_small_reads_trust_the_listing_only_as_far_as_the_file_agrees(tmp_path, sshd, monkeypatch):
    """A small file of known size is read with an open, one read and a close not waited for,
    and is still the whole file as it is now: grown, shrunk or emptied since the listing,
    or capped by a server that serves less per request than asked."""
    from craftflow_migrations.nas.clients import sftp as nas_client

    folder = tmp_path / "G" / "S" / "T"
    folder.mkdir(parents=True)
    payload = os.urandom(400 * 1024)
    files = {"exact.bin": payload[:1000], "grew.bin": payload[:5000], "shrank.bin": payload[:10],
             "emptied.bin": b"", "empty.bin": b""}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    listed = {"exact.bin": 1000, "grew.bin": 1000, "shrank.bin": 1000, "emptied.bin": 1000, "empty.bin": 0}
    client = open_sftp(sshd, tmp_path / "G")
    try:
        for name, size in listed.items():
            assert client.read(f"S/T/{name}".encode(), size) == files[name], name
        # The same files with their requests in flight together, a missing one among them.
        wanted = [*listed.items(), ("missing.bin", 10), *listed.items()]
        got = list(client.read_each((f"S/T/{name}".encode(), size) for name, size in wanted))
        for (name, _), (data, error) in zip(wanted, got, strict=True):
            if name == "missing.bin":
                assert data is None and isinstance(error, FileNotFoundError)
            else:
                assert (data, error) == (files[name], None), name
        before = client.sftp.request_number
        assert client.read(b"S/T/exact.bin", 1000) == files["exact.bin"]
        assert client.sftp.request_number - before == 3  # open, read, close
        with pytest.raises(IOError):
            client.read(b"S/T/missing.bin", 10)

        # Close replies are consumed with later requests, and the server really closes each
        # handle: hundreds of reads leave neither replies waiting nor files open.
        for i in range(300):
            (folder / f"f{i}.bin").write_bytes(payload[i:i + 100])
        fds = _descendants_open_fds(sshd.proc.pid)
        for i in range(300):
            assert client.read(f"S/T/f{i}.bin".encode(), 100) == payload[i:i + 100]
        assert not client.requests.waiting and not client.requests.replies and not client.sftp._expecting
        assert _descendants_open_fds(sshd.proc.pid) <= fds + 2
        # In groups, with a large file (pipelined on its own) between them.
        (folder / "large.bin").write_bytes(payload * 2)
        names = [f"f{i}.bin" for i in range(150)] + ["large.bin"] + [f"f{i}.bin" for i in range(150, 300)]
        got = list(client.read_each((f"S/T/{n}".encode(), (folder / n).stat().st_size) for n in names))
        assert [data for data, _ in got] == [(folder / n).read_bytes() for n in names]
        assert not client.requests.waiting and not client.requests.replies and not client.sftp._expecting
        assert _descendants_open_fds(sshd.proc.pid) <= fds + 2

        # Asking more per request than OpenSSH serves (255 KB): the short answer is read on.
        (folder / "capped.bin").write_bytes(payload)
        monkeypatch.setattr(nas_client, "READ_REQUEST_SIZE", 1024 * 1024)
        client.read_request_size = None
        assert client.read(b"S/T/capped.bin", len(payload)) == payload
        assert list(client.read_each([(b"S/T/capped.bin", len(payload))] * 2)) == [(payload, None)] * 2
    finally:
        client.close()


def test_small_reads_over_a_link_that_drops_never_return_short_bytes(tmp_path, sshd):
    """Cut midway, every file either came back as its exact bytes or with an error: a dropped
    connection is never taken for a file's end, and the reads end there."""
    from .proxy import DroppingProxy

    folder = tmp_path / "G" / "S" / "T"
    folder.mkdir(parents=True)
    files = {f"f{i:03d}.bin": os.urandom(9000) for i in range(200)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    proxy = DroppingProxy(sshd.port, drop_connection=1, drop_after_bytes=300 * 1024)
    known = sshd.known_hosts.read_text().replace(f"[127.0.0.1]:{sshd.port}", f"[127.0.0.1]:{proxy.port}")
    (tmp_path / "known_hosts").write_text(known)
    client = open_sftp(sshd, tmp_path / "G", port=proxy.port, known_hosts=str(tmp_path / "known_hosts"))
    got, errors = {}, {}
    try:
        names = list(files)
        for name, (data, error) in zip(names, client.read_each((f"S/T/{n}".encode(), 9000) for n in names),
                                       strict=True):
            if error is None:
                got[name] = data
            else:
                errors[name] = error
        assert not client.connected()
    finally:
        client.close()
        proxy.close()
    assert proxy.dropped == 1 and got and errors and len(got) + len(errors) == len(files)
    assert all(got[name] == files[name] for name in got)
    assert min(errors) > max(got)  # nothing read after the drop


def test_buffered_socket_serves_small_reads_from_one_large_read():
    import socket

    from craftflow_migrations.nas.clients.sftp import BufferedSocket

    a, b = socket.socketpair()
    try:
        payload = os.urandom(100_000)
        a.sendall(payload)
        sock = BufferedSocket(b)
        got = sock.recv(4)
        while len(got) < len(payload):
            got += sock.recv(min(32_768, len(payload) - len(got)))
        assert got == payload
        a.sendall(b"xy")
        assert sock.recv(1) == b"x" and sock.recv(10) == b"y"
        sock.settimeout(0.05)
        with pytest.raises(TimeoutError):
            sock.recv(1)
    finally:
        a.close()
        b.close()


def test_requests_in_flight_together_go_out_in_few_writes(tmp_path, sshd):
    """The listing's and the small reads' requests leave in bursts, not a packet each, and the
    server holds no handle once a burst is done."""
    base = tmp_path / "G"
    for shop in range(10):
        for template in range(20):
            (base / f"S{shop}" / f"T{template}").mkdir(parents=True)
            (base / f"S{shop}" / f"T{template}" / "a.png").write_bytes(os.urandom(300 + template))
    client = open_sftp(sshd, base)
    channel = client.sftp.sock
    writes = _recorded(channel._channel, "sendall", len)
    try:
        fds = _descendants_open_fds(sshd.proc.pid)
        before = client.sftp.request_number
        files = [f for li in list_nas(client)[0].values() for f in li.files]
        listing_requests = client.sftp.request_number - before
        listing_writes = len(writes)
        assert len(files) == 200 and listing_writes * 8 < listing_requests, (listing_writes, listing_requests)
        writes.clear()
        before = client.sftp.request_number
        got = list(client.read_each((f.rel, f.size) for f in files))
        read_requests = client.sftp.request_number - before
        assert [data for data, _ in got] == [(base / f.path).read_bytes() for f in files]
        assert len(writes) * 8 < read_requests, (len(writes), read_requests)
        assert not channel._held
        # The closes are sent, not waited for: a busy server may take a moment to process them.
        deadline = time.monotonic() + 10
        while _descendants_open_fds(sshd.proc.pid) > fds + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _descendants_open_fds(sshd.proc.pid) <= fds + 2
    finally:
        client.close()


def test_a_request_sent_while_another_thread_waits_goes_out_at_once(tmp_path, sshd):
    """paramiko's prefetch thread sends the requests a reading thread is already waiting on:
    held back for a burst, they would never be answered."""
    import threading

    from paramiko.sftp import CMD_STAT

    (tmp_path / "G").mkdir()
    (tmp_path / "G" / "f.bin").write_bytes(b"x" * 10)
    client = open_sftp(sshd, tmp_path / "G")
    sftp, answered = client.sftp, []
    try:
        number = sftp.request_number
        sftp._expecting[number] = type(None)  # as _async_request registers it, before sending
        waiter = threading.Thread(target=lambda: answered.append(sftp._read_response(number)), daemon=True)
        waiter.start()
        deadline = time.monotonic() + 5
        while not sftp.sock._waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        del sftp._expecting[number]
        assert sftp._async_request(type(None), CMD_STAT, client._abs(b"f.bin")) == number
        waiter.join(timeout=10)
        assert answered and answered[0][0] is not None
    finally:
        client.close()


def test_requests_share_the_connection_with_paramikos_own(tmp_path, sshd):
    """A reply to one of paramiko's requests (a large file's prefetch) read while waiting for
    our own is handed to its owner; a close's reply nobody waits for is dropped."""
    from paramiko.sftp import CMD_ATTRS, CMD_STAT

    from craftflow_migrations.nas.clients.sftp import _string

    (tmp_path / "G").mkdir()
    (tmp_path / "G" / "f.bin").write_bytes(b"x" * 10)
    client = open_sftp(sshd, tmp_path / "G")

    class Owner:
        got: list = []

        def _async_response(self, kind, msg, number):
            self.got.append((kind, number))

    owner = Owner()
    try:
        theirs = client.sftp._async_request(owner, CMD_STAT, client._abs(b"f.bin"))
        client._close_unwaited([b"no such handle"])
        ours = client.requests.send(CMD_STAT, _string(client._abs(b"f.bin")))
        assert client.requests.reply(ours)[0] == CMD_ATTRS
        assert owner.got == [(CMD_ATTRS, theirs)] and theirs not in client.sftp._expecting
        assert not client.requests.waiting and not client.requests.replies
        assert client.read(b"f.bin", 10) == b"x" * 10  # the stream is still in step
    finally:
        client.close()


def _name_reply(entries: list[tuple[bytes, dict]]) -> bytes:
    """A READDIR reply (after its request number), each entry's attributes packed by paramiko
    (its flags say which fields are there: only those given)."""
    msg = paramiko.Message()
    msg.add_int(len(entries))
    for name, fields in entries:
        msg.add_string(name)
        msg.add_string(b"-rw-r--r-- 1 u g " + name)
        attr = paramiko.SFTPAttributes()
        for field, value in fields.items():
            setattr(attr, field, value)
        attr._pack(msg)
    return msg.asbytes()


def test_readdir_replies_are_read_as_paramiko_reads_them():
    import stat

    from craftflow_migrations.nas.clients.sftp import _entries

    full = {"st_size": 5 * 2**32 + 7, "st_uid": 0xFFFFFFFE, "st_gid": 100, "st_mode": stat.S_IFREG | 0o644,
            "st_atime": 1, "st_mtime": 1_700_000_123}
    extended = {**full, "attr": {b"a@x": b"1", b"b@x": b"\xff" * 40}}
    entries = [
        (b".", {**extended, "st_mode": stat.S_IFDIR | 0o755}),
        (b"..", {**full, "st_mode": stat.S_IFDIR | 0o755}),
        ("café.png".encode("latin-1"), extended),
        (b"folder", {"st_mode": stat.S_IFDIR | 0o700, "st_atime": 1, "st_mtime": 1_700_000_000}),
        (b"link", {**full, "st_mode": stat.S_IFLNK | 0o777}),
        (b"fifo", {**full, "st_mode": stat.S_IFIFO | 0o600}),
        (b"no attributes", {}),
        (b"size only", {"st_size": 42}),
    ]
    data = _name_reply(entries)
    expected = []
    reference = paramiko.Message(data)
    for _ in range(reference.get_int()):
        name, _ = reference.get_string(), reference.get_string()
        attr = paramiko.SFTPAttributes._from_msg(reference)
        if name not in (b".", b".."):
            expected.append((name, attr.st_mode or 0, attr.st_size or 0, (attr.st_mtime or 0) * 1_000_000))
    got = _entries(data)
    assert [(e.name, e.size, e.mtime_us) for e in got] == [(n, s, m) for n, _, s, m in expected]
    assert [e.kind for e in got] == ["file", "dir", "link", "other", "other", "other"]
    # Cut anywhere, a reply is an error for its folder, never entries of zeros.
    for cut in range(len(data)):
        with pytest.raises(OSError, match="malformed READDIR reply"):
            _entries(data[:cut])


def test_a_listing_left_by_a_killed_worker_is_removed_by_a_later_save(tmp_path):
    from datetime import datetime, timezone

    from craftflow_migrations.nas.listing import STALE_LISTING_S, SavedListing, load_listing, save_listing

    folder = tmp_path / "storage" / "listings"
    folder.mkdir(parents=True)
    stale, recent = folder / "listing-killed.pickle", folder / "listing-running.pickle"
    half_written = folder / "listing-killed-mid-write.tmp"
    for path in (stale, recent, half_written):
        path.write_bytes(b"")
    for path in (stale, half_written):
        os.utime(path, (time.time() - STALE_LISTING_S - 60,) * 2)
    saved = save_listing(folder, SavedListing(datetime.now(timezone.utc), {}))
    assert sorted(p.name for p in folder.iterdir()) == sorted([saved.name, recent.name])
    assert load_listing(str(saved), []).partitions == {}
