"""``batcher export --format webdataset`` of a SQLite run folder, on the standard library.

The general export (:mod:`batcher.shardexport`) reads the job table through
:class:`jobs.JobStore`: SQLAlchemy, aiosqlite and an event loop, whose import alone was most
of an export of 20,000 small images (0.28 of 1.43 s), and a dict per row built for every
output format. This path reads ``batcher.db`` with ``sqlite3`` (``mode=ro``, or
``immutable=1`` for a folder that cannot be written, as the store opens it), selects only the
columns a sample needs as tuples, in one statement (one read transaction: a snapshot), and
builds each record in the order and with the values of :func:`batcher.records.export_row`
(tests compare the two, and the shards with the general path's, byte for byte).

It only takes what it is sure to do as the general path would: a run folder's own
``batcher.db`` (no ``--db``, no ``BATCHER_DATABASE_URL``), at this batcher's schema
version. Anything else, an older schema to migrate, a newer one to refuse, a damaged file,
goes to the general path (:func:`export_webdataset` returns None), which says what is wrong
as it always has. A job of several images, and a row whose numbers are not of the types the
job store writes (a hand-edited table), are built by the general path's own functions. Like
the general path it keeps the summary of the manifest variables in ``meta`` when it had to
work it out (where the folder can be written); nothing else is written to the run folder.

The row loop runs in C where :mod:`batcher._speedups` was built (``batcher/_speedups.c``):
it reads the rows through SQLite's C interface on a read-only connection of its own and
writes the samples of the rows whose values are of the types the job store writes; every
other row it hands to this module's loop body (:func:`_write`'s ``one``), with a function
reading from its connection. Without it (no compiler at install, or
``BATCHER_PURE_PYTHON=1``) the same body runs for every row; both write the same bytes. The
records are not built by SQLite: tried (``printf`` joining the fields, ``json_quote`` for the
strings), SQLite's functions cost about what the json module's C encoder and one ``%`` do per
value (``bench/RESULTS.md``).

Splits are independent (numbered and sharded apart), so with more than one and a second
core, a forked process writes the splits of one group (:class:`_Child`): each split's shards
are the same bytes whichever process writes them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jobs.errors import JobStoreError
from jobs.params import load_params
from jobs.version import (
    EMULATOR_ENDPOINT,
    MICROS,
    SCHEMA_VERSION,
    SQLITE_VARIABLES_SQL,
    VARIABLES_KEY,
    VERSION_KEY,
)

from .card import CardFacts, prompt_language, write_card
from .export import ExportOptions, ExportResult, selected_state
from .layout import RunLayout
from .records import (
    EXPORT_FIELDS,
    SPLIT_FOLDERS,
    export_row,
    image_records,
    split_of,
    variable_keys,
    whole_second,
)
from .shardexport import read_file, sample_key
from .shards import ShardSet, TarShards

__all__ = ["export_webdataset"]

# A query on the connection the export's rows come from: fetch(sql, params) -> rows
Fetch = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]

_DONE = "done"
_JSON = json.JSONEncoder(ensure_ascii=False)  # the general path's encoder, as configured there
_enc = encode_basestring  # what that encoder writes a str as (the C function where there is one)
# The columns read, in the order of EXPORT_FIELDS where a field is a column as it is; the
# rest (file, cost, actual_prompt, the times) are made from them below.
_COLUMNS = (
    "id, state, model, prompt, size, seed, prompt_extend, params, n, output, request_id, "
    "task_id, width, height, sha256, bytes, attempts, error_code, error_message, shortfall, "
    "cost_micros, currency, endpoint, lane, actual_prompt, input_tokens, output_tokens, "
    "total_tokens, latency_ms, billed, throttled, ambiguous, regenerated, created_at, "
    "started_at, generated_at, finished_at, review, review_note, reviewed_at, vars"
)
_NAMES = tuple(c.strip() for c in _COLUMNS.split(","))
# Numbers that only go into the record, read as their JSON text where SQLite's own text of
# them is Python's (an integer; a finite real, whose repr str() is too): NULL as 'null'.
_NUMBERS = frozenset(
    {"seed", "width", "height", "attempts", "input_tokens", "output_tokens", "total_tokens"}
    | {"latency_ms", "billed", "throttled", "ambiguous", "regenerated"}
)
_FAST_COLUMNS = ", ".join(f"ifnull({c}, 'null')" if c in _NUMBERS else c for c in _NAMES)
# Whether a row's numbers are of the types the job store writes (anything else, which only
# a hand-edited table holds, goes through the general path's record builder)
_PLAIN = " AND ".join(
    [
        "typeof(seed) = 'integer'",
        "typeof(n) = 'integer'",
        *(
            f"typeof({c}) IN ('integer', 'null')"
            for c in sorted(_NUMBERS - {"seed", "latency_ms"} | {"bytes"})
        ),
        "typeof(latency_ms) IN ('real', 'null')",
        "abs(ifnull(latency_ms, 0)) < 9e999",  # not an infinity (JSON's Infinity)
    ]
)
_IMAGE_COLUMNS = "idx, url, url_expires_at, actual_prompt, width, height, sha256, bytes"


def export_webdataset(layout: RunLayout, opt: ExportOptions) -> ExportResult | None:
    """Export ``layout``'s jobs as WebDataset shards in ``opt.output``, as
    :func:`batcher.shardexport.export_shards` would; None when this path does not take the
    folder (see the module docstring) and nothing was written."""
    db = _connect(layout)
    if db is None:
        return None
    try:
        try:
            names = _variables(db, layout)
        except sqlite3.Error:
            return None  # the general path says what is wrong with the table
        keys = variable_keys(names, EXPORT_FIELDS)
        assert opt.output is not None
        return _export(db, layout, opt, keys)
    finally:
        db.close()


def _uri(layout: RunLayout) -> str:
    """``batcher.db``'s URI, read-only (``immutable=1`` in a folder that cannot be written,
    as the store opens it)."""
    where = quote(os.path.abspath(layout.db))
    writable = os.access(layout.root, os.W_OK) and os.access(layout.db, os.W_OK)
    return f"file:{where}?{'mode=ro' if writable else 'immutable=1'}"


def _connect(layout: RunLayout) -> sqlite3.Connection | None:
    """``batcher.db`` opened read-only, at this batcher's schema version; None otherwise."""
    try:
        db = sqlite3.connect(_uri(layout), uri=True, timeout=15.0)
    except sqlite3.Error:
        return None
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (VERSION_KEY,)).fetchone()
        if row is not None and int(row[0]) == SCHEMA_VERSION:
            return db
    except (sqlite3.Error, ValueError):
        pass
    db.close()  # an older schema (the general path migrates it), a newer one, no table
    return None


