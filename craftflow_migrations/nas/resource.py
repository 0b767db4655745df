"""The Dagster resource that opens NAS clients (SFTP when QNAP_HOST is set, else a local folder)."""

from __future__ import annotations

import dagster as dg

from ..settings import NasSettings, get_settings
from .clients import NasClient, open_client


class NasResource(dg.ConfigurableResource):
    """The NAS the environment names (``QNAP_*``, ``NAS_BASE_PATH``), read through the settings model.

    It has no config fields on purpose: nothing about the NAS, least of all its password,
    enters run config, the launchpad or the event log.
    """

    @property
    def settings(self) -> NasSettings:
        return get_settings().nas

    def missing(self) -> list[str]:
        return self.settings.missing()

    @property
    def batched(self) -> bool:
        return self.settings.use_batched

    @property
    def description(self) -> str:
        return self.settings.description

    def open(self) -> NasClient:
        return open_client(self.settings)
