"""What images cost: a price table per model and region, in the region's currency.

Billing is unit price x successfully generated images, whatever the resolution; failed calls
are free (README, "Cost and the quota"). ``z-image-turbo`` costs twice as much with
``prompt_extend``; for the other models the switch does not change the price.

Region ``cn`` (Beijing) is priced in CNY as published. Region ``intl`` (Singapore) is priced in
USD: the official page lists Singapore prices in CNY only, and the USD figures below are the
reference's conversion (Singapore CNY / 7.3393), which a third-party price list corroborates for
z-image-turbo. All amounts are ``Decimal``: money is never a float here.

>>> str(price_per_image("z-image-turbo", "cn", prompt_extend=True))
'CN¥0.20'
>>> str(estimate(100, model="z-image-turbo", region="intl", prompt_extend=False))
'US$1.50'
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType

__all__ = ["Money", "currency_of", "estimate", "known_models", "price_per_image"]

_SYMBOLS = MappingProxyType({"USD": "US$", "CNY": "CN¥"})
_CURRENCY = MappingProxyType({"cn": "CNY", "intl": "USD"})
_CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class Money:
    """An exact amount in one currency (ISO code). ``str()`` gives e.g. ``US$1.23``.

    At least two decimals are shown, more only when the amount has them (``US$0.015``).

    >>> Money(Decimal("0.10"), "CNY") + Money(Decimal("0.20"), "CNY")
    Money(amount=Decimal('0.30'), currency='CNY')
    >>> str(Money(Decimal("1234.5"), "USD"))
    'US$1,234.50'
    """

    amount: Decimal
    currency: str

    def __post_init__(self) -> None:
        if not isinstance(self.amount, Decimal) or not self.amount.is_finite():
            raise TypeError(f"Money needs a finite Decimal amount, not {self.amount!r}")

    @classmethod
    def zero(cls, currency: str) -> Money:
        """Nothing, in ``currency``: the start of a running total."""
        return cls(Decimal(0), currency)

    def _same(self, other: object) -> Money:
        if not isinstance(other, Money):
            raise TypeError(f"cannot combine Money and {type(other).__name__}")
        if other.currency != self.currency:
            raise ValueError(f"cannot combine {self.currency} and {other.currency}")
        return other

    def __add__(self, other: Money) -> Money:
        if not isinstance(other, Money):
            return NotImplemented
        return Money(self.amount + self._same(other).amount, self.currency)

    def __radd__(self, other: int) -> Money:
        # Lets sum() start from its default 0.
        if other == 0 and not isinstance(other, bool):
            return self
        return NotImplemented

    def __mul__(self, count: int) -> Money:
        if not isinstance(count, int) or isinstance(count, bool):
            return NotImplemented
        return Money(self.amount * count, self.currency)

    __rmul__ = __mul__

    def __lt__(self, other: Money) -> bool:
        return self.amount < self._same(other).amount

    def __le__(self, other: Money) -> bool:
        return self.amount <= self._same(other).amount

    def __gt__(self, other: Money) -> bool:
        return self.amount > self._same(other).amount

    def __ge__(self, other: Money) -> bool:
        return self.amount >= self._same(other).amount

    def __str__(self) -> str:
        amount = self.amount.normalize()
        exponent = amount.as_tuple().exponent
        if isinstance(exponent, int) and exponent > -2:
            amount = amount.quantize(_CENT)
        sign = "-" if amount < 0 else ""
        symbol = _SYMBOLS.get(self.currency, f"{self.currency} ")
        return f"{sign}{symbol}{abs(amount):,f}"


_D = Decimal
# (model, region) -> price of one image without prompt_extend, in the region's currency.
# The "intl" figures are USD converted by the reference (Singapore CNY / 7.3393), not official.
_PRICES: MappingProxyType[tuple[str, str], Decimal] = MappingProxyType(
    {
        ("z-image-turbo", "cn"): _D("0.10"),
        ("z-image-turbo", "intl"): _D("0.015"),
        ("qwen-image-plus", "cn"): _D("0.20"),
        ("qwen-image-plus", "intl"): _D("0.030"),
        ("qwen-image", "cn"): _D("0.25"),
        ("qwen-image", "intl"): _D("0.035"),
        ("qwen-image-max", "cn"): _D("0.50"),
        ("qwen-image-max", "intl"): _D("0.075"),
        ("wan2.5-t2i-preview", "cn"): _D("0.20"),
        ("wan2.5-t2i-preview", "intl"): _D("0.030"),
        ("wan2.2-t2i-flash", "cn"): _D("0.14"),
        ("wan2.2-t2i-flash", "intl"): _D("0.025"),
        ("wan2.2-t2i-plus", "cn"): _D("0.20"),
        ("wan2.2-t2i-plus", "intl"): _D("0.050"),
    }
)
# Price multiplier with prompt_extend on; models not listed are billed the same either way.
_EXTEND_FACTOR: MappingProxyType[str, int] = MappingProxyType({"z-image-turbo": 2})


def currency_of(region: str) -> str:
    """The currency prices are given in for ``region`` (``"cn"`` or ``"intl"``).

    >>> currency_of("intl")
    'USD'
    """
    try:
        return _CURRENCY[region]
    except KeyError:
        known = ", ".join(sorted(_CURRENCY))
        raise ValueError(f"unknown region {region!r} (known: {known})") from None


def known_models() -> tuple[str, ...]:
    """The models with a known price, sorted."""
    return tuple(sorted({model for model, _ in _PRICES}))


def price_per_image(model: str, region: str, prompt_extend: bool) -> Money:
    """The price of one successfully generated image.

    Raises ``ValueError`` naming the known models (or regions) for an unknown one.

    >>> price_per_image("z-image-turbo", "intl", False)
    Money(amount=Decimal('0.015'), currency='USD')
    """
    currency = currency_of(region)
    unit = _PRICES.get((model, region))
    if unit is None:
        raise ValueError(f"no price known for model {model!r} (known: {', '.join(known_models())})")
    factor = _EXTEND_FACTOR.get(model, 1) if prompt_extend else 1
    return Money(unit * factor, currency)


def estimate(count: int, *, model: str, region: str, prompt_extend: bool) -> Money:
    """The price of ``count`` images.

    >>> str(estimate(3, model="qwen-image", region="cn", prompt_extend=True))
    'CN¥0.75'
    """
    if count < 0:
        raise ValueError(f"count must not be negative, not {count!r}")
    return price_per_image(model, region, prompt_extend) * count
