"""Duplicate designs: grouping (exact and near), the copy to keep, stored groups and a report."""


def load_libraries() -> None:
    """Import what grouping and the report load on first use (scipy.sparse, jinja2 and the
    templates: 0.2-0.4 s on one core with what scipy pulls in), so that a later grouping in this process starts at once.

    The worker calls it before an import run whose duplicates run follows, while the step
    forkserver still imports; after the run it was on the serial stretch before the duplicates.
    """
    from .grouping import load_sparse
    from .report import load_templates

    load_sparse()
    load_templates()
