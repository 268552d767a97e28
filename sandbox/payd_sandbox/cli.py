"""``payd sandbox`` (also ``python -m payd_sandbox``): parse the gateway's flags and serve.

payd's command line hands the words after ``payd sandbox`` over unparsed, so the
gateway's flags live here with the gateway and ``payd`` never imports it to build its
own parser. SIGTERM or SIGINT closes the listener and returns 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import uvloop

from payd_sandbox.behaviour import add_arguments, settings_from_args
from payd_sandbox.gateway import serve


def build_parser(prog: str = "payd sandbox") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="run the sandbox payment gateway, a fake payment provider over HTTP (docs/sandbox.md)",
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "payd sandbox") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2

    async def run() -> int:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, shutdown.set)
        await serve(settings, shutdown)
        return 0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run())
