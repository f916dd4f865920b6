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

from .client import REGIONS, DashScopeClient, ImageResult
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
