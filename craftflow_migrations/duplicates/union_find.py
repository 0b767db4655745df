"""Disjoint sets of integers (group labels), for joining pairs transitively."""

from __future__ import annotations


class UnionFind:
    """Sets of integers, each alone until joined; only joined ones take memory, so a worker
    deciding a few components of a million labels holds just theirs. A set's root is its
    smallest member."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        while parent.get(x, x) != x:
            grand = parent.get(parent[x], parent[x])
            parent[x] = grand  # halve the path on the way up
            x = grand
        return x

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True
