"""``batcher redo``: done jobs made again, with their previous image and record kept.

A person who rejected an image (``batcher review``) or names a job by id puts it back to
``pending`` with a new seed, a given seed, or a new prompt; the next ``batcher run`` makes it.
Nothing is lost: the previous image (every image of a job of several, ``n > 1``) moves under
``DIR/history/`` (the same sub-folders as under ``images/``, a name made unique with the time
and the image's hash, never overwriting), and the job's previous record goes to the
``job_history`` table with reason ``redo`` and the path of that file (of a job of several, the
first image's; the record lists every image, and each kept file is named after its own,
``cat-2.<time>.<hash>.png``). ``batcher retry`` is the same mechanism for failed jobs
(:meth:`JobStore.redo` and :meth:`JobStore.retry_failed` share it).

Order of the steps, so a crash at any point loses nothing: the image is first *linked* under
``history/`` (both names on one file), then the job table is changed in one transaction, then
the name under ``images/`` is removed. A crash before the transaction leaves an extra name in
``history/``; a crash after it leaves the old image at its path until the next run writes the
new one over it, while the history name still holds the old one.

A run whose table is in PostgreSQL (``--db``) may have workers running meanwhile, on this
host or others; they hold no folder lock, so redo takes none either (the store's transaction
refuses a job that is no longer done). A worker may claim a redone job as soon as the
transaction commits, and rename its new image into place before redo removes the old name: so
the name is removed only while it is still the file kept under ``history/``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from jobs import EMULATOR_ENDPOINT, JobStore, Redo, State
from jobs.durable import fsync_dir
from jobs.fields import MAX_SEED, text_problem
from jobs.naming import image_output

from .errors import ConfigError
from .layout import RunLayout, RunLock
from .metadata import MetadataWriter
from .models import UnknownModel
from .models import model as model_of
from .pricing import Money, price_per_image

__all__ = ["RedoItem", "RedoOptions", "cmd_redo", "plan_redo", "redo"]

# The currency a job was billed in says which region's prices apply to making it again.
_REGION_OF_CURRENCY = {"USD": "intl", "CNY": "cn"}
_SHOWN = 20  # jobs listed one by one before "... and N more"


@dataclass(frozen=True, kw_only=True, slots=True)
class RedoOptions:
    """Which done jobs to make again, and how."""

    ids: tuple[str, ...] = ()
    rejected: bool = False
    seed: int | None = None
    new_seed: bool = False
    prompt: str | None = None
    dry_run: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class RedoItem:
    """One job to redo: its record now, the seed and prompt it will be made with, and the
    image file that will be kept (``image``; every file of a job of several images in
    ``files``, as (output path, file, sha256), the first one ``image``)."""

    record: dict[str, Any]
    seed: int
    prompt: str
    image: Path
    cost: Money
    kept: Path | None = field(default=None)  # where the image went, once kept
    files: tuple[tuple[str, Path, str | None], ...] = ()
    kept_all: tuple[Path, ...] = ()  # where every file went, once kept

    @property
    def id(self) -> str:
        return str(self.record["id"])


def _cost(record: dict[str, Any]) -> Money:
    region = _REGION_OF_CURRENCY.get(record.get("currency") or "", "intl")
    try:
        unit = price_per_image(record["model"], region, bool(record["prompt_extend"]))
        return unit * int(record.get("n") or 1)  # a job of n images is billed n
    except ValueError:  # a model with no known price: say nothing rather than guess
        return Money.zero("USD" if region == "intl" else "CNY")


def _check_options(opt: RedoOptions) -> None:
    if not opt.ids and not opt.rejected:
        raise ConfigError("say which jobs to redo: --rejected, or --id ID (repeatable)")
    if opt.seed is not None and not 0 <= opt.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be within 0..{MAX_SEED}, got {opt.seed}")
    if opt.prompt is not None:
        if not opt.prompt.strip():
            raise ConfigError("--prompt must not be empty")
        problem = text_problem(opt.prompt)
        if problem:
            raise ConfigError(f"--prompt {problem}")


def _check_prompt_length(prompt: str, rec: dict[str, Any]) -> None:
    """A new prompt longer than the job's model reads is refused (its limit, per model)."""
    try:
        limit = model_of(str(rec["model"])).prompt_limit
    except UnknownModel:  # a model this batcher does not know: the service will say
        return
    if len(prompt) > limit:
        raise ConfigError(
            f"--prompt has {len(prompt)} characters; the service cuts {rec['model']} prompts "
            f"at {limit}"
        )