def _variables(db: sqlite3.Connection, layout: RunLayout) -> list[str]:
    """The manifest variables' names, as :meth:`jobs.JobStore.variables` gives them: from
    their summary in ``meta``, else worked out from the table and, as the general path does,
    kept in ``meta`` for the next time (at 20,000 jobs working it out is 0.05 s; not in a
    folder that cannot be written, nor when another process holds the database's write lock)."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (VARIABLES_KEY,)).fetchone()
    if row is not None:
        return [str(name) for name, _kinds in json.loads(row[0])]
    kept = _keep_variables(layout)
    if kept is not None:
        return kept
    return [str(name) for name, _kinds in db.execute(SQLITE_VARIABLES_SQL)]


def _keep_variables(layout: RunLayout) -> list[str] | None:
    """Work the variables out and write their summary to ``meta`` in one write transaction
    (an import, which forgets the summary in its own transaction, cannot come between);
    their names, or None when the folder or the lock is not to be had."""
    if not (os.access(layout.root, os.W_OK) and os.access(layout.db, os.W_OK)):
        return None
    where = quote(os.path.abspath(layout.db))
    try:
        db = sqlite3.connect(f"file:{where}?mode=rw", uri=True, timeout=0.2, isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT value FROM meta WHERE key = ?", (VARIABLES_KEY,)).fetchone()
        if row is not None:  # another process kept it meanwhile
            db.execute("ROLLBACK")
            return [str(name) for name, _kinds in json.loads(row[0])]
        found = {
            str(k): frozenset(str(kinds).split(","))
            for k, kinds in db.execute(SQLITE_VARIABLES_SQL)
        }
        summary = json.dumps([[name, sorted(kinds)] for name, kinds in found.items()])
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (VARIABLES_KEY, summary),
        )
        db.execute("COMMIT")
        return list(found)
    except sqlite3.Error:
        return None
    finally:
        db.close()  # a transaction left open is rolled back


# The split of a job's output in SQL, as batcher.records.split_of says it ("data" for none).
_SPLIT_SQL = (
    "CASE WHEN substr(output, 1, instr(output, '/') - 1) IN ({folders}) "
    "THEN substr(output, 1, instr(output, '/') - 1) ELSE 'data' END"
).format(folders=", ".join(f"'{name}'" for name in sorted(SPLIT_FOLDERS)))


def _export(
    db: sqlite3.Connection, layout: RunLayout, opt: ExportOptions, keys: list[tuple[str, str]]
) -> ExportResult:
    assert opt.output is not None
    state = selected_state(opt, "webdataset")
    shards = ShardSet(folder=opt.output, ext="tar", with_count=False)
    shards.prepare()
    try:
        groups = _split_groups(db, state)
    except sqlite3.Error as exc:
        raise JobStoreError(f"the job database failed: {exc}") from exc
    facts = CardFacts()
    child: _Child | None = None
    writer = TarShards(shards, opt.shard_size)
    try:
        if len(groups) > 1:
            child = _Child.start(layout, opt, keys, state, groups[1])
        # this process: every split but the other's (a split the weighing did not see too)
        theirs = groups[1] if child is not None else None
        records, missing = _write(db, layout, state, theirs, keys, writer, facts, others=True)
        writer.close()
        if child is not None:
            done = child.result()
            child = None
            records += done.records
            missing += done.missing
            _merge(facts, done.facts)
            shards.written.update(done.written)
        files = shards.publish()
    except BaseException:
        if child is not None:
            child.stop()
        writer.abandon()  # a full disk: closing must not raise before the shards go
        shards.discard()
        shards.prepare()  # the other process's temporary shards too
        raise
    card = write_card(opt.output, "webdataset", facts, files, embed=opt.embed)
    return ExportResult(fmt="webdataset", records=records, files=(*files, card), missing=missing)


_WEIGHED = 1024  # rows of a larger table the split groups are weighed on


def _split_groups(db: sqlite3.Connection, state: str | None) -> list[list[str]]:
    """The splits to export, in two groups of about as many jobs when there are several
    splits and a second core to write them (each split's shards are then written by one
    process, the same bytes as by one process for all); else one group, every split.

    A table of more than a few thousand rows is weighed on :data:`_WEIGHED` rows picked by
    rowid, spread as the multiples of the golden ratio are (evenly, and never in step with
    rows that alternate between splits, as a fixed stride can be): reading every row's split
    was 15-27 ms of 20,000 jobs before the second process could start, the picked rows are
    3 ms. The groups only share the work out: the first group's process writes every split
    the second's does not, so a split the weighing missed is still written, by that one."""
    if _cores() < 2:
        return [[]]
    condition = "AND state = ?" if state is not None else ""
    params: list[object] = [state] if state is not None else []
    low, high = db.execute(
        "SELECT (SELECT rowid FROM jobs ORDER BY rowid LIMIT 1), "
        "(SELECT rowid FROM jobs ORDER BY rowid DESC LIMIT 1)"
    ).fetchone()
    if low is None:
        return [[]]
    if high - low < 8 * _WEIGHED:
        query = (
            f"SELECT {_SPLIT_SQL} AS split, count(*) FROM jobs WHERE 1 {condition} GROUP BY split"
        )
    else:
        picked = "k * 0.6180339887498949 - CAST(k * 0.6180339887498949 AS INTEGER)"
        query = (
            "WITH RECURSIVE picked(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM picked "
            f"WHERE k < ?) SELECT {_SPLIT_SQL} AS split, count(*) FROM picked CROSS JOIN jobs "
            f"ON jobs.rowid = ? + CAST(({picked}) * ? AS INTEGER) WHERE 1 {condition} "
            "GROUP BY split"
        )
        params = [_WEIGHED, low, high - low + 1, *params]
    counts = sorted(db.execute(query, params), key=lambda row: (-row[1], row[0]))
    if len(counts) < 2:
        return [[]]
    groups: tuple[list[str], list[str]] = ([], [])
    load = [0, 0]
    for split, count in counts:  # the largest first, each to the lighter group
        lighter = 0 if load[0] <= load[1] else 1
        groups[lighter].append(split)
        load[lighter] += count
    return list(groups)


