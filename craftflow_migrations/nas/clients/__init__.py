"""NAS backends behind one interface: a new backend is one new module beside these."""

from __future__ import annotations

from ...settings import NasSettings
from .base import Entry, HostKeyError, NasClient, NasError
from .local import LocalNasClient


def open_client(settings: NasSettings) -> NasClient:
    """SFTP when ``QNAP_HOST`` is set, else ``NAS_BASE_PATH`` as a local (mounted) folder."""
    if settings.is_sftp:
        from .sftp import SftpNasClient

        return SftpNasClient(
            settings.host, settings.port, settings.username, settings.base_path,
            password=settings.password.get_secret_value() or None, key_file=settings.key_file or None,
            known_hosts=settings.known_hosts or None, host_key_fingerprint=settings.host_key_fingerprint or None,
        )
    return LocalNasClient(settings.base_path)


__all__ = ["Entry", "HostKeyError", "LocalNasClient", "NasClient", "NasError", "open_client"]