def _new_seed(old: int) -> int:
    while (seed := secrets.randbelow(MAX_SEED + 1)) == old:
        pass
    return seed


async def plan_redo(store: JobStore, layout: RunLayout, opt: RedoOptions) -> list[RedoItem]:
    """The jobs ``opt`` names, checked: each must be done with its image in place, else a
    :class:`ConfigError` names the first that is not (one line)."""
    _check_options(opt)
    records: list[dict[str, Any]] = []
    if opt.ids:
        found = await store.records(ids=opt.ids)
        known = {r["id"] for r in found}
        for job_id in opt.ids:
            if job_id not in known:
                raise ConfigError(f"no job has the id {job_id!r} in {layout.root}")
        records += found
    if opt.rejected:
        seen = {r["id"] for r in records}
        records += [r for r in await store.records(review="rejected") if r["id"] not in seen]
    items = []
    for rec in records:
        state = rec["state"]
        if state == State.RUNNING.value:
            raise ConfigError(
                f"job {rec['id']!r} is running: a run is making it now; redo it once it is done"
            )
        if state != State.DONE.value:
            hint = "; `batcher retry` puts failed jobs back" if state == State.FAILED.value else ""
            raise ConfigError(f"job {rec['id']!r} is {state} and has no image to redo{hint}")
        files = _files(layout, rec)
        for output, image, _ in files:
            if not image.is_file():
                raise ConfigError(
                    f"job {rec['id']!r} is done but its image {layout.relative(output)} "
                    "is missing; nothing to keep (run `batcher run` to check the folder)"
                )
        image = files[0][1]
        if opt.prompt is not None:
            _check_prompt_length(opt.prompt, rec)
        if opt.seed is not None:
            seed = opt.seed
        elif opt.new_seed or opt.prompt is None:
            seed = _new_seed(int(rec["seed"]))
        else:  # a new prompt alone keeps the seed: one change at a time
            seed = int(rec["seed"])
        items.append(
            RedoItem(
                record=rec,
                seed=seed,
                prompt=opt.prompt if opt.prompt is not None else rec["prompt"],
                image=image,
                cost=_cost(rec),
                files=files,
            )
        )
    return items


def _files(layout: RunLayout, rec: dict[str, Any]) -> tuple[tuple[str, Path, str | None], ...]:
    """(output path, file, sha256) of each image of a done job: its one image, or every
    image recorded for a job of several."""
    images = rec.get("images")
    if not images:
        path = layout.image_path(rec["output"], create_parents=False)
        return ((rec["output"], path, rec.get("sha256")),)
    n = int(rec.get("n") or 1)
    out = []
    for image in images:
        output = image_output(rec["output"], image["index"], n)
        out.append((output, layout.image_path(output, create_parents=False), image["sha256"]))
    return tuple(out)


