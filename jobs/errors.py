"""Exceptions of the job store.

The tree::

    JobStoreError                 anything the durable job table refuses or fails at
    ├── ManifestError             one located problem in a manifest (path, line, field)
    ├── ManifestInvalid           a manifest with one or more ManifestErrors; nothing was imported
    ├── LeaseLost                 a write carried a claim token that no longer owns the job
    ├── IllegalTransition         a state change the transition table does not allow
    ├── UnknownJob                no job has the id asked for
    ├── SchemaMismatch            the run folder's database was written by an unknown schema
    └── StoreUnavailable          the database could not be opened or written (locked, full, ...)
        └── StoreUnreachable      the connection to the database server was lost or refused

Each class's docstring is its default message.
"""

from __future__ import annotations

from typing import TypeVar

_E = TypeVar("_E", bound=BaseException)

__all__ = [
    "IllegalTransition",
    "JobStoreError",
    "LeaseLost",
    "ManifestError",
    "ManifestInvalid",
    "SchemaMismatch",
    "StoreUnavailable",
    "StoreUnreachable",
    "UnknownJob",
]


class JobStoreError(Exception):
    """The job store failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())

    def __reduce__(self) -> tuple[object, ...]:
        # Subclasses take other arguments (path, line, ...), so rebuild without calling
        # __init__: a manifest read in a helper process sends its errors back pickled.
        return (rebuild_error, (type(self), self.args, self.__dict__))


class ManifestError(JobStoreError):
    """The manifest has a problem."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.message = message
        super().__init__(self.format())

    def format(self) -> str:
        """One line: ``path:line: field: message`` (line and field only where known)."""
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class ManifestInvalid(JobStoreError):
    """The manifest is invalid; nothing was imported."""

    def __init__(self, errors: list[ManifestError], *, truncated: bool = False) -> None:
        self.errors = errors
        self.truncated = truncated
        lines = [e.format() for e in errors]
        if truncated:
            lines.append("... (more problems not shown)")
        super().__init__("\n".join(lines) or "The manifest is invalid; nothing was imported.")


class LeaseLost(JobStoreError):
    """The job's lease was lost to another worker; this write was not applied."""


class IllegalTransition(JobStoreError):
    """That state change is not allowed."""


class UnknownJob(JobStoreError):
    """No job has that id."""


class SchemaMismatch(JobStoreError):
    """The run folder's database has a schema this version of batcher does not know."""


class StoreUnavailable(JobStoreError):
    """The job database could not be read or written."""


class StoreUnreachable(StoreUnavailable):
    """The job database server could not be reached (the connection was lost or refused, or
    the server is restarting): a condition that may pass, unlike a full disk or a refused
    login. A run waits for the server to come back (``JobStore.outage``); any other command
    stops with the message."""


def rebuild_error(cls: type[_E], args: tuple[object, ...], state: dict[str, object]) -> _E:
    """Unpickle an error without calling its ``__init__`` (subclasses take other arguments):
    the ``__reduce__`` of JobStoreError here and of BatcherError in ``batcher.errors``."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error
