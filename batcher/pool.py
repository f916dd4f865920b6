"""The run: claim -> pace -> generate -> record -> download -> complete, under bounded concurrency.

One dispatcher loop takes capacity first (a free in-flight slot), then a claimed job from a
small local buffer (refilled from the store in batches), waits for its pacing slot when the job
needs a generation call, and starts a worker task. Downloads of already generated images do not
wait for pacing: they cost no quota.

Every worker ends its attempt with exactly one final store write, run under a shielded cancel
scope so an interrupt cannot leave a job half-recorded; if it is cancelled before it could
decide, it releases the job (back to pending, no attempt charged).

Every lane (an API key: :mod:`batcher.lanes`) has its own pacer per model (the service counts
requests per account *and model*), so a mixed manifest keeps every model's quota busy on every
account: the dispatcher starts whichever buffered job has a lane serving its model with a free
send slot (the lane with the fewest calls for its weight when several have one). A run without
``--lanes`` has one lane, ``default``. On a PostgreSQL table the pacer of a lane and model
keeps to the schedule every worker of the run shares (:mod:`batcher.sharedpacing`), so
workers on one account together stay under its quota. An error fatal to an account (a bad
key, arrears, the free quota used up) disables its lane alone: the job goes back to pending
with no attempt charged, the other lanes go on, and the run stops (exit 3) when jobs are left
that no lane can take (once the others are done), or at once when every lane is disabled.

A model called as an asynchronous task (see ``batcher.models``) also has a limit of tasks at
once per lane; its worker creates the task, commits the ``task_id`` and the lane (state
``submitted``) before anything else, then polls it with that lane's key
(``batcher.taskpolls``) and downloads the result like any other image. A ``submitted`` job
claimed by a later run is polled (with the lane recorded), never created again.

A job of several images (``n > 1``) records every image the answer carries (URL, and a
shortfall note when some of the n failed: a task's partial success) with the generation,
billed per image; then each image is downloaded, its hash recorded, and its file put in place
in turn, and the job is done once every recorded image is (:meth:`Runner._download_several`).
A later run that finds the job generated re-downloads only the images whose verified file is
not in place: the URLs are recorded, nothing is generated (or paid) again.

An unreachable service is one condition, not a failure per job (:mod:`batcher.reach`): a call
that fails to connect is retried with no attempt charged (it never reached the service), and
when such failures follow one another on a lane the dispatcher stops starting calls on it and
lets one probe at a time go, with backoff (each lane on its own: lanes may send to two regions);
past ``unreachable_timeout`` a run of one lane stops (:attr:`StopReason.UNREACHABLE`) with every
job left pending, and of several the lane is disabled, the others going on.

A job database that cannot be reached (a PostgreSQL server restarting, the network to it cut:
:class:`jobs.StoreUnreachable`) is the same kind of condition. The runner is the store's
``outage`` hook: a write, claim or read that fails waits there while one probe at a time pings
the database with backoff; the dispatcher starts no call meanwhile, and answers already in
hand wait in memory to be written. Once the database answers, every waiting write goes on,
and before any new call the leases of the jobs held are renewed: those another worker took
over meanwhile (the outage outlasted the lease) leave the buffer, and a late write of one in
flight is refused by its claim token (a lost lease, counted). Past ``unreachable_timeout``
the run stops (:attr:`StopReason.DATABASE`), leaving every job as the database has it.

Stopping: :meth:`Runner.request_stop` stops claiming (within a second: every wait in the
dispatcher watches the stop event) and lets in-flight calls finish; :meth:`Runner.cancel_in_flight`
cuts them short. A run-level API error (bad key, arrears, ...) does the former by itself.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import anyio
from anyio.abc import TaskGroup

from jobs import (
    EMULATOR_ENDPOINT,
    Claim,
    Generated,
    JobImage,
    JobStore,
    JobStoreError,
    LaneCalls,
    LeaseLost,
    State,
    StoredFile,
    StoreUnreachable,
)
from jobs.naming import image_output
from jobs.params import load_params

from .backoff import next_delay, parse_retry_after
from .classify import DownloadVerdict, TransportFault, Verdict, classify_api_error
from .client import DashScopeClient, ImageResult, TaskReport, url_expiry
from .committer import ImageCommitter
from .download import Downloaded, commit, discard, download_image, hash_file
from .errors import ApiError, DownloadError, RunAborted, TransportError
from .lanebook import LaneBook, LaneTally, RunLane, accepted_rate
from .lanes import default_lane
from .layout import RunLayout, UnsafeOutputPath
from .models import MODELS, ApiProtocol
from .pacing import DEFAULT_QUOTA, LatencyTracker, Pacer, Pacing, auto_concurrency, head_start
from .pricing import Money, price_per_image
from .reach import Reachability
from .sendlog import SendLog
from .sharedpacing import SharedPacer
from .taskpolls import PollGate, TaskClock, poll_delay

__all__ = ["RunCounters", "RunOptions", "RunResult", "Runner", "StopReason", "shortfall_note"]

log = logging.getLogger("batcher.run")
WORKER = f"{socket.gethostname()}:{os.getpid()}"
"""Who holds a claimed job (``jobs.worker``): the host and process, for a table several
workers share."""

# 429 codes that name the request-rate quota itself (the pacer may estimate it from them).
QUOTA_CODES = frozenset({"throttling.ratequota", "limitrequests", "limit_requests"})
BUFFER_MAX = 256  # claimed jobs held while their models wait for a send slot
FILL_AHEAD = 0.25  # s: claim more only when no send slot is due sooner (a claim is a write)
MAX_POLL_FAILURES = 8  # polls of one task failing in a row before it is left for later
DB_PROBE_CAP = 5.0  # s: the longest wait between pings of a job database that went away
LANE_SAVE_PERIOD = 5.0  # s: how often the lanes' figures are saved while the run goes


class StopReason(StrEnum):
    """Why a run ended."""

    FINISHED = "finished"  # nothing left to do
    ABORTED = "aborted"  # a run-level API error or a disk problem
    INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM
    BUDGET = "budget"  # --budget reached
    LIMIT = "limit"  # --limit reached
    UNREACHABLE = "unreachable"  # the service could not be reached for --unreachable-timeout
    DATABASE = "database"  # the job database could not be reached for --unreachable-timeout


def shortfall_note(n: int, came: int, failed: Sequence[tuple[str, str]]) -> str | None:
    """What a job of ``n`` images that got ``came`` of them records; None when all came.

    >>> shortfall_note(4, 3, [("InternalError.Algo", "Inference error.")])
    '1 of 4 images failed: InternalError.Algo: Inference error.'
    >>> shortfall_note(4, 4, [])
    """
    missing = n - came
    if missing <= 0:
        return None
    if not failed:
        return f"{missing} of {n} images did not come (the answer listed {came})"
    reasons = dict.fromkeys(f"{code}: {message}".rstrip(": ") for code, message in failed)
    return f"{missing} of {n} images failed: {'; '.join(reasons)}"


@dataclass(frozen=True, kw_only=True, slots=True)
class RunOptions:
    """How a run behaves (the ``batcher run`` flags)."""

    rps: float = 2.0
    concurrency: int | None = None  # None: derived from rate x the time a job is in flight
    max_attempts: int = 5
    request_timeout: float = 120.0
    download_timeout: float = 120.0
    region: str = "intl"
    limit: int | None = None
    budget: Decimal | None = None
    lease_seconds: float = 60.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    adaptive: bool = True
    start_rps: float | None = DEFAULT_QUOTA  # slow start begins here (None: at ``rps``)
    # Each model's own send rate (requests/s); a model not listed is paced at ``rps``.
    # ``model_rates(None)`` gives every known model its published quota.
    model_rps: Mapping[str, float] = field(default_factory=dict)
    unreachable_timeout: float = 180.0  # seconds the service (or the database) may be away
    seed: int | None = None  # for the retry jitter, so tests can reproduce a run


@dataclass(kw_only=True, slots=True)
class RunCounters:
    """What happened in this run (the database holds the totals over all runs)."""

    calls: int = 0
    accepted: int = 0  # calls the service answered without throttling them
    unreached: int = 0  # calls that never reached the service (connection failures)
    generated: int = 0  # jobs generated (a job of several images counts once)
    done: int = 0  # jobs done
    images_generated: int = 0  # images the service made (and billed) for this run's calls
    images_saved: int = 0  # image files this run verified and put in place
    failed: int = 0
    retries: int = 0
    throttled: int = 0
    ambiguous: int = 0  # calls retried after an answer was lost (may have been billed)
    abandoned: int = 0  # calls cut short by a second Ctrl-C (may have been billed)
    regenerated: int = 0
    download_retries: int = 0
    downloads_skipped: int = 0
    lease_lost: int = 0
    database_outages: int = 0  # times the job database went away and the run paused
    released: int = 0
    tasks_created: int = 0
    task_polls: int = 0
    tasks_reattached: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    cost: Decimal = Decimal(0)
    # per (lane, model): calls, throttled, rate, cost
    lanes: dict[tuple[str, str], LaneTally] = field(default_factory=dict)
    disabled: dict[str, str] = field(default_factory=dict)  # lane -> why it was disabled


@dataclass(frozen=True, kw_only=True, slots=True)
class RunResult:
    """How a run ended, what it did, and when its first and last API calls went out.

    ``first_accepted_at`` / ``last_accepted_at``: send times of the first and last calls the
    service answered without throttling; the achieved rate is measured between them.
    """

    reason: StopReason
    counters: RunCounters
    abort_message: str | None
    elapsed: float
    first_call_at: float | None
    last_call_at: float | None
    first_accepted_at: float | None = None
    last_accepted_at: float | None = None
    lanes: tuple[LaneCalls, ...] = ()  # this run's figures per lane and model

    @property
    def accepted_per_second(self) -> float | None:
        """Calls the service accepted per second while sending; None when too few to say
        (fewer than three, or sent within a second: a rate of a burst means nothing)."""
        return accepted_rate(self.counters.accepted, self.first_accepted_at, self.last_accepted_at)


class Runner:
    """Drives one run over an open store. See the module docstring."""

    def __init__(
        self,
        *,
        store: JobStore,
        client: DashScopeClient,
        session: aiohttp.ClientSession,
        layout: RunLayout,
        options: RunOptions,
        endpoint: str | None = None,
        spent: Decimal = Decimal(0),
        on_done: Callable[[list[str]], Awaitable[None]] | None = None,
        lanes: Sequence[RunLane] | None = None,
        on_notice: Callable[[str], None] | None = None,
        sent_calls: SendLog | None = None,
    ) -> None:
        """``endpoint`` is what each image records as its origin (default: the client's base
        URL); ``spent`` what the run folder spent before, in the region's currency, which
        ``--budget`` counts against. ``lanes``: the keys to send through (default: one lane,
        ``default``, with ``client``); ``on_notice`` hears the lines a person must see while
        the run goes on (a lane disabled). ``sent_calls`` notes each synchronous call sent
        until its outcome is recorded (closed when the run ends)."""
        self.store = store
        self._sent_calls = sent_calls
        self.client = client
        self.session = session
        self.layout = layout
        self.opt = options
        self.endpoint = endpoint if endpoint is not None else client.base_url
        if lanes is None:
            lanes = [
                RunLane(
                    lane=default_lane(options.region, None), client=client, endpoint=self.endpoint
                )
            ]
        self.book = LaneBook(lanes, lambda model: options.model_rps.get(model, options.rps))
        self.lanes = self.book.lanes
        self._on_notice = on_notice
        self.run_id = uuid.uuid4().hex
        self._started_wall = time.time()
        self._spent_before = spent
        self.counters = RunCounters(lanes=self.book.tallies, disabled=self.book.disabled)
        self.committer = ImageCommitter(store, on_done)
        self._on_done = on_done  # hears the ids of jobs this run completes
        self._pacers: dict[tuple[str, str], Pacing] = {}
        self._services: TaskGroup | None = None  # where shared pacers talk to the database
        self._unserved: list[SharedPacer] = []  # shared pacers made before the run started
        # tasks this run is creating or polling, by lane and model
        self._tasks_open: dict[tuple[str, str], int] = {}
        self._polls = PollGate()
        self._next_fill = 0.0
        # Whether each lane's service can be reached (lanes may be in two regions: one cut
        # off pauses alone), the job whose call probes a paused lane, and each lane's calls
        # in flight (a probe waits for them: their answers may end the outage).
        self._reach = {
            name: Reachability(window=options.unreachable_timeout) for name in self.lanes
        }
        self._probe: dict[str, str] = {}
        self._lane_generating: dict[str, int] = dict.fromkeys(self.lanes, 0)
        # How long a job holds its slot, call to completed file: the pool needs rate x this
        # in flight (the call's latency alone leaves out the download and the commits).
        self.job_time = LatencyTracker(initial=2.0)
        self._rng = random.Random(options.seed)
        self._buffer: deque[Claim] = deque()
        self._orphans: dict[str, list[Claim]] = {}  # by model: jobs no enabled lane serves
        self._held: dict[str, Claim] = {}
        self._in_flight = 0
        # Generation calls dispatched and not yet answered: counted from the dispatch (not
        # when the worker task first runs), so --budget sees every call already committed.
        self._generating = 0
        self._generating_images = 0  # the images those calls make (n a job)
        self._started: set[str] = set()  # jobs this run has called the API for (--limit)
        self._abandoned: set[str] = set()  # jobs whose call was cut short after it was sent
        self._stop = anyio.Event()
        self._wake = anyio.Event()
        self._reason = StopReason.FINISHED
        self._abort_message: str | None = None
        self._work_scope: anyio.CancelScope | None = None
        self._prices: dict[tuple[str, bool, str], Money] = {}
        self._t0 = time.monotonic()
        self.first_call_at: float | None = None
        self.last_call_at: float | None = None
        self.first_accepted_at: float | None = None
        self.last_accepted_at: float | None = None
        self._unreached_detail: dict[str, str] = {}  # by lane: why its service is unreachable
        # the job database (see the module docstring)
        self.database = Reachability(
            window=options.unreachable_timeout, streak=1, probe_cap=DB_PROBE_CAP
        )
        self._db_probe = anyio.Lock()  # one ping at a time; the other waiters find it back
        self._db_gone = False  # gave up: every store call fails at once
        self._recheck_leases = False  # renew every held lease before the next call
        self._cut = anyio.Event()  # cancel_in_flight: stop waiting for the database too

    # ------------------------------------------------------------------ control

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the run is stopping, once it is (None while it goes on)."""
        return self._reason if self._stop.is_set() else None

    @property
    def elapsed(self) -> float:
        """Seconds since this runner was made."""
        return time.monotonic() - self._t0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def concurrency(self) -> int:
        if self.opt.concurrency is not None:
            return self.opt.concurrency
        return auto_concurrency(self.rate, self.job_time)

    @property
    def rate(self) -> float:
        """Calls a second the run is paced at: every enabled lane's pacers together (``rps``
        before the first call)."""
        disabled = self.book.disabled
        live = (p.rate for (lane, _), p in self._pacers.items() if lane not in disabled)
        return sum(live) or self.opt.rps

    @property
    def pacer(self) -> Pacing:
        """The pacer set up last (a single-model run's one pacer); see :meth:`pacer_for` and
        :attr:`rate` for a mixed run."""
        if not self._pacers:
            return self.pacer_for(next(iter(self.lanes)), "z-image-turbo")
        return next(reversed(self._pacers.values()))

    def pacer_for(self, lane: str, model: str) -> Pacing:
        """The pacer of ``model`` on ``lane`` (the service counts per account and model).

        On a table other workers share (PostgreSQL), the pacer keeps to the schedule of the
        lane and model that all of them share (:mod:`batcher.sharedpacing`), even while this
        worker is alone: another may join at any time."""
        pacer = self._pacers.get((lane, model))
        if pacer is None:
            rate = self.book.quota_of(lane, model)
            entry = MODELS.get(model)
            published = entry.quota.rps if entry is not None else DEFAULT_QUOTA
            # a quota the user stated above the published one starts nearer it (head_start)
            start = head_start(rate, published, self.opt.start_rps)
            known_good = self.opt.start_rps
            schedule = self.store.quota_schedule(lane=lane, model=model)
            if schedule is None:
                pacer = Pacer(
                    rate, adaptive=self.opt.adaptive, start_rate=start, known_good=known_good
                )
            else:
                shared = SharedPacer(
                    schedule,
                    rate,
                    adaptive=self.opt.adaptive,
                    start_rate=start,
                    known_good=known_good,
                    on_slot=self._notify,
                )
                if self._services is None:
                    self._unserved.append(shared)
                else:
                    self._services.start_soon(shared.serve)
                pacer = shared
            self._pacers[(lane, model)] = pacer
        return pacer

    def request_stop(self, reason: StopReason, message: str | None = None) -> None:
        """Stop claiming; in-flight work goes on. The first reason given is kept."""
        if not self._stop.is_set():
            self._reason = reason
            self._abort_message = message
            self._stop.set()
            self._notify()
            log.info("stopping: %s%s", reason.value, f" ({message})" if message else "")

    def cancel_in_flight(self) -> None:
        """Cut in-flight calls short; their jobs are released to pending."""
        self.request_stop(StopReason.INTERRUPTED)
        self._cut.set()
        if self._work_scope is not None:
            self._work_scope.cancel()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = anyio.Event()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early when stopping or when a worker finishes."""
        wake = self._wake
        with anyio.move_on_after(max(0.0, seconds)):
            async with anyio.create_task_group() as tg:

                async def _watch_stop() -> None:
                    await self._stop.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(_watch_stop)
                await wake.wait()
                tg.cancel_scope.cancel()

    def price(self, model: str, prompt_extend: bool, region: str | None = None) -> Money:
        """One image's price in ``region`` (default: the run's ``--region``)."""
        key = (model, prompt_extend, region or self.opt.region)
        if key not in self._prices:
            self._prices[key] = price_per_image(model, key[2], prompt_extend)
        return self._prices[key]

    # ---------------------------------------------------------------------- run

    async def run(self) -> RunResult:
        """Work until nothing is left or a stop; release whatever is still held."""
        outage, self.store.outage = self.store.outage, self._database_outage
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._heartbeat_loop)
                outer.start_soon(self._lane_figures_loop)
                self._services = outer
                for shared in self._unserved:
                    outer.start_soon(shared.serve)
                self._unserved.clear()
                with anyio.CancelScope() as self._work_scope:
                    async with anyio.create_task_group() as tg:
                        try:
                            await self._dispatch(tg)
                        except StoreUnreachable:
                            if not self._db_gone:
                                raise  # the stop is requested; the workers end
                outer.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._release_buffer()
                await self.save_lanes()
            self.store.outage = outage
            if self._sent_calls is not None:
                self._sent_calls.close()  # every call answered or its job released
        return RunResult(
            reason=self._reason,
            counters=self.counters,
            abort_message=self._abort_message,
            elapsed=time.monotonic() - self._t0,
            first_call_at=self.first_call_at,
            last_call_at=self.last_call_at,
            first_accepted_at=self.first_accepted_at,
            last_accepted_at=self.last_accepted_at,
            lanes=tuple(self.lane_rows()),
        )

    async def _dispatch(self, tg: TaskGroup) -> None:
        while not self.stopping:
            if self.database.paused:
                await self._sleep(1.0)  # no new call; the database coming back wakes this
                continue
            if self._recheck_leases:
                self._recheck_leases = False
                await self._renew_leases()
                continue
            if self._in_flight >= self.concurrency:
                await self._sleep(1.0)
                continue
            if self._give_up_unreachable():
                continue
            claim, lane, wait = self._pick_ready()
            if claim is None and self._all_paused():
                # every lane's service is unreachable: claim nothing more, wait for a probe's
                # turn (or a worker's answer, which wakes this)
                await self._sleep(min(1.0, wait if wait is not None else 1.0))
                continue
            if claim is None:
                # Nothing buffered can start now: claim more (other models may be free), unless
                # a send slot is so near that the claim's write would make that send late; or
                # wait for the earliest send slot, a finishing worker, or a due job.
                now = anyio.current_time()
                if (
                    (wait is None or wait >= FILL_AHEAD)
                    and len(self._buffer) < BUFFER_MAX
                    and now >= self._next_fill
                ):
                    if await self._fill_buffer():
                        continue
                    self._next_fill = now + 1.0  # nothing due: do not ask again at once
                if not self._buffer:
                    if self._in_flight == 0:
                        due = await self.store.next_due_at()
                        if self._orphans and (due is None or self.store.shared):
                            # every job a lane could take is done: those left have none
                            self._no_lane_left(", ".join(sorted(self._orphans)))
                            return
                        if due is None:
                            return  # every job is done or failed
                        await self._sleep(min(1.0, max(0.01, due - self.store.clock())))
                    else:
                        await self._sleep(1.0)
                    continue
                await self._sleep(min(1.0, wait if wait is not None else 1.0))
                continue
            if claim.state is State.GENERATED:
                self._start(tg, self._download_only, claim, None)
                continue
            if lane is None:  # a task created on a lane this run cannot use
                await self._task_without_lane(claim)
                continue
            if claim.state is State.SUBMITTED:
                self._open_task(lane.name, claim.model, +1)
                self.counters.tasks_reattached += 1
                self._start(tg, self._task, claim, lane)
                continue
            if not self._within_limits(claim, lane):
                self._buffer.appendleft(claim)
                return
            self.pacer_for(lane.name, claim.model).control.reserve(now=anyio.current_time())
            self.book.sent(lane)
            if self.opt.limit is not None:
                self._started.add(claim.id)
            if self._reach[lane.name].paused:
                self._probe[lane.name] = claim.id
            self._lane_generating[lane.name] += 1
            self._generating += 1  # until _call_and_record / _create_task has the answer
            self._generating_images += claim.n
            if self._is_task_model(claim.model):
                self._open_task(lane.name, claim.model, +1)
                self._start(tg, self._task, claim, lane)
            else:
                self._start(tg, self._generate, claim, lane)

    def _open_task(self, lane: str, model: str, change: int) -> None:
        key = (lane, model)
        self._tasks_open[key] = self._tasks_open.get(key, 0) + change

    async def _task_without_lane(self, claim: Claim) -> None:
        """A submitted job whose task was created on a lane this run does not have (or has
        disabled): its task can only be polled with that lane's key, so it waits, its task id
        kept, for a run that has the lane."""
        why = (
            f"its task was created on lane {claim.lane!r}, which this run "
            + ("has disabled" if claim.lane in self.book.disabled else "does not have")
            + "; it is polled by a run with that lane (--lanes)"
        )
        log.warning("job %s: %s", claim.id, why)
        self._held.pop(claim.id, None)
        try:
            await self.store.poll_later(
                claim.id, claim.token, delay=self.opt.backoff_cap, code="LaneMissing", message=why
            )
        except LeaseLost:
            self.counters.lease_lost += 1

    def _is_task_model(self, model: str) -> bool:
        entry = MODELS.get(model)
        return entry is not None and entry.protocol is ApiProtocol.TASK

    def _pick_ready(self) -> tuple[Claim | None, RunLane | None, float | None]:
        """Take the first buffered job that can start now, with its lane: a download, a task
        to poll (on the lane that created it), or a generation with a lane serving its model
        that has a free send slot (and, for a task model, room for one more task); of several
        such lanes, the one with the fewest calls for its weight. Otherwise (None, None,
        seconds until the earliest send slot, or None).

        A job whose model no enabled lane serves any more (every lane that could was disabled)
        is held aside; the run stops (exit 3) once the other lanes have nothing left to do."""
        now = anyio.current_time()
        earliest: float | None = None
        for index, claim in enumerate(self._buffer):
            if claim.state is State.GENERATED:
                del self._buffer[index]
                return claim, None, 0.0
            if claim.state is State.SUBMITTED:
                del self._buffer[index]
                return claim, self.book.task_lane(claim.lane, claim.model), 0.0
            serving = self.book.serving(claim.model)
            if not serving:
                # Every lane for its model was disabled: held aside (released at the end, no
                # attempt charged) while the other lanes finish what they can.
                del self._buffer[index]
                self._orphans.setdefault(claim.model, []).append(claim)
                return None, None, 0.0
            entry = MODELS.get(claim.model)
            limit = entry.quota.concurrent_tasks if entry is not None else None
            best: RunLane | None = None
            for lane in serving:
                if limit is not None and self._tasks_open.get((lane.name, claim.model), 0) >= limit:
                    continue  # a worker's end wakes the dispatcher
                wait = self._probe_wait(lane, now)
                if wait > 0:  # its service is unreachable, and no probe may go yet
                    earliest = wait if earliest is None else min(earliest, wait)
                    continue
                wait = self.pacer_for(lane.name, claim.model).control.wait_needed(now=now)
                if wait > 0:
                    earliest = wait if earliest is None else min(earliest, wait)
                elif best is None or self.book.share(lane) < self.book.share(best):
                    best = lane
            if best is not None:
                del self._buffer[index]
                return claim, best, 0.0
        return None, None, earliest

    def _no_lane_left(self, model: str) -> None:
        """No enabled lane serves ``model``: stop (exit 3), saying why each lane went."""
        why = self.book.why_disabled()
        self.request_stop(
            StopReason.ABORTED,
            f"no lane is left for {model}: {why or 'none serves it'}; "
            "the jobs are left pending with no attempt charged: fix the keys, then run the "
            "same command again",
        )

    def _lane_fatal(self, lane: RunLane, code: str, message: str, advice: str) -> None:
        """An error fatal to ``lane``'s account. A run of one lane stops (exit 3), as a run
        always did; of several, the lane alone is disabled with one line, and the others go
        on (the dispatcher stops the run when no lane is left for a job's model)."""
        if len(self.lanes) == 1:
            self.request_stop(StopReason.ABORTED, f"{code}: {message} -- {advice}")
            return
        line = self.book.disable(lane, code, message, advice)
        if line is None:
            return  # disabled already
        log.warning("%s", line)
        if self._on_notice is not None:
            self._on_notice(line)
        if self.book.all_disabled:
            self._no_lane_left("any model")
        self._notify()

    def _probe_wait(self, lane: RunLane, now: float) -> float:
        """0 when ``lane`` may send now as far as reaching its service goes; else seconds to
        wait: while it is unreachable, one probing call at a time goes, with backoff, once the
        lane's calls in flight have answered (a worker's end wakes the dispatcher)."""
        reach = self._reach[lane.name]
        if not reach.paused:
            return 0.0
        if lane.name in self._probe or self._lane_generating[lane.name]:
            return 1.0
        wait = reach.probe_wait(now=now)
        if wait > 0:  # wake in time to give up, too
            return max(0.01, min(wait, reach.window - reach.down_for(now=now) + 0.01))
        return 0.0

    def _all_paused(self) -> bool:
        """Whether every enabled lane's service is unreachable."""
        enabled = [name for name in self.lanes if name not in self.book.disabled]
        return bool(enabled) and all(self._reach[name].paused for name in enabled)

    def _give_up_unreachable(self) -> bool:
        """Lanes unreachable for longer than ``--unreachable-timeout``: a run of one lane stops
        (exit 3) as a run always did; of several, the lane alone is disabled with one line and
        the others go on, the run stopping when none is left. True when anything changed."""
        now = anyio.current_time()
        changed = False
        for name, reach in self._reach.items():
            if name in self.book.disabled or not reach.gave_up(now=now):
                continue
            lane = self.lanes[name]
            down = reach.down_for(now=now)
            where = f"the service at {lane.client.endpoint}"
            detail = self._unreached_detail.get(name) or "no connection"
            if len(self.lanes) == 1:
                self.request_stop(
                    StopReason.UNREACHABLE,
                    f"could not reach {where} for {down:.0f}s ({detail}); the jobs are left "
                    "pending with no attempt charged: check the network, --base-url and "
                    "--region, then run the same command again",
                )
                return True
            line = self.book.disable(
                lane,
                "Unreachable",
                f"could not reach {where} for {down:.0f}s ({detail})",
                "check the network and the lane's region or base_url",
            )
            changed = True
            if line is not None:
                log.warning("%s", line)
                if self._on_notice is not None:
                    self._on_notice(line)
        if changed and self.book.all_disabled:
            self.request_stop(
                StopReason.UNREACHABLE,
                f"no lane is left: {self.book.why_disabled()}; the jobs are left pending with "
                "no attempt charged: run the same command again once the service can be reached",
            )
        if changed:
            self._notify()
        return changed

    async def _sleep_until(self, when: float) -> None:
        while not self.stopping:
            left = when - anyio.current_time()
            if left <= 0:
                return
            with anyio.move_on_after(left):
                await self._stop.wait()

    def _within_limits(self, claim: Claim, lane: RunLane) -> bool:
        limit = self.opt.limit
        if limit is not None and claim.id not in self._started and len(self._started) >= limit:
            self.request_stop(StopReason.LIMIT, f"--limit {self.opt.limit} reached")
            return False
        if self.opt.budget is not None:
            price = self.price(claim.model, claim.prompt_extend, lane.lane.region)
            spent = self._spent_before + self.counters.cost
            committed = spent + price.amount * self._generating_images
            if committed + price.amount * claim.n > self.opt.budget:
                budget = Money(self.opt.budget, price.currency)
                total = Money(committed, price.currency)
                self.request_stop(
                    StopReason.BUDGET,
                    f"--budget {budget} reached: this run folder has spent (or has in flight) "
                    f"{total}, and one more job costs {price} x {claim.n} image(s)",
                )
                return False
        return True

    def _start(self, tg: TaskGroup, fn: object, claim: Claim, lane: RunLane | None) -> None:
        self._in_flight += 1
        tg.start_soon(fn, claim, lane)  # type: ignore[arg-type]

    async def _fill_buffer(self) -> int:
        """Claim a batch into the buffer; how many were claimed."""
        # At least a small batch even when few slots are free: each claim is a write
        # transaction, and the buffer is released on any stop.
        batch = min(64, max(16, self.concurrency - self._in_flight))
        claims = await self.store.claim(
            limit=batch, lease_seconds=self.opt.lease_seconds, worker=WORKER
        )
        for c in claims:
            self._held[c.id] = c
        self._buffer.extend(claims)
        return len(claims)

    async def _release_buffer(self) -> None:
        while self._buffer:
            claim = self._buffer.popleft()
            await self._release(claim)
        for claims in self._orphans.values():
            while claims:
                await self._release(claims.pop())

    async def _release(self, claim: Claim) -> None:
        self._held.pop(claim.id, None)
        if self._db_gone:
            return  # the run gave up on the database: left as it is, its lease runs out
        abandoned = claim.id in self._abandoned
        try:
            await self.store.release(claim.id, claim.token, ambiguous=abandoned)
            self.counters.released += 1
            self.counters.abandoned += int(abandoned)
        except LeaseLost:
            self.counters.lease_lost += 1
        except StoreUnreachable:
            if not self._db_gone:
                raise  # else (given up meanwhile) left as it is: its lease runs out

    def lane_rows(self) -> list[LaneCalls]:
        """This run's figures per lane and model, as ``lane_calls`` keeps them."""
        return self.book.rows(self.run_id, emulated=self.endpoint == EMULATOR_ENDPOINT)

    async def save_lanes(self) -> None:
        """Write this run's figures per lane and model (``lane_calls``)."""
        if self.database.paused or self._db_gone:
            return  # the database is away: the next save writes them
        rows = self.lane_rows()
        try:
            await self.store.save_lane_calls(rows, worker=WORKER, started_at=self._started_wall)
        except (OSError, JobStoreError) as exc:  # figures only: never the run's failure
            log.warning("could not save the lanes' figures: %s", exc)

    async def _lane_figures_loop(self) -> None:
        """Save the lanes' figures every ``LANE_SAVE_PERIOD`` seconds: a run killed with
        ``kill -9`` loses at most that much of them (the run's end saves them too)."""
        while True:
            await anyio.sleep(LANE_SAVE_PERIOD)
            await self.save_lanes()

    async def _heartbeat_loop(self) -> None:
        period = max(0.5, self.opt.lease_seconds / 3)
        while True:
            await anyio.sleep(period)
            try:
                await self._renew_leases()
            except StoreUnreachable:
                if not self._db_gone:
                    raise
                return

    async def _renew_leases(self) -> None:
        """Extend the lease of every job held. A job another worker holds now (this worker
        lost the database for longer than the lease) leaves the buffer if it is still there;
        one in flight finds out at its next write."""
        by_token: dict[str, list[str]] = {}
        for claim in list(self._held.values()):
            by_token.setdefault(claim.token, []).append(claim.id)
        for token, ids in by_token.items():
            lost = await self.store.heartbeat(token, ids, lease_seconds=self.opt.lease_seconds)
            for job_id in lost:
                log.warning("job %s: lease lost to another worker", job_id)
                for claim in self._buffer:
                    if claim.id == job_id:
                        self._buffer.remove(claim)
                        self._held.pop(job_id, None)
                        self.counters.lease_lost += 1
                        break

    async def _database_outage(self, exc: StoreUnreachable) -> bool:
        """The store's ``outage`` hook (see the module docstring): True once the database
        answers again, False when the run gives up on it."""
        if self._db_gone:
            return False
        if self.database.failed(now=anyio.current_time()):
            log.warning(
                "the job database is unreachable (%s): pausing, reconnecting for up to %gs",
                exc,
                self.database.window,
            )
            self.counters.database_outages += 1
        async with self._db_probe:
            while self.database.paused and not self._db_gone:
                now = anyio.current_time()
                down = self.database.down_for(now=now)
                if self.database.gave_up(now=now) or self._cut.is_set():
                    self._db_gone = True
                    self.request_stop(
                        StopReason.DATABASE,
                        f"the job database could not be reached for {down:.0f}s ({exc}); every "
                        "job is left as the database has it (a job this worker held is taken "
                        "over once its lease runs out): run the same command again once the "
                        "database is back",
                    )
                    break
                left = self.database.window - down + 0.01
                with anyio.move_on_after(max(0.01, min(self.database.probe_wait(now=now), left))):
                    await self._cut.wait()
                if self._cut.is_set():
                    continue
                try:
                    await self.store.ping()
                except StoreUnreachable as again:
                    exc = again
                    self.database.probe_failed(now=anyio.current_time())
                    continue
                down = self.database.down_for(now=anyio.current_time())
                log.warning(
                    "the job database is back after %.1fs: going on%s",
                    down,
                    f" (longer than the lease, {self.opt.lease_seconds:g}s: jobs other "
                    "workers took over meanwhile are dropped, and late writes of them refused)"
                    if down > self.opt.lease_seconds
                    else "",
                )
                self.database.answered(now=anyio.current_time())
                self._recheck_leases = True
                self._notify()
        return not self._db_gone

    # ------------------------------------------------------------------ workers

    async def _generate(self, claim: Claim, lane: RunLane) -> None:
        await self._guarded(claim, lambda c: self._generate_and_download(c, lane))

    async def _task(self, claim: Claim, lane: RunLane) -> None:
        """A task model's job: create (unless submitted already), poll, download."""
        try:
            await self._guarded(claim, lambda c: self._task_work(c, lane))
        finally:
            self._open_task(lane.name, claim.model, -1)
            self._notify()

    async def _download_only(self, claim: Claim, _lane: None) -> None:
        await self._guarded(claim, self._download)

    async def _guarded(self, claim: Claim, work: Callable[[Claim], Awaitable[bool]]) -> None:
        """Run one attempt; whatever happens, the job ends recorded or released, never held.

        ``work`` returns True once it recorded the job's outcome. A lost lease means another
        worker owns the job now: nothing to release.
        """
        settled = False
        began = anyio.current_time()
        try:
            settled = await work(claim)
        except LeaseLost as exc:
            settled = True
            self.counters.lease_lost += 1
            log.warning("%s", exc)
        except StoreUnreachable:
            if not self._db_gone:
                raise
            settled = True  # the run gave up on the database: the job stays as it is there
        finally:
            with anyio.CancelScope(shield=True):
                if not settled:
                    await self._release(claim)  # same id and token as any claim derived from it
            self.job_time.add(anyio.current_time() - began)
            self._finish(claim)

    async def _generate_and_download(self, claim: Claim, lane: RunLane) -> bool:
        generated = await self._call_and_record(claim, lane)
        if generated is None:
            return True  # the outcome (retry, failure) is recorded
        if generated is claim:
            return False  # a run-level stop: give the job back untouched
        return await self._download(generated, fresh=True)

    def _note_call(self, lane: RunLane, model: str) -> float:
        """Count a call that goes out now (its lane and model's pacer, the counters, the span
        of the achieved rate); returns its send time on the event loop's clock."""
        sent = anyio.current_time()
        self.pacer_for(lane.name, model).control.sent(at=sent)
        self.counters.calls += 1
        self.book.tally(lane.name, model).calls += 1
        now = time.time()
        self.first_call_at = self.first_call_at or now
        self.last_call_at = now
        return sent

    async def _call_and_record(self, claim: Claim, lane: RunLane) -> Claim | None:
        """Call the API and write the outcome. Returns the generated claim, None when the
        outcome was recorded (retry or failure), or ``claim`` itself when it must be released."""
        try:
            sent = self._note_call(lane, claim.model)
            if self._sent_calls is not None:
                self._sent_calls.sent(claim.id, claim.token)
            try:
                result = await lane.client.generate(
                    model=claim.model,
                    prompt=claim.prompt,
                    size=claim.size,
                    seed=claim.seed,
                    prompt_extend=claim.prompt_extend,
                    params=load_params(claim.params),
                    n=claim.n,
                )
            except anyio.get_cancelled_exc_class():
                # Hung up on a call that was sent: the service may still bill it.
                self._abandoned.add(claim.id)
                raise
            except ApiError as err:
                with anyio.CancelScope(shield=True):
                    recorded = await self._on_api_error(claim, err, sent, lane)
                return None if recorded else claim
            except TransportError as err:
                if err.fault is TransportFault.CONNECT:
                    with anyio.CancelScope(shield=True):
                        await self._on_unreached(claim, err, lane)
                    return None
                self._reach[lane.name].answered(now=anyio.current_time())  # it connected
                with anyio.CancelScope(shield=True):
                    await self._on_retryable(
                        claim,
                        code=f"transport.{err.fault.value}",
                        message=str(err),
                        ambiguous=err.classification.ambiguous,
                        retry_after=None,
                    )
                return None
            self._on_answered(sent, accepted=True, lane=lane, model=claim.model)
            several: tuple[ImageResult, ...] = ()
            if claim.n > 1:
                more = [
                    replace(result, image_url=url, url_expires_at=url_expiry(url), slot=slot)
                    for slot, url in enumerate(result.more_urls, start=2)
                ]
                several = (result, *more)
            with anyio.CancelScope(shield=True):
                generated = await self._record(claim, result, lane, several=several)
            return generated
        finally:
            self._calls_ended(claim, lane)

    def _calls_ended(self, claim: Claim, lane: RunLane) -> None:
        """A generation call (or task create) dispatched for ``claim`` on ``lane`` ended."""
        self._generating -= 1
        self._generating_images -= claim.n
        self._lane_generating[lane.name] -= 1
        if self._probe.get(lane.name) == claim.id:
            del self._probe[lane.name]
        if self._sent_calls is not None:
            self._sent_calls.answered(claim.id)

    def _on_answered(self, sent: float, *, accepted: bool, lane: RunLane, model: str) -> None:
        """The service answered a call sent at ``sent`` (monotonic): it is reachable, and
        unless it throttled the call, the call counts towards the achieved rate."""
        self._reach[lane.name].answered(now=anyio.current_time())
        if accepted:
            self.pacer_for(lane.name, model).accepted(sent)
            self.counters.accepted += 1
            wall = time.time() - (anyio.current_time() - sent)
            # answers come back out of order: the span is from the earliest send to the latest
            self.first_accepted_at = min(self.first_accepted_at or wall, wall)
            self.last_accepted_at = max(self.last_accepted_at or wall, wall)
            t = self.book.tally(lane.name, model)
            t.accepted += 1
            t.first_accepted_at = min(t.first_accepted_at or wall, wall)
            t.last_accepted_at = max(t.last_accepted_at or wall, wall)

    async def _on_unreached(self, claim: Claim, err: TransportError, lane: RunLane) -> None:
        """The call never reached the service: no attempt is charged. Across the run, such
        failures pause the lane (every lane, when all are cut off; see :mod:`batcher.reach`)."""
        now = anyio.current_time()
        reach = self._reach[lane.name]
        self.counters.unreached += 1
        self._unreached_detail[lane.name] = (err.detail or err.fault.value).split(": ", 1)[-1]
        whose = "" if len(self.lanes) == 1 else f" for lane {lane.name}"
        if self._probe.get(lane.name) == claim.id:
            reach.probe_failed(now=now)
            log.info("probe: the service is still unreachable%s (%s)", whose, err.detail)
        elif reach.failed(now=now):
            log.warning(
                "the service is unreachable%s (%s): pausing, probing for up to %gs",
                whose,
                err.detail,
                reach.window,
            )
        await self.store.retry_later(
            claim.id,
            claim.token,
            delay=0.0 if reach.paused else self._delay(1, None),
            code=f"transport.{err.fault.value}",
            message=str(err),
            charge_attempt=False,
        )

    def _finish(self, claim: Claim) -> None:
        self._held.pop(claim.id, None)
        self._in_flight -= 1
        self._notify()

    async def _record(
        self,
        claim: Claim,
        result: ImageResult,
        lane: RunLane,
        *,
        several: Sequence[ImageResult] = (),
        failed: Sequence[tuple[str, str]] = (),
    ) -> Claim:
        """Record a generation: one image (``result``), or for a job of n > 1 images every
        image that came (``several``, ``result`` the first) and the slots that failed."""
        price = self.price(claim.model, claim.prompt_extend, lane.lane.region)
        billed = 1
        images: tuple[JobImage, ...] = ()
        shortfall: str | None = None
        if several:
            billed = result.image_count if result.image_count is not None else len(several)
            images = tuple(
                JobImage(
                    index=image.slot,
                    url=image.image_url,
                    url_expires_at=image.url_expires_at,
                    actual_prompt=image.actual_prompt if claim.prompt_extend else None,
                    width=image.width if image.width is not None else result.width,
                    height=image.height if image.height is not None else result.height,
                )
                for image in several
            )
            shortfall = shortfall_note(claim.n, len(several), failed)
            if shortfall is not None:
                log.warning("job %s: %s", claim.id, shortfall)
        await self.store.record_generated(
            claim.id,
            claim.token,
            Generated(
                request_id=result.request_id,
                width=result.width,
                height=result.height,
                image_count=result.image_count,
                input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
                total_tokens=result.total_tokens,
                reasoning_tokens=result.reasoning_tokens,
                actual_prompt=result.actual_prompt if claim.prompt_extend else None,
                image_url=result.image_url,
                url_expires_at=result.url_expires_at,
                latency_ms=result.latency_ms,
                cost=price.amount * billed,
                currency=price.currency,
                endpoint=lane.endpoint,
                lane=lane.name,
                images=images,
                billed=billed,
                shortfall=shortfall,
            ),
            lease_seconds=self.opt.lease_seconds,
        )
        self.counters.generated += 1
        self.counters.images_generated += billed
        self.counters.cost += price.amount * billed
        t = self.book.tally(lane.name, claim.model)
        t.images += billed
        t.cost += price.amount * billed
        t.currency = price.currency
        return replace(
            claim,
            state=State.GENERATED,
            request_id=result.request_id,
            image_url=result.image_url,
            url_expires_at=result.url_expires_at,
            width=result.width,
            height=result.height,
            attempts=claim.attempts + 1,
            download_attempts=0,
            sha256=None,
            bytes=None,
        )

    async def _on_api_error(self, claim: Claim, err: ApiError, sent: float, lane: RunLane) -> bool:
        verdict = err.classification.verdict
        code = err.code or f"HTTP{err.status}"
        accepted = verdict is not Verdict.THROTTLED
        self._on_answered(sent, accepted=accepted, lane=lane, model=claim.model)
        if verdict is Verdict.THROTTLED:
            quota = (err.code or "").casefold() in QUOTA_CODES
            self.pacer_for(lane.name, claim.model).throttled(sent, quota=quota)
            self.counters.throttled += 1
            self.book.tally(lane.name, claim.model).throttled += 1
            retry_after = parse_retry_after(err.retry_after, now=time.time())
            delay = retry_after if retry_after is not None else self._rng.uniform(0.0, 1.0)
            await self.store.retry_later(
                claim.id,
                claim.token,
                delay=delay,
                code=code,
                message=err.message,
                request_id=err.request_id,
                charge_attempt=False,
                throttled=True,
            )
            return True
        if verdict is Verdict.ABORT_RUN:
            self._lane_fatal(lane, code, err.message or "", err.classification.advice)
            return False  # released by the caller, no attempt charged
        if verdict is Verdict.FAIL_JOB:
            await self._fail(claim, code, err.message or "", request_id=err.request_id)
            return True
        return await self._on_retryable(
            claim,
            code=code,
            message=err.message or "",
            ambiguous=err.classification.ambiguous,
            retry_after=parse_retry_after(err.retry_after, now=time.time()),
            request_id=err.request_id,
        )

    async def _on_retryable(
        self,
        claim: Claim,
        *,
        code: str,
        message: str,
        ambiguous: bool,
        retry_after: float | None,
        request_id: str | None = None,
    ) -> bool:
        attempt = claim.attempts + 1
        if ambiguous:
            self.counters.ambiguous += 1
        if attempt >= self.opt.max_attempts:
            await self._fail(
                claim,
                code,
                f"{message} (gave up after {attempt} attempts)",
                request_id=request_id,
                ambiguous=ambiguous,
            )
            return True
        delay = self._delay(attempt, retry_after)
        await self.store.retry_later(
            claim.id,
            claim.token,
            delay=delay,
            code=code,
            message=message,
            request_id=request_id,
            charge_attempt=True,
            ambiguous=ambiguous,
        )
        self.counters.retries += 1
        log.info("job %s: %s, retry %d in %.1fs", claim.id, code, attempt, delay)
        return True

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        return next_delay(
            attempt,
            retry_after=retry_after,
            rng=self._rng,
            base=self.opt.backoff_base,
            cap=self.opt.backoff_cap,
        )

    async def _fail(
        self,
        claim: Claim,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        charge: bool = True,
        ambiguous: bool = False,
    ) -> None:
        await self.store.fail(
            claim.id,
            claim.token,
            code=code,
            message=message,
            request_id=request_id,
            charge_attempt=charge,
            ambiguous=ambiguous,
        )
        self._count_failure(code)

    def _count_failure(self, code: str) -> None:
        self.counters.failed += 1
        self.counters.failures[code] = self.counters.failures.get(code, 0) + 1
        log.info("job failed: %s", code)

    async def _download(self, claim: Claim, *, fresh: bool = False) -> bool:
        """Download a generated image and complete the job. True once the job is settled."""
        if claim.n > 1:
            return await self._download_several(claim, fresh=fresh)
        assert claim.image_url is not None
        try:
            dest = self.layout.image_path(claim.output)
        except UnsafeOutputPath as exc:
            with anyio.CancelScope(shield=True):
                await self._fail(claim, "UnsafeOutputPath", str(exc), charge=False)
            return True
        if claim.sha256 is not None:
            found = await anyio.to_thread.run_sync(hash_file, dest)
            if found == (claim.sha256, claim.bytes):
                with anyio.CancelScope(shield=True):
                    await self.store.complete(
                        claim.id, claim.token, StoredFile(sha256=found[0], bytes=found[1])
                    )
                    if self._on_done is not None:
                        await self._on_done([claim.id])
                self.counters.done += 1
                self.counters.images_saved += 1
                self.counters.downloads_skipped += 1
                return True
        item = await self._fetch(
            claim,
            claim.image_url,
            dest,
            width=claim.width,
            height=claim.height,
            expires_at=claim.url_expires_at,
            fresh=fresh,
        )
        if isinstance(item, bool):
            return item
        with anyio.CancelScope(shield=True):
            try:
                await self.committer.commit(claim.id, claim.token, item)
            except RunAborted as exc:
                self.request_stop(StopReason.ABORTED, str(exc))
                return False
        self.counters.done += 1
        self.counters.images_saved += 1
        return True

    async def _fetch(
        self,
        claim: Claim,
        url: str,
        dest: Path,
        *,
        width: int | None,
        height: int | None,
        expires_at: float | None,
        fresh: bool,
        what: str = "the image URL",
    ) -> Downloaded | bool:
        """Download one image of ``claim`` to a verified temporary file beside ``dest``; or,
        when that cannot be (its URL expired or came from a stopped emulator, the download
        failed, the run must stop), settle the job instead and return what the download
        returns: True once the job is settled, False when the run stops."""
        # Expiry only for URLs from an earlier run: a fresh one is tried whatever our clock
        # says (a skewed clock must not throw paid images away); storage has the last word.
        if not fresh and expires_at is not None and expires_at <= time.time() + 5:
            return await self._regenerate(claim, "URLExpired", f"{what} expired")
        if not fresh and self._from_a_gone_emulator(url):
            return await self._regenerate(
                claim, "URLExpired", f"{what} came from an emulator that has stopped"
            )
        try:
            return await download_image(
                self.session,
                url,
                dest,
                expect_width=width,
                expect_height=height,
                timeout=self.opt.download_timeout,
            )
        except RunAborted as exc:
            self.request_stop(StopReason.ABORTED, str(exc))
            return False
        except DownloadError as exc:
            with anyio.CancelScope(shield=True):
                settled = await self._on_download_error(claim, exc)
            return settled

    async def _download_several(self, claim: Claim, *, fresh: bool) -> bool:
        """Download the images of a job of several that are not in place yet, each verified,
        its hash recorded, then put in place; complete the job once all are. True once the
        job is settled (done, or a retry, a regeneration or a failure recorded)."""
        images = await self.store.job_images(claim.id)
        if not images:  # generated, yet no image recorded: nothing to download
            return await self._regenerate(claim, "ImagesMissing", "no image URL was recorded")
        kept: list[StoredFile] = []
        for image in images:
            try:
                dest = self.layout.image_path(image_output(claim.output, image.index, claim.n))
            except UnsafeOutputPath as exc:
                with anyio.CancelScope(shield=True):
                    await self._fail(claim, "UnsafeOutputPath", str(exc), charge=False)
                return True
            if image.sha256 is not None and image.bytes is not None:
                found = await anyio.to_thread.run_sync(hash_file, dest)
                if found == (image.sha256, image.bytes):
                    self.counters.downloads_skipped += 1
                    kept.append(StoredFile(sha256=image.sha256, bytes=image.bytes))
                    continue
            item = await self._fetch(
                claim,
                image.url,
                dest,
                width=image.width,
                height=image.height,
                expires_at=image.url_expires_at,
                fresh=fresh,
                what=f"the URL of image {image.index}",
            )
            if isinstance(item, bool):
                return item
            with anyio.CancelScope(shield=True):
                try:
                    kept.append(await self._put_in_place(claim, image, item))
                except RunAborted as exc:
                    self.request_stop(StopReason.ABORTED, str(exc))
                    return False
        with anyio.CancelScope(shield=True):
            await self.store.complete(claim.id, claim.token, kept[0])
            if self._on_done is not None:
                await self._on_done([claim.id])
        self.counters.done += 1
        self.counters.images_saved += len(kept)
        return True

    async def _put_in_place(self, claim: Claim, image: JobImage, item: Downloaded) -> StoredFile:
        """Record a verified image's hash, then rename its file into place (the order of
        :mod:`batcher.committer`, one image at a time)."""
        stored = StoredFile(sha256=item.sha256, bytes=item.bytes)
        try:
            await self.store.record_image_file(claim.id, claim.token, image.index, stored)
        except BaseException:
            discard(item)
            raise
        await commit(item)
        return stored

    async def _on_download_error(self, claim: Claim, exc: DownloadError) -> bool:
        """A download failed: generate again, retry the download later, or give up."""
        if exc.verdict is DownloadVerdict.REGENERATE:
            return await self._regenerate(claim, f"Download.{exc.reason}", str(exc))
        attempt = claim.download_attempts + 1
        if attempt >= self.opt.max_attempts:
            await self._fail(claim, f"Download.{exc.reason}", str(exc), charge=False)
            return True
        await self.store.retry_download_later(
            claim.id,
            claim.token,
            delay=self._delay(attempt, None),
            code=f"Download.{exc.reason}",
            message=str(exc),
        )
        self.counters.download_retries += 1
        return True

    def _from_a_gone_emulator(self, url: str) -> bool:
        """Whether ``url`` was issued by an earlier rehearsal's emulator: each rehearsal starts
        its own on a new port, so such a URL can never be downloaded (emulated, not paid)."""
        if self.endpoint != EMULATOR_ENDPOINT:
            return False
        return urlsplit(url)[:2] != urlsplit(self.client.base_url)[:2]

    async def _regenerate(self, claim: Claim, code: str, message: str) -> bool:
        """The image URL is dead: generate again (paid again), at most ``max_attempts`` times.

        A storage that refuses every URL (or URLs that arrive already expired) must not turn
        into an endless loop of paid generations: past the cap the job fails with the code.
        """
        if claim.regenerated + 1 >= self.opt.max_attempts:
            with anyio.CancelScope(shield=True):
                await self._fail(
                    claim,
                    code,
                    f"{message} (the image was generated {claim.regenerated + 1} times and its "
                    "URL was dead each time)",
                    charge=False,
                )
            return True
        with anyio.CancelScope(shield=True):
            await self.store.regenerate(claim.id, claim.token, code=code, message=message)
        self.counters.regenerated += 1
        log.info("job %s: %s; it will be generated again", claim.id, code)
        return True

    # ------------------------------------------------------------------ tasks

    async def _task_work(self, claim: Claim, lane: RunLane) -> bool:
        """Create the job's task unless it has one, then poll it to its end (with the key of
        the lane that created it)."""
        reattached = claim.state is State.SUBMITTED
        if not reattached:
            created = await self._create_task(claim, lane)
            if created is None:
                return True  # the outcome (retry, failure) is recorded
            if created is claim:
                return False  # a run-level stop: give the job back untouched
            claim = created
        return await self._poll_to_end(claim, lane, at_once=reattached)

    async def _create_task(self, claim: Claim, lane: RunLane) -> Claim | None:
        """Create the task and commit its id; the submitted claim, None when the outcome was
        recorded, or ``claim`` itself when it must be released."""
        try:
            with anyio.CancelScope(shield=True):
                await self.store.mark_creating(claim.id, claim.token)
            sent = self._note_call(lane, claim.model)
            try:
                created = await lane.client.create_task(
                    model=claim.model,
                    prompt=claim.prompt,
                    size=claim.size,
                    seed=claim.seed,
                    prompt_extend=claim.prompt_extend,
                    n=claim.n,
                    params=load_params(claim.params),
                )
            except anyio.get_cancelled_exc_class():
                self._abandoned.add(claim.id)  # the task may exist: ambiguous on release
                raise
            except ApiError as err:
                with anyio.CancelScope(shield=True):
                    recorded = await self._on_api_error(claim, err, sent, lane)
                return None if recorded else claim
            except TransportError as err:
                if err.fault is TransportFault.CONNECT:  # never reached the service
                    with anyio.CancelScope(shield=True):
                        await self._on_unreached(claim, err, lane)
                    return None
                self._reach[lane.name].answered(now=anyio.current_time())
                with anyio.CancelScope(shield=True):
                    await self._on_retryable(
                        claim,
                        code=f"transport.{err.fault.value}",
                        message=str(err),
                        ambiguous=err.classification.ambiguous,
                        retry_after=None,
                    )
                return None
            self._on_answered(sent, accepted=True, lane=lane, model=claim.model)
            with anyio.CancelScope(shield=True):
                await self.store.record_submitted(
                    claim.id,
                    claim.token,
                    task_id=created.task_id,
                    request_id=created.request_id,
                    lease_seconds=self.opt.lease_seconds,
                    lane=lane.name,
                )
            self.counters.tasks_created += 1
            return replace(
                claim,
                state=State.SUBMITTED,
                task_id=created.task_id,
                task_submitted_at=self.store.clock(),
                request_id=created.request_id,
                lane=lane.name,
            )
        finally:
            self._calls_ended(claim, lane)

    async def _poll_to_end(self, claim: Claim, lane: RunLane, *, at_once: bool) -> bool:
        """Poll the task until it ends and record the end; True once the job is settled.

        Polls are spaced by ``poll_delay`` (suited to tasks of 10 s to minutes) and by one
        gate for the whole run; they do not use the generation quota. A cancelled run leaves
        the job ``submitted`` (released): the next run polls the same task.
        """
        assert claim.task_id
        clock = TaskClock(submitted_at=claim.task_submitted_at or self.store.clock())
        polls = failures = 0
        while True:
            if not (at_once and polls == 0):
                delay = poll_delay(clock.elapsed(self.store.clock()), self._rng)
                await anyio.sleep(delay)
            await self._polls.wait_turn()
            polls += 1
            self.counters.task_polls += 1
            try:
                report = await lane.client.poll_task(claim.task_id)
            except ApiError as err:
                verdict = err.classification.verdict
                if verdict is Verdict.ABORT_RUN:
                    code = err.code or f"HTTP{err.status}"
                    self._lane_fatal(lane, code, err.message or "", err.classification.advice)
                    return False  # released: still submitted
                failures += verdict is not Verdict.THROTTLED
                report = None
            except TransportError:
                failures += 1
                report = None
            if report is None:
                if failures >= MAX_POLL_FAILURES:
                    with anyio.CancelScope(shield=True):
                        await self.store.poll_later(
                            claim.id,
                            claim.token,
                            delay=self.opt.backoff_cap,
                            code="TaskPollFailed",
                            message=f"{failures} polls of task {claim.task_id} failed",
                        )
                    return True
                continue
            failures = 0
            if report.running and not clock.expired(self.store.clock()):
                continue
            with anyio.CancelScope(shield=True):
                generated = await self._task_ended(claim, report, lane)
            if generated is None:
                return True  # the outcome is recorded
            return await self._download(generated, fresh=True)

    async def _task_ended(self, claim: Claim, report: TaskReport, lane: RunLane) -> Claim | None:
        """Record how a task ended. Returns the generated claim when its image is recorded
        and must be downloaded, else None (the outcome is recorded)."""
        if report.running or report.status == "UNKNOWN":
            # Expired (24 h) or forgotten by the service: create it again (paid again).
            why = "the task expired" if report.running else "the service no longer knows it"
            await self._regenerate(claim, "TaskUnknown", f"task {claim.task_id}: {why}")
            return None
        if report.status == "SUCCEEDED" and report.images:
            count = report.image_count if report.image_count is not None else len(report.images)
            width, height = (int(v) for v in claim.size.split("*"))
            sized = [replace(i, width=width, height=height) for i in report.images]
            image = replace(sized[0], image_count=count)
            if claim.n > 1:
                return await self._record(
                    claim, image, lane, several=sized, failed=report.failed_slots
                )
            if report.failed_slots:
                code, message = report.failed_slots[0]
                log.warning(
                    "job %s: %d image(s) of the task failed: %s %s",
                    claim.id,
                    len(report.failed_slots),
                    code,
                    message,
                )
            return await self._record(claim, image, lane)
        if report.status == "CANCELED":
            await self._fail(claim, "TaskCanceled", f"task {claim.task_id} was cancelled")
            return None
        slot = report.failed_slots[0] if report.failed_slots else (None, "")
        code = report.code or slot[0] or f"Task{report.status.title()}"
        message = report.message or slot[1]
        # A task's failure comes in a 200 answer: classified by its code as a failed call is.
        verdict = classify_api_error(500, code, message).verdict
        if verdict is Verdict.FAIL_JOB:
            await self._fail(claim, code, message, request_id=report.request_id)
            return None
        if verdict is Verdict.ABORT_RUN:
            if len(self.lanes) == 1:
                self.request_stop(StopReason.ABORTED, f"{code}: {message}")
            else:
                self._lane_fatal(lane, code, message, classify_api_error(500, code, message).advice)
            await self.store.retry_later(
                claim.id, claim.token, delay=0, code=code, message=message, charge_attempt=False
            )
            return None
        await self._on_retryable(
            claim,
            code=code,
            message=message,
            ambiguous=False,
            retry_after=None,
            request_id=report.request_id,
        )
        return None
