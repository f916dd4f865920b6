"""Delay math: full jitter bounds, Retry-After parsing, and the two combined."""

from __future__ import annotations

import doctest
import math
import random
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import batcher.backoff
from batcher.backoff import full_jitter_delay, next_delay, parse_retry_after

NOW = datetime(2026, 5, 9, 12, 0, 0, tzinfo=UTC).timestamp()
PURE = settings(database=None, deadline=None)


class Highest(random.Random):
    """A generator that always draws the top of the range, to read the ceiling off."""

    def random(self) -> float:
        return 1.0


class Lowest(random.Random):
    def random(self) -> float:
        return 0.0


def http_date(seconds_from_now: float) -> str:
    when = datetime.fromtimestamp(NOW + seconds_from_now, tz=UTC)
    return format_datetime(when, usegmt=True)


# full_jitter_delay


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 32.0), (7, 60.0), (8, 60.0), (500, 60.0)],
)
def test_ceiling_doubles_then_stays_at_the_cap(attempt: int, ceiling: float) -> None:
    assert full_jitter_delay(attempt, rng=Highest()) == ceiling
    assert full_jitter_delay(attempt, rng=Lowest()) == 0.0


def test_ceilings_never_decrease_and_never_pass_the_cap() -> None:
    for base, cap in [(1.0, 60.0), (0.25, 10.0), (3.0, 7.5), (1.0, 0.0)]:
        ceilings = [full_jitter_delay(a, base=base, cap=cap, rng=Highest()) for a in range(1, 80)]
        assert ceilings == sorted(ceilings)
        assert max(ceilings) == cap
        assert ceilings[0] == min(base, cap)


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert full_jitter_delay(10**6, rng=Highest()) == 60.0
    assert full_jitter_delay(2000, base=1e300, cap=5.0, rng=Highest()) == 5.0


def test_draws_spread_over_the_whole_range() -> None:
    rng = random.Random(0)
    draws = [full_jitter_delay(4, rng=rng) for _ in range(2000)]
    assert all(0.0 <= d <= 8.0 for d in draws)
    assert min(draws) < 0.5 and max(draws) > 7.5
    assert 3.5 < sum(draws) / len(draws) < 4.5  # uniform: mean near half the ceiling


def test_same_seed_same_delays() -> None:
    first = [full_jitter_delay(a, rng=random.Random(42)) for a in range(1, 10)]
    again = [full_jitter_delay(a, rng=random.Random(42)) for a in range(1, 10)]
    assert first == again
    rng_a, rng_b = random.Random(9), random.Random(9)
    seq_a = [next_delay(a, retry_after=None, rng=rng_a) for a in range(1, 20)]
    seq_b = [next_delay(a, retry_after=None, rng=rng_b) for a in range(1, 20)]
    assert seq_a == seq_b
    assert seq_a != [next_delay(a, retry_after=None, rng=random.Random(10)) for a in range(1, 20)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempt": 0},
        {"attempt": -1},
        {"attempt": 1, "base": 0.0},
        {"attempt": 1, "base": -1.0},
        {"attempt": 1, "base": math.nan},
        {"attempt": 1, "cap": -1.0},
        {"attempt": 1, "cap": math.inf},
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    attempt = int(kwargs.pop("attempt"))
    with pytest.raises(ValueError):
        full_jitter_delay(attempt, rng=random.Random(1), **kwargs)


# parse_retry_after


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("1", 1.0),
        ("120", 120.0),
        (" 30 ", 30.0),
        ("1.5", 1.5),
        ("300", 300.0),
        ("301", 300.0),  # clamped
        ("86400", 300.0),
        ("9" * 400, 300.0),  # a number float() reads as infinity: still just "long"
        (None, None),
        ("", None),
        ("   ", None),
        ("soon", None),
        ("-5", None),
        ("-0.5", None),
        ("NaN", None),
        ("nan", None),
        ("inf", None),
        ("1e3", None),
        ("1_000", None),
        ("12abc", None),
        ("١٢", None),  # non-ASCII digits
        ("Wed, 99 Foo 2015 07:28:00 GMT", None),
        ("Mon, 32 Jan 2026 00:00:00 GMT", None),
    ],
)
def test_retry_after_values(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_retry_after_as_an_http_date() -> None:
    assert parse_retry_after(http_date(45), now=NOW) == pytest.approx(45.0)
    assert parse_retry_after(http_date(45.0), now=NOW + 0.5) == pytest.approx(44.5)
    # RFC 850 and asctime forms are valid HTTP-dates too.
    assert parse_retry_after("Saturday, 09-May-26 12:01:00 GMT", now=NOW) == pytest.approx(60.0)
    assert parse_retry_after("Sat May  9 12:02:00 2026", now=NOW) == pytest.approx(120.0)


def test_retry_after_date_in_the_past_means_now() -> None:
    assert parse_retry_after(http_date(-10), now=NOW) == 0.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", now=NOW) == 0.0


def test_retry_after_date_far_ahead_is_clamped() -> None:
    assert parse_retry_after(http_date(3600), now=NOW) == 300.0
    assert parse_retry_after(http_date(3600), now=NOW, max_delay=7200.0) == pytest.approx(3600.0)
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now=NOW) == 300.0


