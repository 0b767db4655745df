"""design_images statements against real PostgreSQL: per-run grouped counts and shop links."""

from sqlalchemy import text

from craftflow_migrations.db import get_engine
from craftflow_migrations.nas import store
from craftflow_migrations.nas.hashing import ImageFacts
from craftflow_migrations.nas.listing import NasFile

ODD = ("Ünïcode 'Shop' \"Q\"", "Poster 50×70, matte")


def facts(sha: str) -> ImageFacts:
    return ImageFacts(sha * 64, "0" * 64, 10, 10, "PNG")


def put(conn, shop: str, template: str, path: str, sha: str, failed: bool = False) -> None:
    f = NasFile(shop, template, f"{shop}/{template}/{path}", 1, 0)
    row = store.row_for(f, ImageFacts(None, None, None, None, None, "unreadable image") if failed else facts(sha),
                        store.EPOCH)
    store.upsert(conn, [row])


def test_exact_duplicate_counts_for_every_partition_of_a_run_in_one_query(migrated_url):
    engine = get_engine(migrated_url)
    with engine.begin() as conn:
        put(conn, *ODD, "a.png", "a")
        put(conn, *ODD, "b.png", "b")
        put(conn, "Shop B", "T1", "copy of a.png", "a")  # same bytes in another partition
        put(conn, "Shop B", "T1", "c.png", "c")
        put(conn, "Shop B", "T1", "c again.png", "c")  # and twice within one
        put(conn, "Shop B", "T1", "broken.png", "x", failed=True)
        put(conn, "Shop C", "T1", "d.png", "d")
        store.mark_removed(conn, [("Shop C", "T1", "Shop C/T1/d.png")], store.EPOCH)
        put(conn, "Shop D", "T1", "d.png", "d")  # its twin is removed: not a duplicate any more

        counts = store.exact_duplicate_counts(conn, [ODD, ("Shop B", "T1"), ("Shop D", "T1"), ("Empty", "T")])
    assert counts == {ODD: 1, ("Shop B", "T1"): 3, ("Shop D", "T1"): 0, ("Empty", "T"): 0}
    with engine.connect() as conn:
        assert store.exact_duplicate_counts(conn, []) == {}


def test_link_shops_links_unambiguous_names_only(migrated_url):
    engine = get_engine(migrated_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, slug) VALUES (1, 'Acme', 'acme'), (2, 'Other', 'other')"))
        conn.execute(text("INSERT INTO shops (tenant_id, name, platform) VALUES "
                          "(1, :odd, 'etsy'), (1, 'Twice', 'etsy'), (2, 'Twice', 'shopify')"),
                     {"odd": ODD[0]})
        put(conn, *ODD, "a.png", "a")
        put(conn, "Twice", "T", "b.png", "b")
        put(conn, "Nowhere", "T", "c.png", "c")
        store.link_shops(conn, [ODD[0], "Twice", "Nowhere", ODD[0]])
        linked = dict(conn.execute(text(
            "SELECT d.shop, s.name FROM design_images d LEFT JOIN shops s ON s.id = d.shop_id")).all())
    assert linked == {ODD[0]: ODD[0], "Twice": None, "Nowhere": None}


