"""The Dagster resource that opens NAS clients (SFTP when QNAP_HOST is set, else a local folder)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from .client import LocalNasClient, NasClient, SftpNasClient


class NasResource(dg.ConfigurableResource):
    """Configure with ``EnvVar``s (see resources.py); the password never enters run config."""

    host: str = ""
    username: str = ""
    password: str = ""
    port: int = 22
    base_path: str = "/share/Graphics"
    key_file: str = ""
    known_hosts: str = ""
    host_key_fingerprint: str = ""
    use_batched: str = "true"

    @property
    def batched(self) -> bool:
        return self.use_batched.strip().lower() not in ("0", "false", "no", "off")

    def missing(self) -> list[str]:
        """Settings still needed before the NAS can be read; empty when it can."""
        if self.host:
            need = [] if self.username else ["QNAP_USERNAME"]
            if not (self.password or self.key_file):
                need.append("QNAP_PASSWORD (or QNAP_KEY_FILE)")
            return need
        if not Path(self.base_path).is_dir():
            return ["QNAP_HOST (or NAS_BASE_PATH pointing at a local folder)"]
        return []

    @property
    def description(self) -> str:
        if self.host:
            return f"sftp://{self.username}@{self.host}:{self.port}{self.base_path}"
        return f"local folder {self.base_path}"

    def open(self) -> NasClient:
        if self.host:
            return SftpNasClient(
                self.host, self.port, self.username, self.base_path,
                password=self.password or None, key_file=self.key_file or None,
                known_hosts=self.known_hosts or None, host_key_fingerprint=self.host_key_fingerprint or None,
            )
        return LocalNasClient(self.base_path)
