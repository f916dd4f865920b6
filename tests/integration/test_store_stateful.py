"""A hypothesis state machine against a real store.

Random sequences of claim / heartbeat / record_generated / record_file / complete / retry_later
/ retry_download_later / regenerate / fail / release / clock advance / reclaim / retry_failed /
re-import run against one store on a fresh SQLite file per example (and, in a second test,
on an empty PostgreSQL schema per example). A pure model says what each
call must do, including which token owns which job; after every step the file is compared with
the model and the invariants are checked:

* every job's state is its previous state or one the transition table allows from it;
* a job is held by at most one outstanding claim, and its token is the model's;
* a write with a token that does not own the job raised LeaseLost and changed nothing;
* done jobs have a sha256; the counts per state add up to the number of jobs.

Rules are drawn uniformly, so the fenced writes of an owner have two rules (two shares of the
draws): a run has to hold jobs and move them along to reach the deeper states (a failed
download retried while its URL is valid, a regeneration after the file was noted).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, event, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from jobs.errors import LeaseLost
from jobs.states import TRANSITIONS, State
from jobs.store import JobStore
from tests.pgsupport import fresh, require_database

from .store_support import FakeClock, generated, specs, stored, table

P, R, G, D, F = State.PENDING, State.RUNNING, State.GENERATED, State.DONE, State.FAILED
IDS = ["j0", "j1", "j2", "j3"]
HELD = (R, G)
DOWNLOAD_LEASE = 30.0
# Thousands of short-lived files: in memory where the system has it (fsync is not under test).
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None


WRITES = (
    "record_generated",
    "record_file",
    "complete",
    "retry_later",
    "retry_download_later",
    "regenerate",
    "fail",
    "release",
)
FITS = {  # the writes that apply in each held state
    R: frozenset({"record_generated", "retry_later", "fail", "release"}),
    G: frozenset(
        {"record_file", "complete", "retry_download_later", "regenerate", "fail", "release"}
    ),
}


@dataclass
class Job:
    """The model of one row: what the store's behaviour depends on or must keep."""

    state: State = P
    token: str | None = None
    lease: float | None = None
    due: float = 0.0
    attempts: int = 0
    download_attempts: int = 0
    billed: int = 0
    regenerated: int = 0
    url_expires: float | None = None
    has_url: bool = False
    sha: str | None = None


def expired(lease: float | None, now: float) -> bool:
    return lease is None or lease < now


@dataclass(frozen=True)
class Write:
    """One fenced write: the states it applies in, the call, and its effect on the model."""

    allowed: tuple[State, ...]
    call: Callable[[], Awaitable[Any]]
    apply: Callable[[Job], None]


