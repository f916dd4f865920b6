"""The baseline: the script a capable user writes without batcher.

The official ``dashscope`` SDK's ``MultiModalConversation.call`` in a ``ThreadPoolExecutor``;
each thread keeps one ``requests.Session`` (passed to the SDK with ``session=`` and used for the
download, so connections are reused); a retry with exponential backoff and full jitter on 429,
5xx and connection errors; each image downloaded with ``requests`` into a folder (written to a
temporary name, then renamed). With ``--rps`` a simple client-side limiter spaces the calls
evenly at that rate, as a user who knows the quota would add.

What it does not do, and batcher does: record anything durable (a crash loses track of what was
paid for), verify the PNG, hash it, or adapt to the real quota.

Run it on its own against a CSV manifest (``id,prompt,size,seed``); without ``--base-url`` it
starts the project's emulator (zero latency, no quota) in a subprocess::

    python -m bench.baseline_sdk [MANIFEST] [--out DIR] [--workers 16] [--rps R] [--json]

It prints a table, or with ``--json`` one JSON object with its counters.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import dashscope
import requests
from dashscope import MultiModalConversation

MODEL = "z-image-turbo"


class RateLimiter:
    """Evenly spaced send slots at ``rate`` per second, shared by every thread."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.lock = threading.Lock()
        self.next_slot = time.monotonic()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            slot = max(now, self.next_slot)
            self.next_slot = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


@dataclass
class Counters:
    jobs: int = 0
    done: int = 0
    failed: int = 0
    calls: int = 0
    throttled: int = 0
    server_errors: int = 0
    connection_errors: int = 0
    download_retries: int = 0
    bytes: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    send_times: list[float] = field(default_factory=list, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


_local = threading.local()


def session() -> requests.Session:
    """This thread's session: connections are reused across calls and downloads."""
    s: requests.Session | None = getattr(_local, "session", None)
    if s is None:
        s = _local.session = requests.Session()
    return s


def backoff(attempt: int, base: float, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0.0, min(cap, base * 2 ** (attempt - 1)))


def download(url: str, path: Path, counters: Counters, attempts: int = 4) -> None:
    temp = path.with_name(path.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            with session().get(url, timeout=60) as reply:
                reply.raise_for_status()
                data = reply.content
            temp.write_bytes(data)
            os.replace(temp, path)
            counters.add("bytes", len(data))
            return
        except (requests.RequestException, OSError):
            if attempt == attempts:
                raise
            counters.add("download_retries")
            time.sleep(backoff(attempt, 0.5))


def run_job(
    job: dict[str, str],
    *,
    api_key: str,
    out: Path,
    limiter: RateLimiter | None,
    max_attempts: int,
    backoff_base: float,
    counters: Counters,
) -> None:
    messages = [{"role": "user", "content": [{"text": job["prompt"]}]}]
    extra: dict[str, Any] = {}
    if job.get("seed"):
        extra["seed"] = int(job["seed"])
    code = "unknown"
    for attempt in range(1, max_attempts + 1):
        if limiter is not None:
            limiter.wait()
        counters.send_times.append(time.time())
        counters.add("calls")
        try:
            response: Any = MultiModalConversation.call(
                model=MODEL,
                messages=messages,
                api_key=api_key,
                size=job.get("size") or "1024*1024",
                prompt_extend=False,
                session=session(),
                **extra,
            )
        except requests.RequestException as exc:
            counters.add("connection_errors")
            code = type(exc).__name__
        else:
            status = response.status_code
            if status == 200:
                url = response.output.choices[0].message.content[0]["image"]
                try:
                    download(url, out / f"{job['id']}.png", counters)
                except (requests.RequestException, OSError) as exc:
                    code = f"download.{type(exc).__name__}"
                    break
                counters.add("done")
                return
            code = str(response.code or status)
            if status == 429:
                counters.add("throttled")
            elif status >= 500:
                counters.add("server_errors")
            else:
                break  # a 4xx other than 429: retrying will not help
        if attempt < max_attempts:
            time.sleep(backoff(attempt, backoff_base))
    counters.add("failed")
    with counters.lock:
        counters.failures[code] = counters.failures.get(code, 0) + 1


def read_jobs(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def run(
    jobs: list[dict[str, str]],
    *,
    base_url: str,
    api_key: str,
    out: Path,
    workers: int,
    rps: float | None,
    max_attempts: int = 10,
    backoff_base: float = 1.0,
) -> dict[str, Any]:
    """Generate and download every job; return the counters as JSON-ready data."""
    dashscope.base_http_api_url = base_url
    out.mkdir(parents=True, exist_ok=True)
    counters = Counters(jobs=len(jobs))
    limiter = RateLimiter(rps) if rps else None
    started = time.time()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [
            pool.submit(
                run_job,
                job,
                api_key=api_key,
                out=out,
                limiter=limiter,
                max_attempts=max_attempts,
                backoff_base=backoff_base,
                counters=counters,
            )
            for job in jobs
        ]:
            future.result()
    elapsed = time.perf_counter() - t0
    sends = sorted(counters.send_times)
    span = sends[-1] - sends[0] if len(sends) > 1 else 0.0
    skip = ("send_times", "lock")
    data = {f.name: getattr(counters, f.name) for f in fields(counters) if f.name not in skip}
    data.update(
        workers=workers,
        rps=rps,
        elapsed_seconds=elapsed,
        started_at=started,
        first_call_at=sends[0] if sends else None,
        send_span_seconds=span,
        calls_per_second=(len(sends) - 1) / span if span > 0 else None,
        accepted_per_second=(len(sends) - counters.throttled - 1) / span if span > 0 else None,
    )
    return data


def _jobs_from(path: Path | None, n: int) -> Iterator[dict[str, str]]:
    if path is not None:
        yield from read_jobs(path)
        return
    from .manifests import prompt_for

    for i in range(n):
        yield {"id": f"job{i:07d}", "prompt": prompt_for(i), "size": "512*512", "seed": str(i)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.baseline_sdk", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("manifest", nargs="?", type=Path, help="CSV with id,prompt,size,seed")
    parser.add_argument("--out", type=Path, help="image folder (default bench/_work/baseline)")
    parser.add_argument("--base-url", help="API base URL ending in /api/v1 (default: emulator)")
    parser.add_argument("--workers", type=int, default=16, help="threads (default 16)")
    parser.add_argument("--rps", type=float, help="client-side rate limit, calls per second")
    parser.add_argument("--max-attempts", type=int, default=10)
    parser.add_argument("--backoff-base", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="200 jobs rather than 1,000")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    from .common import WORK, EmulatorProcess
    from .report import fmt, table

    jobs = list(_jobs_from(args.manifest, 200 if args.quick else 1000))
    out = args.out or WORK / "baseline" / "images"
    api_key = os.environ.get("DASHSCOPE_API_KEY", "sk-baseline")
    emulator = None
    base_url = args.base_url
    if base_url is None:
        emulator = EmulatorProcess(latency="0", rps="inf").start()
        base_url = emulator.base_url
    try:
        data = run(
            jobs,
            base_url=base_url,
            api_key=api_key,
            out=out,
            workers=args.workers,
            rps=args.rps,
            max_attempts=args.max_attempts,
            backoff_base=args.backoff_base,
        )
    finally:
        if emulator is not None:
            emulator.stop()
    if args.json:
        print(json.dumps(data))
    else:
        rows = [(k, v) for k, v in data.items() if not isinstance(v, dict)]
        print("\n".join(table(["baseline_sdk", "value"], [(k, fmt(v)) for k, v in rows])))
    return 0 if data["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