def _cores() -> int:
    """The cores this process may run on (all of them where that cannot be asked)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class _Done:
    """What the second process wrote: its records, missing images, card figures, and its
    temporary shards by split."""

    records: int
    missing: int
    facts: CardFacts
    written: dict[str, list[Path]]


@dataclass(slots=True)
class _Child:
    """The second process, forked to write the splits of one group (no thread and no open
    statement in this one at the fork; it opens the database again), reporting through a
    pipe: a pickled :class:`_Done`, or the exception that ended it."""

    pid: int
    pipe: int

    @classmethod
    def start(
        cls,
        layout: RunLayout,
        opt: ExportOptions,
        keys: list[tuple[str, str]],
        state: str | None,
        splits: list[str],
    ) -> _Child:
        import pickle

        read, write = os.pipe()
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            os.close(write)
            return cls(pid=pid, pipe=read)
        code = 1
        try:
            os.close(read)
            _die_with(parent)
            assert opt.output is not None
            shards = ShardSet(folder=opt.output, ext="tar", with_count=False)
            writer = TarShards(shards, opt.shard_size)
            facts = CardFacts()
            db = _connect(layout)
            if db is None:
                raise JobStoreError(f"{layout.db} changed while it was exported")
            try:
                records, missing = _write(db, layout, state, splits, keys, writer, facts)
                writer.close()
            except BaseException:
                writer.abandon()  # the parent removes the temporary shards
                raise
            finally:
                db.close()
            report: object = _Done(records, missing, facts, shards.written)
            code = 0
        except BaseException as exc:  # handed to the parent, which raises it
            report = exc
        try:
            with os.fdopen(write, "wb") as out:
                pickle.dump(report, out)
        finally:
            os._exit(code)

    def result(self) -> _Done:
        """Wait for the process; its result, or its error raised here."""
        import pickle

        with os.fdopen(self.pipe, "rb") as fh:
            self.pipe = -1
            data = fh.read()
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        try:
            report = pickle.loads(data) if data else None
        except Exception:  # cut short (the process was killed), or an error that cannot be
            report = None  # rebuilt here: said below by its exit status
        if isinstance(report, BaseException):
            raise report
        if not isinstance(report, _Done) or status != 0:
            raise JobStoreError(f"the export's second process ended with status {status}")
        return report

    def stop(self) -> None:
        """End the process (this one failed or was interrupted) and wait for it, unless
        :meth:`result` already did."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0
        if self.pipe >= 0:
            os.close(self.pipe)
            self.pipe = -1


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux's
    ``PR_SET_PDEATHSIG``): a killed export leaves no process writing on."""
    import ctypes

    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request was made
        os._exit(1)


def _merge(facts: CardFacts, other: CardFacts) -> None:
    """Add ``other``'s figures to ``facts`` (as if one process had counted every row)."""
    facts.states.update(other.states)
    facts.splits.update(other.splits)
    facts.models.update(other.models)
    facts.sizes.update(other.sizes)
    facts.languages.update(other.languages)
    facts.image_bytes += other.image_bytes
    for mine, theirs in ((facts.cost, other.cost), (facts.emulated, other.emulated)):
        for cur, amount in sorted(theirs.items()):
            mine[cur] = mine.get(cur, Decimal(0)) + amount
    for stamp in (other.first, other.last):
        if stamp is not None:
            facts.first = stamp if facts.first is None else min(facts.first, stamp)
            facts.last = stamp if facts.last is None else max(facts.last, stamp)