def test_upsert_by_copy_keeps_every_value_exactly(migrated_url):
    """Binary COPY round trip: hostile names, raw path bytes with NUL and high bytes, NULLs,
    exact microseconds before and after 2000 (PostgreSQL's epoch), the newer-listing guard."""
    engine = get_engine(migrated_url)
    hostile = "Shop \\x9e\t\"tab\"\nnew line, 'quote' \\N é 日本"
    raw = b"Shop \x9e\x00\xff/odd.png"
    early, late = store.to_timestamp(-1), store.to_timestamp(1_700_000_000_123_457)
    rows = [
        store.row_for(NasFile(hostile, "T", f"{hostile}/T/a.png", 123_456_789_012, -1, raw),
                      ImageFacts("a" * 64, "f" * 64, 70_000, 1, "PNG"), late),
        store.row_for(NasFile("Shop", "T", "Shop/T/broken.png", 0, 1_700_000_000_123_457),
                      ImageFacts(None, None, None, None, None, "unreadable image: \\ tab\there"), early),
    ]
    with engine.begin() as conn:
        assert store.upsert(conn, rows) == 2
        assert store.upsert(conn, []) == 0
        got = {r.path: r for r in conn.execute(text(
            "SELECT shop, path, path_bytes, size_bytes, mtime, sha256, phash, hash_size, width, height, format, "
            "status::text AS status, error, listed_at FROM design_images"))}
    a, b = got[f"{hostile}/T/a.png"], got["Shop/T/broken.png"]
    assert (a.shop, bytes(a.path_bytes), a.size_bytes, store.mtime_us(a.mtime)) == (hostile, raw, 123_456_789_012, -1)
    assert (a.sha256, a.phash, a.hash_size, a.width, a.height, a.format, a.status, a.error) == (
        "a" * 64, "f" * 64, 16, 70_000, 1, "PNG", "ok", None)
    assert a.listed_at == late
    assert (b.path_bytes, b.sha256, b.phash, b.width, b.status, b.error) == (
        None, None, None, None, "failed", "unreadable image: \\ tab\there")
    assert store.mtime_us(b.mtime) == 1_700_000_000_123_457 and b.listed_at == early

    # An older listing changes nothing; a newer one replaces the row.
    stale = store.row_for(NasFile(hostile, "T", f"{hostile}/T/a.png", 1, 5, raw),
                          ImageFacts("b" * 64, "0" * 64, 1, 1, "PNG"), early)
    with engine.begin() as conn:
        assert store.upsert(conn, [stale]) == 0
        assert store.upsert(conn, [stale._replace(listed_at=late)]) == 1
        assert conn.execute(text("SELECT sha256 FROM design_images WHERE size_bytes = 1")).scalar() == "b" * 64


def _waits_then_commits(engine, other, write):
    """Run ``write(conn)`` in its own transaction on a thread while ``other`` holds uncommitted
    rows: it must wait on their keys; ``other`` then commits. Returns what ``write`` returned,
    or raises what it raised."""
    import threading

    outcome: list = []

    def run() -> None:
        try:
            with engine.begin() as conn:
                outcome.append(write(conn))
        except BaseException as exc:  # noqa: BLE001 - raised again below
            outcome.append(exc)

    writer = threading.Thread(target=run)
    writer.start()
    writer.join(1.0)
    assert writer.is_alive(), "the COPY should wait for the other transaction's keys"
    other.commit()
    writer.join(30)
    (result,) = outcome
    if isinstance(result, BaseException):
        raise result
    return result


def test_thumbnails_by_copy_keep_the_first_and_survive_a_concurrent_writer(migrated_url):
    """A sha256 already stored keeps its bytes; one stored by another transaction between the
    look-up and the COPY (two batch steps importing byte-identical files) costs no error."""
    engine = get_engine(migrated_url)
    with engine.begin() as conn:
        store.save_thumbnails(conn, {"1" * 64: b"first\x00"})
        store.save_thumbnails(conn, {"1" * 64: b"second", "2" * 64: b"\x00\xff" * 40_000})
    with engine.connect() as other:
        other.execute(text("INSERT INTO design_thumbnails (sha256, jpeg) VALUES (:s, 'theirs')"), {"s": "3" * 64})
        # Does not see the uncommitted row, so COPYs it and waits on its unique key.
        _waits_then_commits(engine, other, lambda conn: store.save_thumbnails(
            conn, {"3" * 64: b"ours", "4" * 64: b"four"}))
    with engine.connect() as conn:
        stored = {r.sha256: bytes(r.jpeg) for r in conn.execute(text("SELECT sha256, jpeg FROM design_thumbnails"))}
    assert stored == {"1" * 64: b"first\x00", "2" * 64: b"\x00\xff" * 40_000, "3" * 64: b"theirs", "4" * 64: b"four"}


