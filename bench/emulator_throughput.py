"""How many generation-plus-download pairs a second the emulator serves on one core.

The emulator runs as ``python -m batcher.emulator --latency 0 --rps inf`` in a separate process
pinned to one core; this process (pinned to the other cores, when there are any) drives it with
an aiohttp client: ``--concurrency`` workers each POST a generation for a 512*512 image with a
distinct prompt of about ``--prompt-words`` words, then GET the image URL and read the PNG.
After ``--warmup`` pairs it times ``--pairs`` pairs and prints:

* pairs/s, wall clock, as the client saw it;
* the emulator's CPU time over the same span (from /proc), hence its CPU use and the pairs per
  emulator CPU-second: the rate one fully busy core would sustain. When the client is the
  bottleneck (the emulator's core is not saturated), this second figure is the emulator's
  capacity and the first only a lower bound.

Run: ``.venv/bin/python -m bench.emulator_throughput [--pairs 5000] [--concurrency 32]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aiohttp

from .common import EmulatorProcess, cpu_seconds, pin_self, split_cores

GENERATION = "/services/aigc/multimodal-generation/generation"
PROMPT = "a watercolour fox in a snowy forest at dawn with soft light and long shadows"
WORDS = tuple(PROMPT.split())


async def _drive(
    base_url: str, warmup: int, pairs: int, concurrency: int, prompt_words: int, pid: int
) -> None:
    body_template = {
        "model": "z-image-turbo",
        "input": {"messages": [{"role": "user", "content": [{"text": ""}]}]},
        "parameters": {"size": "512*512", "prompt_extend": False},
    }
    headers = {"Authorization": "Bearer sk-bench"}
    total = warmup + pairs
    issued = 0
    marks: dict[str, float] = {}
    done = 0
    image_bytes = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal issued, done, image_bytes
        while issued < total:
            number = issued
            issued += 1
            words = list(WORDS * (1 + prompt_words // len(WORDS)))[: prompt_words - number % 4]
            text = " ".join(words) + f" #{number}"
            body = {
                **body_template,
                "input": {"messages": [{"role": "user", "content": [{"text": text}]}]},
                "parameters": {"size": "512*512", "seed": number},
            }
            async with session.post(base_url + GENERATION, json=body, headers=headers) as reply:
                reply.raise_for_status()
                payload = await reply.json()
            url = payload["output"]["choices"][0]["message"]["content"][0]["image"]
            async with session.get(url, headers=None) as image:
                image.raise_for_status()
                image_bytes += len(await image.read())
            done += 1
            if done == warmup:
                marks["start"] = time.perf_counter()
                marks["cpu_start"] = cpu_seconds(pid)
            if done == total:
                marks["end"] = time.perf_counter()
                marks["cpu_end"] = cpu_seconds(pid)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    wall = marks["end"] - marks["start"]
    cpu = marks["cpu_end"] - marks["cpu_start"]
    print(
        f"pairs measured: {pairs} (after {warmup} warm-up), concurrency {concurrency}, "
        f"prompts of about {prompt_words} words"
    )
    print(f"mean PNG size: {image_bytes / total / 1024:.1f} KiB (512*512)")
    print(f"throughput: {pairs / wall:,.0f} pairs/s wall clock ({wall:.2f} s)")
    print(f"emulator CPU: {cpu:.2f} s = {100 * cpu / wall:.0f}% of one core")
    if cpu > 0:
        print(f"capacity: {pairs / cpu:,.0f} pairs per emulator CPU-second")


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=20, help="words per prompt (about)")
    args = parser.parse_args()

    client_cores, server_core = split_cores()
    emulator = EmulatorProcess(latency="0", rps="inf", core=server_core).start()
    pin_self(client_cores)
    where = f"core {server_core}" if server_core is not None else "a shared core"
    print(f"emulator pid {emulator.pid} pinned to {where}; client on cores {sorted(client_cores)}")
    try:
        asyncio.run(
            _drive(
                emulator.base_url,
                args.warmup,
                args.pairs,
                args.concurrency,
                max(5, args.prompt_words),
                emulator.pid,
            )
        )
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
