"""Rows into PostgreSQL with ``COPY ... FROM STDIN (FORMAT binary)``.

A thumbnail sent through a multi-row ``INSERT`` travels as hex text: twice its size to
format on the client and to parse on the server. For 10,000 small designs (their own 9 KB
thumbnails) that was 2.1 CPU-s of the server and 0.8 of the client; binary COPY of the same
bytes took 0.8 and 0.25. Rows of ``design_images`` cost 0.45 + 0.7 CPU-s as 1,000-row
``INSERT``s and 0.1 + 0.4 through COPY into a temporary table (``benchmarks/README.md``).

Only the types the import writes are encoded, each NULL as ``None``.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone

from sqlalchemy.engine import Connection

_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_TRAILER = struct.pack("!h", -1)
_NULL = struct.pack("!i", -1)
_LENGTH = struct.Struct("!i")
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
# psycopg2 reads the stream 8 KB at a time by default, a call back into Python (and a hand-over
# of the GIL from the hashing thread) per 8 KB: 116,000 of them per 100,000 small thumbnails.
_SEND_BYTES = 1024 * 1024


def _varlena(value: str | bytes, out: list[bytes]) -> None:
    # Length and bytes as two pieces of the stream: joined once, at the end, not per value
    # (a 9 KB thumbnail was copied three times on its way into the stream).
    data = value.encode() if isinstance(value, str) else value
    out.append(_LENGTH.pack(len(data)))
    out.append(data)


def _fixed(fmt: str) -> Callable[[int, list[bytes]], None]:
    packer = struct.Struct(fmt)
    size = struct.pack("!i", packer.size)
    return lambda value, out: out.append(size + packer.pack(value))


_int8 = _fixed("!q")
_PG_EPOCH_US = (_PG_EPOCH - datetime(1970, 1, 1, tzinfo=timezone.utc)) // _US

# Binary forms: text, char(n) and enum labels are their UTF-8 bytes; timestamptz is int64
# microseconds since 2000-01-01 UTC (integer datetimes, PostgreSQL's only kind since 10), from
# a datetime or, as ``timestamptz_us``, from integer microseconds since the Unix epoch (a
# file's mtime as listed: no datetime made per file, and exact). Each encoder appends its
# value's pieces to the stream.
ENCODERS: dict[str, Callable[[object, list[bytes]], None]] = {
    "text": _varlena,
    "bytea": _varlena,
    "int2": _fixed("!h"),
    "int4": _fixed("!i"),
    "int8": _int8,
    "timestamptz": lambda value, out: _int8((value - _PG_EPOCH) // _US, out),
    "timestamptz_us": lambda value, out: _int8(value - _PG_EPOCH_US, out),
}


def encode(rows: Iterable[Sequence], types: Sequence[str]) -> bytes:
    """One COPY stream for ``rows``, each value of its column's type in ``types``."""
    encoders = [ENCODERS[t] for t in types]
    count = struct.pack("!h", len(types))
    out = [_HEADER]
    for row in rows:
        out.append(count)
        for enc, value in zip(encoders, row, strict=True):
            if value is None:
                out.append(_NULL)
            else:
                enc(value, out)
    out.append(_TRAILER)
    return b"".join(out)


# What a row's values other than bytea are taken to add to the stream, for the chunking below:
# generous, as the import's text values are names, hashes and one-line errors (a few hundred bytes).
ROW_BYTES_BESIDES_BYTEA = 4096


def copy_rows(conn: Connection, table: str, columns: Sequence[str], types: Sequence[str], rows: Iterable[Sequence],
              chunk_bytes: int = 32 * 1024 * 1024) -> None:
    """COPY ``rows`` into ``table`` in this connection's transaction (COPY has no ON CONFLICT).

    One COPY per ``chunk_bytes`` of bytea values (thumbnails, when they are kept in
    PostgreSQL) or of rows, so a flush never holds a second copy of all it sends. Only the
    bytea values are measured: summing every value's length cost 1.7 us a row.
    """
    statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT binary)"
    binary = [i for i, t in enumerate(types) if t == "bytea"]
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        chunk: list[Sequence] = []
        size = 0
        for row in rows:
            chunk.append(row)
            size += ROW_BYTES_BESIDES_BYTEA
            for i in binary:
                if row[i] is not None:
                    size += len(row[i])
            if size >= chunk_bytes:
                cursor.copy_expert(statement, io.BytesIO(encode(chunk, types)), size=_SEND_BYTES)
                chunk, size = [], 0
        if chunk:
            cursor.copy_expert(statement, io.BytesIO(encode(chunk, types)), size=_SEND_BYTES)
    finally:
        cursor.close()
