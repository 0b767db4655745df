"""List the NAS: ``<base>/<shop>/<template>/`` folders and every file under them.

Every entry a decade-old share can hold is decided here, once, for every backend:

- names that are not UTF-8 are kept as bytes and stored in the documented text form
  (``names.py``); names with newlines, quotes, ``%``, backslashes are kept exactly;
- hidden entries (``.DS_Store``, ``@Recycle``, ``.@__thumb``) are ignored;
- **symbolic links are never followed**. Every real file under the base is reached by the
  walk itself, so following a link could only import a file a second time (an alias), leave
  the base, or loop (``loop -> .``). Each link is recorded with where it leads;
- a folder or file that cannot be read is recorded with the reason, and rows already imported
  from under an unreadable folder are kept, never marked removed;
- two names that end up with the same text (or the same partition key) are recorded, not
  merged.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import pickle
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

from .clients.base import Entry, NasClient, NasError
from .names import is_hidden, is_utf8, partition_key, shown, split_partition_key, text_of

log = logging.getLogger("craftflow_migrations.nas")
# Folders listed in one exchange with the NAS (their requests in flight together). Listing 3,000
# folders over loopback sshd, alternated: 16 at once 0.71-1.21 s, 32 0.80-1.03, 64 0.55-0.74.
FOLDERS_AT_ONCE = 64


@dataclass(frozen=True, slots=True)
class NasFile:
    """A file under the base path. ``path`` is the stored text, relative to the base."""

    shop: str
    template: str
    path: str
    size: int
    mtime_us: int
    raw_path: bytes | None = None  # the exact bytes, only when the path is not UTF-8

    @property
    def rel(self) -> bytes:
        return self.raw_path if self.raw_path is not None else self.path.encode()

    @property
    def key(self) -> str:
        return partition_key(self.shop, self.template)

    def __reduce__(self):
        # Pickled as a plain tuple: a slots dataclass's own __getstate__ calls fields() for
        # every object, 0.9 of the 1.2 s it took to save a listing of 100,000 files (and again
        # for every batch step's input).
        return NasFile, (self.shop, self.template, self.path, self.size, self.mtime_us, self.raw_path)


@dataclass(frozen=True, slots=True)
class ListingProblem:
    path: str  # stored text, relative to the base
    reason: str

    def line(self) -> str:
        return f"{shown(self.path)}: {self.reason}"


@dataclass(frozen=True, slots=True)
class PartitionFolder:
    key: str
    shop: str
    template: str
    raw: bytes  # relative path of the folder, exact bytes


@dataclass
class PartitionListing:
    folder: PartitionFolder
    files: list[NasFile] = field(default_factory=list)
    problems: list[ListingProblem] = field(default_factory=list)
    # Folders (stored text, relative to the base) that could not be listed: rows under them stay.
    unlisted: list[str] = field(default_factory=list)
    missing: bool = False  # the folder itself is gone from the NAS

    @property
    def key(self) -> str:
        return self.folder.key

    @cached_property
    def fingerprint(self) -> str:
        """A digest of every file's path, size and mtime, and of what could not be listed.

        Read only once the listing is complete, and computed once: the worker's check for an
        unchanged NAS, its run and the plan step (which gets it pickled with the listing) each
        read it, 0.07 s for 100,000 files when each computed it.
        """
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f"{f.path}\0{f.size}\0{f.mtime_us}\n".encode("utf-8", "surrogatepass"))
        for p in self.problems:
            digest.update(f"!{p.path}\0{p.reason}\n".encode("utf-8", "surrogatepass"))
        return digest.hexdigest()[:32]


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _link_problem(rel: bytes, target: bytes | None) -> str:
    """What a link at ``rel`` is, from where it leads (``NasClient.resolve``)."""
    if target is None:
        return "symbolic link that is broken or loops; not followed"
    if target == b".." or target.startswith(b"../"):
        return "symbolic link to outside NAS_BASE_PATH; ignored"
    parent = rel.rpartition(b"/")[0]
    if target == b"." or parent == target or parent.startswith(target + b"/"):
        return f"symbolic link loop (to {shown(target)}); not followed"
    return f"symbolic link to {shown(target)}, imported under its own path; not followed"


def _other_problem(entry: Entry) -> str:
    if entry.error is None:
        return "not a regular file or folder; skipped"
    if entry.error.errno == errno.ENAMETOOLONG:
        return (f"could not be examined ({_why(entry.error)}): the path is longer than the file system "
                "allows; shorten the folder names above it")
    return f"could not be examined ({_why(entry.error)}); skipped"


def list_partition_folders(client: NasClient) -> tuple[list[PartitionFolder], list[ListingProblem]]:
    """Every ``<shop>/<template>`` folder, sorted by key, and what could not be listed."""
    try:
        shops = client.scandir(b"")
    except OSError as exc:
        raise NasError(f"Cannot list NAS_BASE_PATH on {client.description}: {_why(exc)} "
                       "(check NAS_BASE_PATH and the NAS user's permissions)") from None
    folders: dict[str, PartitionFolder] = {}
    problems: list[ListingProblem] = []
    shops = sorted((e for e in shops if not is_hidden(e.name)), key=lambda e: e.name)
    shop_dirs = [shop for shop in shops if shop.kind == "dir"]
    scanned = [result for i in range(0, len(shop_dirs), FOLDERS_AT_ONCE)
               for result in client.scandir_each([s.name for s in shop_dirs[i:i + FOLDERS_AT_ONCE]])]
    # Shops and templates that are links, resolved together (shops sharing templates by links).
    shop_links = [shop.name for shop in shops if shop.kind == "link"]
    links = shop_links + [_join(shop.name, t.name) for shop, templates in zip(shop_dirs, scanned, strict=True)
                          if not isinstance(templates, OSError)
                          for t in templates if t.kind == "link" and not is_hidden(t.name)]
    targets = dict(zip(links, client.resolve_each(links), strict=True)) if links else {}
    problems += [ListingProblem(text_of(name), _link_problem(name, targets[name])) for name in shop_links]
    for shop, templates in zip(shop_dirs, scanned, strict=True):
        if isinstance(templates, OSError):
            problems.append(ListingProblem(text_of(shop.name), f"shop folder could not be listed: {_why(templates)}"))
            continue
        for template in sorted(templates, key=lambda e: e.name):
            rel = _join(shop.name, template.name)
            if is_hidden(template.name):
                continue
            if template.kind == "link":
                problems.append(ListingProblem(text_of(rel), _link_problem(rel, targets[rel])))
                continue
            if template.kind != "dir":
                continue
            folder = PartitionFolder(partition_key(text_of(shop.name), text_of(template.name)),
                                     text_of(shop.name), text_of(template.name), rel)
            if folder.key in folders:
                problems.append(ListingProblem(text_of(rel), f"folder has the same partition key as "
                                               f"{shown(folders[folder.key].raw)}; rename one of them"))
                continue
            folders[folder.key] = folder
    return sorted(folders.values(), key=lambda f: f.key), problems


class _PartitionWalk:
    """Every file under one partition folder, without following links.

    The walk hands out the folders it has still to list (``take``) and is given each one's
    entries, or the ``OSError`` listing it raised (``add``), so that the subfolders of one
    partition, and many partitions, are listed with their requests in flight together. What
    the entries mean is decided at the end (``finished``), folder by folder in depth-first
    order: the problems' order (and so the fingerprint), and which of two names with the same
    stored text is kept, never depend on how the folders were fetched.
    """

    def __init__(self, folder: PartitionFolder):
        self.folder = folder
        self.pending = [folder.raw]
        self.links: list[bytes] = []  # resolved together (``NasClient.resolve_each``), then given to ``finished``
        self._listed: dict[bytes, list[Entry] | OSError] = {}

    def take(self, most: int) -> list[bytes]:
        # From the end: a deep tree keeps few folders pending, and each take costs its length.
        rels = self.pending[-most:] if most > 0 else []
        del self.pending[len(self.pending) - len(rels):]
        return rels

    def add(self, rel: bytes, entries: list[Entry] | OSError) -> None:
        self._listed[rel] = entries
        if not isinstance(entries, OSError):
            for e in entries:
                if is_hidden(e.name):
                    continue
                if e.kind == "dir":
                    self.pending.append(_join(rel, e.name))
                elif e.kind == "link":
                    self.links.append(_join(rel, e.name))

    def finished(self, targets: dict[bytes, bytes | None]) -> PartitionListing:
        folder, listing = self.folder, PartitionListing(self.folder)
        seen: set[str] = set()
        stack = [folder.raw]
        while stack:
            rel = stack.pop()
            entries = self._listed.pop(rel)
            if isinstance(entries, OSError):
                if rel == folder.raw and entries.errno == errno.ENOENT:
                    listing.missing = True
                    return listing
                listing.problems.append(ListingProblem(text_of(rel), f"folder could not be listed: {_why(entries)}"))
                listing.unlisted.append(text_of(rel))
                continue
            for e in entries:
                if is_hidden(e.name):
                    continue
                child = _join(rel, e.name)
                if e.kind == "dir":
                    stack.append(child)
                elif e.kind == "link":
                    listing.problems.append(ListingProblem(text_of(child), _link_problem(child, targets[child])))
                elif e.kind == "other":
                    listing.problems.append(ListingProblem(text_of(child), _other_problem(e)))
                else:
                    text = text_of(child)
                    if text in seen:
                        listing.problems.append(ListingProblem(
                            text, "name is not UTF-8 and its stored form equals another file's name; rename it"))
                        continue
                    seen.add(text)
                    listing.files.append(NasFile(folder.shop, folder.template, text, e.size, e.mtime_us,
                                                 None if is_utf8(child) else child))
        listing.files.sort(key=lambda f: f.path)
        return listing


def list_partitions(client: NasClient, folders: Sequence[PartitionFolder]) -> dict[str, PartitionListing]:
    """Each folder's listing: FOLDERS_AT_ONCE folders, of one partition or of many, listed per
    exchange (``NasClient.scandir_each``), so a NAS of thousands of small partitions, or a
    template folder of a thousand order folders, costs round trips in parallel, not one after
    another, and never more than FOLDERS_AT_ONCE handles open on the NAS."""
    out: dict[str, PartitionListing] = {}
    todo = iter(folders)
    active: list[_PartitionWalk] = []
    while True:
        while len(active) < FOLDERS_AT_ONCE and (folder := next(todo, None)) is not None:
            active.append(_PartitionWalk(folder))
        asked: list[tuple[_PartitionWalk, bytes]] = []
        for walk in active:
            asked += [(walk, rel) for rel in walk.take(FOLDERS_AT_ONCE - len(asked))]
        if not asked:
            return out
        for (walk, rel), entries in zip(asked, client.scandir_each([rel for _, rel in asked]), strict=True):
            walk.add(rel, entries)
        done = [walk for walk in active if not walk.pending]
        links = [rel for walk in done for rel in walk.links]
        targets = dict(zip(links, client.resolve_each(links), strict=True)) if links else {}
        for walk in done:
            out[walk.folder.key] = walk.finished(targets)
        active = [walk for walk in active if walk.pending]


@dataclass
class SavedListing:
    """A run's listing, written by the worker and read by the run's plan step: listed once per run."""

    listed_at: datetime
    partitions: dict[str, PartitionListing]


# The run tag naming the listing file of a run the worker started.
LISTING_TAG = "craftflow/listing"
# A worker killed during its run leaves the run's listing; the next save removes it.
STALE_LISTING_S = 24 * 3600


def save_listing(folder: Path, listing: SavedListing) -> Path:
    """Pickled into Dagster's own storage folder (where step outputs are pickled too)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in folder.glob("listing-*"):
        try:
            if now - old.stat().st_mtime > STALE_LISTING_S:
                old.unlink()
        except OSError:
            pass  # another worker's, removed meanwhile
    path = folder / f"listing-{uuid.uuid4().hex}.pickle"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(listing, protocol=pickle.HIGHEST_PROTOCOL))
    tmp.replace(path)
    return path


