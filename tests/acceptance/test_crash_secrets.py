"""A run with a distinctive fake API key, through success, a job failure,
transient faults, `status`, `export`, `retry`, and a wrong-key stop from a server that echoes the
key back. The key (or
its distinctive part) never appears in the database (iterdump and raw bytes, WAL included), any
file of the run folder, the log, the exports, or the stdout / stderr of any command.

(The client's exceptions are checked in tests/integration/test_faults_secrets.py.)
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from aiohttp import web

from batcher.emulator import EmulatorConfig, EmulatorThread
from tests.support import ServerThread, check_invariants, run_args, run_cli

KEY = "sk-f00dfacecafe4242beefdeadc0de7777"
DISTINCT = KEY.removeprefix("sk-")


def echoing_app() -> web.Application:
    """Answers every call 401, with the caller's key in the message and the request id."""

    async def refuse(request: web.Request) -> web.Response:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        body = {
            "code": "InvalidApiKey",
            "message": f"Invalid API-key provided: {key} (Authorization: Bearer {key})",
            "request_id": f"rid-{key}",
        }
        return web.json_response(body, status=401)

    app = web.Application()
    app.router.add_post("/api/v1/{tail:.*}", refuse)
    return app


def assert_nowhere(texts: list[str], folder: Path) -> None:
    for text in texts:
        assert DISTINCT not in text, text[-2000:]
    for path in folder.rglob("*"):
        if path.is_file():
            assert DISTINCT.encode() not in path.read_bytes(), path
    con = sqlite3.connect(folder / "batcher.db")
    try:
        dump = "\n".join(con.iterdump())
    finally:
        con.close()
    assert DISTINCT not in dump


def test_the_api_key_never_leaks(tmp_path):
    out = tmp_path / "out"
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": f"s{i}", "prompt": f"a product photo {i}", "seed": i} for i in range(8)]
    rows.append({"id": "bad", "prompt": "a forbidden thing"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    env = {"DASHSCOPE_API_KEY": KEY}
    texts: list[str] = []

    def cli(*args, expect: int, **kw):
        r = run_cli(*args, env=env, **kw)
        texts.extend([r.stdout, r.stderr])
        assert r.returncode == expect, r.stderr
        return r

    cfg = EmulatorConfig(
        latency="0",
        rps=100_000.0,
        seed=9,  # its draws give a lost answer, a 500, a reset and a truncated download early
        api_key=KEY,
        moderate=("forbidden",),
        faults="500=0.15,reset=0.1,lost=0.1,truncate=0.1,corrupt=0.05",
    )
    with EmulatorThread(cfg) as emu:
        # success for most, a moderated job failed, retries and lost answers along the way
        cli(*run_args(manifest, out, emu.base_url, "--max-attempts", "10"), expect=1)
        cli("status", out, "--json", expect=0)
        cli("export", out, expect=0)
        exports = tmp_path / "exports"
        exports.mkdir()
        cli("export", out, "--format", "csv", "-o", exports / "jobs.csv", expect=0)
        faults = emu.stats()["faults_injected"]
    assert {"lost", "reset", "500", "truncate"} <= set(faults)  # the error paths were taken
    assert check_invariants(out) == {"done": 8, "failed": 1}

    # a server that echoes the key in its refusal: the run stops (exit 3), one clear line
    # (the emulator refusing a wrong key is in test_cli_run.py; this server is nastier). A
    # folder of its own: images from another endpoint never count as done in this one.
    cli("retry", out, expect=0)
    echoed = tmp_path / "echoed"
    with ServerThread(echoing_app()) as server:
        r = cli(*run_args(manifest, echoed, server.url + "/api/v1"), expect=3)
    assert "InvalidApiKey" in r.stderr and "DASHSCOPE_API_KEY" in r.stderr

    for p in exports.iterdir():
        texts.append(p.read_text(encoding="utf-8"))
    for folder in (out, echoed):
        assert_nowhere(texts, folder)
        assert (folder / "batcher.log").stat().st_size > 0
        check_invariants(folder)
