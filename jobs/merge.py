"""Merging an imported manifest (the ``staging`` table) into a run folder's job table.

Theory of operation
-------------------
The manifest is the source of truth. Each row of ``staging`` is compared with the job of the
same id:

* no such job: a new ``pending`` job;
* same content and output: unchanged;
* same content, another ``output``: the job *moves*. Its state is kept; a done job's image is
  to be moved on disk, so the move is written to ``job_history`` (reason ``move``, ``file`` the
  old path) for the caller to carry out and then mark ``moved`` (:data:`MOVE`, :data:`MOVED`);
* other content (model, prompt, size, seed, prompt_extend, n, params): an error naming the id,
  unless ``replace``: then the job starts again as ``pending``, its old record kept in the
  history;
* other variables (``vars``, the row's extra columns) and the same content: the job takes the
  new ones and keeps its state and image (*updated*: a label edited costs nothing);
* a ``withdrawn`` job: back where its record says it was (see :data:`RESTORED_STATE`).

With ``withdraw``, every job whose id is not in the manifest becomes ``withdrawn`` (a
``running`` one is left to its run, and a ``submitted`` one to its task at the service: each is
withdrawn by an import after it moved on). A leaving job whose
output path a manifest row now claims gives the path up: its record goes to the history and its
results are cleared, so if it ever comes back it is generated again.

Everything here runs inside the import's one transaction: a manifest error rolls it all back.
State names come from :mod:`jobs.states`, never typed into the SQL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from .errors import ManifestError, ManifestInvalid
from .schema import history, images, jobs
from .spec import KindCounts
from .states import State, sources_of

__all__ = [
    "MOVE",
    "MOVED",
    "RESTORED_STATE",
    "ImportReport",
    "attach_images",
    "drop_images",
    "images_of",
    "merge_staging",
]

MOVE = "move"
"""``job_history.reason`` of a done job's image still to be moved to its new output path."""
MOVED = "moved"
"""The reason once the image was moved (or found already in place)."""

# A redone job keeps the manifest's seed and prompt aside (manifest_seed, manifest_prompt): the
# manifest row it came from is unchanged as long as it matches those.
_SAME_CONTENT = (
    "j.model = s.model AND coalesce(j.manifest_prompt, j.prompt) = s.prompt "
    "AND j.size = s.size AND coalesce(j.manifest_seed, j.seed) = s.seed "
    "AND j.prompt_extend = s.prompt_extend AND j.n = s.n "
    # params may be NULL on either side: equal when both are, or both hold the same text
    "AND coalesce(j.params = s.params, j.params IS NULL AND s.params IS NULL)"
)
_CONTENT_CHANGED = f"NOT ({_SAME_CONTENT})"
_MOVED_ONLY = f"{_SAME_CONTENT} AND j.output != s.output"
# (null-safe "differs", in SQL both databases read: one NULL and not the other differs too)
_VARS_ONLY = f"{_SAME_CONTENT} AND (j.vars <> s.vars OR (j.vars IS NULL) <> (s.vars IS NULL))"


def _states(states: frozenset[State] | set[State]) -> str:
    return ", ".join(f"'{s.value}'" for s in sorted(states))


_WITHDRAWABLE = _states(sources_of(State.WITHDRAWN))
_WITHDRAWN = f"'{State.WITHDRAWN.value}'"
# A job leaving the manifest gives its path up to a row that claims it, unless a run holds it.
_GIVES_UP_PATH = _states(sources_of(State.WITHDRAWN) | {State.WITHDRAWN})

RESTORED_STATE = (
    "CASE "
    f"WHEN finished_at IS NOT NULL AND error_code IS NULL AND sha256 IS NOT NULL "
    f"THEN '{State.DONE.value}' "
    f"WHEN finished_at IS NOT NULL THEN '{State.FAILED.value}' "
    f"WHEN image_url IS NOT NULL THEN '{State.GENERATED.value}' "
    f"ELSE '{State.PENDING.value}' END"
)
"""Where a withdrawn job goes back to, from its record: ``done`` once it was completed (a
finish time, no error, a file hash), ``failed`` when it finished with an error, ``generated``
when an image was paid for and not saved, else ``pending``."""

