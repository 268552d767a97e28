"""The ``payd`` command line: parse arguments and hand over, nothing more."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import uvloop

from daemon.config import Config, ConfigError, load_config
from daemon.logs import configure_logging
from daemon.secrets import describe_secrets, load_secret


def _run(main: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def cmd_run(config: Config, _args: argparse.Namespace) -> int:
    from daemon.service import serve  # noqa: PLC0415 (keep light commands light)

    logging_handle = configure_logging(config.daemon.log_level, config.daemon.log_format, config.gelf)

    async def main() -> int:
        shutdown, force, reload = asyncio.Event(), asyncio.Event(), asyncio.Event()

        def on_signal() -> None:
            # The first signal drains; a second one cuts the drain short.
            (force if shutdown.is_set() else shutdown).set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        loop.add_signal_handler(signal.SIGHUP, reload.set)
        return await serve(config, shutdown=shutdown, force=force, reload=reload)

    try:
        return _run(main())
    except ConfigError as error:  # a provider found its credentials missing, say
        print(f"payd: configuration error: {error}", file=sys.stderr)
        return 2
    finally:
        logging_handle.close()  # send what is queued for Graylog, for at most 5 s


def cmd_migrate(config: Config, _args: argparse.Namespace) -> int:
    from daemon.storage.db import close_pool, open_pool  # noqa: PLC0415
    from daemon.storage.migrate import migrate  # noqa: PLC0415

    async def main() -> int:
        pool = await open_pool(config.mysql, load_secret("mysql_password"))
        try:
            await migrate(pool)
        finally:
            await close_pool(pool)
        return 0

    return _run(main())


def cmd_check_config(config: Config, _args: argparse.Namespace) -> int:
    print(f"{config.source}: ok")
    print(msgspec.json.format(msgspec.json.encode(config)).decode())
    print("secrets:")
    for name, state in describe_secrets().items():
        print(f"  {name}: {state}")
    return 0


def cmd_publish(config: Config, args: argparse.Namespace) -> int:
    from daemon.publish import check_lines, publish_lines, read_lines  # noqa: PLC0415

    stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
    with stream:
        if args.check:
            return check_lines(config, read_lines(stream), sys.stdout)
        return _run(publish_lines(config, read_lines(stream)))


def cmd_halt(config: Config, args: argparse.Namespace) -> int:
    from daemon import operate  # noqa: PLC0415

    return _run(operate.halt(config, provider=args.provider, reason=args.reason))


def cmd_resume(config: Config, args: argparse.Namespace) -> int:
    from daemon import operate  # noqa: PLC0415

    return _run(operate.resume(config, provider=args.provider))


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    from daemon import operate  # noqa: PLC0415

    return _run(operate.status(config, as_json=args.json))


def cmd_retry(config: Config, args: argparse.Namespace) -> int:
    from daemon.subscriptions import commands  # noqa: PLC0415

    return _run(commands.retry(config, args.subscription_id))


def cmd_subscriptions_import(config: Config, args: argparse.Namespace) -> int:
    from daemon.subscriptions import commands  # noqa: PLC0415

    return _run(
        commands.import_subscriptions(config, args.file, file_format=args.format, batch_size=args.batch_size)
    )


def cmd_sandbox(args: argparse.Namespace) -> int:
    from daemon.providers.sandbox import gateway  # noqa: PLC0415

    try:
        settings = gateway.settings_from_args(args)
    except ValueError as error:
        print(f"payd sandbox: {error}", file=sys.stderr)
        return 2

    async def main() -> int:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, shutdown.set)
        await gateway.serve(settings, shutdown)
        return 0

    return _run(main())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="payd", description="Subscription payment-attempt daemon.")
    parser.add_argument(
        "--config", default="./config.toml", help="configuration file (default ./config.toml)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", default=argparse.SUPPRESS, help="configuration file")
        sub.set_defaults(handler=handler)
        return sub

    add("run", cmd_run, "run the daemon until SIGTERM, then drain")
    add("migrate", cmd_migrate, "create or upgrade the database schema (idempotent)")
    add("check-config", cmd_check_config, "validate the configuration and show it, secrets masked")
    publish = add("publish", cmd_publish, "publish attempt requests from JSON lines (FILE or - for stdin)")
    publish.add_argument("file", metavar="FILE|-")
    publish.add_argument("--check", action="store_true", help="validate the lines locally; publish nothing")
    halt = add("halt", cmd_halt, "emergency stop: no instance starts a new provider call (fleet-wide)")
    halt.add_argument("--provider", help="halt only this provider (default: all)")
    halt.add_argument("--reason", default="halted by an operator", help="recorded with the halt")
    resume = add("resume", cmd_resume, "lift a halt (global, or one provider's)")
    resume.add_argument("--provider", help="resume only this provider's halt (default: the global one)")
    status = add("status", cmd_status, "show the running instance's status (from its control endpoint)")
    status.add_argument("--json", action="store_true", help="the raw JSON snapshot")
    retry = add("retry", cmd_retry, "dispatch one try of a subscription's unpaid cycle now (via the outbox)")
    retry.add_argument("subscription_id", type=int, metavar="SUBSCRIPTION_ID")
    subscriptions = add("subscriptions", cmd_subscriptions_import, "subscription data: import")
    subscription_commands = subscriptions.add_subparsers(dest="subscriptions_command", required=True)
    importing = subscription_commands.add_parser(
        "import",
        help="import subscriptions from CSV or JSON lines (idempotent)",
        description="import subscriptions from CSV or JSON lines; rejected rows are reported by line",
    )
    importing.add_argument("--config", default=argparse.SUPPRESS, help="configuration file")
    importing.add_argument("file", metavar="FILE")
    importing.add_argument(
        "--format", choices=["csv", "jsonl"], help="default: from the file name or content"
    )
    importing.add_argument("--batch-size", type=int, default=1000, help="rows per INSERT (%(default)s)")
    importing.set_defaults(handler=cmd_subscriptions_import)
    sandbox = add("sandbox", cmd_sandbox, "run the sandbox payment gateway")
    sandbox.set_defaults(needs_config=False)
    from daemon.providers.sandbox import gateway  # noqa: PLC0415

    gateway.add_arguments(sandbox)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "needs_config", True):
        return int(args.handler(args))
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"payd: configuration error: {error}", file=sys.stderr)
        return 2
    for renamed in config.deprecations:  # stderr: the journal under systemd, the terminal otherwise
        print(f"payd: deprecated: {renamed}; the old name goes in the next release", file=sys.stderr)
    return int(args.handler(config, args))


if __name__ == "__main__":
    sys.exit(main())
