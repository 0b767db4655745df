"""Discovery and ordering of migration files (no database needed)."""

from pathlib import Path

from craftflow_migrations.schema.discovery import dependents_of, discover

from .conftest import PACKAGE_MIGRATIONS


def write(folder: Path, name: str, body: str = "", depends: list[str] | None = None) -> Path:
    header = f"DEPENDS_ON = {depends!r}\n" if depends is not None else ""
    path = folder / f"{name}.py"
    path.write_text(f'"""{name}"""\nfrom sqlalchemy import text\n{header}{body}\ndef upgrade(connection):\n    pass\n')
    return path


def test_package_migrations_order_dependencies_first():
    plan = discover(PACKAGE_MIGRATIONS)
    assert plan.errors == []
    order = [m.name for m in plan.migrations]
    for m in plan.migrations:
        for dep in m.depends_on:
            assert order.index(dep) < order.index(m.name), (dep, m.name)
    assert order[0] == "add_multi_tenant_schema"
    assert plan.by_name()["run_canvas_size_migration"].kind == "complex"
    assert plan.by_name()["add_design_images_phash_index"].transactional is False
    assert all(m.has_downgrade for m in plan.migrations)


def test_ties_break_by_name_and_legacy_files_follow_declared_ones(tmp_path):
    write(tmp_path, "b_base", depends=[])
    write(tmp_path, "a_child", depends=["b_base"])
    write(tmp_path, "c_other", depends=[])
    write(tmp_path, "aa_legacy")  # no DEPENDS_ON: runs after every declared migration
    plan = discover(tmp_path)
    assert [m.name for m in plan.migrations] == ["b_base", "a_child", "c_other", "aa_legacy"]
    assert set(plan.by_name()["aa_legacy"].depends_on) == {"a_child", "b_base", "c_other"}
    assert dependents_of(plan, "b_base") == {"a_child", "aa_legacy"}


def test_import_error_names_the_migration(tmp_path):
    write(tmp_path, "add_x", body="import no_such_module_here\n", depends=[])
    plan = discover(tmp_path)
    assert plan.by_name()["add_x"].load_error == "Could not load add_x: No module named 'no_such_module_here'"


def test_syntax_error_names_file_and_line(tmp_path):
    (tmp_path / "broken.py").write_text("def upgrade(connection)\n    pass\n")
    plan = discover(tmp_path)
    assert plan.by_name()["broken"].load_error.startswith("Could not load broken: syntax error at line 1")


def test_cycle_and_missing_dependency_are_reported(tmp_path):
    write(tmp_path, "one", depends=["two"])
    write(tmp_path, "two", depends=["one"])
    write(tmp_path, "three", depends=["nowhere"])
    plan = discover(tmp_path)
    text = " | ".join(plan.errors)
    assert "Migration three (three.py) depends on 'nowhere', which does not exist" in text
    assert "Migration dependency cycle:" in text and "one" in text and "two" in text


def test_startup_cannot_depend_on_complex(tmp_path):
    write(tmp_path, "heavy", body='KIND = "complex"\n', depends=[])
    write(tmp_path, "light", depends=["heavy"])
    assert any("cannot depend on complex migration heavy" in e for e in discover(tmp_path).errors)
