"""Read the NAS: an SFTP backend (a QNAP over SSH) and a local-folder backend, one interface.

Listing uses one READDIR exchange per folder (``listdir_attr``), never a stat per file.
Reads are pipelined (``prefetch``), which is what makes paramiko fast: a plain
``SFTPFile.read()`` waits for each 32 KB request in turn. The rest of the speed comes from
spending less Python per byte: 255 KB read requests instead of 32 KB, chunks handed over
whole instead of sliced 8 KB at a time, and AES-GCM (one AEAD pass) ahead of AES-CTR plus
a separate HMAC when the server offers it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import posixpath
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import paramiko

# Large windows keep many requests in flight on a fast link; OpenSSH's sftp does the same.
WINDOW_SIZE = 64 * 1024 * 1024
MAX_PACKET_SIZE = 256 * 1024
# OpenSSH's largest read (sftp-server's SFTP_MAX_READ_LENGTH). Measured on 611 MB over
# loopback, client + sshd CPU: 32 KB requests 4.8 s, 128 KB 2.2-2.8 s, 255 KB 2.1-2.5 s.
READ_REQUEST_SIZE = 255 * 1024
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


class NasError(RuntimeError):
    """The NAS cannot be reached or read; the message names the host and what to do."""


class HostKeyError(NasError):
    pass


@dataclass(frozen=True)
class NasFile:
    """A file under the base path; ``path`` is relative to the base, with '/' separators."""

    shop: str
    template: str
    path: str
    size: int
    mtime: float


def is_hidden(name: str) -> bool:
    # QNAP keeps its own bookkeeping in @Recently-Snapshot, .@__thumb and friends.
    return name.startswith((".", "@", "#recycle"))


def split_partition_key(key: str) -> tuple[str, str]:
    shop, sep, template = key.partition("/")
    if not sep or not shop or not template:
        raise ValueError(f"Partition key {key!r} is not of the form <shop>/<template>")
    return shop, template


def partition_key(shop: str, template: str) -> str:
    return f"{shop}/{template}"


# Dagster refuses these inside partition keys ("..." is its range syntax).
_BAD_IN_KEYS = ("...", "\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0")


def unusable_name(name: str) -> str | None:
    """Why a folder name cannot be a partition key part, or None when it can."""
    for bad in _BAD_IN_KEYS:
        if bad in name:
            return f"folder name {name!r} contains {bad!r}, which Dagster partition keys cannot hold; rename it"
    return None


class NasClient(Protocol):
    description: str

    def list_partitions(self) -> list[tuple[str, str]]: ...

    def list_files(self, shop: str, template: str) -> list[NasFile]: ...

    def read(self, path: str) -> bytes: ...

    def close(self) -> None: ...


class LocalNasClient:
    """A NAS mounted over SMB/NFS, or a plain folder for demos and tests."""

    def __init__(self, base_path: str | os.PathLike[str]):
        self.base = Path(base_path)
        if not self.base.is_dir():
            raise NasError(f"NAS_BASE_PATH {str(self.base)!r} is not a folder on this machine")
        self.real_base = self.base.resolve()
        self.description = f"local folder {self.base}"

    def _inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.real_base)

    def _subdirs(self, path: Path) -> list[str]:
        out = []
        with os.scandir(path) as entries:
            for e in entries:
                if not is_hidden(e.name) and e.is_dir() and self._inside(Path(e.path)):
                    out.append(e.name)
        return sorted(out)

    def list_partitions(self) -> list[tuple[str, str]]:
        return [(s, t) for s in self._subdirs(self.base) for t in self._subdirs(self.base / s)]

    def list_files(self, shop: str, template: str) -> list[NasFile]:
        root = self.base / shop / template
        out: list[NasFile] = []

        def walk(folder: Path) -> None:
            with os.scandir(folder) as entries:
                for e in entries:
                    if is_hidden(e.name):
                        continue
                    p = Path(e.path)
                    if e.is_symlink() and not self._inside(p):
                        continue
                    if e.is_dir():
                        walk(p)
                    elif e.is_file():
                        st = e.stat()
                        rel = p.relative_to(self.base).as_posix()
                        out.append(NasFile(shop, template, rel, st.st_size, st.st_mtime))

        if root.is_dir():
            walk(root)
        return sorted(out, key=lambda f: f.path)

    def read(self, path: str) -> bytes:
        return (self.base / path).read_bytes()

    def close(self) -> None:
        pass


class BufferedSocket:
    """A socket whose ``recv`` reads up to 256 KB at a time and serves paramiko from that.

    paramiko reads each SSH packet in pieces (its length, then the rest), one ``recv`` each,
    and OpenSSH sends 32 KB packets: about 40,000 system calls per GB. Serving them from
    large reads cut paramiko's CPU for the benchmark corpus by about a fifth. paramiko
    calls only ``recv``, ``send``, ``settimeout`` and ``close`` on its socket (paramiko 5.1).
    """

    READ_SIZE = 256 * 1024

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buffer = memoryview(b"")

    def recv(self, n: int) -> bytes:
        if not self._buffer:
            data = self._sock.recv(max(n, self.READ_SIZE))
            if len(data) <= n:
                return data
            self._buffer = memoryview(data)
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out.tobytes()

    def send(self, data: bytes) -> int:
        return self._sock.send(data)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def close(self) -> None:
        self._sock.close()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint, as ``ssh-keygen -lf`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def verify_host_key(host: str, port: int, key: paramiko.PKey, known_hosts: str | None,
                    pinned_fingerprint: str | None) -> None:
    """Refuse an unknown or changed host key, saying how to trust the right one."""
    seen = fingerprint(key)
    if pinned_fingerprint:
        if seen != pinned_fingerprint.strip():
            raise HostKeyError(
                f"SSH host key of {host}:{port} is {seen}, not the pinned QNAP_HOST_KEY_FINGERPRINT "
                f"{pinned_fingerprint}: if the NAS was re-keyed, verify and update the pin; otherwise "
                "someone may be intercepting the connection"
            )
        return
    path = os.path.expanduser(known_hosts or "~/.ssh/known_hosts")
    name = _known_hosts_name(host, port)
    how = (f"verify the fingerprint on the NAS, then trust it with "
           f"`ssh-keyscan -p {port} {host} >> {path}` or set QNAP_HOST_KEY_FINGERPRINT={seen}")
    try:
        keys = paramiko.HostKeys(path) if os.path.exists(path) else paramiko.HostKeys()
    except (OSError, paramiko.SSHException) as exc:
        raise HostKeyError(f"Cannot read known_hosts file {path}: {exc}") from None
    entry = keys.lookup(name)
    if not entry:
        raise HostKeyError(f"Unknown SSH host key for {name} ({key.get_name()} {seen}): {how}")
    if key.get_name() not in entry:
        known = ", ".join(entry.keys())
        raise HostKeyError(
            f"SSH host key for {name} is {key.get_name()} {seen}, but {path} lists only {known} for it: {how}"
        )
    if entry[key.get_name()] != key:
        raise HostKeyError(
            f"SSH host key for {name} CHANGED (now {seen}); refusing to connect. If the NAS was re-keyed, "
            f"remove the old line with `ssh-keygen -R '{name}' -f {path}` and trust the new key after verifying it"
        )


class SftpNasClient:
    """A QNAP (or any OpenSSH server) over SFTP, with host-key verification."""

    def __init__(self, host: str, port: int, username: str, base_path: str, password: str | None = None,
                 key_file: str | None = None, known_hosts: str | None = None,
                 host_key_fingerprint: str | None = None, timeout: float = 15.0):
        self.host, self.port, self.base = host, port, base_path.rstrip("/") or "/"
        self.description = f"sftp://{username}@{host}:{port}{self.base}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise NasError(f"Cannot reach NAS {host}:{port}: {exc} (check QNAP_HOST and QNAP_PORT)") from None
        transport = paramiko.Transport(BufferedSocket(sock), default_window_size=WINDOW_SIZE,
                                       default_max_packet_size=MAX_PACKET_SIZE)
        options = transport.get_security_options()
        options.ciphers = FAST_CIPHERS + tuple(c for c in options.ciphers if c not in FAST_CIPHERS)
        # Servers cap one read (OpenSSH 9: 255 KB; older sftp-servers: 64 KB); a short answer
        # to a prefetched request would leave a hole that paramiko fills one round trip at a
        # time, so the first large file measures the cap.
        self.read_request_size: int | None = None
        try:
            transport.start_client(timeout=timeout)
            verify_host_key(host, port, transport.get_remote_server_key(), known_hosts, host_key_fingerprint)
            if key_file:
                try:
                    pkey = paramiko.PKey.from_path(os.path.expanduser(key_file))
                except (OSError, paramiko.SSHException) as exc:
                    raise NasError(f"Cannot read QNAP_KEY_FILE {key_file}: {exc}") from None
                try:
                    transport.auth_publickey(username, pkey)
                except paramiko.AuthenticationException:
                    if not password:
                        raise
                    transport.auth_password(username, password)
            else:
                transport.auth_password(username, password or "")
            self.sftp = paramiko.SFTPClient.from_transport(
                transport, window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE
            )
        except paramiko.AuthenticationException:
            transport.close()
            raise NasError(
                f"NAS {host}:{port} refused the login of {username!r}: check QNAP_USERNAME and "
                "QNAP_PASSWORD (or QNAP_KEY_FILE)"
            ) from None
        except paramiko.SSHException as exc:
            transport.close()
            raise NasError(f"SSH handshake with NAS {host}:{port} failed: {exc}") from None
        except BaseException:
            transport.close()
            raise
        self.transport = transport
        self.sftp.get_channel().settimeout(timeout * 4)
        self._real_base = self.sftp.normalize(self.base)

    def _abs(self, rel: str) -> str:
        return posixpath.join(self.base, rel)

    def _inside(self, path: str) -> bool:
        try:
            real = self.sftp.normalize(path)
        except OSError:
            return False
        return real == self._real_base or real.startswith(self._real_base.rstrip("/") + "/")

    def _entries(self, path: str) -> Iterator[tuple[str, paramiko.SFTPAttributes]]:
        """(name, attributes) of a folder, following symlinks that stay inside the base."""
        for attr in self.sftp.listdir_attr(path):
            if is_hidden(attr.filename):
                continue
            full = posixpath.join(path, attr.filename)
            if stat.S_ISLNK(attr.st_mode or 0):
                if not self._inside(full):
                    continue
                try:
                    attr = self.sftp.stat(full)
                except OSError:
                    continue
                attr.filename = posixpath.basename(full)
            yield attr.filename, attr

    def _subdirs(self, path: str) -> list[str]:
        return sorted(n for n, a in self._entries(path) if stat.S_ISDIR(a.st_mode or 0))

    def list_partitions(self) -> list[tuple[str, str]]:
        try:
            shops = self._subdirs(self.base)
        except FileNotFoundError:
            raise NasError(f"NAS_BASE_PATH {self.base!r} does not exist on {self.host}") from None
        return [(s, t) for s in shops for t in self._subdirs(posixpath.join(self.base, s))]

    def list_files(self, shop: str, template: str) -> list[NasFile]:
        out: list[NasFile] = []
        stack = [posixpath.join(self.base, shop, template)]
        while stack:
            folder = stack.pop()
            try:
                entries = list(self._entries(folder))
            except FileNotFoundError:
                continue
            for name, attr in entries:
                full = posixpath.join(folder, name)
                if stat.S_ISDIR(attr.st_mode or 0):
                    stack.append(full)
                elif stat.S_ISREG(attr.st_mode or 0):
                    rel = posixpath.relpath(full, self.base)
                    out.append(NasFile(shop, template, rel, attr.st_size or 0, float(attr.st_mtime or 0)))
        return sorted(out, key=lambda f: f.path)

    def read(self, path: str) -> bytes:
        with self.sftp.open(self._abs(path), "rb") as fh:
            size = fh.stat().st_size or 0
            if size == 0:
                return b""
            head = b""
            if self.read_request_size is None and size > READ_REQUEST_SIZE:
                head = self._probe_read_limit(fh)
            # Instance overrides of two class constants: requests of the probed size, and
            # read() taking each prefetched chunk whole (its 8 KB default slices every chunk,
            # copying the rest of it each time).
            fh.MAX_REQUEST_SIZE = fh._DEFAULT_BUFSIZE = self.read_request_size or READ_REQUEST_SIZE
            fh.prefetch(size)
            # read() without a size appends to a bytearray; read(size) concatenates bytes
            # (quadratic: 2.5 CPU-s for 60 MB).
            return head + fh.read() if head else fh.read()

    def _probe_read_limit(self, fh: paramiko.SFTPFile) -> bytes:
        # One bare request (read() would keep asking until it had the whole size).
        fh.MAX_REQUEST_SIZE = READ_REQUEST_SIZE
        head = fh._read(READ_REQUEST_SIZE)
        self.read_request_size = max(len(head), 4096)
        fh.seek(len(head))
        return head

    def close(self) -> None:
        try:
            self.sftp.close()
        finally:
            self.transport.close()