def _write(
    db: sqlite3.Connection,
    layout: RunLayout,
    state: str | None,
    splits: list[str] | None,
    keys: list[tuple[str, str]],
    writer: TarShards,
    facts: CardFacts,
    *,
    others: bool = False,
) -> tuple[int, int]:
    """Write the samples of every selected job (of ``splits`` only, when given, or with
    ``others`` of every split but those); count the card's figures into ``facts``; returns
    (records, done images whose file was missing)."""
    conditions: list[str] = []
    params: list[str] = []
    if state is not None:
        conditions.append("state = ?")
        params.append(state)
    if splits:
        which = "NOT IN" if others else "IN"
        conditions.append(f"{_SPLIT_SQL} {which} ({', '.join('?' * len(splits))})")
        params += splits
    where_clause = " WHERE " + " AND ".join(conditions) if conditions else ""
    columns = f"{_FAST_COLUMNS}, ifnull(bytes, 'null'), {_PLAIN}, rowid"
    query = f"SELECT {columns} FROM jobs{where_clause} ORDER BY rowid"
    images = str(layout.images.resolve())
    fields = (*EXPORT_FIELDS, *(key for _, key in keys))
    # The record's JSON as the general path's encoder writes the dict of these fields, in
    # order ({"id": ..., "state": ...}): each value encoded here, the keys once
    template = "{" + ", ".join(_enc(k).replace("%", "%%") + ": %s" for k in fields) + "}"
    var_names = [name for name, _ in keys]
    numbers: dict[str, int] = {}
    states: Counter[str] = Counter()
    per_split: Counter[str] = Counter()
    models: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    costs: dict[tuple[str, int, bool], int] = {}  # (currency, micros, emulated) -> jobs
    params_of: dict[str, tuple[str, str]] = {}  # params -> negative_prompt, watermark as JSON
    cost_json: dict[int | None, str] = {}
    stamps: list[float] = []
    image_bytes = missing = records = 0
    enc, jv, text, iso = _enc, _json_value, _json_text, _json_time
    add = writer.add_sample
    loads = json.loads
    vars_json: dict[str | None, tuple[str, ...]] = {}  # the variables' JSON of a vars text
    # the images folder open once, each file opened relative to it (as read_file says)
    try:
        folder: int | None = os.open(images, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        folder = None  # no image to read: each one is reported missing as it is looked for
    where = None if folder is not None else images

    def params_json(par: str) -> tuple[str, str]:
        """A params text's negative_prompt and watermark as JSON (kept for the next row)."""
        loaded = load_params(par)
        got = jv(loaded.get("negative_prompt")), jv(loaded.get("watermark"))
        if len(params_of) < 4096:
            params_of[par] = got
        return got

    def cost_text(micros: int | None) -> str:
        cost = cost_json[micros] = enc(str(Decimal(int(micros or 0)) / MICROS))
        return cost

    def vars_values(vars_: str | None) -> tuple[str, ...]:
        found = loads(vars_) if vars_ else {}
        got = tuple([jv(found.get(name)) for name in var_names])
        if len(vars_json) < 4096:  # rows share labels: most are found here
            vars_json[vars_] = got
        return got

    def one(row: tuple[Any, ...], fetch: Fetch) -> None:
        """Write one row's samples and count it (the loop's body, in Python); ``fetch``
        reads from the connection the row came from."""
        nonlocal records, missing, image_bytes
        (
            job_id, st, model, prompt, size, seed, extend, par, n, output, request_id,
            task_id, width, height, sha256, nbytes, attempts, error_code, error_message,
            shortfall, micros, currency, endpoint, lane, actual, input_tokens, output_tokens,
            total_tokens, latency_ms, billed, throttled, ambiguous, regenerated, created_at,
            started_at, generated_at, finished_at, review, review_note, reviewed_at, vars_,
            bytes_json, plain, rowid,
        ) = row  # fmt: skip
        done = st == _DONE
        if not plain or (n > 1 and done):  # the general path's records, as they are
            for image_rec in image_records(_record(fetch, rowid)):
                records += 1
                missing += _general(image_rec, keys, images, writer, facts, numbers)
            return
        n = n or 1
        if par is None:
            negative = watermark = "null"
        else:
            negative, watermark = params_of.get(par) or params_json(par)
        cost = cost_json.get(micros) or cost_text(micros)
        if generated_at is None and request_id is None:
            actual = "null"
        else:
            actual = enc(str(actual or prompt))
        values: tuple[object, ...] = (
            enc(job_id), enc(st), enc(model), enc(prompt), enc(size), seed,
            "true" if extend else "false", text(par), n, negative, watermark,
            enc(f"images/{output}") if done else "null", "1", text(request_id),
            text(task_id), width, height, text(sha256), bytes_json, attempts,
            text(error_code), text(error_message), text(shortfall), cost, text(currency),
            text(endpoint), text(lane), actual, input_tokens, output_tokens,
            total_tokens, latency_ms, billed, throttled, ambiguous,
            regenerated, iso(created_at), iso(started_at), iso(generated_at),
            iso(finished_at), text(review), text(review_note), iso(reviewed_at),
        )  # fmt: skip
        if var_names:
            values += vars_json.get(vars_) or vars_values(vars_)
        record = (template % values).encode()
        image: bytes | None = None
        if done:
            try:
                path = output if where is None else os.path.join(where, output)
                image = read_file(path, nbytes, folder)
            except FileNotFoundError:
                missing += 1
            else:
                image_bytes += len(image)
            sizes[size] += 1
        split = split_of(output) or "data"
        number = numbers.get(split, 0)
        numbers[split] = number + 1
        name = job_id if n == 1 else f"{job_id}-1"  # a job of several not done yet
        add(split, sample_key(number, name), image, record, prompt.encode())
        records += 1
        # the card's figures, as CardFacts.add counts them (a job is one row here)
        states[st] += 1
        per_split[split] += 1
        models[model] += 1
        languages[prompt_language(prompt)] += 1
        if currency:
            key = (currency, micros, endpoint == EMULATOR_ENDPOINT)
            costs[key] = costs.get(key, 0) + 1
        if created_at is not None:
            stamps.append(created_at)
        if finished_at is not None:
            stamps.append(finished_at)
        if len(stamps) > 4096:
            stamps[:] = [min(stamps), max(stamps)]

    fast = _speedups() if folder is not None else None
    try:
        if fast is None:
            fetch: Fetch = lambda sql, values: db.execute(sql, values).fetchall()  # noqa: E731
            for row in db.execute(query, params):
                one(row, fetch)
        else:  # the same loop in C, which hands back to one() each row it does not write
            by_rowid = f"SELECT {columns} FROM jobs WHERE rowid = ?"

            def fallback(rowid: int, fetch: Fetch) -> None:
                """One row the C loop hands back, read on its connection (its snapshot)."""
                (row,) = fetch(by_rowid, (rowid,))
                one(row, fetch)

            heads = [("{" if i == 0 else ", ") + _enc(k) + ": " for i, k in enumerate(fields)]
            done_here = fast.write_rows(
                _uri(layout), f"SELECT {_COLUMNS}, rowid FROM jobs{where_clause} ORDER BY rowid",
                tuple(params), tuple(head.encode() for head in (*heads, "}")), len(var_names),
                folder, SPLIT_FOLDERS, _DONE, EMULATOR_ENDPOINT, numbers,
                (states, per_split, models, sizes, languages, costs),
                (params_of, params_json, cost_json, cost_text, vars_json, vars_values,
                 _SECONDS, _second_head),
                writer, writer.shard_size, fallback, ("zh", "en", "other"),
            )  # fmt: skip
            records += done_here[0]
            missing += done_here[1]
            image_bytes += done_here[2]
            stamps.extend(stamp for stamp in done_here[3:] if stamp is not None)
    except sqlite3.Error as exc:
        raise JobStoreError(f"the job database failed: {exc}") from exc
    finally:
        if folder is not None:
            os.close(folder)
    facts.states.update(states)
    facts.splits.update(per_split)
    facts.models.update(models)
    facts.sizes.update(sizes)
    facts.languages.update(languages)
    facts.image_bytes += image_bytes
    for (cur, micros, emulated), count in sorted(costs.items()):
        # the sum CardFacts.add makes one job at a time, in one step per amount: exact either
        # way, and with the same exponent (a Decimal sum keeps the smallest)
        amount = Decimal(int(micros or 0)) / MICROS * count
        into = facts.emulated if emulated else facts.cost
        into[cur] = into.get(cur, Decimal(0)) + amount
    if stamps:
        low, high = min(stamps), max(stamps)
        facts.first = low if facts.first is None else min(facts.first, low)
        facts.last = high if facts.last is None else max(facts.last, high)
    return records, missing


def _json_value(value: Any) -> str:
    """``value`` as the general path's JSON encoder writes it (a value of any type)."""
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return _enc(value)
    if kind is int:
        return int.__repr__(value)
    if kind is bool:
        return "true" if value else "false"
    return _JSON.encode(value)  # a float (NaN, Infinity), a list, a dict


def _json_text(value: str | None) -> str:
    """A text column's value (SQLite's TEXT affinity stores text or NULL) as JSON."""
    return "null" if value is None else _enc(value)


_MILLIS = tuple(f'{ms:03d}Z"' for ms in range(1000))  # a time's JSON after its second
_SECONDS: dict[int, str] = {}  # a whole second -> its time's JSON before the milliseconds


def _second_head(second: int, seconds: dict[int, str] = _SECONDS) -> str:
    """A time's JSON before its milliseconds (kept for the next time of that second)."""
    head = f'"{whole_second(second)}.'
    if len(seconds) < 65536:
        seconds[second] = head
    return head


def _json_time(
    stamp: float | None,
    floor: Callable[[float], int] = math.floor,
    seconds: dict[int, str] = _SECONDS,
    millis: tuple[str, ...] = _MILLIS,
) -> str:
    """A time column as the JSON of :func:`batcher.records.iso_utc`'s text (ASCII only),
    its arithmetic inline and the text of each whole second kept (five a record: half
    the time of an f-string with a format spec and the cached function's call)."""
    if stamp is None:
        return "null"
    second = floor(stamp)
    micros = round((stamp - second) * 1e6)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    head = seconds.get(second) or _second_head(second, seconds)
    return head + millis[micros // 1000]


def _speedups() -> Any:
    """The C loop (:mod:`batcher._speedups`), or None: not built here, or turned off with
    ``BATCHER_PURE_PYTHON=1`` (the tests run both, and compare what they write)."""
    if os.environ.get("BATCHER_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from . import _speedups as module
    except ImportError:
        return None
    return module


def _record(fetch: Fetch, rowid: int) -> dict[str, Any]:
    """A job as :meth:`jobs.JobStore.iter_records` gives it, with the columns an export
    shows; a job of several images with its ``images`` from ``job_images``."""
    (row,) = fetch(f"SELECT {_COLUMNS} FROM jobs WHERE rowid = ?", (rowid,))
    rec = dict(zip(_NAMES, row, strict=True))
    rec["prompt_extend"] = bool(rec["prompt_extend"])
    rec["cost"] = str(Decimal(int(rec.pop("cost_micros") or 0)) / MICROS)
    if rec["n"] > 1:
        query = f"SELECT {_IMAGE_COLUMNS} FROM job_images WHERE job_id = ? ORDER BY idx"
        names = [c.strip() for c in _IMAGE_COLUMNS.split(",")]
        rec["images"] = []
        for image_row in fetch(query, (rec["id"],)):
            image = dict(zip(names, image_row, strict=True))
            image["index"] = image.pop("idx")
            rec["images"].append(image)
    return rec


def _general(
    rec: dict[str, Any],
    keys: list[tuple[str, str]],
    images: str,
    writer: TarShards,
    facts: CardFacts,
    numbers: dict[str, int],
) -> int:
    """One record's sample as :class:`batcher.shardexport._Sink` writes it (an image of a
    job of several, or a row whose numbers are of unexpected types); returns 1 when its
    image file was missing."""
    row = export_row(rec, keys)
    split = split_of(rec["output"]) or "data"
    image: bytes | None = None
    lost = 0
    if rec["state"] == _DONE:
        try:
            image = read_file(os.path.join(images, rec["output"]), rec.get("bytes"))
        except FileNotFoundError:
            lost = 1
    facts.add(rec, split, len(image) if image is not None else 0)
    number = numbers.get(split, 0)
    numbers[split] = number + 1
    name = rec["id"] if (rec.get("n") or 1) == 1 else f"{rec['id']}-{rec['image_index']}"
    record = _JSON.encode(row).encode()
    writer.add_sample(split, sample_key(number, name), image, record, rec["prompt"].encode())
    return lost
