"""Find migration files, load them, read their metadata and order them.

A migration is a module with ``upgrade(connection)``; everything else is optional:

- ``DEPENDS_ON = ["other"]``: run after these. A file that does not say ``DEPENDS_ON``
  (the service's historical format) depends on every migration of its kind that does,
  so a dropped-in file always sees the full schema. ``DEPENDS_ON = []`` means "no
  dependencies".
- ``KIND = "startup" | "complex"`` (default ``startup``).
- ``TRANSACTIONAL = False`` for statements PostgreSQL refuses inside a transaction.

Order: dependencies first, then by name (the lexicographically smallest topological
order), so the same files always run in the same order.
"""

from __future__ import annotations

import hashlib
import heapq
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from types import ModuleType

KINDS = ("startup", "complex")


class MigrationPlanError(RuntimeError):
    """The set of migration files cannot be ordered (cycle, missing dependency, duplicate)."""


@dataclass
class Migration:
    name: str
    path: Path
    checksum: str
    kind: str = "startup"
    depends_on: tuple[str, ...] = ()
    declared_depends: bool = False
    transactional: bool = True
    description: str = ""
    upgrade: Callable | None = None
    downgrade: Callable | None = None
    load_error: str | None = None
    # Risk rules (``rules.py``) the migration accepts, by name, with the reason.
    acknowledged: dict[str, str] = field(default_factory=dict)

    @property
    def has_downgrade(self) -> bool:
        return self.downgrade is not None


@dataclass
class MigrationPlan:
    """Migrations in run order, and every problem found while loading them."""

    migrations: list[Migration] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, Migration]:
        return {m.name: m for m in self.migrations}

    def of_kind(self, kind: str) -> list[Migration]:
        return [m for m in self.migrations if m.kind == kind]

    def raise_for_errors(self) -> None:
        if self.errors:
            raise MigrationPlanError("; ".join(self.errors))


def file_checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


PACKAGE_DIR = Path(__file__).resolve().parent.parent / "migrations"


def _module_name(directory: Path, name: str) -> str:
    # Module names sit under "craftflow_migrations" so the migrations' own loggers are captured
    # by Dagster (managed_python_loggers); other folders get a unique segment so two folders
    # (tests, plugins) never collide in sys.modules.
    if directory.resolve() == PACKAGE_DIR:
        return f"craftflow_migrations.migrations.{name}"
    tag = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:10]
    return f"craftflow_migrations.external_{tag}.{name}"


def _load_module(path: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def load_migration(path: Path) -> Migration:
    """Load one file; a file that fails to load comes back with ``load_error`` set."""
    name = path.stem
    migration = Migration(name=name, path=path, checksum=file_checksum(path))
    try:
        module = _load_module(path, _module_name(path.parent, name))
    except SyntaxError as exc:
        migration.load_error = f"Could not load {name}: syntax error at line {exc.lineno}: {exc.msg}"
        return migration
    except Exception as exc:  # noqa: BLE001 - any import-time error is reported, not raised
        migration.load_error = f"Could not load {name}: {exc}"
        return migration

    upgrade = getattr(module, "upgrade", None)
    if not callable(upgrade):
        migration.load_error = f"Could not load {name}: it has no upgrade(connection) function"
        return migration
    migration.upgrade = upgrade
    downgrade = getattr(module, "downgrade", None)
    migration.downgrade = downgrade if callable(downgrade) else None
    migration.description = (inspect.getdoc(module) or "").strip()

    kind = getattr(module, "KIND", "startup")
    if kind not in KINDS:
        migration.load_error = f"Could not load {name}: KIND={kind!r} must be one of {', '.join(KINDS)}"
        return migration
    migration.kind = kind
    migration.transactional = bool(getattr(module, "TRANSACTIONAL", True))
    acknowledged = getattr(module, "ACKNOWLEDGE", {})
    if not isinstance(acknowledged, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                                     for k, v in acknowledged.items()):
        migration.load_error = (f"Could not load {name}: ACKNOWLEDGE must map rule names to reasons, "
                                'e.g. {"index-without-concurrently": "the table is tiny"}')
        return migration
    migration.acknowledged = dict(acknowledged)
    if hasattr(module, "DEPENDS_ON"):
        deps = module.DEPENDS_ON
        if isinstance(deps, str) or not all(isinstance(d, str) for d in deps):
            migration.load_error = f"Could not load {name}: DEPENDS_ON must be a list of migration names"
            return migration
        migration.depends_on = tuple(deps)
        migration.declared_depends = True
    return migration


def migration_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.glob("*.py") if not p.name.startswith(("_", ".")) and p.is_file()
    )


def _lexicographic_topological_order(graph: dict[str, set[str]]) -> list[str]:
    sorter = TopologicalSorter(graph)
    sorter.prepare()
    ready: list[str] = list(sorter.get_ready())
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        node = heapq.heappop(ready)
        order.append(node)
        sorter.done(node)
        for nxt in sorter.get_ready():
            heapq.heappush(ready, nxt)
    return order


def discover(directory: Path) -> MigrationPlan:
    """Load every migration file in ``directory`` and order them.

    Structural problems (cycles, missing dependencies, duplicates) go into
    ``plan.errors``; a file that fails to import stays in the plan with its
    ``load_error`` so it fails, alone, when it is run.
    """
    plan = MigrationPlan()
    loaded: dict[str, Migration] = {}
    for path in migration_files(directory):
        migration = load_migration(path)
        if migration.name in loaded:
            plan.errors.append(f"Duplicate migration name {migration.name!r} ({path})")
            continue
        loaded[migration.name] = migration

    declared = {
        kind: sorted(m.name for m in loaded.values() if m.kind == kind and m.declared_depends)
        for kind in KINDS
    }
    graph: dict[str, set[str]] = {}
    for m in loaded.values():
        if m.load_error:
            graph[m.name] = set()
            continue
        if not m.declared_depends:
            m.depends_on = tuple(declared[m.kind])
        for dep in m.depends_on:
            if dep not in loaded:
                plan.errors.append(f"Migration {m.name} ({m.path.name}) depends on {dep!r}, which does not exist")
            elif loaded[dep].kind == "complex" and m.kind == "startup":
                plan.errors.append(
                    f"Startup migration {m.name} cannot depend on complex migration {dep}: "
                    "startup migrations run before complex ones"
                )
        graph[m.name] = {d for d in m.depends_on if d in loaded}

    try:
        order = _lexicographic_topological_order(graph)
    except CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        plan.errors.append(f"Migration dependency cycle: {cycle}; break it by editing DEPENDS_ON")
        order = sorted(loaded)
    plan.migrations = [loaded[name] for name in order]
    return plan


def dependents_of(plan: MigrationPlan, name: str) -> set[str]:
    """Every migration that (transitively) depends on ``name``."""
    children: dict[str, set[str]] = {m.name: set() for m in plan.migrations}
    for m in plan.migrations:
        for dep in m.depends_on:
            children.setdefault(dep, set()).add(m.name)
    out: set[str] = set()
    stack = [name]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out
