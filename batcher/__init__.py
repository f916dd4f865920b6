"""batcher: a manifest of prompts in, a folder of images out (DashScope z-image-turbo).

The command line (``batcher run``, ``plan``, ``status``, ``export``, ``retry``, ``emulate``) is
the main surface; these names are for programs that drive a run themselves::

    async with await JobStore.open("out/catalog/batcher.db") as store:
        async with aiohttp.ClientSession() as session:
            client = DashScopeClient(session, base_url=REGIONS["intl"], api_key=key)
            runner = Runner(store=store, client=client, session=session,
                            layout=RunLayout(Path("out/catalog")), options=RunOptions(rps=2))
            result = await runner.run()
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
    ApiError,
    BatcherError,
    ConfigError,
    DownloadError,
    PermanentJobError,
    RunAborted,
    TransientError,
    TransportError,
)
from .layout import RunLayout

if TYPE_CHECKING:
    from .client import REGIONS, DashScopeClient, ImageResult
    from .pool import Runner, RunOptions, RunResult, StopReason
    from .pricing import Money, price_per_image

__all__ = [
    "REGIONS",
    "ApiError",
    "BatcherError",
    "ConfigError",
    "DashScopeClient",
    "DownloadError",
    "ImageResult",
    "Money",
    "PermanentJobError",
    "RunAborted",
    "RunLayout",
    "RunOptions",
    "RunResult",
    "Runner",
    "StopReason",
    "TransientError",
    "TransportError",
    "__version__",
    "price_per_image",
]

__version__ = "0.1.0"

# The client and the pool (aiohttp) are imported on first use, so that commands which never
# call the service (``batcher export``, ``status``) start without them.
_LAZY = {
    "REGIONS": "client",
    "DashScopeClient": "client",
    "ImageResult": "client",
    "Runner": "pool",
    "RunOptions": "pool",
    "RunResult": "pool",
    "StopReason": "pool",
    "Money": "pricing",
    "price_per_image": "pricing",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
