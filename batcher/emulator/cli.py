"""The ``emulate`` subcommand: serve the emulator until SIGINT or SIGTERM.

On start it prints exactly one line on stdout, containing ``http://HOST:PORT``, so that scripts
can find the port it picked; everything else goes to stderr. Example::

    $ batcher emulate --port 0 --latency 0 --faults 500=0.05,reset=0.01 --seed 7
    DashScope emulator listening on http://127.0.0.1:41837 (base URL http://127.0.0.1:41837/api/v1)

Several accounts (``--account NAME=ENVVAR[,ENVVAR]``, repeatable) take their keys from the
environment: keys of one account share its quota, each account has its own::

    $ KEY_A1=sk-a1 KEY_A2=sk-a2 KEY_B=sk-b batcher emulate --account a=KEY_A1,KEY_A2 \
        --account b=KEY_B
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import sys
from collections.abc import Mapping

from batcher.emulator.config import EmulatorConfig
from batcher.wording import plural

__all__ = ["accounts_from_env", "config_from_args", "configure_parser", "run"]

_DEFAULTS = EmulatorConfig()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's options to ``parser``."""
    parser.add_argument("--host", default=_DEFAULTS.host, help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=_DEFAULTS.port, help="port to listen on (0: a free one)"
    )
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="accept only this key (default: any key that starts with sk-)",
    )
    parser.add_argument(
        "--account",
        action="append",
        default=[],
        metavar="NAME=ENVVAR[,ENVVAR]",
        help="an account whose keys are in these environment variables (repeatable): keys of "
        "one account share its quota, accounts have their own; any other key gets 401 "
        "InvalidApiKey",
    )
    parser.add_argument(
        "--rps",
        type=float,
        default=_DEFAULTS.rps,
        help="z-image-turbo's accepted requests per second per key (other models keep their "
        "own published quota); inf for no quota at all (default: 2)",
    )
    parser.add_argument(
        "--latency",
        default=_DEFAULTS.latency,
        metavar="SPEC",
        help="MS or lognormal:MEDIAN_MS:SIGMA (default: %(default)s)",
    )
    parser.add_argument(
        "--faults",
        default=_DEFAULTS.faults,
        metavar="SPEC",
        help="kind=fraction,... with kinds 500 503 429 reset lost hang truncate corrupt "
        "free-quota poll-500 poll-reset task-failed task-partial or a documented error code "
        "(default: none)",
    )
    parser.add_argument(
        "--task-seconds",
        default=_DEFAULTS.task_seconds,
        metavar="SPEC",
        help="how long an async task takes: S or lognormal:MEDIAN_S:SIGMA (default: %(default)s)",
    )
    parser.add_argument(
        "--task-ttl",
        type=float,
        default=_DEFAULTS.task_ttl,
        metavar="SECONDS",
        help="how long a task can be queried before it reads UNKNOWN (default: 86400)",
    )
    parser.add_argument(
        "--moderate",
        action="append",
        default=[],
        metavar="WORD",
        help="a prompt containing WORD gets 400 DataInspectionFailed (repeatable)",
    )
    parser.add_argument(
        "--url-ttl",
        type=float,
        default=_DEFAULTS.url_ttl,
        metavar="SECONDS",
        help="lifetime of image URLs (default: 86400)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="make faults and latencies reproducible"
    )
    parser.add_argument(
        "--retry-after",
        default=None,
        metavar="VALUE",
        help="Retry-After header value to send with every 429 (default: none)",
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=_DEFAULTS.max_images,
        metavar="N",
        help="how many issued images stay downloadable (default: %(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The :class:`EmulatorConfig` the parsed options describe (``ValueError`` if invalid)."""
    return EmulatorConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        rps=args.rps,
        latency=args.latency,
        faults=args.faults,
        moderate=tuple(args.moderate),
        url_ttl=args.url_ttl,
        seed=args.seed,
        retry_after=args.retry_after,
        max_images=args.max_images,
        task_seconds=args.task_seconds,
        task_ttl=args.task_ttl,
        accounts=accounts_from_env(args.account),
    )


def accounts_from_env(
    specs: list[str], environ: Mapping[str, str] | None = None
) -> dict[str, tuple[str, ...]]:
    """``--account NAME=ENVVAR[,ENVVAR]`` items as accounts and their keys, read from the
    environment (keys never go on a command line, where ``ps`` shows them). ``ValueError``
    for a bad item or a variable that is not set (named, never its value)."""
    env = os.environ if environ is None else environ
    accounts: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        name, sep, names = spec.partition("=")
        name = name.strip()
        variables = [v.strip() for v in names.split(",") if v.strip()]
        if not sep or not name or not variables:
            raise ValueError(f"invalid --account {spec!r}: expected NAME=ENVVAR[,ENVVAR]")
        if name in accounts:
            raise ValueError(f"invalid --account: account {name!r} is given twice")
        keys = []
        for variable in variables:
            key = env.get(variable, "").strip()
            if not key:
                raise ValueError(
                    f"--account {name}: the environment variable {variable} is not set"
                )
            keys.append(key)
        accounts[name] = tuple(keys)
    return accounts


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; the exit status (0 after a clean stop)."""
    import asyncio  # here: every command builds this parser, and few serve

    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"batcher emulate: error: {exc}", file=sys.stderr)
        return 2
    if not _is_loopback(config.host):
        print(
            f"batcher emulate: warning: listening on {config.host}, not only on loopback",
            file=sys.stderr,
        )
    try:
        return asyncio.run(_serve(config))
    except BrokenPipeError:
        raise  # stdout closed by its reader: the command line's concern, not a listen error
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(
            f"batcher emulate: error: cannot listen on {config.host}:{config.port}: {reason}",
            file=sys.stderr,
        )
        return 1


async def _serve(config: EmulatorConfig) -> int:
    import asyncio

    from batcher.emulator.server import running_emulator  # aiohttp: only to serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    async with running_emulator(config) as emulator:
        print(
            f"DashScope emulator listening on {emulator.root_url} (base URL {emulator.base_url})",
            flush=True,
        )
        await stop.wait()
        stats = emulator.stats()
    print(
        f"batcher emulate: stopped after "
        f"{plural(stats['generate_requests'], 'generation request')}, "
        f"{plural(stats['images_billed'], 'image')} billed, "
        f"{plural(stats['downloads'], 'download')}",
        file=sys.stderr,
    )
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