def load_listing(path: str | None, keys: Sequence[str]) -> SavedListing | None:
    """The saved listing of these keys, or None (no tag, file gone, or not covering every key)."""
    if not path or not Path(path).is_file():
        return None
    saved: SavedListing = pickle.loads(Path(path).read_bytes())
    if not all(k in saved.partitions for k in keys):
        return None
    return SavedListing(saved.listed_at, {k: saved.partitions[k] for k in keys})


def list_nas(client: NasClient, keys: Sequence[str] | None = None,
             logger: logging.Logger | None = None) -> tuple[dict[str, PartitionListing], list[ListingProblem]]:
    """List every partition (or those of ``keys``), over one connection.

    A requested key whose folder is no longer on the NAS comes back ``missing``.
    """
    logger = logger or log
    folders, problems = list_partition_folders(client)
    by_key = {f.key: f for f in folders}
    wanted = list(by_key if keys is None else keys)
    listed = list_partitions(client, [by_key[key] for key in wanted if key in by_key])
    out: dict[str, PartitionListing] = {
        key: listed[key] if key in listed else
        PartitionListing(PartitionFolder(key, *split_partition_key(key), b""), missing=True)
        for key in wanted}
    for p in problems:
        logger.warning(f"NAS listing: {p.line()}")
    return out, problems

