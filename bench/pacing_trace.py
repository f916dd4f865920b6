"""The pacing profile: when batcher's dispatcher asked for a send slot, and when calls went out.

A sampling profiler says nothing about pacing (the process is idle most of the time); what
matters is *when* each call leaves. This runs the real ``batcher run`` CLI in-process (its
``main``) against a pinned emulator, with :class:`batcher.pacing.RateController`'s ``reserve``
and ``sent`` and :meth:`jobs.JobStore.claim` wrapped to record their times, and prints:

* how late the dispatcher reserved each slot against the earliest time the pacer allowed;
* the gap between consecutive sends against ``1/rate``, hence the rate lost to lateness;
* how long the store's claims took (they run on the dispatcher's path).

Run: ``python -m bench.pacing_trace [--jobs 200] [--rps 10]`` (the emulator gets the same quota).
When run with ``--child`` it is the wrapped CLI itself (used by the parent, not by hand).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

TRACE_ENV = "BENCH_PACING_TRACE"


def _child(argv: list[str], trace_path: Path) -> int:
    """Run ``batcher`` with the pacer and the claim wrapped; write the trace as JSON."""
    import anyio

    from batcher import cli, pacing
    from jobs.store import JobStore

    reserves: list[tuple[float, float, float]] = []  # (now, earliest allowed, rate)
    sends: list[float] = []
    claims: list[tuple[float, int]] = []  # (seconds, jobs)

    original_reserve = pacing.RateController.reserve
    original_sent = pacing.RateController.sent
    original_claim = JobStore.claim

    def reserve(self: Any, *, now: float) -> float:
        earliest = self._next_slot
        reserves.append((now, earliest, self.rate))
        return original_reserve(self, now=now)

    def sent(self: Any, *, at: float) -> None:
        sends.append(at)
        original_sent(self, at=at)

    async def claim(self: Any, **kwargs: Any) -> Any:
        started = anyio.current_time()
        result = await original_claim(self, **kwargs)
        claims.append((anyio.current_time() - started, len(result)))
        return result

    pacing.RateController.reserve = reserve  # type: ignore[method-assign]
    pacing.RateController.sent = sent  # type: ignore[method-assign]
    JobStore.claim = claim  # type: ignore[method-assign]
    try:
        return cli.main(argv)
    finally:
        trace_path.write_text(json.dumps({"reserves": reserves, "sends": sends, "claims": claims}))


def analyse(trace: dict[str, Any]) -> dict[str, float]:
    reserves = trace["reserves"]
    sends = sorted(trace["sends"])
    claims = trace["claims"]
    late = [now - earliest for now, earliest, _ in reserves[1:]]
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    rate = statistics.median(r for _, _, r in reserves)
    gap = statistics.median(gaps) if gaps else float("nan")
    return {
        "reservations": len(reserves),
        "late_share": sum(1 for x in late if x > 0) / max(1, len(late)),
        "late_median_ms": 1000 * statistics.median(late) if late else 0.0,
        "late_p90_ms": 1000 * sorted(late)[int(0.9 * (len(late) - 1))] if late else 0.0,
        "pacer_rate": rate,
        "send_gap_median_s": gap,
        "send_gap_expected_s": 1 / rate,
        "sends_per_s": (len(sends) - 1) / (sends[-1] - sends[0]) if len(sends) > 1 else 0.0,
        "lost_to_lateness": 1 - (1 / rate) / gap if gaps else 0.0,
        "claims": len(claims),
        "claim_median_ms": 1000 * statistics.median(c for c, _ in claims) if claims else 0.0,
        "claim_max_ms": 1000 * max(c for c, _ in claims) if claims else 0.0,
        "claim_mean_jobs": statistics.mean(n for _, n in claims) if claims else 0.0,
    }


def trace_run(jobs: int, rps: float, latency: str = "lognormal:1000:0.4") -> dict[str, float]:
    """Run the traced CLI against a fresh emulator with quota ``rps``; the analysed trace."""
    from .common import PYTHON, ROOT, EmulatorProcess, pin_self, run_measured, split_cores, work_dir
    from .manifests import cached_manifest

    work = work_dir("pacing_trace")
    manifest = cached_manifest(jobs)
    trace_path = work / "trace.json"
    client_cores, server_core = split_cores()
    with EmulatorProcess(latency=latency, rps=f"{rps:g}", core=server_core) as emu:
        pin_self(client_cores)
        command = [
            PYTHON,
            "-m",
            "bench.pacing_trace",
            "--child",
            str(trace_path),
            "run",
            str(manifest),
            "--out",
            str(work / "run"),
            "--base-url",
            emu.base_url,
            "--rps",
            f"{rps:g}",
            "--json",
            "--no-progress",
        ]
        run_measured(command, cwd=ROOT, timeout=4 * jobs / rps + 60, logs=work / "run.log").check()
        figures = analyse(json.loads(trace_path.read_text()))
        figures["throttled"] = emu.stats()["throttled"]
    return figures


def describe(f: dict[str, float]) -> list[str]:
    return [
        f"- {f['reservations']:.0f} slots reserved; {f['late_share']:.0%} of them after the "
        f"earliest time the pacer allowed, by {f['late_median_ms']:.2f} ms median "
        f"({f['late_p90_ms']:.2f} ms p90): the dispatcher's wake-up lateness.",
        f"- pacer rate {f['pacer_rate']:.2f}/s "
        f"(1/rate = {1000 * f['send_gap_expected_s']:.1f} ms); "
        f"median gap between sends {1000 * f['send_gap_median_s']:.1f} ms: "
        f"{f['lost_to_lateness']:.1%} of the rate lost to lateness; sends "
        f"{f['sends_per_s']:.2f}/s; {f['throttled']:.0f} throttled.",
        f"- {f['claims']:.0f} store claims of {f['claim_mean_jobs']:.1f} jobs on average, "
        f"{f['claim_median_ms']:.1f} ms median, {f['claim_max_ms']:.1f} ms max.",
    ]


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return _child(sys.argv[3:], Path(sys.argv[2]))
    parser = argparse.ArgumentParser(
        prog="python -m bench.pacing_trace", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rps", type=float, default=10.0)
    args = parser.parse_args()
    print("\n".join(describe(trace_run(args.jobs, args.rps))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
