"""The service's environment, read once into one typed model.

Every variable is parsed here and nowhere else. A bad value fails with one line that names
the variable and what is allowed (the CLI exits 2); secrets (``QNAP_PASSWORD``, the
password inside ``DATABASE_URL``) are never echoed, not even in part.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, SecretStr

MODES = ("all", "startup", "nas-only", "complex")
EXECUTORS = ("multiprocess", "celery")
THUMBNAIL_STORES = ("folder", "postgres")
# The Dagster instance when DAGSTER_HOME is unset (the worker sets DAGSTER_HOME to it).
LOCAL_DAGSTER_HOME = Path.home() / ".craftflow_migrations" / "dagster_home"
DEFAULT_NAS_BASE_PATH = "/share/Graphics"
PACKAGE_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Batched event writes: a run over thousands of folders writes its materializations in a
# few statements instead of one per partition (Dagster reads this variable itself).
DAGSTER_EVENT_BATCH_SIZE = "1000"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message is one line naming the variable."""


_FALSE, _TRUE = ("0", "false", "no", "off"), ("1", "true", "yes", "on")


def usable_cores() -> int:
    """The cores this process may run on: a container or ``taskset`` pinned to 4 of a host's 64
    has 4, where ``os.cpu_count()`` says 64 and 64 batch steps would share 4 cores."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # no affinity API (macOS)
        return max(os.cpu_count() or 2, 1)


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return None if value is None or value.strip() == "" else value.strip()


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
    raw = _raw(env, name)
    if raw is None:
        return default
    allowed = f"a whole number from {minimum}" + (f" to {maximum}" if maximum is not None else " up")
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number: use {allowed}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"{name}={value} is out of range: use {allowed}")
    return value


def _number(env: Mapping[str, str], name: str, default: float, minimum: float, maximum: float,
            not_a_number: str, out_of_range: str) -> float:
    raw = _raw(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} {not_a_number}") from None
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise ConfigError(f"{name}={raw!r} {out_of_range}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    """Positive, finite, at least a millisecond: PostgreSQL timeouts are whole milliseconds."""
    return _number(env, name, default, 0.001, math.inf, "is not a number of seconds (e.g. 5 or 0.5)",
                   "must be a finite number of seconds, at least 0.001")


def _fraction(env: Mapping[str, str], name: str, default: float) -> float:
    allowed = "must be a number from 0 to 1 (e.g. 0.05)"
    return _number(env, name, default, 0.0, 1.0, allowed, allowed)


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _raw(env, name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not one of: true, false")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = _raw(env, name) or default
    if raw not in choices:
        raise ConfigError(f"{name}={raw!r} is not one of: {', '.join(choices)}")
    return raw


_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.S)


def check_database_url(url: str, name: str = "DATABASE_URL") -> None:
    """Refuse a malformed PostgreSQL URL without printing any part of its password."""
    match = _URL.match(url)
    if not match:
        raise ConfigError(f"{name} is not a URL: expected postgresql://user:password@host:5432/dbname")
    scheme, rest = match["scheme"], match["rest"]
    if scheme.split("+")[0] not in ("postgres", "postgresql"):
        raise ConfigError(f"{name} has scheme {scheme!r}: expected postgresql:// (or postgres://)")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    tail = rest[len(authority):]
    if authority.count("@") > 1:
        raise ConfigError(f"{name} has more than one '@' before the host: percent-encode '@' in the "
                          "password as %40 (and ':' as %3A, '/' as %2F)")
    if "@" not in authority and "@" in tail.split("?", 1)[0]:
        raise ConfigError(f"{name} has a '/', '?' or '#' inside its user or password: percent-encode them "
                          "(%2F, %3F, %23)")
    hostport = authority.rsplit("@", 1)[-1]
    if "@" in authority:
        userinfo = authority.rsplit("@", 1)[0]
        if not unquote(userinfo.split(":", 1)[0]):
            raise ConfigError(f"{name} has a password but no user name before the host")
    if hostport.startswith("["):
        port = hostport.rpartition("]:")[2] if "]:" in hostport else ""
    else:
        port = hostport.rpartition(":")[2] if ":" in hostport else ""
        if hostport.count(":") > 1:
            raise ConfigError(f"{name}: the host part {hostport!r} has more than one ':'")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{name}: port {port!r} is not a number from 1 to 65535")


class MigrationSettings(BaseModel):
    """Timeouts that keep DDL from blocking the live API."""

    model_config = ConfigDict(frozen=True)

    lock_timeout_s: float = 5.0
    statement_timeout_s: float = 600.0
    lock_retries: int = 5
    runner_lock_wait_s: float = 300.0
    canvas_batch_size: int = 5000


class NasSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    host: str = ""
    port: int = 22
    username: str = ""
    password: SecretStr = SecretStr("")
    key_file: str = ""
    known_hosts: str = ""
    host_key_fingerprint: str = ""
    base_path: str = DEFAULT_NAS_BASE_PATH
    use_batched: bool = True
    max_concurrent: int = usable_cores()
    commit_every: int = 5000
    max_file_mb: int = 1024
    max_pixels: int = 250_000_000
    decode_timeout_s: float = 120.0
    # Thumbnails: appended to pack files of a folder (indexed in PostgreSQL), or in PostgreSQL.
    thumbnail_store: Literal["folder", "postgres"] = "folder"
    thumbnail_dir: str = ""  # empty: <DAGSTER_HOME>/thumbnails

    @property
    def thumbnail_folder(self) -> Path:
        return Path(self.thumbnail_dir) if self.thumbnail_dir else LOCAL_DAGSTER_HOME / "thumbnails"

    @property
    def is_sftp(self) -> bool:
        return bool(self.host)

    def missing(self) -> list[str]:
        """Settings still needed before the NAS can be read; empty when it can."""
        if self.host:
            need = [] if self.username else ["QNAP_USERNAME"]
            if not (self.password.get_secret_value() or self.key_file):
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


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    database_url: SecretStr | None = None
    mode: Literal["all", "startup", "nas-only", "complex"] = "all"
    executor: Literal["multiprocess", "celery"] = "multiprocess"
    celery_broker_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    celery_backend_url: SecretStr = SecretStr("redis://127.0.0.1:6379/1")
    io_dir: str = ""
    report_dir: str = ""
    dagster_home: str = ""
    migrations_dir: Path = PACKAGE_MIGRATIONS
    max_failed_share: float = 0.05
    migrations: MigrationSettings = MigrationSettings()
    nas: NasSettings = NasSettings()

    def require_database_url(self) -> str:
        if self.database_url is None:
            raise ConfigError("Database connection failed: DATABASE_URL is not set "
                              "(set it to postgresql://user:password@host:5432/dbname)")
        return self.database_url.get_secret_value()

    def secrets(self) -> list[str]:
        """Every secret value, for redaction: passwords, and the URLs that carry them."""
        out = [self.nas.password.get_secret_value()]
        for url in (self.database_url, self.celery_broker_url, self.celery_backend_url):
            if url is not None:
                value = url.get_secret_value()
                out.append(value)
                out.extend(url_passwords(value))
        return [s for s in out if s]


def url_passwords(url: str) -> list[str]:
    """The password of a URL, raw and percent-decoded (both may appear in messages)."""
    match = _URL.match(url)
    if not match:
        return []
    authority = re.split(r"[/?#]", match["rest"], maxsplit=1)[0]
    if "@" not in authority:
        return []
    userinfo = authority.rsplit("@", 1)[0]
    if ":" not in userinfo:
        return []
    raw = userinfo.split(":", 1)[1]
    return [p for p in {raw, unquote(raw)} if p]


def from_env(env: Mapping[str, str]) -> Settings:
    """Parse the environment; raises :class:`ConfigError` with one line on the first bad value."""
    url = _raw(env, "DATABASE_URL")
    if url is not None:
        check_database_url(url)
    migrations_dir = PACKAGE_MIGRATIONS
    override = _raw(env, "CRAFTFLOW_MIGRATIONS_DIR")
    if override:
        migrations_dir = Path(override)
        if not migrations_dir.is_dir():
            raise ConfigError(f"CRAFTFLOW_MIGRATIONS_DIR={override!r} is not a directory")
    executor = _choice(env, "CRAFTFLOW_EXECUTOR", "multiprocess", EXECUTORS)
    thumbnail_dir = _raw(env, "CRAFTFLOW_THUMBNAIL_DIR")
    if thumbnail_dir is not None and not Path(thumbnail_dir).expanduser().is_absolute():
        raise ConfigError(f"CRAFTFLOW_THUMBNAIL_DIR={thumbnail_dir!r} is not an absolute path: every process "
                          "(batch steps, the UI, the report) must find the same folder; give it from /")
    dagster_home = _raw(env, "DAGSTER_HOME")
    # Runs on several machines (Celery steps; a webserver, daemon and worker sharing one instance
    # in PostgreSQL) share no folder unless one is named for them: there thumbnails stay in
    # PostgreSQL by default, where every machine that reads them finds them.
    several_machines = executor == "celery" or _raw(env, "DAGSTER_POSTGRES_URL") is not None
    nas = NasSettings(
        thumbnail_store=_choice(env, "CRAFTFLOW_THUMBNAIL_STORE",
                                "postgres" if several_machines and thumbnail_dir is None else "folder",
                                THUMBNAIL_STORES),
        thumbnail_dir=(str(Path(thumbnail_dir).expanduser()) if thumbnail_dir
                       else str(Path(dagster_home) / "thumbnails") if dagster_home else ""),
        host=_raw(env, "QNAP_HOST") or "",
        port=_int(env, "QNAP_PORT", 22, 1, 65535),
        username=_raw(env, "QNAP_USERNAME") or "",
        password=SecretStr(env.get("QNAP_PASSWORD", "")),
        key_file=_raw(env, "QNAP_KEY_FILE") or "",
        known_hosts=_raw(env, "QNAP_KNOWN_HOSTS") or "",
        host_key_fingerprint=_raw(env, "QNAP_HOST_KEY_FINGERPRINT") or "",
        base_path=_raw(env, "NAS_BASE_PATH") or DEFAULT_NAS_BASE_PATH,
        use_batched=_bool(env, "NAS_USE_BATCHED", True),
        max_concurrent=_int(env, "NAS_MAX_CONCURRENT", usable_cores(), 1, 256),
        commit_every=_int(env, "NAS_COMMIT_EVERY", 5000, 1, 100_000),
        max_file_mb=_int(env, "NAS_MAX_FILE_MB", 1024, 1),
        max_pixels=_int(env, "NAS_MAX_PIXELS", 250_000_000, 1),
        decode_timeout_s=_seconds(env, "NAS_DECODE_TIMEOUT", 120.0),
    )
    fingerprint = nas.host_key_fingerprint
    if fingerprint and not re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fingerprint):
        raise ConfigError(f"QNAP_HOST_KEY_FINGERPRINT={fingerprint!r} is not of the form SHA256:<43 base64 "
                          "characters> as `ssh-keygen -lf` prints it")
    migrations = MigrationSettings(
        lock_timeout_s=_seconds(env, "MIGRATION_LOCK_TIMEOUT", 5.0),
        statement_timeout_s=_seconds(env, "MIGRATION_STATEMENT_TIMEOUT", 600.0),
        lock_retries=_int(env, "MIGRATION_LOCK_RETRIES", 5, 0, 100),
        runner_lock_wait_s=_seconds(env, "MIGRATION_RUNNER_LOCK_WAIT", 300.0),
        canvas_batch_size=_int(env, "CANVAS_MIGRATION_BATCH_SIZE", 5000, 1, 10_000_000),
    )
    return Settings(
        database_url=SecretStr(url) if url is not None else None,
        mode=_choice(env, "MIGRATION_MODE", "all", MODES),
        executor=executor,
        celery_broker_url=SecretStr(_raw(env, "CELERY_BROKER_URL") or "redis://127.0.0.1:6379/0"),
        celery_backend_url=SecretStr(_raw(env, "CELERY_BACKEND_URL") or "redis://127.0.0.1:6379/1"),
        io_dir=_raw(env, "CRAFTFLOW_IO_DIR") or "",
        report_dir=_raw(env, "CRAFTFLOW_REPORT_DIR") or "",
        dagster_home=dagster_home or "",
        migrations_dir=migrations_dir,
        max_failed_share=_fraction(env, "MAX_FAILED_SHARE", 0.05),
        migrations=migrations,
        nas=nas,
    )


_VARIABLES = ("DATABASE_URL", "MIGRATION_MODE", "CRAFTFLOW_EXECUTOR", "CELERY_BROKER_URL", "CELERY_BACKEND_URL",
              "CRAFTFLOW_IO_DIR", "CRAFTFLOW_REPORT_DIR", "CRAFTFLOW_THUMBNAIL_STORE",
              "CRAFTFLOW_THUMBNAIL_DIR", "DAGSTER_HOME", "DAGSTER_POSTGRES_URL", "CRAFTFLOW_MIGRATIONS_DIR",
              "MAX_FAILED_SHARE", "QNAP_HOST", "QNAP_PORT", "QNAP_USERNAME", "QNAP_PASSWORD", "QNAP_KEY_FILE",
              "QNAP_KNOWN_HOSTS", "QNAP_HOST_KEY_FINGERPRINT", "NAS_BASE_PATH", "NAS_USE_BATCHED",
              "NAS_MAX_CONCURRENT", "NAS_COMMIT_EVERY", "NAS_MAX_FILE_MB", "NAS_MAX_PIXELS",
              "NAS_DECODE_TIMEOUT", "MIGRATION_LOCK_TIMEOUT", "MIGRATION_STATEMENT_TIMEOUT",
              "MIGRATION_LOCK_RETRIES", "MIGRATION_RUNNER_LOCK_WAIT", "CANVAS_MIGRATION_BATCH_SIZE")


@lru_cache(maxsize=16)
def _cached(items: tuple[tuple[str, str], ...]) -> Settings:
    return from_env(dict(items))


def get_settings() -> Settings:
    """The settings of this process's environment (parsed once per distinct environment)."""
    return _cached(tuple((k, os.environ[k]) for k in _VARIABLES if k in os.environ))


