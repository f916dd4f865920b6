"""``batcher``: the command line.

    batcher plan MANIFEST|DIR [--out DIR]        validate and import; no API call
    batcher run MANIFEST|DIR [--out DIR] [...]   generate every image (see --help)
    batcher status DIR [--json]                  counts per state, failures by code
    batcher export DIR [--format jsonl|csv|parquet|webdataset] [-o PATH] [...]
    batcher retry DIR [--code CODE]              failed jobs back to pending
    batcher cancel DIR                           cancel the folder's tasks not yet started
    batcher redo DIR [--rejected] [--id ID ...]  done jobs made again, old images kept
    batcher report DIR [-o PATH] [--db URL]      a static report with a gallery (file://)
    batcher review DIR [--port N] [--host H]     the report served locally, with review marks
    batcher emulate [--port 0] [...]             the built-in DashScope emulator

Every command but emulate takes ``--db URL`` (or ``BATCHER_DATABASE_URL``) for a run whose
table is in PostgreSQL; a folder made so remembers the URL (``DIR/batcher.database``).

User mistakes end as one line on stderr and exit code 2; a bug shows a traceback.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.errors import JobStoreError, ManifestInvalid, StoreUnavailable

from .errors import BatcherError, ConfigError, LanesInvalid
from .exitcodes import ExitCode
from .export import ExportOptions, parse_shard_size

# The commands, anyio and the job store (SQLAlchemy) are imported when a command needs them:
# ``batcher export --format webdataset`` of a run folder needs none of them
# (:mod:`batcher.leanexport`), and their import was most of its start-up.

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

__all__ = ["build_parser", "main"]


def _number(kind: Callable[[str], float], text: str) -> float:
    try:
        value = kind(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number: {text!r}")
    return value


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    """An argparse type: a finite number above zero (``inf``, ``nan``, 0 and -1 refused)."""

    def parse(text: str) -> Any:
        value = _number(kind, text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def _non_negative(kind: Callable[[str], float]) -> Callable[[str], Any]:
    """An argparse type: a finite number, zero or more."""

    def parse(text: str) -> Any:
        value = _number(kind, text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be zero or more: {text!r}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, except that a closed stdout is not silently ignored while printing help:
    the command then exits as any other whose reader went away (see :func:`main`)."""

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if message:
            (file or sys.stderr).write(message)