def test_packed_thumbnails_survive_a_concurrent_writer_too(migrated_url, tmp_path):
    """The same race with thumbnails in packs: our COPY of index rows rolls back to its
    savepoint, the rows go in with ON CONFLICT DO NOTHING, and every sha256 reads back the
    picture of whichever import indexed it first (ours, for the one nobody else had)."""
    from craftflow_migrations.nas.thumbnail_packs import PackWriter

    engine = get_engine(migrated_url)
    folder = tmp_path / "thumbs"
    packs = PackWriter(folder)
    with engine.connect() as other:
        other.execute(text("INSERT INTO design_thumbnails (sha256, jpeg) VALUES (:s, 'theirs')"), {"s": "3" * 64})
        _waits_then_commits(engine, other, lambda conn: store.save_thumbnails(
            conn, {"3" * 64: b"ours", "4" * 64: b"four"}, packs))
    packs.close()
    with engine.connect() as conn:
        assert store.thumbnails(conn, ["3" * 64, "4" * 64], folder) == {"3" * 64: b"theirs", "4" * 64: b"four"}
        assert conn.execute(text("SELECT pack IS NOT NULL FROM design_thumbnails WHERE sha256 = :s"),
                            {"s": "4" * 64}).scalar()


def _stored_rows(conn) -> dict:
    return {r.path: tuple(r) for r in conn.execute(text(
        "SELECT shop, template, path, path_bytes, size_bytes, mtime, sha256, phash, hash_algorithm, hash_size, "
        "width, height, format, status::text AS status, error, listed_at, removed_at FROM design_images"))}


def test_fresh_rows_copied_straight_in_equal_those_upserted(migrated_url):
    """A first import's rows skip the temporary table: the same values, exactly."""
    hostile = "Shop \\x9e\t\"tab\"\nnew line, 'quote' \\N é 日本"
    late = store.to_timestamp(1_700_000_000_123_457)
    rows = [store.row_for(NasFile(hostile, "T", f"{hostile}/T/{i}.png", i, -i, b"\x9e\x00" if i else None),
                          ImageFacts(f"{i:064x}", "f" * 64, i + 1, 2, "PNG") if i % 3 else
                          ImageFacts(None, None, None, None, None, "unreadable image: \\ tab\there"), late)
            for i in range(6)]
    engine = get_engine(migrated_url)
    with engine.begin() as conn:
        assert store.upsert(conn, rows) == 6
        upserted = _stored_rows(conn)
        conn.execute(text("DELETE FROM design_images"))
        assert store.upsert(conn, rows[:2], fresh=rows[2:]) == 6
        assert _stored_rows(conn) == upserted
        conn.execute(text("DELETE FROM design_images"))
        assert store.upsert(conn, [], fresh=rows) == 6
        assert _stored_rows(conn) == upserted


def test_fresh_rows_another_import_inserted_meanwhile_keep_the_newer_listing(migrated_url):
    """Two deploys importing one new folder: the other commits rows for two of our files
    while our COPY waits on their keys. The COPY rolls back to its savepoint and our rows
    take the guarded upsert: the newer listing wins each row, and nothing is lost."""
    early, late = store.to_timestamp(1_000), store.to_timestamp(2_000)
    files = [NasFile("Shop", "T", f"Shop/T/{i}.png", 10 + i, 5) for i in range(4)]
    ours = [store.row_for(f, ImageFacts(f"{i:064x}", "a" * 64, 1, 1, "PNG"), early) for i, f in enumerate(files)]
    engine = get_engine(migrated_url)
    with engine.connect() as other:
        theirs = [store.row_for(files[0], ImageFacts("b" * 64, "b" * 64, 1, 1, "PNG"), late),  # newer: kept
                  store.row_for(files[1], ImageFacts("c" * 64, "c" * 64, 1, 1, "PNG"), store.to_timestamp(500))]
        store.upsert(other, theirs)
        assert _waits_then_commits(engine, other, lambda conn: store.upsert(conn, [], fresh=ours)) == 3
    with engine.connect() as conn:
        got = {r.path: (r.sha256, r.listed_at) for r in conn.execute(
            text("SELECT path, sha256, listed_at FROM design_images"))}
    assert got == {"Shop/T/0.png": ("b" * 64, late), "Shop/T/1.png": (f"{1:064x}", early),
                   "Shop/T/2.png": (f"{2:064x}", early), "Shop/T/3.png": (f"{3:064x}", early)}


