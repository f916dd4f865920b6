"""The model registry: every text-to-image model batcher drives, as data.

One ``Model`` row per model holds all that the rest of batcher needs to know about it: the
protocol it is called with (one synchronous ``multimodal-generation`` request, or an
asynchronous ``image-synthesis`` task created and then polled), its size policy, prompt and
negative-prompt limits, the parameters it accepts, its prices per region and its quota. The
manifest validator (``batcher.modelrules``), the client, the pricing, the pacing and the
emulator all read these rows; nothing else in the code branches on a model's name.

    >>> MODELS["wan2.2-t2i-flash"].protocol
    <ApiProtocol.TASK: 'task'>
    >>> model("qwen-image").sizes.default
    '1328*1328'

The figures are those of the service's published documentation (late 2025 to mid 2026), as
summarised in the README's model table. Where the documentation disagrees with itself the
stricter reading is taken, so batcher never sends what one version of it refuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "ApiProtocol",
    "Model",
    "Prices",
    "Quota",
    "SizePolicy",
    "UnknownModel",
    "model",
    "model_rates",
]


class ApiProtocol(StrEnum):
    """How a model is called."""

    SYNC = "sync"  # POST .../multimodal-generation/generation answers with the image URL
    TASK = "task"  # POST .../image-synthesis (async header) creates a task; GET /tasks/{id} polls


@dataclass(frozen=True, kw_only=True, slots=True)
class SizePolicy:
    """Which ``W*H`` sizes a model takes and how a written ratio maps to one.

    A size is accepted when it is in ``table`` (if the model has a fixed table), else when its
    total pixels, each side and its aspect ratio are within the given bounds (``None``: no
    bound). ``ratios`` maps an aspect ratio to one size per entry of ``tiers``.
    """

    default: str
    table: tuple[str, ...] = ()
    min_pixels: int | None = None
    max_pixels: int | None = None
    min_side: int | None = None
    max_side: int | None = None
    max_aspect: float | None = None  # long side / short side
    ratios: MappingProxyType[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    tiers: tuple[str, ...] = ()
    default_tier: str = ""

    def problem(self, width: int, height: int) -> str | None:
        """Why ``width*height`` is not accepted, or None."""
        text = f"{width}*{height}"
        if self.table:
            return None if text in self.table else f"{text} is not one of {', '.join(self.table)}"
        pixels = width * height
        low, high = self.min_pixels, self.max_pixels
        if (low is not None and pixels < low) or (high is not None and pixels > high):
            return f"{text} is outside {_square(low)}..{_square(high)} total pixels"
        low, high = self.min_side, self.max_side
        if (low is not None and min(width, height) < low) or (
            high is not None and max(width, height) > high
        ):
            return f"{text}: each side must be in {low}..{high}"
        if self.max_aspect is not None and max(width, height) > self.max_aspect * min(
            width, height
        ):
            limit = f"{self.max_aspect:g}"
            return f"{text}: the aspect ratio must be within 1:{limit}..{limit}:1"
        return None


def _square(pixels: int | None) -> str:
    if pixels is None:
        return "any"
    side = int(pixels**0.5)
    return f"{side}*{side}" if side * side == pixels else str(pixels)


@dataclass(frozen=True, kw_only=True, slots=True)
class Prices:
    """Price of one successfully generated image, per region.

    ``cn`` is the Beijing price in CNY; ``intl_cny`` the Singapore price in CNY as published;
    ``intl_usd`` the same converted to USD (CNY / 7.3393), the currency batcher shows for the
    international region. ``extend_factor`` multiplies the price when ``prompt_extend`` is on.
    ``estimated`` marks prices not in the published table (taken from the nearest sibling).
    """

    cn: Decimal
    intl_cny: Decimal
    intl_usd: Decimal
    extend_factor: int = 1
    estimated: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Quota:
    """Per Alibaba Cloud account and model: requests per second, and tasks at once (``None``:
    no limit, as for synchronous calls)."""

    rps: float
    concurrent_tasks: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Model:
    """One model's contract. ``negative_prompt_limit`` is ``None`` when it takes none;
    ``n_api_default`` is what the service makes when ``n`` is not sent (batcher always sends
    ``n``, 1 unless the manifest says otherwise)."""

    name: str
    protocol: ApiProtocol
    purpose: str
    speed: str
    sizes: SizePolicy
    prompt_limit: int
    negative_prompt_limit: int | None
    prompt_extend_default: bool
    watermark: bool
    n_max: int
    n_api_default: int
    prices: Prices
    quota: Quota
    seed: bool = True
    n_min: int = 1
    answer_text: bool = False  # a sync answer also carries the prompt (and reasoning) as text

    @property
    def n_default(self) -> int:
        """The images one job makes when its manifest does not say: always 1."""
        return 1


class UnknownModel(ValueError):
    """A model name not in the registry; the message lists the known ones."""


def model(name: str) -> Model:
    """The registry row of ``name``; raises ``UnknownModel`` listing the known models."""
    found = MODELS.get(name)
    if found is None:
        raise UnknownModel(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return found


_D = Decimal
_Z_RATIOS = {
    "1:1": ("1024*1024", "1280*1280", "1536*1536"),
    "2:3": ("832*1248", "1024*1536", "1248*1872"),
    "3:2": ("1248*832", "1536*1024", "1872*1248"),
    "3:4": ("864*1152", "1104*1472", "1296*1728"),
    "4:3": ("1152*864", "1472*1104", "1728*1296"),
    "7:9": ("896*1152", "1120*1440", "1344*1728"),
    "9:7": ("1152*896", "1440*1120", "1728*1344"),
    "9:16": ("720*1280", "864*1536", "1152*2048"),
    "9:21": ("576*1344", "720*1680", "864*2016"),
    "16:9": ("1280*720", "1536*864", "2048*1152"),
    "21:9": ("1344*576", "1680*720", "2016*864"),
}
Z_IMAGE_SIZES = SizePolicy(
    default="1024*1536",
    min_pixels=512 * 512,
    max_pixels=2048 * 2048,
    ratios=MappingProxyType(_Z_RATIOS),
    tiers=("1024", "1280", "1536"),
    default_tier="1280",
)
_QWEN_RATIOS = {
    "16:9": ("1664*928",),
    "4:3": ("1472*1104",),
    "1:1": ("1328*1328",),
    "3:4": ("1104*1472",),
    "9:16": ("928*1664",),
}
QWEN_SIZES = SizePolicy(
    default="1328*1328",
    table=tuple(sizes[0] for sizes in _QWEN_RATIOS.values()),
    ratios=MappingProxyType(_QWEN_RATIOS),
    tiers=("1328",),
    default_tier="1328",
)
# wan2.5: two published ranges, 768²..1440² and 1280²..1440²; the second would refuse the
# model's own recommended 1104*1472 and 1472*1104, so the first is taken.
WAN25_SIZES = SizePolicy(
    default="1280*1280",
    min_pixels=768 * 768,
    max_pixels=1440 * 1440,
    max_aspect=4.0,
    ratios=MappingProxyType(
        {
            "1:1": ("1280*1280",),
            "3:4": ("1104*1472",),
            "4:3": ("1472*1104",),
            "9:16": ("960*1696",),
            "16:9": ("1696*960",),
        }
    ),
    tiers=("1280",),
    default_tier="1280",
)
# wan2.2 / wanx2.1: each side in 512..1440; no ratio table is published, these are batcher's.
WAN22_SIZES = SizePolicy(
    default="1024*1024",
    min_side=512,
    max_side=1440,
    ratios=MappingProxyType(
        {
            "1:1": ("1024*1024",),
            "2:3": ("832*1248",),
            "3:2": ("1248*832",),
            "3:4": ("864*1152",),
            "4:3": ("1152*864",),
            "9:16": ("720*1280",),
            "16:9": ("1280*720",),
        }
    ),
    tiers=("1024",),
    default_tier="1024",
)


def _qwen(name: str, purpose: str, prices: Prices, rps: float) -> Model:
    return Model(
        name=name,
        protocol=ApiProtocol.SYNC,
        purpose=purpose,
        speed="~10-20 s a call" if rps >= 1 else "2 calls a minute",
        sizes=QWEN_SIZES,
        prompt_limit=800,
        negative_prompt_limit=500,
        prompt_extend_default=True,
        watermark=True,
        n_max=1,
        n_api_default=1,
        prices=prices,
        quota=Quota(rps=rps),
    )


def _wan(
    name: str, purpose: str, sizes: SizePolicy, prices: Prices, rps: float, tasks: int
) -> Model:
    return Model(
        name=name,
        protocol=ApiProtocol.TASK,
        purpose=purpose,
        speed="task of ~10 s-2 min",
        sizes=sizes,
        prompt_limit=2000 if sizes is WAN25_SIZES else 800,
        negative_prompt_limit=500,
        prompt_extend_default=True,
        watermark=True,
        n_max=4,
        n_api_default=4,
        prices=prices,
        quota=Quota(rps=rps, concurrent_tasks=tasks),
    )


MODELS: MappingProxyType[str, Model] = MappingProxyType(
    {
        "z-image-turbo": Model(
            name="z-image-turbo",
            protocol=ApiProtocol.SYNC,
            purpose="fast, cheap catalog and dataset images",
            speed="~2-5 s a call",
            sizes=Z_IMAGE_SIZES,
            prompt_limit=800,
            negative_prompt_limit=None,
            prompt_extend_default=False,
            watermark=False,
            n_max=1,
            n_api_default=1,
            prices=Prices(
                cn=_D("0.10"), intl_cny=_D("0.110089"), intl_usd=_D("0.015"), extend_factor=2
            ),
            quota=Quota(rps=2.0),
            answer_text=True,
        ),
        "qwen-image": _qwen(
            "qwen-image",
            "legible text in the picture: posters, packaging, Chinese signage",
            Prices(cn=_D("0.25"), intl_cny=_D("0.256873"), intl_usd=_D("0.035")),
            2.0,
        ),
        "qwen-image-plus": _qwen(
            "qwen-image-plus",
            "text in the picture, a little cheaper than qwen-image",
            Prices(cn=_D("0.20"), intl_cny=_D("0.220177"), intl_usd=_D("0.030")),
            2.0,
        ),
        "qwen-image-max": _qwen(
            "qwen-image-max",
            "best text rendering and detail; slow quota",
            Prices(cn=_D("0.50"), intl_cny=_D("0.550443"), intl_usd=_D("0.075")),
            2 / 60,
        ),
        "wan2.2-t2i-flash": _wan(
            "wan2.2-t2i-flash",
            "photographic quality, fast; up to 4 images a call",
            WAN22_SIZES,
            Prices(cn=_D("0.14"), intl_cny=_D("0.183481"), intl_usd=_D("0.025")),
            2.0,
            2,
        ),
        "wan2.2-t2i-plus": _wan(
            "wan2.2-t2i-plus",
            "photographic quality, richer detail; up to 4 images a call",
            WAN22_SIZES,
            Prices(cn=_D("0.20"), intl_cny=_D("0.366962"), intl_usd=_D("0.050")),
            2.0,
            2,
        ),
        "wan2.5-t2i-preview": _wan(
            "wan2.5-t2i-preview",
            "newest Wan: long prompts (2000 characters), larger sizes, free aspect ratio",
            WAN25_SIZES,
            Prices(cn=_D("0.20"), intl_cny=_D("0.220177"), intl_usd=_D("0.030")),
            5.0,
            5,
        ),
        "wanx2.1-t2i-turbo": _wan(
            "wanx2.1-t2i-turbo",
            "older Wan, fast; up to 4 images a call",
            WAN22_SIZES,
            Prices(cn=_D("0.14"), intl_cny=_D("0.183481"), intl_usd=_D("0.025"), estimated=True),
            2.0,
            2,
        ),
    }
)
DEFAULT_MODEL = "z-image-turbo"


def model_rates(rps: float | None) -> dict[str, float]:
    """Every registered model's send rate: ``rps`` when the user gave one (``--rps``), else the
    model's published quota (the service counts each model's requests apart, per account).

    >>> model_rates(None)["qwen-image-max"], model_rates(5.0)["qwen-image-max"]
    (0.03333333333333333, 5.0)
    """
    return {name: rps or entry.quota.rps for name, entry in MODELS.items()}