class StoreMachine(RuleBasedStateMachine):
    shared = False  # a table other workers share (PostgreSQL): claims take expired leases

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="batcher-stateful-", dir=SCRATCH))
        self.db = self.make_target()
        self.clock = FakeClock()
        self.portal_cm = start_blocking_portal("asyncio")
        self.portal = self.portal_cm.__enter__()
        self.store: JobStore = self.portal.call(partial(JobStore.open, self.db, clock=self.clock))
        self.portal.call(partial(self.store.import_specs, specs(IDS), source="m.csv"))
        self.jobs = {i: Job() for i in IDS}
        self.tokens: list[str] = []  # every token ever handed out, oldest first
        self.claims: list[tuple[str, str]] = []  # (job, token) of every claim handed out
        self.prev_states = {i: P for i in IDS}
        self.moves: set[tuple[State, State]] = set()

    def make_target(self) -> Path | str:
        """Where this example's store lives: a fresh SQLite file."""
        return self.dir / "batcher.db"

    def teardown(self) -> None:
        # steer generation towards runs that make many different moves
        target(float(len(self.moves)), label="distinct moves")
        try:
            self.portal.call(self.store.close)
        finally:
            self.portal_cm.__exit__(None, None, None)
            shutil.rmtree(self.dir, ignore_errors=True)

    def call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        return self.portal.call(fn)

    # ------------------------------------------------------- the fenced writes

    def make_write(self, name: str, data: st.DataObject, job_id: str, token: str) -> Write:
        """The store call ``name`` for ``job_id`` under ``token``, with its expected effect."""
        store, now = self.store, self.clock.now

        if name == "record_generated":
            life = data.draw(st.sampled_from([-5.0, 10.0, 1000.0, None]), label="url life")
            expires = None if life is None else now + life
            gen = generated(expires_at=expires)

            def record_generated(job: Job) -> None:
                job.state, job.lease = G, now + DOWNLOAD_LEASE
                job.attempts += 1
                job.billed += 1
                job.download_attempts = 0
                job.has_url, job.url_expires = True, expires

            call = partial(store.record_generated, job_id, token, gen, lease_seconds=DOWNLOAD_LEASE)
            return Write((R,), call, record_generated)

        if name == "record_file":
            file = stored(job_id)

            def record_file(job: Job) -> None:
                job.sha = file.sha256

            return Write((G,), partial(store.record_file, job_id, token, file), record_file)

        if name == "complete":
            file = stored(job_id)

            def complete(job: Job) -> None:
                job.state, job.token, job.lease, job.sha = D, None, None, file.sha256

            return Write((G,), partial(store.complete, job_id, token, file), complete)

        if name == "retry_later":
            delay = data.draw(st.sampled_from([-1.0, 0.0, 3.0, 30.0]), label="delay")
            charge = data.draw(st.booleans(), label="charge")

            def retry_later(job: Job) -> None:
                job.state, job.token, job.lease = P, None, None
                job.due = now + max(0.0, delay)
                job.attempts += int(charge)

            call = partial(
                store.retry_later,
                job_id,
                token,
                delay=delay,
                code="E",
                message="m",
                charge_attempt=charge,
            )
            return Write((R,), call, retry_later)

        if name == "retry_download_later":
            delay = data.draw(st.sampled_from([0.0, 10.0]), label="delay")

            def retry_download_later(job: Job) -> None:
                job.token, job.lease = None, None
                job.due = now + delay
                job.download_attempts += 1

            call = partial(
                store.retry_download_later, job_id, token, delay=delay, code="E", message="m"
            )
            return Write((G,), call, retry_download_later)

        if name == "regenerate":

            def regenerate(job: Job) -> None:
                event(f"regenerate with a file noted: {job.sha is not None}")
                job.state, job.token, job.lease, job.due = P, None, None, now
                job.has_url, job.url_expires, job.sha = False, None, None
                job.regenerated += 1
                job.download_attempts = 0

            call = partial(store.regenerate, job_id, token, code="URLExpired", message="m")
            return Write((G,), call, regenerate)

        if name == "fail":
            charge = data.draw(st.booleans(), label="charge")

            def fail(job: Job) -> None:
                job.state, job.token, job.lease = F, None, None
                job.attempts += int(charge)

            call = partial(store.fail, job_id, token, code="E", message="m", charge_attempt=charge)
            return Write(HELD, call, fail)

        assert name == "release"

        def release(job: Job) -> None:
            job.state = P if job.state == R else G
            job.token, job.lease = None, None

        return Write(HELD, partial(store.release, job_id, token), release)

    def attempt(self, name: str, data: st.DataObject, job_id: str, token: str) -> None:
        """Run a fenced write: it must succeed exactly when ``token`` owns the job in a state
        the write applies to, and otherwise raise LeaseLost and change nothing."""
        job = self.jobs[job_id]
        write = self.make_write(name, data, job_id, token)
        if job.token == token and job.state in write.allowed:
            event(f"owner: {name} from {job.state}")
            self.call(write.call)
            write.apply(job)
            return
        event("refused write")
        before = table(self.db)
        with pytest.raises(LeaseLost):
            self.call(write.call)
        assert table(self.db) == before, f"a refused {name} changed the table"

    def owner_write(self, data: st.DataObject) -> None:
        held = [i for i, j in self.jobs.items() if j.token is not None]
        if not held:
            return
        job_id = data.draw(st.sampled_from(held), label="job")
        state = self.jobs[job_id].state
        # mostly a write that applies in the job's state; sometimes one that does not
        fitting = [n for n in WRITES if n in FITS[state]]
        name = data.draw(
            st.sampled_from(fitting * 3 + list(WRITES)) if fitting else st.just("fail"),
            label="write",
        )
        token = self.jobs[job_id].token
        assert token is not None
        self.attempt(name, data, job_id, token)

    # -------------------------------------------------------------------- rules

    @initialize(limit=st.integers(0, 3), lease=st.sampled_from([5.0, 60.0]))
    def first_claim(self, limit: int, lease: float) -> None:
        if limit:  # even the simplest runs start with jobs in hand
            self.claim(limit=limit, lease=lease)

    @rule(limit=st.integers(1, 3), lease=st.sampled_from([5.0, 20.0, 60.0]))
    def claim(self, limit: int, lease: float) -> None:
        now = self.clock.now

        def due_first(job_id: str) -> tuple[float, int]:
            return (self.jobs[job_id].due, IDS.index(job_id))

        gen = sorted(
            (
                i
                for i, j in self.jobs.items()
                if j.state == G and j.due <= now and expired(j.lease, now)
            ),
            key=due_first,
        )[:limit]
        taken = sorted(  # a shared table's claim takes over a running job whose lease ran out
            (
                i
                for i, j in self.jobs.items()
                if self.shared and j.state == R and j.lease is not None and j.lease < now
            ),
            key=lambda i: (self.jobs[i].lease or 0.0, IDS.index(i)),
        )[: limit - len(gen)]
        pend = (
            taken
            + sorted(
                (i for i, j in self.jobs.items() if j.state == P and j.due <= now), key=due_first
            )[: limit - len(gen) - len(taken)]
        )
        claims = self.call(partial(self.store.claim, limit=limit, lease_seconds=lease))
        assert [c.id for c in claims] == gen + pend
        assert [c.state for c in claims] == [G] * len(gen) + [R] * len(pend)
        if not claims:
            return
        tokens = {c.token for c in claims}
        assert len(tokens) == 1
        token = tokens.pop()
        assert token not in self.tokens, "a token was handed out twice"
        self.tokens.append(token)
        for c in claims:
            job = self.jobs[c.id]
            assert (c.attempts, c.download_attempts, c.sha256) == (
                job.attempts,
                job.download_attempts,
                job.sha,
            )
            job.state = R if c.id in pend else G
            job.token, job.lease = token, now + lease
            self.claims.append((c.id, token))

    @rule(data=st.data())
    def write_as_owner(self, data: st.DataObject) -> None:
        self.owner_write(data)

    @rule(data=st.data())
    def write_as_owner_again(self, data: st.DataObject) -> None:
        self.owner_write(data)

    @rule(data=st.data(), name=st.sampled_from(WRITES))
    def write_as_someone_else(self, data: st.DataObject, name: str) -> None:
        """A stale token (an earlier claim's) or one nobody was given: always refused."""
        job_id = data.draw(st.sampled_from(IDS), label="job")
        current = self.jobs[job_id].token
        stale = [t for t in self.tokens if t != current]
        if stale and data.draw(st.booleans(), label="stale"):
            token = data.draw(st.sampled_from(stale), label="stale token")
        else:
            token = uuid.uuid4().hex
        self.attempt(name, data, job_id, token)

    @rule(data=st.data(), lease=st.sampled_from([5.0, 60.0]))
    def heartbeat(self, data: st.DataObject, lease: float) -> None:
        if not self.tokens:
            return
        token = data.draw(st.sampled_from(self.tokens), label="token")
        ids = data.draw(st.sets(st.sampled_from(IDS), min_size=1), label="ids")
        held = {i for i in ids if self.jobs[i].token == token and self.jobs[i].state in HELD}
        lost = self.call(partial(self.store.heartbeat, token, ids, lease_seconds=lease))
        assert lost == ids - held
        for i in held:
            self.jobs[i].lease = self.clock.now + lease

    @rule(seconds=st.sampled_from([1.0, 5.0, 20.0, 61.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(all_running=st.booleans())
    def reclaim(self, all_running: bool) -> None:
        now = self.clock.now
        expected = 0
        for job in self.jobs.values():
            if job.token is None or not (all_running or expired(job.lease, now)):
                continue
            if job.state == R:
                job.state = P
                expected += 1
            job.token, job.lease = None, None
        assert self.call(partial(self.store.reclaim, all_running=all_running)) == expected

    @rule()
    def retry_failed(self) -> None:
        now = self.clock.now
        expected = 0
        for job in self.jobs.values():
            if job.state != F:
                continue
            expected += 1
            live = job.has_url and job.url_expires is not None and job.url_expires > now
            job.state = G if live else P
            job.attempts = job.download_attempts = 0
            job.due = 0.0
            event(f"retry_failed -> {job.state}")
        assert self.call(self.store.retry_failed) == expected

    @rule()
    def stats_add_up(self) -> None:
        """The store's own counts agree with the file and the model (a rule, not an
        invariant: stats() is four queries, too slow to run after every step)."""
        stats = self.call(self.store.stats)
        assert stats.total == len(IDS)
        assert stats.by_state == {
            s.value: sum(j.state == s for j in self.jobs.values()) for s in State
        }
        assert stats.images_billed == sum(j.billed for j in self.jobs.values())
        assert stats.attempts == sum(j.attempts for j in self.jobs.values())
        assert stats.regenerated == sum(j.regenerated for j in self.jobs.values())

    @rule()
    def import_again(self) -> None:
        report = self.call(partial(self.store.import_specs, specs(IDS), source="m.csv"))
        assert (report.added, report.unchanged, report.replaced) == (0, len(IDS), 0)

    # --------------------------------------------------------------- invariants

    @invariant()
    def invariants(self) -> None:
        """Read the file once per step and hold it against the model and the rules."""
        rows = {r["id"]: r for r in table(self.db)}
        assert list(rows) == IDS
        self.the_file_matches_the_model(rows)
        self.states_move_only_along_the_table(rows)
        self.a_job_has_at_most_one_holder(rows)
        self.done_jobs_have_a_file_and_counts_add_up(rows)

    def the_file_matches_the_model(self, rows: dict[str, dict[str, Any]]) -> None:
        for job_id, job in self.jobs.items():
            r = rows[job_id]
            got = {
                "state": r["state"],
                "token": r["claim_token"],
                "lease": r["lease_expires_at"],
                "due": r["next_attempt_at"],
                "attempts": r["attempts"],
                "download_attempts": r["download_attempts"],
                "billed": r["billed"],
                "regenerated": r["regenerated"],
                "has_url": r["image_url"] is not None,
                "url_expires": r["url_expires_at"],
                "sha": r["sha256"],
            }
            want = {k: getattr(job, k) for k in got}
            want["state"] = job.state.value
            assert got == want, job_id

    def states_move_only_along_the_table(self, rows: dict[str, dict[str, Any]]) -> None:
        now = {job_id: State(r["state"]) for job_id, r in rows.items()}
        for job_id, state in now.items():
            before = self.prev_states[job_id]
            assert state == before or state in TRANSITIONS[before], (job_id, before, state)
            self.moves.add((before, state))
        self.prev_states = now

    def a_job_has_at_most_one_holder(self, rows: dict[str, dict[str, Any]]) -> None:
        holders = Counter(
            job_id for job_id, token in self.claims if rows[job_id]["claim_token"] == token
        )
        assert all(n <= 1 for n in holders.values()), holders
        for job_id, r in rows.items():
            held = r["claim_token"] is not None
            assert held == (holders[job_id] == 1)
            assert held <= (r["state"] in ("running", "generated")), job_id
            assert (r["state"] == "running") <= held, f"{job_id} runs without a holder"

    def done_jobs_have_a_file_and_counts_add_up(self, rows: dict[str, dict[str, Any]]) -> None:
        for r in rows.values():
            if r["state"] == "done":
                assert r["sha256"] is not None and r["bytes"] is not None
                assert r["billed"] >= 1
        counts = Counter(r["state"] for r in rows.values())
        assert set(counts) <= {s.value for s in State}
        assert sum(counts.values()) == len(IDS)


StoreMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreStateMachine = StoreMachine.TestCase


class PgStoreMachine(StoreMachine):
    """The same machine on a real PostgreSQL: an empty schema per example."""

    shared = True

    def make_target(self) -> Path | str:
        return fresh()


def test_the_state_machine_on_postgresql() -> None:
    require_database()  # skipped (or, in CI, failed) here when the server is unreachable
    run_state_machine_as_test(
        PgStoreMachine,
        settings=settings(
            # fewer than on SQLite: a fresh schema and a store opening on a server cost ~1 s
            max_examples=20,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