def test_thumbnail_look_ups_use_the_primary_key(migrated_url):
    """Keys sent as text[] made PostgreSQL cast the char(64) column and read the whole table
    (or, with seq scans forbidden, the whole index) on every flush; in the column's type the
    primary key is searched for exactly those keys."""
    engine = get_engine(migrated_url)
    shas = [f"{i:064x}" for i in range(3)]
    with engine.begin() as conn:
        store.save_thumbnails(conn, {sha: sha.encode() for sha in shas})
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        for statement in (store.STORED_THUMBNAILS, store.THUMBNAILS):
            plan = "\n".join(conn.execute(text(f"EXPLAIN {statement}"), {"s": shas[:2]}).scalars())
            assert "Index Cond: (sha256 = ANY" in plan and "Filter" not in plan, plan
        assert store.thumbnails(conn, [shas[1], shas[1], "f" * 64]) == {shas[1]: shas[1].encode()}


def test_thumbnails_are_stored_out_of_line_without_compression(migrated_url):
    """Thumbnails are compressed images: PostgreSQL must not spend a pglz attempt on each one.
    Even a value pglz would shrink to almost nothing is stored as its own bytes."""
    engine = get_engine(migrated_url)
    with engine.begin() as conn:
        store.save_thumbnails(conn, {"5" * 64: b"\x00" * 50_000})
        storage = conn.execute(text("SELECT attstorage FROM pg_attribute WHERE attrelid = "
                                    "'design_thumbnails'::regclass AND attname = 'jpeg'")).scalar()
        stored = conn.execute(text("SELECT pg_column_size(jpeg) FROM design_thumbnails")).scalar()
    assert (storage, stored) == ("e", 50_000)


def test_a_batch_writes_its_rows_linked_to_their_shop(migrated_url, tmp_path):
    """Rows go in with the shop of the folder's name, where exactly one shop has it: the summary's
    link_shops then moves nothing (linked afterwards, every row was written twice). A re-import
    of a folder no shop matches any more keeps the row's link."""
    from datetime import datetime, timezone

    from craftflow_migrations.nas.clients.local import LocalNasClient
    from craftflow_migrations.nas.importer import import_batch
    from craftflow_migrations.nas.listing import list_nas
    from craftflow_migrations.settings import NasSettings

    from .support import write_corpus

    engine = get_engine(migrated_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, slug) VALUES (1, 'Acme', 'acme'), (2, 'Other', 'other')"))
        conn.execute(text("INSERT INTO shops (tenant_id, name, platform) VALUES "
                          "(1, :odd, 'etsy'), (1, 'Twice', 'etsy'), (2, 'Twice', 'shopify')"), {"odd": ODD[0]})
    base = tmp_path / "nas"
    write_corpus(base, {ODD: 3, ("Twice", "T"): 2, ("Nowhere", "T"): 2}, size=(40, 30))
    settings = NasSettings(thumbnail_dir=str(tmp_path / "thumbs"))

    def import_all(had_rows):
        files = [f for li in list_nas(LocalNasClient(base))[0].values() for f in li.files]
        import_batch(LocalNasClient(base), engine, files, datetime.now(timezone.utc), settings, had_rows=had_rows)

    def links():
        with engine.connect() as conn:
            return sorted(conn.execute(text(
                "SELECT d.shop, s.name FROM design_images d LEFT JOIN shops s ON s.id = d.shop_id")).all())

    import_all(frozenset())
    expected = sorted([(ODD[0], ODD[0])] * 3 + [("Twice", None)] * 2 + [("Nowhere", None)] * 2)
    assert links() == expected
    with engine.begin() as conn:
        assert store.link_shops(conn, [ODD[0], "Twice", "Nowhere"]) == set()
        conn.execute(text("UPDATE shops SET name = 'Renamed' WHERE name = :odd"), {"odd": ODD[0]})
        conn.execute(text("UPDATE design_images SET size_bytes = 0"))  # every file changed: re-imported
    import_all(None)  # a retry's way: through the upsert
    assert links() == sorted([(ODD[0], "Renamed")] * 3 + [("Twice", None)] * 2 + [("Nowhere", None)] * 2)
