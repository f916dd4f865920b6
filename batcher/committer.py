"""Group commit for verified images: note the hash, put the file in place, complete the job.

Putting one downloaded image in place takes three steps, in this order for every job:

1. ``record_file``: the file's sha256 is made durable in the job table first, so a crash after
   the rename finds the file at its path and completes the job without downloading it again;
2. the file is written, fsynced and renamed into place, and its folder fsynced;
3. ``complete``: ``generated -> done``.

Each step is a trip to another thread (the database's, or a file worker) and the folder fsync
is a disk flush: at hundreds of images a second, doing them image by image costs more CPU than
the downloads themselves. So a worker hands its image to :class:`ImageCommitter` and waits;
whoever finds no batch running becomes the leader and runs the three steps for every image
queued so far (:class:`jobs.group.GroupCommit`, as the job table's own writes): three trips
and one fsync per folder per batch, whatever its size. Each image still goes through the steps
in order, and a lost lease or a disk error fails that image alone. The batch runs shielded: a
cancelled leader must not leave the others' images half-committed. Then ``on_done`` hears the
ids of the batch's completed jobs (the run appends them to ``metadata.jsonl``); it must not
raise for a problem of its own, since the images are already done.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from jobs import JobStore, StoredFile
from jobs.group import GroupCommit

from .download import Downloaded, commit_all, discard

__all__ = ["ImageCommitter"]


@dataclass(eq=False, slots=True)
class _Pending:
    job_id: str
    token: str
    item: Downloaded
    taken: bool = False  # a leader has it in its batch
    done: bool = False  # the leader is through with it (``error`` says how it went)
    error: BaseException | None = None

    @property
    def file(self) -> tuple[str, str, StoredFile]:
        return self.job_id, self.token, StoredFile(sha256=self.item.sha256, bytes=self.item.bytes)


class ImageCommitter:
    """Commits verified images in batches. See the module docstring."""

    def __init__(
        self,
        store: JobStore,
        on_done: Callable[[list[str]], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._on_done = on_done  # told the ids of each batch's completed jobs
        self._group = GroupCommit(self._run)
        self.batches = 0  # how many batches ran (how well they group shows in images / batches)

    async def commit(self, job_id: str, token: str, item: Downloaded) -> None:
        """Put ``item`` in place and mark the job done, or raise why not.

        Raises :class:`jobs.LeaseLost` (another worker owns the job: nothing was placed, or
        the job was not completed), :class:`~batcher.download.DiskProblem` (stop the run),
        :class:`jobs.StoreUnavailable`, or another OSError from the file system.
        """
        mine = _Pending(job_id, token, item)
        try:
            await self._group.submit([mine])
        except BaseException:
            if not mine.taken:
                discard(item)
            raise
        if mine.error is not None:
            raise mine.error

    async def _run(self, batch: list[_Pending]) -> None:
        self.batches += 1
        live = batch
        try:
            live = _settle(live, await self._store.record_files([p.file for p in live]))
            live = _settle(live, await commit_all([p.item for p in live]))
            live = _settle(live, await self._store.complete_all([p.file for p in live]))
            if self._on_done is not None and live:
                await self._on_done([p.job_id for p in live])
        except BaseException as exc:  # a database error or an interrupt: fails the rest alike
            for p in live:
                p.error = p.error or exc
            raise
        finally:
            for p in batch:
                if p.error is not None:
                    discard(p.item)  # a no-op once the file was renamed into place
                p.done = True


def _settle(batch: list[_Pending], outcomes: Sequence[BaseException | None]) -> list[_Pending]:
    """Note each failed image's error; the ones that went through go on to the next step."""
    live = []
    for p, error in zip(batch, outcomes, strict=True):
        if error is None:
            live.append(p)
        else:
            p.error = error
    return live
