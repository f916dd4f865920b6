"""The emulator's pure parts: settings and specs, error codes, seeded draws, the quota."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

import batcher.emulator
from batcher.emulator.codes import ERROR_CODES, api_error
from batcher.emulator.config import (
    EmulatorConfig,
    FaultKind,
    Latency,
    parse_faults,
    parse_latency,
)
from batcher.emulator.faults import SlidingWindowQuota, draw


def test_public_surface() -> None:
    assert batcher.emulator.__all__ == [
        "Emulator",
        "EmulatorConfig",
        "EmulatorThread",
        "FaultKind",
        "running_emulator",
    ]
    for name in batcher.emulator.__all__:
        assert getattr(batcher.emulator, name) is not None


def test_defaults_match_the_issue() -> None:
    config = EmulatorConfig()
    assert (config.host, config.port, config.api_key, config.rps) == ("127.0.0.1", 0, None, 2.0)
    assert config.latency == "lognormal:2000:0.4"
    assert config.latency_model == Latency(median_ms=2000.0, sigma=0.4)
    assert (config.faults, config.moderate, config.url_ttl) == ("", (), 86400.0)
    assert (config.seed, config.retry_after) == (None, None)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0", Latency(median_ms=0.0)),
        ("250", Latency(median_ms=250.0)),
        (" 12.5 ", Latency(median_ms=12.5)),
        ("lognormal:2000:0.4", Latency(median_ms=2000.0, sigma=0.4)),
        ("LOGNORMAL:5:0", Latency(median_ms=5.0, sigma=0.0)),
    ],
)
def test_parse_latency(spec: str, expected: Latency) -> None:
    assert parse_latency(spec) == expected


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "expected MS"),
        ("fast", "expected MS"),
        ("lognormal:2000", "expected MS"),
        ("normal:1:2", "expected MS"),
        ("-5", ">= 0"),
        ("nan", ">= 0"),
        ("lognormal:100:-1", "sigma"),
        ("lognormal:100:9", "sigma"),
    ],
)
def test_parse_latency_rejects(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="invalid latency") as caught:
        parse_latency(spec)
    assert fragment in str(caught.value)


def test_latency_seconds() -> None:
    assert Latency(median_ms=0.0, sigma=1.0).seconds(3.0) == 0.0
    assert Latency(median_ms=250.0).seconds(2.0) == 0.25
    assert Latency(median_ms=1000.0, sigma=0.5).seconds(0.0) == 1.0
    assert Latency(median_ms=1000.0, sigma=0.5).seconds(2.0) == pytest.approx(math.e)


def test_parse_faults_kinds_and_groups() -> None:
    plan = parse_faults(" reset=0.1, 500=0.05,truncate=0.2,corrupt=0.1 ,hang=0,lost=0.01")
    assert [r.kind for r in plan.generation] == ["500", "hang", "lost", "reset"]
    assert [r.kind for r in plan.download] == ["corrupt", "truncate"]
    by_kind = {r.kind: r for r in plan.generation}
    assert by_kind["500"].error == api_error("InternalError")
    assert by_kind["reset"].error is None
    assert by_kind["lost"].fraction == 0.01
    assert parse_faults("") == parse_faults(" , ")


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("500", 500, "InternalError"),
        ("503", 503, "ModelUnavailable"),
        ("429", 429, "Throttling"),
        ("free-quota", 429, "Throttling.AllocationQuota"),
        ("Arrearage", 400, "Arrearage"),
        ("InternalError.Algo", 500, "InternalError.Algo"),
        ("Throttling.AllocationQuota", 429, "Throttling.AllocationQuota"),
        ("Throttling.RateQuota", 429, "Throttling.RateQuota"),
        ("DataInspectionFailed", 400, "DataInspectionFailed"),
        ("InvalidApiKey", 401, "InvalidApiKey"),
        ("AccessDenied.Unpurchased", 403, "AccessDenied.Unpurchased"),
        ("ModelNotFound", 404, "ModelNotFound"),
        ("NOT AUTHORIZED", 401, "NOT AUTHORIZED"),
        ("ModelServingError", 503, "ModelServingError"),
    ],
)
def test_fault_error_kinds(kind: str, status: int, code: str) -> None:
    (rule,) = parse_faults(f"{kind}=0.5").generation
    assert rule.error is not None
    assert (rule.error.status, rule.error.code) == (status, code)
    assert rule.error.message


def test_free_quota_variant_message() -> None:
    (rule,) = parse_faults("free-quota=1").generation
    assert rule.error is not None
    assert rule.error.message == "Free allocated quota exceeded."
    assert api_error("Throttling.AllocationQuota").message != rule.error.message


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("500", "expected kind=fraction"),
        ("=0.5", "expected kind=fraction"),
        ("500=lots", "is not a number"),
        ("500=1.5", "between 0 and 1"),
        ("500=-0.1", "between 0 and 1"),
        ("500=nan", "between 0 and 1"),
        ("explode=0.1", "unknown fault kind 'explode'"),
        ("500=0.1,500=0.2", "given twice"),
        ("500=0.6,reset=0.5", "generation fractions add up to more than 1"),
        ("truncate=0.6,corrupt=0.5", "download fractions add up to more than 1"),
    ],
)
def test_parse_faults_rejects(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_faults(spec)
    assert fragment in str(caught.value)


def test_generation_and_download_groups_sum_separately() -> None:
    plan = parse_faults("500=0.6,reset=0.4,truncate=0.7,corrupt=0.3")
    assert plan.pick_generation(0.0) is not None
    assert plan.pick_download(0.999) is not None


def test_pick_walks_the_cumulative_fractions() -> None:
    plan = parse_faults("500=0.2,reset=0.3")
    assert [plan.pick_generation(u) for u in (0.0, 0.1999)] == [plan.generation[0]] * 2
    assert [plan.pick_generation(u) for u in (0.2, 0.4999)] == [plan.generation[1]] * 2
    assert plan.pick_generation(0.5) is None
    assert plan.pick_download(0.0) is None


def test_every_fault_kind_is_accepted() -> None:
    for kind in FaultKind:
        parse_faults(f"{kind}=0.1")
    for code in ERROR_CODES:
        parse_faults(f"{code}=0.1")


def test_unknown_kind_message_lists_the_kinds() -> None:
    with pytest.raises(ValueError, match="reset") as caught:
        parse_faults("boom=1")
    assert "Arrearage" in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"port": 70000}, "invalid port"),
        ({"rps": 0.0}, "invalid rps"),
        ({"rps": -1.0}, "invalid rps"),
        ({"rps": math.nan}, "invalid rps"),
        ({"latency": "slow"}, "invalid latency"),
        ({"faults": "500=2"}, "between 0 and 1"),
        ({"api_key": ""}, "invalid api_key"),
        ({"api_key": " sk-x "}, "invalid api_key"),
        ({"moderate": ("ok", " ")}, "invalid moderate"),
        ({"url_ttl": math.inf}, "invalid url_ttl"),
        ({"retry_after": "1\r\nX-Evil: 1"}, "invalid retry_after"),
        ({"retry_after": ""}, "invalid retry_after"),
        ({"max_images": 0}, "invalid max_images"),
    ],
)
def test_config_rejects(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        EmulatorConfig(**changes)  # type: ignore[arg-type]


def test_config_accepts_an_unlimited_rate_and_a_list_of_words() -> None:
    config = EmulatorConfig(rps=math.inf, moderate=["bomb"])  # type: ignore[arg-type]
    assert config.moderate == ("bomb",)
    assert config.public_dict()["rps"] is None


def test_api_key_never_shown() -> None:
    config = EmulatorConfig(api_key="sk-very-secret")
    assert "sk-very-secret" not in repr(config)
    public = config.public_dict()
    assert "api_key" not in public
    assert public["api_key_set"] is True
    assert "sk-very-secret" not in str(public)


def test_with_changes() -> None:
    config = EmulatorConfig(latency="0")
    changed = config.with_changes(faults="Arrearage=1", rps="inf", moderate="gore", url_ttl=5)
    assert changed.faults == "Arrearage=1"
    assert math.isinf(changed.rps)
    assert changed.moderate == ("gore",)
    assert changed.url_ttl == 5.0
    assert config.faults == ""  # the original is untouched
    with pytest.raises(ValueError, match="cannot change port"):
        config.with_changes(port=1)
    with pytest.raises(ValueError, match="invalid rps"):
        config.with_changes(rps="fast")
    with pytest.raises(ValueError, match="invalid faults"):
        config.with_changes(faults=5)
    with pytest.raises(ValueError, match="unknown fault kind"):
        config.with_changes(faults="nope=1")


def test_draws_are_reproducible_and_independent() -> None:
    assert draw(1, "generate", 5) == draw(1, "generate", 5)
    assert draw(1, "generate", 5) != draw(2, "generate", 5)
    assert draw(1, "generate", 5) != draw(1, "download", 5)
    assert draw(1, "generate", 5) != draw(1, "generate", 6)


def test_draws_have_the_right_distributions() -> None:
    draws = [draw(42, "generate", n) for n in range(20_000)]
    uniforms = [d.fault_u for d in draws]
    normals = [d.latency_z for d in draws]
    assert all(0.0 <= u < 1.0 for u in uniforms)
    assert statistics.fmean(uniforms) == pytest.approx(0.5, abs=0.01)
    assert sum(u < 0.1 for u in uniforms) / len(uniforms) == pytest.approx(0.1, abs=0.01)
    assert statistics.fmean(normals) == pytest.approx(0.0, abs=0.03)
    assert statistics.stdev(normals) == pytest.approx(1.0, abs=0.03)
    assert all(0 <= d.seed <= 2_147_483_647 for d in draws)
    assert len({d.seed for d in draws}) > 19_900


def test_quota_whole_rate() -> None:
    quota = SlidingWindowQuota(2)
    assert [quota.try_acquire("k", t) for t in (0.0, 0.1, 0.2, 0.99)] == [True, True, False, False]
    assert quota.try_acquire("k", 1.0)  # the one at 0.0 left the window
    assert not quota.try_acquire("k", 1.05)
    assert quota.try_acquire("k", 1.1)


def test_quota_does_not_count_refusals() -> None:
    quota = SlidingWindowQuota(1)
    assert quota.try_acquire("k", 0.0)
    assert not quota.try_acquire("k", 0.6)
    assert quota.try_acquire("k", 1.0)


def test_quota_is_per_key() -> None:
    quota = SlidingWindowQuota(1)
    assert quota.try_acquire("a", 0.0)
    assert not quota.try_acquire("a", 0.1)
    assert quota.try_acquire("b", 0.1)


def test_quota_fractional_and_unlimited_rates() -> None:
    half = SlidingWindowQuota(0.5)
    assert (half.capacity, half.window) == (1, 2.0)
    assert [half.try_acquire("k", t) for t in (0.0, 1.9, 2.0)] == [True, False, True]
    odd = SlidingWindowQuota(2.5)
    assert (odd.capacity, odd.window) == (2, 0.8)
    unlimited = SlidingWindowQuota(math.inf)
    assert all(unlimited.try_acquire("k", 0.0) for _ in range(10_000))
    with pytest.raises(ValueError):
        SlidingWindowQuota(0)


@given(
    rps=st.sampled_from([1.0, 2.0, 3.0, 0.5, 2.5, 10.0]),
    gaps=st.lists(st.floats(min_value=0.0, max_value=0.7), min_size=1, max_size=80),
)
def test_quota_never_exceeds_the_rate_in_any_window(rps: float, gaps: list[float]) -> None:
    quota = SlidingWindowQuota(rps)
    now, accepted = 0.0, []
    for gap in gaps:
        now += gap
        if quota.try_acquire("k", now):
            accepted.append(now)
    for start in accepted:
        inside = [t for t in accepted if start <= t < start + quota.window]
        assert len(inside) <= quota.capacity


def test_task_seconds_and_the_new_fault_groups() -> None:
    from batcher.emulator.config import parse_task_seconds

    assert parse_task_seconds("3").median_ms == 3000.0
    assert parse_task_seconds("lognormal:20:0.5").sigma == 0.5
    with pytest.raises(ValueError, match="invalid task_seconds"):
        parse_task_seconds("soon")
    with pytest.raises(ValueError, match="task_ttl"):
        EmulatorConfig(task_ttl=0)
    plan = parse_faults("poll-500=0.5,poll-reset=0.5,task-failed=0.2,task-partial=0.1,500=0.1")
    assert [r.kind for r in plan.poll] == ["poll-500", "poll-reset"]
    assert [r.kind for r in plan.task] == ["task-failed", "task-partial"]
    assert [r.kind for r in plan.generation] == ["500"]
    with pytest.raises(ValueError, match="the poll fractions add up to more than 1"):
        parse_faults("poll-500=0.6,poll-reset=0.6")
    assert EmulatorConfig().with_changes(task_seconds="1", task_ttl="5").task_ttl == 5.0


def test_accounts_are_checked_and_never_shown() -> None:
    config = EmulatorConfig(
        accounts={"a": ["sk-1", "sk-2"]}, account_rps={"a": {"z-image-turbo": 3}}
    )
    assert config.accounts == {"a": ("sk-1", "sk-2")}
    assert config.account_of("sk-2") == "a" and config.account_of("sk-9") is None
    assert config.public_dict()["accounts"] == {"a": 2}
    assert "sk-1" not in repr(config)
    with pytest.raises(ValueError, match="in accounts 'a' and 'b'") as found:
        EmulatorConfig(accounts={"a": ("sk-1",), "b": ("sk-1",)})
    assert "sk-1" not in str(found.value)
    with pytest.raises(ValueError, match="has no key"):
        EmulatorConfig(accounts={"a": ()})
    with pytest.raises(ValueError, match="no account 'b'"):
        EmulatorConfig(accounts={"a": ("sk-1",)}, account_rps={"b": {"z-image-turbo": 1}})
    with pytest.raises(ValueError, match="unknown model"):
        EmulatorConfig(accounts={"a": ("sk-1",)}, account_rps={"a": {"nope": 1}})


def test_accounts_from_the_environment() -> None:
    from batcher.emulator.cli import accounts_from_env

    env = {"KA": "sk-a", "KB": "sk-b", "KC": "sk-c"}
    assert accounts_from_env(["a=KA,KB", "c=KC"], env) == {"a": ("sk-a", "sk-b"), "c": ("sk-c",)}
    with pytest.raises(ValueError, match="KZ is not set"):
        accounts_from_env(["a=KZ"], env)
    with pytest.raises(ValueError, match="NAME=ENVVAR"):
        accounts_from_env(["a"], env)
