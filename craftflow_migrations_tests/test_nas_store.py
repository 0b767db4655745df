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
