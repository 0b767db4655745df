"""Real services for the tests: PostgreSQL databases, an OpenSSH sshd, generated images."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg2
from PIL import Image
from sqlalchemy.engine import make_url

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _reachable(url: str) -> bool:
    try:
        psycopg2.connect(url, connect_timeout=3).close()
        return True
    except psycopg2.OperationalError:
        return False


class PostgresServer:
    """The machine's PostgreSQL, or an embedded one (pgserver) where none runs."""

    def __init__(self) -> None:
        self.admin_url = os.environ.get("CRAFTFLOW_TEST_PG_ADMIN_URL", DEFAULT_ADMIN_URL)
        self._embedded = None
        if not _reachable(self.admin_url):
            import pgserver

            self._dir = tempfile.mkdtemp(prefix="cfm-pg-")
            self._embedded = pgserver.get_server(self._dir, cleanup_mode="stop")
            self.admin_url = self._embedded.get_uri()

    def _admin_execute(self, sql: str) -> None:
        # CREATE/DROP DATABASE refuse a transaction block, hence autocommit.
        conn = psycopg2.connect(self.admin_url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def create_database(self, prefix: str = "cfm_test", template: str | None = None) -> str:
        """A new database; ``template``: a copy of that database (nothing may be connected to it)."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        copy = f' TEMPLATE "{make_url(template).database}"' if template else ""
        self._admin_execute(f'CREATE DATABASE "{name}"{copy}')
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        self._admin_execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')

    def stop(self) -> None:
        if self._embedded is not None:
            self._embedded.cleanup()
            shutil.rmtree(self._dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SshServer:
    """OpenSSH's sshd on a loopback port with throwaway host and user keys."""

    def __init__(self, workdir: Path) -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not Path(sshd).exists():
            raise RuntimeError("sshd is not installed: run scripts/setup.sh (apt-get install openssh-server)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.user_key = self.dir / "id_ed25519"
        for key in (self.host_key, self.user_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (self.dir / "authorized_keys").write_text(Path(f"{self.user_key}.pub").read_text())
        self.user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        self.password_user, self.password = self._password_account()
        config = self.dir / "sshd_config"
        config.write_text(
            f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.dir}/authorized_keys
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication {"yes" if self.password_user else "no"}
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
AllowUsers {self.user}{" " + self.password_user if self.password_user else ""}
Subsystem sftp internal-sftp
LogLevel ERROR
MaxStartups 50
MaxSessions 50
"""
        )
        self._command = [sshd, "-D", "-e", "-f", str(config)]
        self.start()
        self.known_hosts = self.dir / "known_hosts"
        pub = Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")

    def start(self) -> None:
        """Start (or restart, on the same port) the server."""
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self._command, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sshd exited: {self.proc.stderr.read().decode()}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """What a NAS reboot does: the server and every open session gone at once."""
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()

    _account: tuple[str | None, str | None] | None = None

    @classmethod
    def _password_account(cls) -> tuple[str | None, str | None]:
        """A throwaway local account for password logins (root only: it edits /etc/shadow).

        Set once per test process: every server started here shares it, and a second server
        (the fault tests start their own) must not change the password the first one hands out.
        Processes share it too, through a root-only file under a lock: two test runs (or a test
        run and a benchmark) on one machine setting passwords of their own broke each other's
        logins.
        """
        if cls._account is not None:
            return cls._account
        if os.geteuid() != 0 or not shutil.which("useradd"):
            cls._account = (None, None)
            return cls._account
        import fcntl

        name = "cfm_sftp_test"
        shared = Path(tempfile.gettempdir()) / f"{name}.password"
        fd = os.open(shared, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            password = fh.read().strip()
            if not password:
                password = uuid.uuid4().hex
                fh.write(password)
                fh.flush()
            if subprocess.run(["id", name], capture_output=True).returncode != 0:
                subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
            subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
        cls._account = (name, password)
        return cls._account

    def env(self, base_path: Path, port: int | None = None) -> dict[str, str]:
        return {
            "QNAP_HOST": "127.0.0.1",
            "QNAP_PORT": str(port or self.port),
            "QNAP_USERNAME": self.user,
            "QNAP_KEY_FILE": str(self.user_key),
            "QNAP_KNOWN_HOSTS": str(self.known_hosts),
            "NAS_BASE_PATH": str(base_path),
        }

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def noise_image(width: int, height: int, seed: int, mode: str = "RGBA") -> Image.Image:
    """Random pixels compress badly, so a few of them make a large corpus fast."""
    rng = np.random.default_rng(seed)
    channels = len(mode)
    data = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(data, mode)


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A smooth picture with structure (gradients and shapes), closer to a real design."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 6.28)
        img[..., c] = 127 + 100 * np.sin(x / width * fx * 6.28 + phase) * np.cos(y / height * fy * 6.28)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.25) * width
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_corpus(root: Path, layout: dict[tuple[str, str], int], size: tuple[int, int] = (640, 480),
                 seed: int = 0) -> list[Path]:
    """``layout``: (shop, template) -> number of images; alternates RGBA PNG and JPEG."""
    paths = []
    for (shop, template), count in layout.items():
        folder = root / shop / template
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            seed += 1
            if i % 2 == 0:
                p = folder / f"design {i:03d}.png"
                noise_image(*size, seed).save(p, compress_level=1)
            else:
                p = folder / f"design {i:03d}.jpg"
                photo_like(*size, seed).save(p, quality=92)
            paths.append(p)
    return paths


def write_bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "whole.png"
    noise_image(200, 150, 99).save(good)
    data = good.read_bytes()
    files = {
        "truncated": folder / "truncated.png",
        "empty": folder / "empty.jpg",
        "text": folder / "notes.png",
    }
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not an image\n")
    return files


def import_local_folder(url: str, base: Path, keys: list[str] | None = None, client=None, **kwargs) -> dict:
    """List and import a local folder (or ``client``'s NAS) without Dagster: the asset's plain-Python path."""
    from craftflow_migrations.db import get_engine
    from craftflow_migrations.nas import store
    from craftflow_migrations.nas.changes import scan_for_import
    from craftflow_migrations.nas.clients import LocalNasClient
    from craftflow_migrations.nas.importer import import_batch
    from craftflow_migrations.nas.listing import list_nas
    from craftflow_migrations.settings import get_settings

    engine = get_engine(url)
    settings = kwargs.pop("settings", get_settings().nas)  # thumbnails where this environment's readers look
    with engine.connect() as conn:
        listed_at = store.db_now(conn)
    with client or LocalNasClient(base) as client:
        listings, _ = list_nas(client, keys)
        scans = scan_for_import(listings, engine, listed_at, settings.max_file_mb * 2**20)
        files = [f for s in scans for f in s.to_import]
        kwargs.setdefault("had_rows", {p for s in scans for p in s.had_rows})  # a first attempt, as the asset's
        result = import_batch(client, engine, files, listed_at, settings, **kwargs)
    with engine.begin() as conn:  # what the summary step does after the batches
        store.mark_shops_changed(conn, {s.shop for s in scans})
    return {"scans": {s.key: s for s in scans}, "result": result, "listings": listings}


def can_mount_sshfs() -> str | None:
    """Why an sshfs mount cannot be made here, or None (it needs FUSE and root or fuse's setuid helper)."""
    if not shutil.which("sshfs"):
        return "sshfs is not installed: run scripts/setup.sh (apt-get install sshfs)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    return None


class SshfsMount:
    """``folder`` mounted over the loopback sshd with sshfs: a share across a network, as an
    SMB or NFS mount is, for the local backend (every folder a round trip over SFTP)."""

    def __init__(self, sshd: SshServer, folder: Path, mountpoint: Path) -> None:
        self.path = mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["sshfs", "-p", str(sshd.port), "-o", f"IdentityFile={sshd.user_key}",
             "-o", f"UserKnownHostsFile={sshd.known_hosts}", "-o", "StrictHostKeyChecking=yes",
             "-o", "BatchMode=yes", f"{sshd.user}@127.0.0.1:{folder}", str(mountpoint)],
            check=True, capture_output=True, timeout=30)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        unmount = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"
        subprocess.run([unmount, "-u", "-z", str(self.path)], capture_output=True, timeout=30)


def most_at_once(obj: object, name: str) -> list[int]:
    """Wrap the method ``obj.name``: the list returned holds the most calls ever running at once."""
    lock, running, most, method = threading.Lock(), [0], [0], getattr(obj, name)

    def counting(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return method(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    setattr(obj, name, counting)
    return most
