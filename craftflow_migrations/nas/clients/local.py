"""A NAS mounted over SMB/NFS, or a plain folder for demos and tests."""

from __future__ import annotations

import os
import stat

from .base import Entry, NasClient, NasError


class LocalNasClient(NasClient):
    def __init__(self, base_path: str | os.PathLike[str]):
        self.base = os.fsencode(base_path)
        if not os.path.isdir(self.base):
            raise NasError(f"NAS_BASE_PATH {os.fsdecode(self.base)!r} is not a folder on this machine "
                           "(check NAS_BASE_PATH, or set QNAP_HOST to read it over SFTP)")
        self.real_base = os.path.realpath(self.base)
        self.description = f"local folder {os.fsdecode(self.base)}"

    def _abs(self, rel: bytes) -> bytes:
        return os.path.join(self.base, rel) if rel else self.base

    def scandir(self, rel: bytes) -> list[Entry]:
        out = []
        with os.scandir(self._abs(rel)) as entries:
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    out.append(Entry(e.name, "other", 0, 0))
                    continue
                mode = st.st_mode
                kind = ("link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode)
                        else "file" if stat.S_ISREG(mode) else "other")
                # st_mtime_ns // 1000, never the float st_mtime: a float does not round-trip.
                out.append(Entry(e.name, kind, st.st_size, st.st_mtime_ns // 1000))
        return out

    def read(self, rel: bytes, size: int | None = None) -> bytes:
        # O_NOFOLLOW: a file swapped for a link after the listing is not followed out of the base.
        fd = os.open(self._abs(rel), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            return fh.read()

    def resolve(self, rel: bytes) -> bytes | None:
        try:
            real = os.path.realpath(self._abs(rel), strict=True)
        except (OSError, RuntimeError):
            return None
        return os.path.relpath(real, self.real_base)
