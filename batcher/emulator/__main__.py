"""``python -m batcher.emulator``: the ``emulate`` subcommand on its own."""

from __future__ import annotations

import argparse
import sys

from batcher.emulator.cli import configure_parser, run


def main() -> int:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(
        prog="python -m batcher.emulator",
        description="A local DashScope z-image-turbo emulator with fault injection.",
    )
    configure_parser(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
