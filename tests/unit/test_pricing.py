"""Prices per model and region (reference section 7), and the Money value."""

from __future__ import annotations

import doctest
from decimal import Decimal

import pytest

import batcher.pricing
from batcher.models import MODELS
from batcher.pricing import Money, currency_of, estimate, known_models, price_per_image

D = Decimal

# (model, Beijing CNY, Singapore USD as converted by the reference), typed from section 7.
REFERENCE = [
    ("z-image-turbo", D("0.10"), D("0.015")),
    ("qwen-image-plus", D("0.20"), D("0.030")),
    ("qwen-image", D("0.25"), D("0.035")),
    ("qwen-image-max", D("0.50"), D("0.075")),
    ("wan2.5-t2i-preview", D("0.20"), D("0.030")),
    ("wan2.2-t2i-flash", D("0.14"), D("0.025")),
    ("wan2.2-t2i-plus", D("0.20"), D("0.050")),
]
# Singapore in CNY as published, kept in the registry beside the converted USD figure.
INTL_CNY = {
    "z-image-turbo": D("0.110089"),
    "qwen-image-plus": D("0.220177"),
    "qwen-image": D("0.256873"),
    "qwen-image-max": D("0.550443"),
    "wan2.5-t2i-preview": D("0.220177"),
    "wan2.2-t2i-flash": D("0.183481"),
    "wan2.2-t2i-plus": D("0.366962"),
}


@pytest.mark.parametrize(("model", "cny", "usd"), REFERENCE)
def test_prices_match_the_reference(model: str, cny: Decimal, usd: Decimal) -> None:
    assert price_per_image(model, "cn", False) == Money(cny, "CNY")
    assert price_per_image(model, "intl", False) == Money(usd, "USD")


def test_z_image_turbo_prompt_extend_doubles_the_price() -> None:
    assert price_per_image("z-image-turbo", "cn", True) == Money(D("0.20"), "CNY")
    assert price_per_image("z-image-turbo", "intl", True) == Money(D("0.030"), "USD")
    assert str(price_per_image("z-image-turbo", "cn", True)) == "CN¥0.20"
    assert str(price_per_image("z-image-turbo", "intl", True)) == "US$0.03"


@pytest.mark.parametrize(("model", "cny", "usd"), REFERENCE[1:])
def test_prompt_extend_does_not_change_other_models(model: str, cny: Decimal, usd: Decimal) -> None:
    assert price_per_image(model, "cn", True) == Money(cny, "CNY")
    assert price_per_image(model, "intl", True) == Money(usd, "USD")


@pytest.mark.parametrize(("model", "cny"), INTL_CNY.items())
def test_the_registry_keeps_the_published_singapore_cny(model: str, cny: Decimal) -> None:
    prices = MODELS[model].prices
    assert prices.intl_cny == cny
    assert not prices.estimated
    # the USD figure is the CNY one converted at 7.3393, to the cent's tenth
    assert abs(prices.intl_cny / D("7.3393") - prices.intl_usd) < D("0.0006")


def test_a_model_without_a_published_price_is_marked_estimated() -> None:
    assert set(MODELS) - {model for model, _, _ in REFERENCE} == {"wanx2.1-t2i-turbo"}
    assert MODELS["wanx2.1-t2i-turbo"].prices.estimated


def test_known_models_and_currencies() -> None:
    assert set(known_models()) == set(MODELS)
    assert currency_of("cn") == "CNY"
    assert currency_of("intl") == "USD"


def test_unknown_model_or_region_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match=r"no price known for model 'dall-e'.*z-image-turbo"):
        price_per_image("dall-e", "cn", False)
    with pytest.raises(ValueError, match=r"unknown region 'us'.*cn, intl"):
        price_per_image("z-image-turbo", "us", False)
    with pytest.raises(ValueError):
        price_per_image("Z-Image-Turbo", "cn", False)  # model names are exact
    with pytest.raises(ValueError):
        currency_of("eu")


def test_estimate() -> None:
    assert estimate(0, model="z-image-turbo", region="cn", prompt_extend=False) == Money(
        D(0), "CNY"
    )
    got = estimate(100, model="z-image-turbo", region="intl", prompt_extend=False)
    assert got == Money(D("1.5"), "USD")
    assert str(got) == "US$1.50"
    got = estimate(24, model="z-image-turbo", region="cn", prompt_extend=True)
    assert got.amount == D("4.80")
    assert str(got) == "CN¥4.80"
    # Exact decimal arithmetic: 3 x 0.10 is 0.30, not 0.30000000000000004.
    assert estimate(3, model="z-image-turbo", region="cn", prompt_extend=False).amount == D("0.3")
    with pytest.raises(ValueError):
        estimate(-1, model="z-image-turbo", region="cn", prompt_extend=False)


def test_estimate_equals_the_sum_of_single_prices() -> None:
    one = price_per_image("wan2.2-t2i-flash", "intl", False)
    total = sum([one] * 7, Money.zero("USD"))
    assert total == estimate(7, model="wan2.2-t2i-flash", region="intl", prompt_extend=False)
    assert sum([one, one]) == one * 2 == 2 * one


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        ("1.23", "USD", "US$1.23"),
        ("1.23", "CNY", "CN¥1.23"),
        ("0", "USD", "US$0.00"),
        ("1", "CNY", "CN¥1.00"),
        ("1.2", "USD", "US$1.20"),
        ("1.230", "USD", "US$1.23"),
        ("0.015", "USD", "US$0.015"),
        ("0.0150", "USD", "US$0.015"),
        ("0.110089", "CNY", "CN¥0.110089"),
        ("100", "USD", "US$100.00"),
        ("1E+2", "USD", "US$100.00"),
        ("1234567.5", "CNY", "CN¥1,234,567.50"),
        ("-2.5", "USD", "-US$2.50"),
        ("3.10", "EUR", "EUR 3.10"),
    ],
)
def test_money_formatting(amount: str, currency: str, text: str) -> None:
    assert str(Money(D(amount), currency)) == text


def test_money_arithmetic_and_comparison() -> None:
    a, b = Money(D("0.10"), "CNY"), Money(D("0.25"), "CNY")
    assert a + b == Money(D("0.35"), "CNY")
    assert a < b and a <= b and b > a and b >= a and a <= a
    assert Money(D("0.30"), "CNY") == Money(D("0.3"), "CNY")
    assert hash(Money(D("0.30"), "CNY")) == hash(Money(D("0.3"), "CNY"))
    assert Money.zero("CNY") + a == a


def test_money_refuses_mixing_currencies_and_floats() -> None:
    usd, cny = Money(D(1), "USD"), Money(D(1), "CNY")
    with pytest.raises(ValueError, match="USD and CNY"):
        usd + cny
    with pytest.raises(ValueError):
        _ = usd < cny
    with pytest.raises(TypeError):
        usd + 1  # type: ignore[operator]
    with pytest.raises(TypeError):
        _ = usd < 1  # type: ignore[operator]
    with pytest.raises(TypeError):
        usd * 1.5  # type: ignore[operator]
    with pytest.raises(TypeError):
        Money(0.1, "USD")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Money(D("NaN"), "USD")
    with pytest.raises(TypeError):
        Money(D("Infinity"), "USD")


def test_money_is_frozen() -> None:
    money = Money(D(1), "USD")
    with pytest.raises(AttributeError):
        money.amount = D(2)  # type: ignore[misc]


def test_docstring_examples() -> None:
    assert doctest.testmod(batcher.pricing).failed == 0
