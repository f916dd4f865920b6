"""The SQLite schema of a run folder's ``batcher.db``: tables, indexes and pragmas.

One row per job in ``jobs``; one row per image of a job of several images (``n > 1``) in
``job_images`` (a job of one image keeps its image in its own row); the previous record of a
job replaced by ``--replace`` (or redone) in ``job_history``; what each lane's (API key's)
calls did per run and model in ``lane_calls``; ``meta`` holds the schema version.
``quota_schedule`` and ``quota_sends`` hold the send schedule that workers sharing a
PostgreSQL run keep to together (see :mod:`jobs.quota`); a SQLite run folder has them, empty.
A run folder made by an older release is upgraded in place on first open by the numbered steps
of :mod:`jobs.migrations`; ``SCHEMA_VERSION`` is the version those steps end at, and the tables
below are that version.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    ColumnElement,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

from jobs.states import ACTIVE as ACTIVE_STATES
from jobs.states import State

from .version import (  # in a module of its own: sqlite3 readers check them too
    EMULATOR_ENDPOINT,
    SCHEMA_VERSION,
)

__all__ = [
    "ACTIVE",
    "EMULATOR_ENDPOINT",
    "PRAGMAS",
    "SCHEMA_VERSION",
    "history",
    "images",
    "jobs",
    "lane_calls",
    "meta",
    "metadata",
    "quota_schedule",
    "quota_sends",
]


PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    # FULL: a committed "generated" row must survive power loss, or the image is paid twice.
    "PRAGMA synchronous=FULL",
    "PRAGMA busy_timeout=15000",
    "PRAGMA foreign_keys=ON",
)

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String, primary_key=True),
    Column("value", Text, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Text, primary_key=True),
    Column("line", Integer, nullable=False),
    # what the job is
    Column("model", Text, nullable=False),
    Column("prompt", Text, nullable=False),
    Column("size", Text, nullable=False),
    Column("seed", Integer, nullable=False),
    Column("prompt_extend", Integer, nullable=False),
    Column("output", Text, nullable=False),
    Column("output_key", Text, nullable=False, unique=True),
    # where it is
    Column("state", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("download_attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", Float, nullable=False, server_default=text("0")),
    Column("lease_expires_at", Float),
    Column("claim_token", Text),
    Column("worker", Text),
    # what the API said
    Column("request_id", Text),
    Column("width", Integer),
    Column("height", Integer),
    Column("image_count", Integer),
    Column("input_tokens", Integer),
    Column("output_tokens", Integer),
    Column("total_tokens", Integer),
    Column("reasoning_tokens", Integer),
    Column("actual_prompt", Text),
    Column("image_url", Text),
    Column("url_expires_at", Float),
    Column("latency_ms", Float),
    Column("error_code", Text),
    Column("error_message", Text),
    # what it cost and what came of it
    Column("billed", Integer, nullable=False, server_default=text("0")),
    Column("cost_micros", Integer, nullable=False, server_default=text("0")),  # 1e-6 currency units
    Column("currency", Text),
    Column("throttled", Integer, nullable=False, server_default=text("0")),
    Column("ambiguous", Integer, nullable=False, server_default=text("0")),
    Column("regenerated", Integer, nullable=False, server_default=text("0")),
    Column("sha256", Text),
    Column("bytes", Integer),
    # when
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("generated_at", Float),
    Column("finished_at", Float),
    # where the image came from: "emulator", or the API base URL (never the key)  [v2]
    Column("endpoint", Text),
    # the manifest row's own variables (extra columns), as a JSON object  [v2]
    Column("vars", Text),
    # a person's judgement of the image: "approved" | "rejected" | NULL, and a note  [v2]
    Column("review", Text),
    Column("review_note", Text),
    Column("reviewed_at", Float),
    # the manifest's own seed and prompt, kept when a redo replaced them (NULL: unchanged), so
    # re-importing the unchanged manifest row is not taken for a change  [v3]
    Column("manifest_seed", Integer),
    Column("manifest_prompt", Text),
    # images one call makes, and the optional model parameters given, as JSON  [v4]
    Column("n", Integer, nullable=False, server_default=text("1")),
    Column("params", Text),
    # the service's task of an asynchronously generated job ("" while its create is in
    # flight), and when it was created  [v4]
    Column("task_id", Text),
    Column("task_submitted_at", Float),
    # the lane (API key) whose call generated the image, or created the task that must be
    # polled with that same key; its name, never the key  [v5]
    Column("lane", Text),
    # what a job of n > 1 images did not get: "2 of 4 images failed: <code>: <message>"
    # (NULL when every image came)  [v7]
    Column("shortfall", Text),
    sqlite_autoincrement=False,
)

# Claiming reads only active rows: a partial index keeps it small when 99% are done.
# SQLite uses a partial index only when the query's WHERE repeats the index's WHERE term
# (``state = 'pending'`` alone does not imply it), so the claim queries add ``ACTIVE``.
# The states come from the state table, in a fixed order (the text is the index's definition).
# Written with OR, not ``state IN (...)``: SQLite tests an IN list of constants against a
# temporary b-tree for every row, so building the index after a first import of 1,000,000 rows
# took 0.60 s with IN and takes 0.32 s with OR (schema version 8; the claims read it the
# same). The parentheses keep it one term wherever it is ANDed into a query's text.
ACTIVE_SQL = "({})".format(" OR ".join(f"state = '{s.value}'" for s in State if s in ACTIVE_STATES))
# PostgreSQL keeps the IN form (ix_jobs_due): given ``state = 'pending' AND (... OR ...)`` its
# planner splits the OR into a bitmap scan per state and sorts every pending row for the
# claim's ORDER BY (0.75 s a claim on a million pending jobs), where the IN form reads the
# first rows of the index in order (0.2 ms).
ACTIVE_IN_SQL = "state IN ({})".format(
    ", ".join(f"'{s.value}'" for s in State if s in ACTIVE_STATES)
)


class _Active(ColumnElement[bool]):
    """The partial index's condition, as each backend's index is written (see above)."""

    type = Boolean()
    inherit_cache = True


@compiles(_Active)
def _active_sqlite(element: _Active, compiler: SQLCompiler, **kw: Any) -> str:
    return ACTIVE_SQL


@compiles(_Active, "postgresql")
def _active_postgresql(element: _Active, compiler: SQLCompiler, **kw: Any) -> str:
    return ACTIVE_IN_SQL


ACTIVE: ColumnElement[bool] = _Active()
Index("ix_jobs_active", jobs.c.state, jobs.c.next_attempt_at, sqlite_where=ACTIVE)
Index("ix_jobs_failed_code", jobs.c.error_code, sqlite_where=text("state = 'failed'"))

images = Table(
    "job_images",
    metadata,
    # One image of a job of n > 1 images  [v7]. Written with the generation's record (its
    # URL; its file is jobs.naming.image_output of the job's output, so a moved job needs no
    # update here), then ``sha256``/``bytes`` once its verified file is about to be renamed into
    # place (as ``jobs.sha256`` for a job of one image), so a run that died between two
    # downloads fetches only the images still missing, and never generates them again.
    Column("job_id", Text, primary_key=True),
    Column("idx", Integer, primary_key=True),  # 1..n: the image's place in the answer
    Column("url", Text, nullable=False),
    Column("url_expires_at", Float),
    Column("actual_prompt", Text),
    Column("width", Integer),
    Column("height", Integer),
    Column("sha256", Text),
    Column("bytes", Integer),
)

history = Table(
    "job_history",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Text, nullable=False, index=True),
    Column("replaced_at", Float, nullable=False),
    Column("record", Text, nullable=False),  # the old row as JSON
    # why the record was set aside ("replace", "redo", ...) and where its image went  [v2]
    Column("reason", Text),
    Column("file", Text),
)

lane_calls = Table(
    "lane_calls",
    metadata,
    # What each lane's calls of one model did in one run (a row per run, lane and model,
    # written as the run goes): the per-lane figures of status, the summary and the report.
    # A run on a shared table writes its own rows; the folder's figures are their sums.  [v5]
    Column("run", Text, primary_key=True),
    Column("lane", Text, primary_key=True),
    Column("model", Text, primary_key=True),
    Column("worker", Text),
    Column("started_at", Float, nullable=False),
    Column("quota", Float),  # the lane's requests/s for the model
    Column("calls", Integer, nullable=False, server_default=text("0")),
    Column("accepted", Integer, nullable=False, server_default=text("0")),
    Column("throttled", Integer, nullable=False, server_default=text("0")),
    # send times (Unix s) of the first and last accepted call: the span of the achieved rate
    Column("first_accepted_at", Float),
    Column("last_accepted_at", Float),
    Column("images", Integer, nullable=False, server_default=text("0")),
    Column("cost_micros", Integer, nullable=False, server_default=text("0")),
    Column("currency", Text),
    Column("emulated", Integer, nullable=False, server_default=text("0")),
)

# The send schedule of one (lane, model) quota, shared by every worker of a PostgreSQL run
# (see jobs.quota). Times are on the database server's clock (epoch seconds); intervals are
# seconds between sends.  [v6]
quota_schedule = Table(
    "quota_schedule",
    metadata,
    Column("lane", Text, primary_key=True),  # an account (API key) by name: "default"
    Column("model", Text, primary_key=True),
    Column("next_at", Float, nullable=False),  # the next free send slot
    Column("last_slot", Float, nullable=False),  # the slot reserved last
    Column("interval_s", Float, nullable=False),  # the spacing all workers keep together
    Column("least_s", Float, nullable=False),  # the spacing of the lowest rate a worker was told
    Column("slow_start", Integer, nullable=False),  # 1 while the rate doubles per window
    Column("known_good", Float, nullable=False),  # the interval last fully accepted
    Column("raised_at", Float, nullable=False),  # when slow start last raised the rate
    Column("cut_at", Float, nullable=False),  # when a throttled answer last acted on it
    Column("held_at", Float, nullable=False),  # when one last held it back without a cut
    Column("probe_at", Float, nullable=False),  # when the next probe may raise it
    Column("probe_every", Float, nullable=False),
    Column("ceiling", Float),  # the last estimate of the quota (requests per window)
    Column("cuts", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# The slots reserved over the last seconds, so that a throttled answer can count the sends
# every worker made in the service's window.  [v6]
quota_sends = Table(
    "quota_sends",
    metadata,
    Column("lane", Text, primary_key=True),
    Column("model", Text, primary_key=True),
    Column("at", Float, primary_key=True),
    Column("throttled", Integer, nullable=False, server_default=text("0")),
)

STAGING_DDL = """
CREATE TEMP TABLE IF NOT EXISTS staging (
    id TEXT NOT NULL, line INTEGER NOT NULL, model TEXT NOT NULL, prompt TEXT NOT NULL,
    size TEXT NOT NULL, seed INTEGER NOT NULL, prompt_extend INTEGER NOT NULL,
    output TEXT NOT NULL, output_key TEXT NOT NULL, n INTEGER NOT NULL, params TEXT, vars TEXT
)
"""
STAGING_COLUMNS = (
    "id",
    "line",
    "model",
    "prompt",
    "size",
    "seed",
    "prompt_extend",
    "output",
    "output_key",
    "n",
    "params",
    "vars",
)
