"""Every number batcher prints means what its label says: the ETA, whose counts a progress line
shows, the achieved rate, abandoned calls, counted nouns."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from batcher.pool import RunCounters
from batcher.progress import PlainProgress, Snapshot, Throughput, _line
from batcher.records import actual_prompt, iso_utc
from batcher.summary import summary_lines
from batcher.wording import plural
from jobs import Spend, Stats


def snapshot(**kw: object) -> Snapshot:
    base: dict[str, object] = dict(
        total=120,
        done=5,
        failed=0,
        remaining=115,
        in_flight=3,
        retries=0,
        throttled=0,
        per_minute=0.0,
        quota_per_minute=120.0,
        eta_seconds=None,
        spent="US$0.08",
        elapsed=2.0,
    )
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_the_eta_is_unknown_until_the_pace_has_settled():
    """5 of 120 done two seconds in: the pacer may aim at 985/s, the ETA is not 0:00."""
    pace = Throughput()
    pace.add(0.0, finished=0)
    pace.add(1.0, finished=2)
    pace.add(2.0, finished=5)
    assert pace.eta(remaining=115) is None
    assert "eta=--" in _line(snapshot(eta_seconds=pace.eta(remaining=115)))


def test_the_eta_follows_the_pace_jobs_actually_finish_at():
    pace = Throughput()
    for second in range(0, 31):
        pace.add(float(second), finished=2 * second)  # 2 jobs/s, whatever the pacer says
    assert pace.per_second() == pytest.approx(2.0)
    assert pace.eta(remaining=100) == pytest.approx(50.0)
    assert pace.eta(remaining=0) == 0.0


def test_the_eta_uses_the_last_minute_not_the_whole_run():
    pace = Throughput(window=60.0)
    for second in range(0, 121):  # 1 job/s for two minutes, then 4 jobs/s for two
        pace.add(float(second), finished=second)
    for second in range(121, 241):
        pace.add(float(second), finished=120 + 4 * (second - 120))
    assert pace.per_second() == pytest.approx(4.0, rel=0.05)


def test_the_progress_line_says_which_counts_are_all_runs_and_which_this_runs():
    line = _line(snapshot(done=105, failed=2, run_done=5, run_failed=1, remaining=13))
    assert line.startswith("all runs: 107/120 (89%) done=105 failed=2 | this run: done=5 failed=1")
    assert line.index("throttled=") > line.index("this run:")
    assert line.index("spent=") > line.index("this run:")


def test_plain_progress_prints_the_labelled_line(capsys):
    view = PlainProgress(every=0.0)
    view.update(snapshot(run_done=5))
    assert "all runs: 5/120" in capsys.readouterr().err


def stats(**by_state: int) -> Stats:
    done = by_state.get("done", 0)
    return Stats(
        by_state=dict(by_state),
        errors_by_code={},
        spend=(Spend(currency="USD", emulated=False, images=done, amount=Decimal("0.015") * done),),
        attempts=0,
        throttled=0,
        ambiguous=0,
        regenerated=0,
    )


def summary(counters: RunCounters, rate: float | None = 1.97, rps: float = 1000.0) -> str:
    lines = summary_lines(
        stats=stats(done=1),
        counters=counters,
        elapsed=3.0,
        reason="finished",
        calls_per_second=rate,
        rps=rps,
    )
    return "\n".join(lines)


def test_calls_cut_short_by_a_second_ctrl_c_are_abandoned_not_re_sends():
    text = summary(RunCounters(calls=4, abandoned=2))
    assert "2 abandoned (may have been billed)" in text
    assert "0 ambiguous re-sends" in text


def test_a_throttled_run_does_not_print_a_percentage_of_a_rate_it_was_never_allowed():
    text = summary(RunCounters(calls=103, accepted=100, throttled=3), rate=1.97, rps=1000)
    [achieved] = [line for line in text.splitlines() if line.startswith("achieved")]
    assert achieved.startswith("achieved 1.97 calls/s accepted by the service")
    assert "3 throttled calls not counted" in achieved and "%" not in achieved
    clean = summary(RunCounters(calls=20, accepted=20), rate=1.97, rps=2)
    assert "achieved 1.97 calls/s against --rps 2 (98%)" in clean


def test_one_is_singular_everywhere_in_the_summary():
    text = summary(
        RunCounters(
            calls=1,
            accepted=1,
            generated=1,
            done=1,
            images_generated=1,
            images_saved=1,
            retries=1,
            download_retries=1,
        )
    )
    assert re.search(r"\b1 (images|API calls|retries|download retries|re-sends)\b", text) is None
    assert "1 image generated" in text and "1 API call," in text and "1 retry," in text


@pytest.mark.parametrize(
    ("count", "noun", "many", "text"),
    [
        (0, "job", None, "0 jobs"),
        (1, "job", None, "1 job"),
        (2, "job", None, "2 jobs"),
        (1, "retry", "retries", "1 retry"),
        (3, "retry", "retries", "3 retries"),
    ],
)
def test_plural(count, noun, many, text):
    assert plural(count, noun, many) == text


def test_export_and_metadata_name_the_same_actual_prompt():
    generated = {"prompt": "a chair", "actual_prompt": None, "request_id": "r1", "generated_at": 1}
    extended = {**generated, "actual_prompt": "a wooden chair, studio light"}
    pending = {"prompt": "a chair", "actual_prompt": None, "request_id": None, "generated_at": None}
    assert actual_prompt(generated) == "a chair"
    assert actual_prompt(extended) == "a wooden chair, studio light"
    assert actual_prompt(pending) is None


def test_times_are_iso_8601_utc():
    assert iso_utc(1_795_942_375.6777) == "2026-11-29T08:52:55.677Z"
    assert iso_utc(None) is None


@pytest.mark.parametrize(
    ("reason", "opening"),
    [
        ("finished", "run finished after 0:03: "),
        ("interrupted", "run interrupted after 0:03: "),
        ("aborted", "run stopped after 0:03: "),
        ("limit", "run stopped at --limit after 0:03: "),
        ("budget", "run stopped at --budget after 0:03: "),
        ("unreachable", "run stopped (the service could not be reached) after 0:03: "),
    ],
)
def test_the_first_summary_line_says_in_words_how_the_run_ended(reason, opening):
    """Not "run limit after 0:03" or "run unreachable after 0:03": the stop reason's code is
    for ``--json``; a person reads a phrase."""
    lines = summary_lines(
        stats=stats(done=1),
        counters=RunCounters(
            calls=1, accepted=1, generated=1, done=1, images_generated=1, images_saved=1
        ),
        elapsed=3.0,
        reason=reason,
        calls_per_second=None,
        rps=2,
    )
    assert lines[0].startswith(opening), lines[0]


def test_a_rehearsal_s_progress_never_labels_its_emulated_money_spent():
    """It read "spent=US$0.06 emulated": a rehearsal spends nothing."""
    line = _line(snapshot(spent="US$0.06", emulated=True))
    assert "spent=" not in line
    assert "emulated=US$0.06 (not billed)" in line
    assert "spent=US$0.08" in _line(snapshot())


def test_a_job_of_several_images_counts_each_image_in_the_summary():
    text = summary(
        RunCounters(calls=2, accepted=2, generated=2, done=2, images_generated=5, images_saved=5)
    )
    assert "this run: 5 images generated, 5 saved," in text


def test_a_worker_of_a_shared_table_says_its_rate_is_its_share():
    """On a shared table several workers send through one lane's schedule at once: each
    worker's summary gives its own rate, and says so (status gives the lane's together)."""
    lines = summary_lines(
        stats=stats(done=1),
        counters=RunCounters(calls=20, accepted=20),
        elapsed=3.0,
        reason="finished",
        calls_per_second=0.66,
        rps=2,
        shared=True,
    )
    [achieved] = [line for line in lines if line.startswith("achieved")]
    assert achieved.startswith("achieved 0.66 calls/s against --rps 2 (33%) by this worker")
    assert "batcher status" in achieved
