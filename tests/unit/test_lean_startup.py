"""Commands that never call the service start without loading what only a run needs
(aiohttp, the pool, the emulator's server, rich, pyarrow, the manifest readers)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
sys.argv = ["batcher", *json.loads(sys.argv[1])]
from batcher.cli import build_parser
build_parser().parse_args(sys.argv[1:])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {"aiohttp", "pyarrow",
      "rich"} or m in {"batcher.emulator.server", "batcher.pool", "jobs.manifest"})))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "DIR", "--format", "webdataset", "-o", "OUT"],
        ["export", "DIR"],
        ["status", "DIR"],
        ["retry", "DIR"],
    ],
)
def test_reading_commands_do_not_import_the_client_or_the_emulator(argv: list[str]) -> None:
    """The CLI module and the parser alone, in a fresh interpreter: none of the heavy modules."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argv)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(done.stdout) == []


def test_the_package_still_offers_its_names_on_first_use() -> None:
    """``batcher.Runner`` and friends load the pool when asked for."""
    code = (
        "import sys, batcher; assert 'aiohttp' not in sys.modules; "
        "from batcher import Runner, DashScopeClient, REGIONS, Money; "
        "import batcher.emulator as e; e.running_emulator; "
        "assert 'aiohttp' in sys.modules; print(Runner.__module__, DashScopeClient.__module__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["batcher.pool", "batcher.client"]
