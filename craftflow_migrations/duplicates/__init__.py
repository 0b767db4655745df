"""Duplicate designs: grouping (exact and near), the copy to keep, stored groups and a report."""
