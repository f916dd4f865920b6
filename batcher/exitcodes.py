"""The exit codes of ``batcher``, and the one rule from a run's outcome to its code.

=====  ===============================================================================
 0     every job done
 1     the run ended with failed jobs (``batcher retry`` puts them back)
 2     a usage or manifest error: nothing was run
 3     the run was stopped by a run-level problem (bad key, arrears, a full disk, the
       service or the job database unreachable for ``--unreachable-timeout``, ...)
 4     stopped early with jobs left (``--limit``, ``--budget``), or jobs still waiting
130    interrupted (Ctrl-C / SIGTERM); the same command goes on where it stopped
141    stdout was closed before everything was written (``batcher export DIR | head``)
=====  ===============================================================================
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

from jobs import State
from jobs.states import ACTIVE

if TYPE_CHECKING:  # the pool (and aiohttp) only when a run's exit code is asked for
    from jobs import Stats

    from .pool import RunResult

__all__ = ["ExitCode", "exit_code_for"]


class ExitCode(IntEnum):
    """What the process returns (see the module docstring)."""

    OK = 0
    FAILURES = 1
    USAGE = 2
    ABORTED = 3
    STOPPED_EARLY = 4
    INTERRUPTED = 130
    CLOSED_STDOUT = 141  # 128 + SIGPIPE: what a shell shows for a writer whose reader left


def exit_code_for(result: RunResult, stats: Stats) -> ExitCode:
    """The exit code of a run that ended with ``result``, the table then being ``stats``.

    A stop the user asked for (``--limit``, ``--budget``) with jobs left outranks failures;
    failures outrank jobs merely left waiting.
    """
    from .pool import StopReason

    left = sum(stats.count(state) for state in ACTIVE)
    if result.reason in (StopReason.ABORTED, StopReason.UNREACHABLE, StopReason.DATABASE):
        return ExitCode.ABORTED
    if result.reason is StopReason.INTERRUPTED:
        return ExitCode.INTERRUPTED
    if result.reason in (StopReason.BUDGET, StopReason.LIMIT) and left:
        return ExitCode.STOPPED_EARLY
    if stats.count(State.FAILED):
        return ExitCode.FAILURES
    if left:
        return ExitCode.STOPPED_EARLY
    return ExitCode.OK