def environment_secrets() -> list[str]:
    """Secrets of the environment even when it does not parse: a message about a malformed
    DATABASE_URL must still not carry its password."""
    out = [os.environ.get("QNAP_PASSWORD", "")]
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_BACKEND_URL", "DAGSTER_POSTGRES_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            out.append(value)
            out.extend(url_passwords(value))
    return [s for s in out if s]


def migrations_dir() -> Path:
    return get_settings().migrations_dir


def set_dagster_home(path: Path) -> None:
    """The instance Dagster opens is named by DAGSTER_HOME; the worker sets it once, here."""
    os.environ["DAGSTER_HOME"] = str(path)


def malloc_tuned_by_operator() -> bool:
    """Whether glibc's malloc thresholds were set through its own environment variables."""
    return any(v in os.environ for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))


def set_blas_default() -> None:
    """One OpenBLAS thread per process unless the environment says otherwise (see the package's docstring)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def set_process_defaults() -> None:
    """Environment that Dagster itself reads, for this process and the step processes it starts."""
    os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", DAGSTER_EVENT_BATCH_SIZE)


def set_database_url(url: str) -> None:
    """The demo points the whole process (and its step processes) at its embedded database."""
    os.environ["DATABASE_URL"] = url


def clear_nas_host() -> None:
    """The demo reads its generated folder, never a configured NAS."""
    for name in [n for n in os.environ if n.startswith("QNAP_")]:
        del os.environ[name]


def set_nas_base_path(path: Path) -> None:
    os.environ["NAS_BASE_PATH"] = str(path)

