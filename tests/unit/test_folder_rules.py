"""The pure rules of a run folder's truth: which endpoint may continue which folder, and how
``--budget`` is read."""

from __future__ import annotations

import doctest
from decimal import Decimal
from pathlib import Path

import pytest

import batcher.commands
import batcher.folder
import batcher.summary
from batcher.commands import parse_budget
from batcher.errors import ConfigError
from batcher.folder import check_endpoint, default_out, endpoint_label

ROOT = Path("out/m")
REAL = "https://dashscope-intl.aliyuncs.com/api/v1"


def test_default_folders_keep_rehearsals_apart() -> None:
    assert default_out(Path("a/m.csv")) == Path("out/m")
    assert default_out(Path("a/m.csv"), emulate=True) == Path("out/m.emulated")


@pytest.mark.parametrize(
    ("found", "endpoint"),
    [
        ({}, REAL),
        ({}, "emulator"),
        ({REAL: 3}, REAL),
        ({"emulator": 3}, "emulator"),
        ({None: 3}, REAL),  # a version-1 folder's paid images: any paid run goes on
        ({None: 1, REAL: 2}, REAL),
    ],
)
def test_allowed(found, endpoint) -> None:
    check_endpoint(found, endpoint, ROOT)


@pytest.mark.parametrize(
    ("found", "endpoint", "says"),
    [
        ({"emulator": 3}, REAL, "--emulate"),  # a paid run never counts rehearsal images
        ({REAL: 3}, "emulator", "paid"),  # a rehearsal never writes over paid images
        ({None: 3}, "emulator", "paid"),
        ({"https://dashscope.aliyuncs.com/api/v1": 1}, REAL, "another endpoint"),
    ],
)
def test_refused_with_what_to_do(found, endpoint, says) -> None:
    with pytest.raises(ConfigError) as info:
        check_endpoint(found, endpoint, ROOT)
    message = str(info.value)
    assert says in message and "--out" in message and "\n" not in message


def test_the_endpoint_never_carries_credentials() -> None:
    assert endpoint_label(emulate=True, base_url=REAL) == "emulator"
    assert endpoint_label(emulate=False, base_url=REAL) == REAL
    assert "secret" not in endpoint_label(
        emulate=False, base_url="http://user:secret@127.0.0.1:9/api/v1"
    )


@pytest.mark.parametrize(
    ("text", "amount", "currency"),
    [
        ("5", Decimal("5"), None),
        ("2.50", Decimal("2.50"), None),
        ("5CNY", Decimal("5"), "CNY"),
        ("5 cny", Decimal("5"), "CNY"),
        ("2.5USD", Decimal("2.5"), "USD"),
        ("US$2.5", Decimal("2.5"), "USD"),
        ("¥10", Decimal("10"), "CNY"),
    ],
)
def test_budget_amount_and_currency(text, amount, currency) -> None:
    assert parse_budget(text) == (amount, currency)


@pytest.mark.parametrize("text", ["", "abc", "5EUR", "-1", "0", "NaN", "inf", "5CNYUSD"])
def test_bad_budgets_are_one_clear_error(text) -> None:
    with pytest.raises(ConfigError, match="--budget"):
        parse_budget(text)


def test_doctests() -> None:
    for module in (batcher.folder, batcher.summary, batcher.commands):
        assert doctest.testmod(module).failed == 0, module.__name__
