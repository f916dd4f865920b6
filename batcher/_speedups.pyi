"""The types of :mod:`batcher._speedups` (a C extension; see ``batcher/_speedups.c``)."""

from collections.abc import Callable
from typing import Any

Fetch = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]

def write_rows(
    uri: str,
    sql: str,
    params: tuple[Any, ...],
    prefixes: tuple[bytes, ...],
    n_vars: int,
    dirfd: int,
    splits: frozenset[str],
    done: str,
    emulator: str,
    numbers: dict[str, int],
    counts: tuple[dict[Any, int], ...],
    caches: tuple[Any, ...],
    writer: Any,
    shard_size: int,
    fallback: Callable[[int, Fetch], None],
    languages: tuple[str, str, str],
) -> tuple[int, int, int, float | None, float | None]: ...