# What a job's results are when it has none (a replaced job, or one that gave its path up).
RESULT_RESET: dict[str, Any] = {
    "request_id": None,
    "width": None,
    "height": None,
    "image_count": None,
    "input_tokens": None,
    "output_tokens": None,
    "total_tokens": None,
    "reasoning_tokens": None,
    "actual_prompt": None,
    "image_url": None,
    "url_expires_at": None,
    "latency_ms": None,
    "sha256": None,
    "bytes": None,
    "generated_at": None,
    "finished_at": None,
    "task_id": None,  # a job started again creates a new task
    "task_submitted_at": None,
    "shortfall": None,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class ImportReport:
    """What an import did: rows read, rows new, rows already there, rows replaced; jobs
    withdrawn (their row left the manifest), restored (it came back), moved (a new output) and
    updated (new variables alone; counted in ``unchanged`` too, since their images stand)."""

    total: int
    added: int
    unchanged: int
    replaced: int
    withdrawn: int = 0
    restored: int = 0
    moved: int = 0
    updated: int = 0
    # A first import into an empty table, whose backend counted the rows as they went in
    # (SQLite): the whole table is these jobs, every one pending and due, none billed, so
    # ``batcher plan`` need not count them again over the table (1M rows: ~1.5 s of scans).
    # None otherwise (a merge into existing jobs, or a backend that does not count).
    fresh: KindCounts | None = field(default=None, compare=False)


async def _rows(conn: AsyncConnection, sql: str, **params: Any) -> list[Any]:
    return list(await conn.execute(text(sql), params))


async def _to_history(
    conn: AsyncConnection, where: str, now: float, reason: str, file_column: str | None = None
) -> list[str]:
    """Copy the jobs ``j`` matching ``where`` (joined to staging ``s`` when it names it) to the
    history with ``reason``; returns their ids."""
    old = [dict(r) for r in (await conn.exec_driver_sql(f"SELECT j.* FROM {where}")).mappings()]
    await attach_images(conn, old)
    for rec in old:
        await conn.execute(
            history.insert().values(
                job_id=rec["id"],
                replaced_at=now,
                record=json.dumps(rec, ensure_ascii=False, default=str),
                reason=reason,
                file=rec[file_column] if file_column else None,
            )
        )
    return [rec["id"] for rec in old]


async def attach_images(conn: AsyncConnection, records: list[dict[str, Any]]) -> None:
    """Give each record of a job of several images (``n > 1``) its ``images``: the rows of
    ``job_images``, in order, as dicts (``index``, ``url``, ``sha256``, ...)."""
    wanted = [rec["id"] for rec in records if (rec.get("n") or 1) > 1]
    if not wanted:
        return
    found = await images_of(conn, wanted)
    for rec in records:
        if (rec.get("n") or 1) > 1:
            rec["images"] = found.get(rec["id"], [])


async def images_of(conn: AsyncConnection, wanted: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The ``job_images`` rows of the jobs ``wanted``, by job, in order, as dicts."""
    found: dict[str, list[dict[str, Any]]] = {}
    for at in range(0, len(wanted), 500):
        query = (
            select(images)
            .where(images.c.job_id.in_(wanted[at : at + 500]))
            .order_by(images.c.job_id, images.c.idx)
        )
        for row in (await conn.execute(query)).mappings():
            image = dict(row)
            image["index"] = image.pop("idx")
            found.setdefault(image.pop("job_id"), []).append(image)
    return found


async def drop_images(conn: AsyncConnection, ids: list[str]) -> None:
    """Forget the images recorded for ``ids`` (their results were reset)."""
    for at in range(0, len(ids), 500):
        await conn.execute(delete(images).where(images.c.job_id.in_(ids[at : at + 500])))


async def merge_staging(
    conn: AsyncConnection,
    *,
    source: str,
    replace: bool,
    withdraw: bool,
    max_errors: int,
    total: int,
    now: float,
    order: str = "rowid",
) -> ImportReport:
    """Merge ``staging`` into ``jobs`` (see the module docstring); raise
    :class:`ManifestInvalid` naming every conflicting row, having changed nothing.

    ``order`` is staging's column of manifest order (the backend's: SQLite's rowid, or an
    identity column); new jobs are added in that order."""
    errors: list[ManifestError] = []
    changed = await _rows(
        conn,
        "SELECT s.line, s.id FROM staging s JOIN jobs j ON j.id = s.id "
        f"WHERE {_CONTENT_CHANGED} ORDER BY s.line LIMIT :limit",
        limit=max_errors + 1,
    )
    if changed and not replace:
        errors += [
            ManifestError(
                source,
                line,
                "id",
                f"job {job_id!r} already exists with different content "
                "(pass --replace to regenerate it)",
            )
            for line, job_id in changed
        ]
    # j keeps its path only if this import does not move it elsewhere (a swap), nor withdraw it
    leaving = (
        "NOT EXISTS (SELECT 1 FROM staging s3 WHERE s3.id = j.id) "
        f"AND j.state IN ({_GIVES_UP_PATH})"
    )
    collisions = await _rows(
        conn,
        "SELECT s.line, s.output, j.id FROM staging s JOIN jobs j "
        "ON j.output_key = s.output_key AND j.id != s.id "
        "WHERE NOT EXISTS (SELECT 1 FROM staging s2 "
        "WHERE s2.id = j.id AND s2.output_key != j.output_key) "
        f"{f'AND NOT {leaving} ' if withdraw else ''}"
        "ORDER BY s.line LIMIT :limit",
        limit=max_errors + 1,
    )
    errors += [
        ManifestError(source, line, "output", f"{output} is already the output of job {other!r}")
        for line, output, other in collisions
    ]
    if errors:
        errors.sort(key=lambda e: e.line or 0)
        raise ManifestInvalid(errors[:max_errors], truncated=len(errors) > max_errors)

    replaced = await _replace_changed(conn, now) if changed else 0
    withdrawn = 0
    if withdraw:
        giving_up = await _rows(
            conn,
            "SELECT j.id FROM staging s JOIN jobs j "
            f"ON j.output_key = s.output_key AND j.id != s.id WHERE {leaving}",
        )
        await _give_up_paths(conn, [r[0] for r in giving_up], now)
        withdrawn = await _withdraw_missing(conn)
    restored = (
        await conn.exec_driver_sql(
            f"UPDATE jobs SET state = {RESTORED_STATE} WHERE state = {_WITHDRAWN} "
            "AND id IN (SELECT id FROM staging)"
        )
    ).rowcount
    moved = await _move_outputs(conn, now)
    updated = (
        await conn.exec_driver_sql(
            "UPDATE jobs SET vars = (SELECT s.vars FROM staging s WHERE s.id = jobs.id) "
            "WHERE id IN (SELECT j.id FROM jobs j JOIN staging s ON s.id = j.id "
            f"WHERE {_VARS_ONLY})"
        )
    ).rowcount
    # A job that gave its path up and came back takes its key again (its path is free now).
    await conn.exec_driver_sql(
        "UPDATE jobs SET output_key = (SELECT s.output_key FROM staging s WHERE s.id = jobs.id) "
        "WHERE id IN (SELECT s.id FROM staging s JOIN jobs j ON j.id = s.id "
        "WHERE j.output_key != s.output_key)"
    )
    added = (
        await conn.execute(
            text(
                "INSERT INTO jobs (id, line, model, prompt, size, seed, prompt_extend, output, "
                "output_key, n, params, vars, state, created_at) "
                "SELECT s.id, s.line, s.model, s.prompt, s.size, s.seed, s.prompt_extend, "
                f"s.output, s.output_key, s.n, s.params, s.vars, '{State.PENDING.value}', :now "
                "FROM staging s "
                f"WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = s.id) ORDER BY s.{order}"
            ),
            {"now": now},
        )
    ).rowcount
    return ImportReport(
        total=total,
        added=added,
        unchanged=total - added - replaced - moved,
        replaced=replaced,
        withdrawn=withdrawn,
        restored=restored,
        moved=moved,
        updated=updated,
    )


async def _replace_changed(conn: AsyncConnection, now: float) -> int:
    ids = await _to_history(
        conn, f"jobs j JOIN staging s ON s.id = j.id WHERE {_CONTENT_CHANGED}", now, "replace"
    )
    # Free the old output keys first so a swap of outputs between jobs is not a collision.
    await conn.execute(
        update(jobs)
        .where(jobs.c.id.in_(ids))
        .values(output_key=jobs.c.output_key + " (replacing) " + jobs.c.id)
    )
    await drop_images(conn, ids)
    await conn.exec_driver_sql(
        "UPDATE jobs SET (line, model, prompt, size, seed, prompt_extend, output, output_key, "
        "n, params, vars) = (SELECT s.line, s.model, s.prompt, s.size, s.seed, "
        "s.prompt_extend, s.output, s.output_key, s.n, s.params, s.vars FROM staging s "
        "WHERE s.id = jobs.id) "
        "WHERE id IN (SELECT j.id FROM jobs j JOIN staging s ON s.id = j.id "
        f"WHERE {_CONTENT_CHANGED})"
    )
    await conn.execute(
        update(jobs)
        .where(jobs.c.id.in_(ids))
        .values(
            state=State.PENDING.value,
            attempts=0,
            download_attempts=0,
            next_attempt_at=0,
            lease_expires_at=None,
            claim_token=None,
            worker=None,
            error_code=None,
            error_message=None,
            manifest_seed=None,
            manifest_prompt=None,
            review=None,  # a new image is not the one judged
            review_note=None,
            reviewed_at=None,
            **RESULT_RESET,
        )
    )
    return len(ids)


async def _give_up_paths(conn: AsyncConnection, ids: list[str], now: float) -> None:
    """Jobs leaving the manifest whose output path a row of it now claims: their record goes
    to the history, their results are cleared (the new row's image will take the path)."""
    for at in range(0, len(ids), 500):
        part = ids[at : at + 500]
        old = (await conn.execute(select(jobs).where(jobs.c.id.in_(part)))).mappings()
        old_records = [dict(r) for r in old]
        await attach_images(conn, old_records)
        for rec in old_records:
            await conn.execute(
                history.insert().values(
                    job_id=rec["id"],
                    replaced_at=now,
                    record=json.dumps(rec, ensure_ascii=False, default=str),
                    reason=State.WITHDRAWN.value,
                    file=rec["output"],
                )
            )
        await conn.execute(
            update(jobs)
            .where(jobs.c.id.in_(part))
            .values(output_key=jobs.c.output_key + " (withdrawn) " + jobs.c.id, **RESULT_RESET)
        )
        await drop_images(conn, part)


async def _withdraw_missing(conn: AsyncConnection) -> int:
    """Withdraw every job whose id the manifest no longer has (but one a run holds)."""
    present = (
        await conn.exec_driver_sql(f"SELECT count(*) FROM jobs WHERE state != {_WITHDRAWN}")
    ).scalar_one()
    matched = (
        await conn.exec_driver_sql(
            f"SELECT count(*) FROM staging s JOIN jobs j ON j.id = s.id "
            f"WHERE j.state != {_WITHDRAWN}"
        )
    ).scalar_one()
    if present == matched:
        return 0  # every job still in the table is in the manifest (ids are unique there)
    return int(
        (
            await conn.exec_driver_sql(
                f"UPDATE jobs SET state = {_WITHDRAWN}, lease_expires_at = NULL, "
                f"claim_token = NULL WHERE state IN ({_WITHDRAWABLE}) "
                "AND id NOT IN (SELECT id FROM staging)"
            )
        ).rowcount
    )


async def _move_outputs(conn: AsyncConnection, now: float) -> int:
    """Jobs whose only change is their output path take the new one, keeping their state; a
    done job's move is written to the history for the caller to carry out on disk."""
    moving = f"jobs j JOIN staging s ON s.id = j.id WHERE {_MOVED_ONLY}"
    await conn.exec_driver_sql("DROP TABLE IF EXISTS moving")
    await conn.exec_driver_sql(f"CREATE TEMP TABLE moving AS SELECT j.id FROM {moving}")
    try:
        count = (await conn.exec_driver_sql("SELECT count(*) FROM moving")).scalar_one()
        if not count:
            return 0
        await _to_history(conn, f"{moving} AND j.state = '{State.DONE.value}'", now, MOVE, "output")
        # Two passes, so that jobs swapping paths never hold the same key at once.
        await conn.exec_driver_sql(
            "UPDATE jobs SET output_key = output_key || ' (moving) ' || id "
            "WHERE id IN (SELECT id FROM moving)"
        )
        await conn.exec_driver_sql(
            "UPDATE jobs SET (output, output_key, line) = (SELECT s.output, s.output_key, "
            "s.line FROM staging s WHERE s.id = jobs.id) WHERE id IN (SELECT id FROM moving)"
        )
        return int(count)
    finally:
        await conn.exec_driver_sql("DROP TABLE IF EXISTS moving")
