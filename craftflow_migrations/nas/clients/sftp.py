"""A QNAP (or any OpenSSH server) over SFTP, with host-key verification.

Listing uses one READDIR exchange per folder, never a stat per file, and keeps names as
the bytes the server sends (paramiko's own ``listdir_attr`` decodes them as UTF-8 and fails
on a Latin-1 name). Reads are pipelined (``prefetch``), which is what makes paramiko fast:
a plain ``SFTPFile.read()`` waits for each 32 KB request in turn. The rest of the speed comes
from spending less Python per byte: 255 KB read requests instead of 32 KB, chunks handed over
whole instead of sliced 8 KB at a time, and AES-GCM (one AEAD pass) ahead of AES-CTR plus a
separate HMAC when the server offers it. Small files are the other way round: their cost
is round trips, so each takes two (open, one read; the close is not waited for) and they are
read in groups with their requests in flight together (``read_each``). Requests in flight
together also leave together: a burst is one write and one SSH packet, not a packet each
(``CorkedChannel``), and READDIR replies are parsed with ``struct``, not a call per field.
Those bursts' requests and replies bypass paramiko's per-request machinery altogether
(``SftpRequests``); paramiko still does the SSH transport and large files' prefetch.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import posixpath
import socket
import stat
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence

import paramiko
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_HANDLE,
    CMD_NAME,
    CMD_OPEN,
    CMD_OPENDIR,
    CMD_READ,
    CMD_READDIR,
    CMD_REALPATH,
    CMD_STAT,
    CMD_STATUS,
    SFTP_FLAG_READ,
)

from .base import Entry, HostKeyError, NasClient, NasError

# Large windows keep many requests in flight on a fast link; OpenSSH's sftp does the same.
WINDOW_SIZE = 64 * 1024 * 1024
MAX_PACKET_SIZE = 256 * 1024
# OpenSSH's largest read (sftp-server's SFTP_MAX_READ_LENGTH). Measured on 611 MB over
# loopback, client + sshd CPU: 32 KB requests 4.8 s, 128 KB 2.2-2.8 s, 255 KB 2.1-2.5 s.
READ_REQUEST_SIZE = 255 * 1024
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# Small files whose open and read requests are in flight at once (``read_each``): 8,000 small
# files over loopback sshd, alternated, 0.17-0.23 ms a file in groups of 16, 0.149-0.151 in 32,
# 0.138-0.186 in 64. A group is read ahead of the read-ahead budget: at most 32 x 255 KB.
PIPELINED_FILES = 32
# Links resolved per exchange (``resolve_each``): two small requests each, no handle held.
RESOLVED_AT_ONCE = 256


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

    def buffered(self) -> int:
        """Bytes already read and not yet handed over: served without waiting."""
        return len(self._buffer)

    def send(self, data: bytes) -> int:
        return self._sock.send(data)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def close(self) -> None:
        self._sock.close()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class CorkedChannel:
    """The SFTP client's channel, its requests held back and sent together before it waits.

    paramiko sends every SFTP request as an SSH packet of its own: a message built,
    encrypted and written with a system call each. The listings and small-file reads send
    requests in bursts; held until a reader would wait for an answer (or 64 KB are held), a
    burst goes out as one write. A request sent while another thread already waits goes out
    at once: its answer may be what that thread waits for (paramiko's prefetch thread sends
    the requests a reading thread waits on). Replies are read from the channel 256 KB at a
    time (a ``BufferedSocket`` over it), not once for each SFTP packet's length and once for
    its body.

    A reader never waits for another thread's write to finish unless it has requests of its
    own to send, so a write stalled on the server's window cannot stop the reading that
    frees it.
    """

    HOLD_BYTES = 64 * 1024

    def __init__(self, channel: paramiko.Channel):
        self._channel = channel
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._waiting = 0  # threads inside recv
        self._lock = threading.Lock()  # the held requests and the count of waiting threads
        self._sending = threading.Lock()  # one write at a time, in the order taken
        self._replies = BufferedSocket(channel)

    def send(self, data: bytes) -> int:
        with self._lock:
            self._held.append(bytes(data))
            self._held_bytes += len(data)
            now = self._waiting or self._held_bytes >= self.HOLD_BYTES
        if now:
            self.flush()
        return len(data)

    def recv(self, n: int) -> bytes:
        if self._replies.buffered():
            return self._replies.recv(n)
        with self._lock:
            # Nothing to read yet: what is held must go out first, or its answers never come.
            must_send = bool(self._held) and not self._channel.recv_ready()
            self._waiting += 1
        try:
            if must_send:
                self.flush()
            return self._replies.recv(n)
        finally:
            with self._lock:
                self._waiting -= 1

    def flush(self) -> None:
        """Send what is held, now (also a burst's closes, which nothing waits for)."""
        with self._sending:
            with self._lock:
                out, self._held, self._held_bytes = b"".join(self._held), [], 0
            if out:
                self._channel.sendall(out)

    def close(self) -> None:
        self._channel.close()

    def __getattr__(self, name: str):
        return getattr(self._channel, name)


_U32, _U64, _TIMES = struct.Struct(">I"), struct.Struct(">Q"), struct.Struct(">II")
# OPEN's flags (read) and an empty ATTRS (no flags).
_OPEN_FOR_READING = struct.pack(">II", SFTP_FLAG_READ, 0)
_HEAD = struct.Struct(">IBI")  # an SFTP packet's length, its type, its request number
_READ = struct.Struct(">QI")  # a READ's offset and length
# paramiko refuses a packet whose length has its high byte set (no server sends 16 MB).
_MAX_PACKET = 1 << 24


def _string(value: bytes) -> bytes:
    return _U32.pack(len(value)) + value


class SftpRequests:
    """SFTP requests packed with ``struct`` and their replies read straight off the channel,
    for the client's own bursts (listings, links, small files, closes).

    paramiko builds each request as a ``Message`` under a lock, keeps a weak reference per
    request, and reads each reply in two calls through its socket layer into another
    ``Message``: about 30 us of Python a request, most of the client's CPU listing 3,000
    small folders over loopback. Here a request is one ``struct.pack`` and a reply is sliced
    from what the channel already read. Request numbers come from paramiko's own counter, so
    its requests (a large file's prefetch) and these never share one; a reply to one of its
    requests read here is handed to paramiko's waiter as its own reader would, and a reply
    nobody waits for (a close's) is dropped.
    """

    def __init__(self, sftp: paramiko.SFTPClient):
        self.sftp = sftp
        self.waiting: set[int] = set()  # numbers of requests whose replies are wanted
        self.replies: dict[int, tuple[int, bytes]] = {}  # read, not yet taken

    def send(self, kind: int, *fields: bytes, wanted: bool = True) -> int:
        sftp = self.sftp
        with sftp._lock:
            number = sftp.request_number
            sftp.request_number = number + 1
        if wanted:
            self.waiting.add(number)
        body = b"".join(fields)
        sftp.sock.send(_HEAD.pack(len(body) + 5, kind, number) + body)
        return number

    def reply(self, number: int) -> tuple[int, bytes]:
        """The reply to request ``number``: its type and what follows the request number."""
        replies = self.replies
        while number not in replies:
            self._read_one()
        self.waiting.discard(number)
        return replies.pop(number)

    def forget(self, numbers: Iterable[int]) -> None:
        """Requests whose replies are no longer wanted (a burst cut short): dropped when they come."""
        for number in numbers:
            self.waiting.discard(number)
            self.replies.pop(number, None)

    def _read_one(self) -> None:
        (size,) = _U32.unpack(self._read_exact(4))
        if size >= _MAX_PACKET or size < 5:
            raise paramiko.SFTPError("Garbage packet received")
        packet = self._read_exact(size)
        kind, (number,) = packet[0], _U32.unpack_from(packet, 1)
        if number in self.waiting:
            self.replies[number] = (kind, packet[5:])
            return
        sftp = self.sftp
        with sftp._lock:
            owner = sftp._expecting.pop(number, None)
        if owner is not None and owner is not type(None):
            msg = paramiko.Message(packet[5:])
            owner._async_response(kind, msg, number)

    def _read_exact(self, n: int) -> bytes:
        try:
            return self.sftp._read_all(n)
        except EOFError:  # as paramiko's own reader says it
            raise paramiko.SSHException("Server connection dropped: end of the SFTP stream") from None


def _entries(data: bytes) -> list[Entry]:
    """The entries of one READDIR reply (``.`` and ``..`` left out).

    Parsed with ``struct`` from the reply's bytes: paramiko's ``SFTPAttributes`` took a
    Python call per field, half the client's CPU listing 3,000 small folders. A reply cut
    short is the folder's error, not a listing of zeros (paramiko pads a short read).
    """
    out = []
    try:
        (count,) = _U32.unpack_from(data, 0)
        pos = 4
        for _ in range(count):
            (n,) = _U32.unpack_from(data, pos)
            name = data[pos + 4:pos + 4 + n]  # bytes: not every name on a NAS is UTF-8
            pos += 4 + n
            (n,) = _U32.unpack_from(data, pos)  # the longname, unused
            pos += 4 + n
            (flags,) = _U32.unpack_from(data, pos)
            pos += 4
            size = mode = mtime = 0
            if flags & paramiko.SFTPAttributes.FLAG_SIZE:
                (size,) = _U64.unpack_from(data, pos)
                pos += 8
            if flags & paramiko.SFTPAttributes.FLAG_UIDGID:
                pos += 8
            if flags & paramiko.SFTPAttributes.FLAG_PERMISSIONS:
                (mode,) = _U32.unpack_from(data, pos)
                pos += 4
            if flags & paramiko.SFTPAttributes.FLAG_AMTIME:
                _, mtime = _TIMES.unpack_from(data, pos)
                pos += 8
            if flags & paramiko.SFTPAttributes.FLAG_EXTENDED:
                (pairs,) = _U32.unpack_from(data, pos)
                pos += 4
                for _ in range(2 * pairs):
                    (n,) = _U32.unpack_from(data, pos)
                    pos += 4 + n
            if pos > len(data):
                raise struct.error("cut short")
            if name in (b".", b".."):
                continue
            kind = ("link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode)
                    else "file" if stat.S_ISREG(mode) else "other")
            # SFTP v3 carries whole seconds.
            out.append(Entry(name, kind, size, mtime * 1_000_000))
    except struct.error:
        raise OSError(errno.EIO, "malformed READDIR reply from the server") from None
    return out


_OK, _EOF, _NO_SUCH_FILE, _PERMISSION_DENIED = 0, 1, 2, 3


def _status_error(kind: int, data: bytes) -> Exception:
    """The error a reply stands for (``EOFError`` for the end of a file), as paramiko's
    ``_convert_status`` raises it."""
    if kind != CMD_STATUS:
        return paramiko.SFTPError(f"unexpected SFTP reply {kind}")
    try:
        (code,) = _U32.unpack_from(data, 0)
        (n,) = _U32.unpack_from(data, 4) if len(data) >= 8 else (0,)
        text = data[8:8 + n].decode("utf-8", "replace")
    except struct.error:
        return OSError(errno.EIO, "malformed STATUS reply from the server")
    if code == _OK:
        return paramiko.SFTPError("SFTP reply without a handle or data")
    if code == _EOF:
        return EOFError(text)
    if code == _NO_SUCH_FILE:
        return FileNotFoundError(errno.ENOENT, text)
    if code == _PERMISSION_DENIED:
        return PermissionError(errno.EACCES, text)
    return OSError(text)


def _string_at_start(data: bytes) -> bytes:
    """The SFTP string (a handle, a name, a file's data) a reply's fields begin with."""
    (n,) = _U32.unpack_from(data, 0)
    if len(data) < 4 + n:
        raise struct.error("cut short")
    return data[4:4 + n]


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


class SftpNasClient(NasClient):
    """A QNAP (or any OpenSSH server) over SFTP, with host-key verification."""

    reads_wait = True

    def __init__(self, host: str, port: int, username: str, base_path: str, password: str | None = None,
                 key_file: str | None = None, known_hosts: str | None = None,
                 host_key_fingerprint: str | None = None, timeout: float = 15.0):
        self.host, self.port = host, port
        self.base = os.fsencode(base_path.rstrip("/") or "/")
        self.description = f"sftp://{username}@{host}:{port}{base_path}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise NasError(f"Cannot reach NAS {host}:{port}: {exc.strerror or exc} "
                           "(check QNAP_HOST and QNAP_PORT, and that the NAS is on)") from None
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
        except (paramiko.SSHException, EOFError, OSError) as exc:
            transport.close()
            raise NasError(f"SSH handshake with NAS {host}:{port} failed: {exc or type(exc).__name__} "
                           "(check QNAP_HOST and QNAP_PORT point at the NAS's SSH service)") from None
        except BaseException:
            transport.close()
            raise
        self.transport = transport
        self.sftp.get_channel().settimeout(timeout * 4)
        self.sftp.sock = CorkedChannel(self.sftp.sock)
        self.requests = SftpRequests(self.sftp)
        try:
            self._real_base = self._realpath(self.base)
        except OSError as exc:
            self.close()
            why = "does not exist" if exc.errno == errno.ENOENT else f"cannot be read ({exc.strerror or exc})"
            raise NasError(f"NAS_BASE_PATH {base_path!r} {why} on {host}:{port}: check NAS_BASE_PATH") from None

    def _abs(self, rel: bytes) -> bytes:
        return posixpath.join(self.base, rel) if rel else self.base

    def _realpath(self, path: bytes) -> bytes:
        t, msg = self.sftp._request(CMD_REALPATH, path)
        if t != CMD_NAME or msg.get_int() != 1:
            raise OSError(errno.EIO, "unexpected answer to REALPATH")
        return msg.get_string()

    def scandir(self, rel: bytes) -> list[Entry]:
        # One folder is a group of one: the same requests as scandir_each, one mechanism.
        [entries] = self.scandir_each([rel])
        if isinstance(entries, OSError):
            raise entries
        return entries

    def scandir_each(self, rels: Sequence[bytes]) -> list[list[Entry] | OSError]:
        """The folders' OPENDIRs sent together, then each one's READDIRs as its replies come.

        One folder at a time, a folder cost four waits for sshd (open, a READDIR with its
        entries, one for the end, close): 3,000 small folders over loopback took 3.5-3.8 s.
        The closes are not waited for.
        """
        requests = self.requests
        out: list[list[Entry] | OSError] = [[] for _ in rels]
        handles: dict[int, bytes] = {}
        waiting: dict[int, int] = {}  # request number -> the folder it is for
        try:
            for i, rel in enumerate(rels):
                waiting[requests.send(CMD_OPENDIR, _string(self._abs(rel)))] = i
            while waiting:
                number = next(iter(waiting))  # the oldest: the server answers in order
                kind, data = requests.reply(number)
                i = waiting.pop(number)
                error: Exception
                if kind in (CMD_HANDLE, CMD_NAME):
                    try:
                        if kind == CMD_HANDLE:
                            handles[i] = _string_at_start(data)
                        else:
                            out[i].extend(_entries(data))  # type: ignore[union-attr]
                    except struct.error:
                        error = OSError(errno.EIO, "malformed OPENDIR reply from the server")
                    except OSError as exc:
                        error = exc
                    else:
                        waiting[requests.send(CMD_READDIR, _string(handles[i]))] = i
                        continue
                else:
                    error = _status_error(kind, data)
                if i in handles:
                    self._close_unwaited([handles.pop(i)])
                    if isinstance(error, EOFError):
                        continue  # the end of the folder
                out[i] = error if isinstance(error, OSError) else OSError(errno.EIO, f"unexpected answer: {error}")
        finally:
            requests.forget(waiting)
            self._close_unwaited(handles.values(), last=True)
        return out

    def resolve(self, rel: bytes) -> bytes | None:
        [target] = self.resolve_each([rel])
        return target

    def resolve_each(self, rels: Sequence[bytes]) -> list[bytes | None]:
        """Every link's REALPATH sent together, then a STAT of every answer together.

        One at a time, a link cost two waits for sshd, on every listing of its folder: 2,000
        links in 100 small partitions took 0.6-1.5 s to list over loopback sshd. OpenSSH
        resolves only existing paths; a dangling link or a loop fails one of the two.
        """
        requests = self.requests
        out: list[bytes | None] = [None] * len(rels)
        for first in range(0, len(rels), RESOLVED_AT_ONCE):
            asked: list[tuple[int, int]] = []
            try:
                asked = [(i, requests.send(CMD_REALPATH, _string(self._abs(rels[i]))))
                         for i in range(first, min(first + RESOLVED_AT_ONCE, len(rels)))]
                real: dict[int, bytes] = {}
                for i, number in asked:
                    kind, data = requests.reply(number)
                    if kind == CMD_NAME and data[:4] == b"\0\0\0\1":
                        try:
                            real[i] = _string_at_start(data[4:])  # the one name
                        except struct.error:
                            continue
                asked = [(i, requests.send(CMD_STAT, _string(path))) for i, path in real.items()]
                for i, number in asked:
                    kind, _ = requests.reply(number)
                    if kind == CMD_ATTRS:
                        out[i] = posixpath.relpath(real[i], self._real_base)
            finally:
                requests.forget(number for _, number in asked)
        return out

    def connected(self) -> bool:
        # paramiko's transport thread closes its channels before it marks itself inactive: in
        # between, a read has already failed on the closed channel while is_active() still
        # says True, and the file would have been recorded as unreadable instead of the batch
        # being retried.
        return self.transport.is_active() and not self.sftp.get_channel().closed

    def read(self, rel: bytes, size: int | None = None) -> bytes:
        if size is not None and size < (self.read_request_size or READ_REQUEST_SIZE):
            # Two round trips, not four (open, stat, read, waited close): 0.98-1.04 -> 0.56-0.69
            # ms a file over loopback, one at a time. See _read_group.
            [(data, error)] = self._read_group([(rel, size)])
            if error is not None:
                raise error
            return data  # type: ignore[return-value]
        with self.sftp.open(self._abs(rel), "rb") as fh:
            size = fh.stat().st_size or 0
            if size == 0:
                return b""
            if size <= (self.read_request_size or READ_REQUEST_SIZE):
                # One request, no prefetch: prefetch() starts a thread per file, which for a
                # small file cost more than the read itself (1.0 -> 0.72-0.76 ms a file over
                # loopback, a third less CPU). A server with a lower limit gets more requests.
                fh.MAX_REQUEST_SIZE = self.read_request_size or READ_REQUEST_SIZE
                return fh.read(size)
            head = b""
            if self.read_request_size is None:
                head = self._probe_read_limit(fh)
            # Instance overrides of two class constants: requests of the probed size, and
            # read() taking each prefetched chunk whole (its 8 KB default slices every chunk,
            # copying the rest of it each time).
            fh.MAX_REQUEST_SIZE = fh._DEFAULT_BUFSIZE = self.read_request_size or READ_REQUEST_SIZE
            fh.prefetch(size)
            # read() without a size appends to a bytearray; read(size) concatenates bytes
            # (quadratic: 2.5 CPU-s for 60 MB).
            return head + fh.read() if head else fh.read()

    def read_each(self, files: Iterable[tuple[bytes, int]]) -> Iterator[tuple[bytes | None, Exception | None]]:
        """Small files in groups of PIPELINED_FILES with their requests in flight together.

        Read one at a time, every small file waits two round trips and wakes this thread
        twice; in a group, the opens go out together, each read as soon as its handle comes
        back. Large files are read alone, pipelined within the file.
        """
        return self._small_in_groups(files, self.read_request_size or READ_REQUEST_SIZE, PIPELINED_FILES,
                                     self._read_group)

    def _close_unwaited(self, handles: Iterable[bytes], last: bool = False) -> None:
        """CLOSE each handle without waiting: the reply is read, and ignored, with a later request's.

        Nothing to report on closing what was only read; on a lost connection the server
        closes them itself. ``last``: the burst's final closes, sent now rather than held
        until the next request waits, so the server holds no handle after the burst.
        """
        try:
            for handle in handles:
                self.requests.send(CMD_CLOSE, _string(handle), wanted=False)
            if last:
                self.sftp.sock.flush()
        except Exception:  # noqa: BLE001, S110 - the connection is gone
            pass

    def _read_group(self, group: list[tuple[bytes, int]]) -> list[tuple[bytes | None, Exception | None]]:
        """Small files of listed size: each one an open, one read of its listed size plus a
        byte, and a close not waited for, every request of the group in flight together.

        Exactly the listed size back means the file ends there. Anything else (the file grew,
        shrank or emptied since the listing, or a server that serves less per request) is read
        again whole. A reply that is only the server's end-of-file status is not mistaken for a
        dropped connection, nor the other way round: a lost connection is every unanswered
        file's error.
        """
        requests = self.requests
        out: list[tuple[bytes | None, Exception | None] | None] = [None] * len(group)
        handles: dict[int, bytes] = {}
        asked: set[int] = set()
        try:
            opens = [requests.send(CMD_OPEN, _string(self._abs(rel)), _OPEN_FOR_READING) for rel, _ in group]
            asked.update(opens)
            reads = {}
            for i, number in enumerate(opens):
                kind, data = requests.reply(number)
                if kind == CMD_HANDLE:
                    handles[i] = _string_at_start(data)
                    # One byte more than listed: exactly the listed size back means the file ends there.
                    reads[i] = requests.send(CMD_READ, _string(handles[i]), _READ.pack(0, group[i][1] + 1))
                    asked.add(reads[i])
                else:
                    out[i] = (None, _status_error(kind, data))
            for i, number in reads.items():
                kind, data = requests.reply(number)
                self._close_unwaited([handles.pop(i)])
                if kind == CMD_DATA:
                    content = _string_at_start(data)
                    if len(content) == group[i][1]:
                        out[i] = (content, None)
                    # else: changed since the listing, or a server serving less: read again below
                else:
                    error = _status_error(kind, data)
                    if not isinstance(error, EOFError):
                        out[i] = (None, error)
                    elif group[i][1] == 0:
                        out[i] = (b"", None)
        except Exception as exc:  # noqa: BLE001 - decided per file below
            if not self.connected():  # every file still unanswered gets the lost connection
                out = [item or (None, exc) for item in out]
            # else (a reply that could not be parsed): those files are read again one at a time
        finally:
            requests.forget(asked)
            self._close_unwaited(handles.values(), last=True)
        done: list[tuple[bytes | None, Exception | None]] = []
        for (rel, _), item in zip(group, out, strict=True):
            if item is None:  # read whole, as it is now, sized by its own stat
                try:
                    item = (self.read(rel), None)
                except Exception as exc:  # noqa: BLE001 - that file's error, as read_each promises
                    item = (None, exc)
            done.append(item)
        return done

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
