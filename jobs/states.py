"""The job state machine: one pure transition table.

Theory of operation
-------------------
A job is born ``pending``. A worker *claims* it: the store moves it to ``running`` under a
lease (an expiry time) and a fresh claim token. Every later write for that attempt carries
the token; the store applies it only while the token still owns the job (fencing), so a
worker that stalled past its lease cannot overwrite the result of the worker that took over.

``running`` ends in one of four ways:

* the API answered with an image: ``generated``. The request_id, usage, cost and the signed
  image URL are written *before* any download starts, so a crash after this point never pays
  for the image again while the URL is valid;
* a transient error: back to ``pending`` with a later ``next_attempt_at`` (the delay is stored,
  so a restart respects it);
* a permanent error, or attempts exhausted: ``failed`` with the code, message and request_id;
* a run-level stop or a crash: back to ``pending`` with no attempt charged (``release``), or,
  after a crash, when the lease expires (``reclaim``).

``generated`` is also leased while its image downloads. It ends ``done`` once the file is
verified and renamed into place, stays ``generated`` (lease dropped, a later
``next_attempt_at``) when a download fails transiently, and goes back to ``pending`` only when
its URL has expired: that is the one case in which an image is generated and paid for twice.

``withdrawn`` is a job whose row left the manifest (deleted, or an id-less row whose content,
and so whose derived id, changed). An import moves every job not in the manifest there, except
one that is ``running`` (a live run holds it; the next import withdraws it). A withdrawn job is
never claimed, and keeps its record and its image if it had one. When its row comes back, it
goes back where its record says it was: ``done`` (it has its file), ``failed``,
``generated`` (paid for, not yet downloaded) or ``pending``.

``done`` and ``failed`` are terminal for a run: they go back only when a person asks, and
both ways are one mechanism in the store (the job's record is first copied to the history
table with the reason, then the job moves):

* ``batcher retry``: ``failed`` goes back to ``pending``, or to ``generated`` when the image
  was paid for and its URL is still valid;
* ``batcher redo``: ``done`` goes back to ``pending`` (with a new seed, or a given seed or
  prompt). The previous image is kept: the caller moves it under the run folder's
  ``history/`` and the history record names where it went. A ``running`` job, or one with no
  image, cannot be redone.

Re-importing a changed row with ``--replace`` resets any state to ``pending`` and keeps the
old record in the history table as well.

What survives a crash: everything committed. SQLite runs in WAL mode with
``synchronous=FULL``, so a committed transition is on disk before the call returns.
"""

from __future__ import annotations

from enum import StrEnum

from .errors import IllegalTransition

__all__ = ["TERMINAL", "TRANSITIONS", "State", "check_transition", "sources_of"]


class State(StrEnum):
    """Where a job is in its life (see the module docstring)."""

    PENDING = "pending"
    RUNNING = "running"
    GENERATED = "generated"
    DONE = "done"
    FAILED = "failed"
    WITHDRAWN = "withdrawn"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.RUNNING, State.WITHDRAWN}),
    State.RUNNING: frozenset({State.PENDING, State.GENERATED, State.FAILED}),
    State.GENERATED: frozenset(
        {State.GENERATED, State.DONE, State.PENDING, State.FAILED, State.WITHDRAWN}
    ),
    State.DONE: frozenset({State.PENDING, State.WITHDRAWN}),
    State.FAILED: frozenset({State.PENDING, State.GENERATED, State.WITHDRAWN}),
    State.WITHDRAWN: frozenset({State.PENDING, State.GENERATED, State.DONE, State.FAILED}),
}
"""Allowed moves. ``generated -> generated`` is a download retry or a new download lease;
``generated -> failed`` is a download that can never succeed (attempts exhausted);
``failed -> generated`` is a retried download whose image URL is still valid; ``done ->
pending`` is a redo, ``failed -> pending`` a retry; ``-> withdrawn`` and back are the manifest
losing a row and getting it back."""

TERMINAL: frozenset[State] = frozenset({State.DONE, State.FAILED})
"""Where a run leaves a job for good (only an import, ``batcher retry`` or ``batcher redo``
moves it on)."""


def check_transition(src: State, dst: State) -> None:
    """Raise :class:`IllegalTransition` unless ``src -> dst`` is in the table.

    >>> check_transition(State.PENDING, State.RUNNING)
    """
    if dst not in TRANSITIONS[src]:
        raise IllegalTransition(f"a job cannot go from {src} to {dst}")


def sources_of(dst: State) -> frozenset[State]:
    """Every state from which ``dst`` may be reached (the store's ``WHERE state IN``)."""
    return frozenset(s for s, targets in TRANSITIONS.items() if dst in targets)