def _port(text: str) -> int:
    """A TCP port for ``--port``: 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535: {text!r}")
    return value


_COMMANDS = (
    *("plan", "run", "status", "export", "retry", "redo", "report", "review", "cancel"),
    "emulate",
)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser: of the command ``argv`` (the command's arguments,
    ``sys.argv`` by default) names, when it names one (the others' parsers, built for nothing,
    were a tenth of an export's start-up); of every command otherwise (``batcher --help``, a
    command misspelt)."""
    args = sys.argv[1:] if argv is None else list(argv)
    named = next((a for a in args if not a.startswith("-")), None)

    def wanted(command: str) -> bool:
        return named not in _COMMANDS or named == command

    parser = _Parser(
        prog="batcher",
        description="Turn a manifest of prompts into a folder of images with DashScope's "
        "text-to-image models (z-image-turbo, Qwen-Image, Wan).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"batcher {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    if wanted("plan"):
        plan = sub.add_parser("plan", help="validate and import a manifest; no API call")
        plan.add_argument("manifest", type=Path, help="a manifest, or a run folder to plan again")
        plan.add_argument("--out", type=Path, help="run folder (default out/<manifest name>)")
        plan.add_argument("--replace", action="store_true", help="reset jobs whose content changed")
        plan.add_argument("--region", choices=["intl", "cn"], default="intl")
        plan.add_argument(
            "--rps",
            type=_positive(float),
            help="quota per model the time is estimated at (default: each model's published one)",
        )
        plan.add_argument(
            "--emulate", action="store_true", help="plan the rehearsal (out/<name>.emulated)"
        )
        plan.add_argument(
            "--lanes",
            type=Path,
            metavar="FILE",
            help="estimate with the lanes of this file (their region's prices, their quotas)",
        )
        plan.add_argument("--json", action="store_true", help="print a JSON object")
        _add_db(plan)

    if wanted("run"):
        run = sub.add_parser("run", help="generate every image of a manifest")
        run.add_argument("manifest", type=Path, help="a manifest, or a run folder to resume")
        run.add_argument(
            "--out",
            type=Path,
            help="run folder (default out/<manifest name>, out/<manifest name>.emulated with "
            "--emulate)",
        )
        run.add_argument(
            "--concurrency",
            type=_positive(int),
            help="jobs in flight: calls, downloads, writes (default: from the rate)",
        )
        run.add_argument(
            "--rps",
            type=_positive(float),
            help="quota per model, requests/s (default: each model's published quota, 2 for most)",
        )
        run.add_argument("--max-attempts", type=_positive(int), default=5)
        run.add_argument("--request-timeout", type=_positive(float), default=120.0, metavar="S")
        run.add_argument("--region", choices=["intl", "cn"], default="intl")
        run.add_argument("--base-url", help="API base URL ending in /api/v1 (overrides --region)")
        run.add_argument(
            "--lanes",
            type=Path,
            metavar="FILE",
            help="several API keys, each paced on its own: a YAML file of lanes (name, key_env, "
            "region or base_url, quota, models, weight); see the README",
        )
        run.add_argument(
            "--emulate",
            action="store_true",
            help="run against the built-in emulator (no key needed)",
        )
        run.add_argument("--emulate-latency", default="lognormal:2000:0.4", help=argparse.SUPPRESS)
        run.add_argument("--emulate-faults", default="", help=argparse.SUPPRESS)
        # the emulated quota: --rps unless given (a rehearsal at --rps 5 meets a 5/s quota)
        run.add_argument(
            "--emulate-rps", type=_positive(float), default=None, help=argparse.SUPPRESS
        )
        run.add_argument("--limit", type=_positive(int), help="generate at most N images (a trial)")
        run.add_argument(
            "--budget",
            metavar="AMOUNT",
            help="stop before the run folder's spend would pass AMOUNT, in the region's currency "
            "unless named (5CNY, 2.5USD)",
        )
        run.add_argument("--replace", action="store_true", help="reset jobs whose content changed")
        run.add_argument(
            "--grace",
            type=_non_negative(float),
            default=10.0,
            help="seconds to let calls finish on Ctrl-C",
        )
        run.add_argument("--lease", type=_positive(float), default=60.0, help=argparse.SUPPRESS)
        run.add_argument(
            "--backoff-base", type=_positive(float), default=1.0, help=argparse.SUPPRESS
        )
        run.add_argument("--seed", type=int, help=argparse.SUPPRESS)
        run.add_argument("--start-rps", type=_positive(float), default=2.0, help=argparse.SUPPRESS)
        run.add_argument(
            "--unreachable-timeout",
            type=_non_negative(float),
            default=180.0,
            metavar="S",
            help="stop (exit 3) when the service or the job database cannot be reached for this "
            "long (default 180)",
        )
        run.add_argument("--no-progress", action="store_true", help="no progress display")
        run.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
        _add_db(run)

    if wanted("status"):
        status = sub.add_parser("status", help="counts per state and failures by code")
        status.add_argument("folder", type=Path)
        status.add_argument("--json", action="store_true")
        _add_db(status)

    if wanted("export"):
        export = sub.add_parser(
            "export", help="the jobs as JSONL or CSV records, or Parquet / WebDataset shards"
        )
        export.add_argument("folder", type=Path)
        export.add_argument(
            "--format",
            choices=["jsonl", "csv", "parquet", "webdataset"],
            help="default: from -o's extension (.jsonl, .csv), else jsonl",
        )
        export.add_argument(
            "-o",
            "--output",
            type=Path,
            help="file to write (default stdout); a folder for parquet and webdataset",
        )
        export.add_argument(
            "--shard-size",
            default="500MB",
            metavar="SIZE",
            help="parquet/webdataset: bytes per shard, e.g. 500MB, 1GiB (default 500MB)",
        )
        export.add_argument(
            "--state",
            choices=["done", "failed", "all"],
            help="which jobs (default: done for shards, all for records)",
        )
        export.add_argument(
            "--no-embed",
            action="store_true",
            help="parquet: name each image by its path instead of embedding its bytes",
        )
        _add_db(export)

    if wanted("retry"):
        retry = sub.add_parser("retry", help="put failed jobs back to pending")
        retry.add_argument("folder", type=Path)
        retry.add_argument("--code", help="only jobs that failed with this error code")
        _add_db(retry)

    if wanted("redo"):
        redo = sub.add_parser(
            "redo", help="put done jobs back to pending with a new seed; their images are kept"
        )
        redo.add_argument("folder", type=Path)
        redo.add_argument("--rejected", action="store_true", help="every job marked rejected")
        redo.add_argument(
            "--id", dest="ids", action="extend", nargs="+", default=[], metavar="ID", help="job ids"
        )
        seeds = redo.add_mutually_exclusive_group()
        seeds.add_argument(
            "--new-seed",
            action="store_true",
            help="a new random seed (the default without --prompt)",
        )
        seeds.add_argument("--seed", type=int, help="this seed for every job redone")
        redo.add_argument(
            "--prompt", help="a new prompt (keeps each seed unless --new-seed/--seed)"
        )
        redo.add_argument(
            "--dry-run", action="store_true", help="print what would be done, do nothing"
        )
        _add_db(redo)

    if wanted("report"):
        report = sub.add_parser("report", help="write a static report: figures, charts, a gallery")
        report.add_argument("folder", type=Path)
        report.add_argument("-o", "--output", type=Path, help="report folder (default DIR/report)")
        _add_db(report)

    if wanted("review"):
        review = sub.add_parser("review", help="serve the report locally with approve/reject/notes")
        review.add_argument("folder", type=Path)
        review.add_argument("--port", type=_port, default=8642, help="port (0: any free one)")
        review.add_argument(
            "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1 only)"
        )
        _add_db(review)

    if wanted("cancel"):
        cancel = sub.add_parser(
            "cancel", help="cancel the folder's asynchronous tasks the service has not started"
        )
        cancel.add_argument("folder", type=Path)
        cancel.add_argument("--region", choices=["intl", "cn"], default="intl")
        cancel.add_argument(
            "--base-url", help="API base URL ending in /api/v1 (overrides --region)"
        )
        cancel.add_argument(
            "--lanes", type=Path, metavar="FILE", help="cancel each task with its lane's key"
        )
        _add_db(cancel)

    if wanted("emulate"):
        emulate = sub.add_parser("emulate", help="serve the built-in DashScope emulator")
        if named == "emulate":  # its options import the emulator's settings and models
            from .emulator.cli import configure_parser

            configure_parser(emulate)
    return parser


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        metavar="URL",
        help="keep the run's job table in PostgreSQL (postgresql://user@host/dbname, one "
        "database per run) instead of DIR/batcher.db; default $BATCHER_DATABASE_URL",
    )


def _database(args: argparse.Namespace) -> str | None:
    """``--db``, else ``BATCHER_DATABASE_URL`` (a default: not for a run folder that has its
    own ``batcher.db``, see :func:`batcher.layout.env_database`); None for the run folder's
    SQLite file, or the database it remembers (:meth:`batcher.layout.RunLayout.locate`)."""
    explicit = args.db is not None
    url = args.db if explicit else os.environ.get("BATCHER_DATABASE_URL") or None
    if url is None:
        return None
    from jobs.backends import is_database_url

    if not is_database_url(url):
        where = "--db" if explicit else "BATCHER_DATABASE_URL"
        raise ConfigError(f"{where} must be a postgresql://user@host/dbname URL")
    if not explicit:
        folder = _folder_of(args)
        if folder is not None:
            from .layout import env_database

            return env_database(folder, url)
    return url


def _folder_of(args: argparse.Namespace) -> Path | None:
    """The run folder a command works on: its ``DIR``, or for ``plan`` and ``run`` the folder
    given, ``--out``, or the manifest's default folder."""
    folder: Path | None = getattr(args, "folder", None)
    if folder is not None:
        return folder
    target: Path | None = getattr(args, "manifest", None)
    if target is None:
        return None
    if target.is_dir():
        return target
    if args.out is not None:
        return Path(args.out)
    from .folder import default_out

    return default_out(target, emulate=bool(getattr(args, "emulate", False)))


def _export_options(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(
        fmt=args.format,
        output=args.output,
        shard_size=parse_shard_size(args.shard_size),
        state=args.state,
        embed=not args.no_embed,
    )


def _lean_export(args: argparse.Namespace) -> int | None:
    """``batcher export --format webdataset`` of a run folder's own ``batcher.db``, without
    an event loop or SQLAlchemy (:mod:`batcher.leanexport`); None when that path does not take
    it (the general one then does, and says what is wrong if anything is)."""
    if _database(args) is not None:
        return None
    from .export import check_output, format_for, tell_exported
    from .layout import RunLayout

    opt = _export_options(args)
    if format_for(opt.fmt, opt.output) != "webdataset":
        return None
    layout = RunLayout.locate(args.folder, None)
    if layout.shared or not layout.has_store():
        return None
    check_output(opt)
    from .leanexport import export_webdataset

    result = export_webdataset(layout, opt)
    if result is None:
        return None
    tell_exported(result, opt)
    return 0


async def _dispatch(args: argparse.Namespace) -> int:
    from .commands import cmd_export, cmd_plan, cmd_retry, cmd_run, cmd_status, parse_budget

    database = _database(args) if hasattr(args, "db") else None
    if args.command == "plan":
        from .planning import PlanOptions  # plan and run only: the pool, aiohttp

        return await cmd_plan(
            PlanOptions(
                manifest=args.manifest,
                out=args.out,
                replace=args.replace,
                region=args.region,
                rps=args.rps,
                emulate=args.emulate,
                as_json=args.json,
                database=database,
                lanes=args.lanes,
            )
        )
    if args.command == "run":
        from .models import model_rates
        from .pool import RunOptions
        from .session import RunCommand

        budget, budget_currency = parse_budget(args.budget)
        options = RunOptions(
            rps=args.rps or 2.0,
            concurrency=args.concurrency,
            max_attempts=args.max_attempts,
            request_timeout=args.request_timeout,
            download_timeout=args.request_timeout,
            region=args.region,
            limit=args.limit,
            budget=budget,
            lease_seconds=args.lease,
            backoff_base=args.backoff_base,
            seed=args.seed,
            model_rps=model_rates(args.rps),
            start_rps=args.start_rps,
            unreachable_timeout=args.unreachable_timeout,
        )
        return await cmd_run(
            RunCommand(
                manifest=args.manifest,
                out=args.out,
                options=options,
                budget_currency=budget_currency,
                base_url=args.base_url,
                emulate=args.emulate,
                emulate_latency=args.emulate_latency,
                emulate_faults=args.emulate_faults,
                emulate_rps=args.rps if args.emulate_rps is None else args.emulate_rps,
                replace=args.replace,
                progress=not args.no_progress,
                as_json=args.json,
                grace=args.grace,
                database=database,
                lanes=args.lanes,
            )
        )
    if args.command == "status":
        return await cmd_status(args.folder, as_json=args.json, database=database)
    if args.command == "export":
        return await cmd_export(args.folder, _export_options(args), database=database)
    if args.command == "retry":
        return await cmd_retry(args.folder, code=args.code, database=database)
    if args.command == "cancel":
        from .cancelling import cancel_pending_tasks

        report = await cancel_pending_tasks(
            args.folder,
            region=args.region,
            base_url=args.base_url,
            database=database,
            lanes=args.lanes,
        )
        print(
            f"{report.cancelled} tasks cancelled; {report.running} already running (the next "
            f"run collects their images); {report.errors} could not be reached"
        )
        return 0 if not report.errors else 1
    if args.command == "report":
        from .gallery.site import cmd_report

        return await cmd_report(args.folder, output=args.output, database=database)
    if args.command == "review":
        from .gallery.server import cmd_review  # aiohttp's server: review only

        return await cmd_review(args.folder, host=args.host, port=args.port, database=database)
    if args.command == "redo":
        from .redo import RedoOptions, cmd_redo

        return await cmd_redo(
            args.folder,
            RedoOptions(
                ids=tuple(args.ids),
                rejected=args.rejected,
                seed=args.seed,
                new_seed=args.new_seed,
                prompt=args.prompt,
                dry_run=args.dry_run,
            ),
            database=database,
        )
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (see the module docstring and the README)."""
    # A file name that is not UTF-8 is printed as the bytes it is (stdout) or escaped
    # (stderr), never an encoding error half-way through a line.
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors=errors)
    try:
        try:
            code = _main(argv)
        except SystemExit as exc:  # argparse: --help printed, or a usage error
            sys.stdout.flush()
            raise exc from None
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (``batcher export DIR | head -2``): not an error of ours, and
        # nothing more can be said on stdout. Point it at /dev/null so the interpreter's own
        # last flush stays quiet, and exit as a process killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return ExitCode.CLOSED_STDOUT


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command == "emulate":
        from .emulator.cli import run as run_emulator

        return int(run_emulator(args))
    try:
        try:
            if args.command == "export" and (code := _lean_export(args)) is not None:
                return code
            import anyio

            return anyio.run(_dispatch, args)
        except BaseExceptionGroup as group:
            raise _leaf(group) from group
    except BrokenPipeError:
        raise
    except (ManifestInvalid, LanesInvalid) as exc:  # located lines: file:line: field: message
        for line in str(exc).splitlines():
            print(line, file=sys.stderr)
        return ExitCode.USAGE
    except StoreUnavailable as exc:  # the database could not be written: stop, say why
        print(f"batcher: error: {exc}", file=sys.stderr)
        return ExitCode.ABORTED
    except (JobStoreError, BatcherError) as exc:
        print(f"batcher: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except OSError as exc:  # the environment refused (permissions, a full or read-only disk)
        where = f" {exc.filename}" if exc.filename else ""
        print(f"batcher: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.USAGE


def _leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a task group's failure: the first known one, else the group."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _leaf(exc)
        if isinstance(exc, JobStoreError | BatcherError | KeyboardInterrupt | OSError):
            return exc
    return group


if __name__ == "__main__":
    sys.exit(main())
