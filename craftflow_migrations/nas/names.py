"""File and folder names from the NAS: bytes on disk, text in the table, keys in Dagster.

A decade-old share holds names that are not UTF-8 (Latin-1 from old Windows and Mac
clients), and names with newlines, quotes, ``%`` or backslashes. The rules, in one place:

- **Stored text** (``shop``, ``template``, ``path`` columns): a UTF-8 name exactly as it is.
  A name that is not valid UTF-8 is decoded with Python's ``backslashreplace``: each byte
  that is not part of a UTF-8 sequence becomes ``\\xNN`` (``caf\\xe9.png`` for Latin-1
  ``café.png``). Such a row also keeps the exact bytes of its path in ``path_bytes``, so
  the form is reversible; for UTF-8 names ``path_bytes`` is NULL.
- **Partition keys**: the stored text of shop and template, joined by ``/``, except that the
  substrings Dagster refuses in keys (``...`` and the control characters ``\\a \\b \\t \\n \\v
  \\f \\r \\0``) are written as ``\\xNN``.
- **Logs**: :func:`shown` quotes a name and escapes control characters, so a name with a
  newline is one log line, never two.
"""

from __future__ import annotations

_KEY_UNSAFE = {c: f"\\x{ord(c):02x}" for c in "\a\b\t\n\v\f\r\0"}


def text_of(raw: bytes) -> str:
    """The stored text of a name or path: exact for UTF-8, ``\\xNN`` for other bytes."""
    return raw.decode("utf-8", "backslashreplace")


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def key_part(text: str) -> str:
    """A shop or template text as Dagster accepts it in a partition key."""
    out = "".join(_KEY_UNSAFE.get(c, c) for c in text)
    while "..." in out:
        out = out.replace("...", ".\\x2e.", 1)
    return out


def partition_key(shop: str, template: str) -> str:
    return f"{key_part(shop)}/{key_part(template)}"


def split_partition_key(key: str) -> tuple[str, str]:
    """The key's two parts (as keys; see :func:`key_part`)."""
    shop, sep, template = key.partition("/")
    if not sep or not shop or not template:
        raise ValueError(f"Partition key {key!r} is not of the form <shop>/<template>")
    return shop, template


def shown(name: str | bytes) -> str:
    """A name for a log line: quoted, control characters and odd bytes escaped."""
    text = text_of(name) if isinstance(name, bytes) else name
    return repr(text)


def is_hidden(name: bytes) -> bool:
    # QNAP keeps its own bookkeeping in @Recently-Snapshot, .@__thumb, @Recycle and friends.
    return name.startswith((b".", b"@", b"#recycle"))