def test_retry_after_date_with_a_zone_offset() -> None:
    later = datetime.fromtimestamp(NOW, tz=UTC) + timedelta(seconds=90)
    for hours in (-5, 8):
        local = later.astimezone(timezone(timedelta(hours=hours)))
        text = local.strftime("%a, %d %b %Y %H:%M:%S %z")
        assert parse_retry_after(text, now=NOW) == pytest.approx(90.0)


def test_retry_after_max_delay_must_be_sane() -> None:
    with pytest.raises(ValueError):
        parse_retry_after("1", now=NOW, max_delay=-1.0)


@PURE
@given(st.text(max_size=40), st.floats(min_value=0, max_value=4e9))
def test_retry_after_never_raises_and_stays_in_range(value: str, now: float) -> None:
    got = parse_retry_after(value, now=now)
    assert got is None or 0.0 <= got <= 300.0


@PURE
@given(st.integers(min_value=0, max_value=10**12))
def test_retry_after_integer_seconds(seconds: int) -> None:
    assert parse_retry_after(str(seconds), now=NOW) == min(float(seconds), 300.0)


# next_delay


def test_next_delay_without_retry_after_is_full_jitter() -> None:
    for attempt in range(1, 12):
        a = next_delay(attempt, retry_after=None, rng=random.Random(attempt))
        b = full_jitter_delay(attempt, rng=random.Random(attempt))
        assert a == b


def test_next_delay_honours_retry_after() -> None:
    assert next_delay(1, retry_after=20.0, rng=Highest()) == 20.0
    assert next_delay(1, retry_after=0.0, rng=Lowest()) == 0.0
    assert next_delay(8, retry_after=2.0, rng=Highest()) == 60.0  # jitter may add, never cut
    assert next_delay(8, retry_after=300.0, rng=Highest()) == 300.0  # beyond the cap: as asked


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_next_delay_refuses_a_nonsense_retry_after(bad: float) -> None:
    with pytest.raises(ValueError):
        next_delay(1, retry_after=bad, rng=random.Random(0))


@PURE
@given(
    attempt=st.integers(min_value=1, max_value=10_000),
    retry_after=st.none() | st.floats(min_value=0.0, max_value=300.0),
    base=st.floats(min_value=0.001, max_value=30.0),
    cap=st.floats(min_value=0.0, max_value=600.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_next_delay_properties(
    attempt: int, retry_after: float | None, base: float, cap: float, seed: int
) -> None:
    delay = next_delay(
        attempt, retry_after=retry_after, rng=random.Random(seed), base=base, cap=cap
    )
    floor = retry_after or 0.0
    assert math.isfinite(delay)
    assert 0.0 <= delay <= max(cap, floor)
    if retry_after is None:
        assert delay <= cap
    else:
        assert delay >= retry_after
    again = next_delay(
        attempt, retry_after=retry_after, rng=random.Random(seed), base=base, cap=cap
    )
    assert again == delay


def test_docstring_examples() -> None:
    assert doctest.testmod(batcher.backoff).failed == 0