def _keep(layout: RunLayout, output: str, image: Path, sha256: str | None, stamp: str) -> Path:
    """A new, unique name for the image ``image`` (at ``output``) under ``history/``: a hard
    link (the same file under two names), or a copy where the file system has no links.
    Never overwrites."""
    folder = layout.history_folder(output)
    name = PurePosixPath(output).name
    stem, suffix = os.path.splitext(name)
    tag = (sha256 or "")[:8]
    for n in range(1, 10_000):
        extra = "" if n == 1 else f"-{n}"
        dest = folder / f"{stem}.{stamp}{('.' + tag) if tag else ''}{extra}{suffix}"
        try:
            os.link(image, dest, follow_symlinks=False)
            return dest
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                raise
        try:  # no hard links here: copy into a file that did not exist
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as out, image.open("rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
        return dest
    raise ConfigError(f"no free name for {name} under {folder}")


async def redo(store: JobStore, layout: RunLayout, items: Sequence[RedoItem]) -> list[RedoItem]:
    """Keep each item's image under ``history/``, put the jobs back to pending, then remove
    the images from ``images/`` (see the module docstring for the order). Returns the items
    with ``kept`` set. The caller holds the run folder's lock."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(store.clock()))
    kept: list[RedoItem] = []
    old: dict[Path, tuple[int, int]] = {}  # each image file kept: (device, inode)
    try:
        for item in items:
            files = item.files or ((item.record["output"], item.image, item.record.get("sha256")),)
            names: list[Path] = []
            try:
                for output, image, sha256 in files:
                    found = os.stat(image)
                    old[image] = (found.st_dev, found.st_ino)
                    names.append(_keep(layout, output, image, sha256, stamp))
            except BaseException:
                for name in names:
                    name.unlink(missing_ok=True)
                raise
            kept.append(_with_kept(item, tuple(names)))
        for folder in {p.parent for k in kept for p in k.kept_all}:
            fsync_dir(folder)
        await store.redo(
            [
                Redo(
                    id=k.id,
                    seed=k.seed,
                    prompt=k.prompt,
                    file=k.kept.relative_to(layout.root).as_posix(),
                )
                for k in kept
                if k.kept is not None
            ]
        )
    except BaseException:
        for k in kept:  # the table did not change: the extra names go
            for name in k.kept_all:
                name.unlink(missing_ok=True)
        raise
    gone = [image for k in kept for _, image, _ in k.files] or [k.image for k in kept]
    for image in gone:
        # Only the file kept above: on a shared table a worker may already have claimed the
        # job again and renamed its new image into place (a new file, another inode).
        with contextlib.suppress(FileNotFoundError):
            found = os.stat(image)
            if (found.st_dev, found.st_ino) == old.get(image):
                image.unlink()
    for folder in {image.parent for image in gone}:
        fsync_dir(folder)
    return kept


def _with_kept(item: RedoItem, dest: tuple[Path, ...]) -> RedoItem:
    return RedoItem(
        record=item.record,
        seed=item.seed,
        prompt=item.prompt,
        image=item.image,
        cost=item.cost,
        kept=dest[0],
        files=item.files,
        kept_all=dest,
    )


def _costs(items: Sequence[RedoItem]) -> str:
    """What making ``items`` again costs, per currency (never summed across currencies)."""
    totals: dict[tuple[str, bool], Money] = {}
    for item in items:
        key = (item.cost.currency, item.record.get("endpoint") == EMULATOR_ENDPOINT)
        totals[key] = totals.get(key, Money.zero(key[0])) + item.cost
    parts = [
        f"{m} (emulated, not billed)" if emulated else str(m)
        for (_, emulated), m in sorted(totals.items())
    ]
    return " + ".join(parts) or "nothing"


def _jobs(n: int) -> str:
    return f"{n} job" if n == 1 else f"{n} jobs"


async def cmd_redo(folder: Path, opt: RedoOptions, *, database: str | None = None) -> int:
    """``batcher redo DIR ... [--db URL]``: print what will be redone and its cost, then do
    it (unless ``dry_run``). Returns the exit code. ``database``: the run's table is in
    PostgreSQL, where workers may be running meanwhile (they hold no folder lock, so none is
    taken: see :func:`redo`)."""
    layout = RunLayout.locate(folder, database)
    if not layout.has_store():
        raise layout.no_store()
    _check_options(opt)
    lock = None if opt.dry_run or layout.shared else RunLock(layout.lock)
    if lock is not None:
        lock.acquire()
    try:
        async with await JobStore.open(layout.store, create=False) as store:
            items = await plan_redo(store, layout, opt)
            if not items:
                print(f"no rejected jobs in {layout.root}: nothing to redo")
                return 0
            for item in items[:_SHOWN]:
                rec = item.record
                change = f"seed {rec['seed']} -> {item.seed}" if item.seed != rec["seed"] else ""
                if item.prompt != rec["prompt"]:
                    change += ("; " if change else "") + "new prompt"
                print(f"  {rec['id']}  {layout.relative(rec['output'])}  {change or 'same seed'}")
            if len(items) > _SHOWN:
                print(f"  ... and {len(items) - _SHOWN} more")
            cost = _costs(items)
            if opt.dry_run:
                print(f"would redo {_jobs(len(items))} for about {cost} (dry run: nothing changed)")
                return 0
            done = await redo(store, layout, items)
            # metadata.jsonl lists done images only: these are no longer done
            await MetadataWriter(store, layout).refresh()
        print(
            f"{_jobs(len(done))} back to pending (about {cost} to make again); previous images "
            f"kept under {layout.history}/; the next `batcher run` makes them"
        )
        return 0
    finally:
        if lock is not None:
            lock.release()
