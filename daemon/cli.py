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
from daemon.models import SubscriptionAction
from daemon.secrets import describe_secrets, load_secret


def _run(main: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def cmd_run(config: Config, _args: argparse.Namespace) -> int:
    from daemon.runtime import tune_garbage_collector  # noqa: PLC0415
    from daemon.service import serve  # noqa: PLC0415 (keep light commands light)
    from daemon.startup import DependencyUnavailable  # noqa: PLC0415
    from daemon.tls import log_plaintext_links  # noqa: PLC0415

    logging_handle = configure_logging(config.daemon.log_level, config.daemon.log_format, config.gelf)
    log_plaintext_links(config)

    async def main() -> int:
        shutdown, force, reload = asyncio.Event(), asyncio.Event(), asyncio.Event()

        def on_signal() -> None:
            # The first signal drains; a second one cuts the drain short.
            (force if shutdown.is_set() else shutdown).set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        loop.add_signal_handler(signal.SIGHUP, reload.set)
        return await serve(
            config, shutdown=shutdown, force=force, reload=reload, before_intake=tune_garbage_collector
        )

    try:
        return _run(main())
    except ConfigError as error:  # a provider found its credentials missing, say
        print(f"payd: configuration error: {error}", file=sys.stderr)
        return 2
    except DependencyUnavailable as error:
        print(f"payd: {error}", file=sys.stderr)
        return 1
    finally:
        logging_handle.close()  # send what is queued for Graylog, for at most 5 s


def cmd_migrate(config: Config, _args: argparse.Namespace) -> int:
    from daemon.startup import DependencyUnavailable  # noqa: PLC0415
    from daemon.storage.db import (  # noqa: PLC0415
        DB_ERRORS,
        close_pool,
        open_pool,
    )
    from daemon.storage.migrate import migrate  # noqa: PLC0415

    async def main() -> int:
        address = f"{config.mysql.host}:{config.mysql.port}"
        try:
            # Unbounded statements: a migration's DDL on a large table may take a while.
            pool = await open_pool(config.mysql, load_secret("mysql_password"), bounded=False)
        except DB_ERRORS as error:
            raise DependencyUnavailable("mysql", address, error) from error
        try:
            await migrate(pool)
        finally:
            await close_pool(pool)
        return 0

    try:
        return _run(main())
    except DependencyUnavailable as error:
        print(f"payd: {error}", file=sys.stderr)
        return 1


def cmd_check_config(config: Config, _args: argparse.Namespace) -> int:
    from daemon.tls import check_links, plaintext_links  # noqa: PLC0415

    try:
        check_links(config)
    except ConfigError as error:
        print(f"payd: configuration error: {config.source}: {error}", file=sys.stderr)
        return 2
    print(f"{config.source}: ok")
    print(msgspec.json.format(msgspec.json.encode(config)).decode())
    print("secrets:")
    for name, state in describe_secrets().items():
        print(f"  {name}: {state}")
    for link, host in plaintext_links(config):
        print(
            f"warning: {link}: {host} is not this host and the link is not encrypted; "
            f"see [{link}.tls] in docs/configuration.md",
            file=sys.stderr,
        )
    return 0


def cmd_publish(config: Config, args: argparse.Namespace) -> int:
    from daemon.publish import check_lines, publish_lines, read_lines  # noqa: PLC0415

    stream = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
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


def cmd_attempts_unpark(config: Config, args: argparse.Namespace) -> int:
    from daemon import operate  # noqa: PLC0415

    return _run(operate.unpark(config, args.keys, every=args.all))


def cmd_retry(config: Config, args: argparse.Namespace) -> int:
    from daemon.subscriptions import commands  # noqa: PLC0415

    return _run(commands.retry(config, args.subscription_id))


def cmd_subscriptions_import(config: Config, args: argparse.Namespace) -> int:
    from daemon.subscriptions import commands  # noqa: PLC0415

    return _run(
        commands.import_subscriptions(config, args.file, file_format=args.format, batch_size=args.batch_size)
    )


def cmd_attempts(config: Config, args: argparse.Namespace) -> int:
    from daemon.models import AttemptState  # noqa: PLC0415
    from daemon.operator import commands  # noqa: PLC0415
    from daemon.operator.listing import AttemptFilter, checked_limit, parse_duration  # noqa: PLC0415
    from daemon.operator.settle import SettleAs  # noqa: PLC0415

    name = f"attempts {args.attempts_command}"
    if args.attempts_command == "show":
        return _run(commands.reporting(name, commands.show(config, args.key, as_json=args.json)))
    if args.attempts_command == "settle":
        settling = commands.settle(
            config,
            args.key,
            settle_as=SettleAs(args.settle_as),
            reason=args.reason,
            operator=args.operator,
            provider_ref=args.provider_ref,
        )
        return _run(commands.reporting(name, settling))
    try:
        older_than = None if args.older_than is None else parse_duration(args.older_than)
    except ValueError as error:
        print(f"payd attempts list: --older-than: {error}", file=sys.stderr)
        return 2
    try:
        limit = checked_limit(args.limit)
    except ValueError as error:
        print(f"payd attempts list: --{error}", file=sys.stderr)
        return 2
    wanted = AttemptFilter(
        state=AttemptState(args.state), provider=args.provider, older_than_s=older_than, limit=limit
    )
    return _run(commands.reporting(name, commands.list_(config, wanted, as_json=args.json)))


def cmd_refund(config: Config, args: argparse.Namespace) -> int:
    from daemon.operator import commands  # noqa: PLC0415
    from daemon.operator.refund import refund  # noqa: PLC0415

    publishing = refund(
        config,
        args.key,
        amount=args.amount,
        reason=args.reason,
        refund_key=args.refund_key,
        then=None if args.then is None else SubscriptionAction(args.then),
        operator=args.operator,
    )
    return _run(commands.reporting("refund", publishing))


def cmd_rollback(config: Config, args: argparse.Namespace) -> int:
    from daemon.operator import commands  # noqa: PLC0415
    from daemon.operator.rollback import RollbackError  # noqa: PLC0415
    from daemon.operator.rollback_run import order_from_args, rollback  # noqa: PLC0415

    try:
        order = order_from_args(config, args, operator=commands.resolve_operator(args.operator))
    except RollbackError as error:
        print(f"payd rollback: {error}", file=sys.stderr)
        return 2

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        running = asyncio.current_task()
        assert running is not None

        def on_signal() -> None:
            # The first signal stops after the publish in progress; a second one at once.
            if stop.is_set():
                running.cancel()
                return
            stop.set()
            print(
                "payd rollback: stopping after the publish in progress (signal again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        try:
            return await commands.reporting("rollback", rollback(config, order, stop))
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
            # What the broker confirmed is recorded (shielded); a publish cut short was not counted.
            print(
                f"payd rollback: stopped at once; run {order.run} again to resume",
                file=sys.stderr,
            )
            return 1

    # stdout carries the report (--json for scripts); the command says what matters itself.
    logging_handle = configure_logging("error", "console", stream=sys.stderr)
    try:
        if order.dry_run or order.report_only:
            # They change nothing: Ctrl-C and SIGTERM end them as they end any program.
            try:
                return _run(commands.reporting("rollback", rollback(config, order, asyncio.Event())))
            except KeyboardInterrupt:
                print("payd rollback: interrupted", file=sys.stderr)
                return 130
        return _run(main())
    finally:
        logging_handle.close()


def cmd_dead(config: Config, args: argparse.Namespace) -> int:
    from daemon.operator import commands  # noqa: PLC0415

    name = f"dead {args.dead_command}"
    if args.dead_command == "list":
        if args.limit < 1:
            print(f"payd dead list: --limit {args.limit}: at least 1", file=sys.stderr)
            return 2
        return _run(commands.reporting(name, commands.dead_list(config, limit=args.limit, as_json=args.json)))
    if not args.all and not args.ids:
        print(
            "payd dead replay: name the dead letters to replay (IDs from payd dead list) or --all",
            file=sys.stderr,
        )
        return 2
    ids = None if args.all else args.ids
    replaying = commands.dead_replay(config, ids, operator=args.operator, as_json=args.json)
    return _run(commands.reporting(name, replaying))


SANDBOX_MISSING = (
    "payd sandbox: the sandbox gateway is not installed (it is the separate distribution payd-sandbox);"
    " install it from a payd checkout: .venv/bin/pip install -e ./sandbox"
)


def cmd_sandbox(args: argparse.Namespace) -> int:
    """Hand the words after ``payd sandbox`` to the gateway's own command line, imported
    only now: the gateway is a separate distribution the production install leaves out."""
    try:
        from payd_sandbox.cli import main as sandbox_main  # noqa: PLC0415
    except ModuleNotFoundError as error:
        if error.name != "payd_sandbox":
            raise
        print(SANDBOX_MISSING, file=sys.stderr)
        return 1
    return sandbox_main(args.sandbox_arguments)


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
    attempt_commands = add_operator_commands(commands)
    unpark = attempt_commands.add_parser(
        "unpark",
        help="return parked unknown attempts (their lookup raised) to automatic reconciliation",
        description="return parked unknown attempts to automatic reconciliation, once the cause is fixed",
    )
    unpark.add_argument("--config", default=argparse.SUPPRESS, help="configuration file")
    unpark.add_argument("keys", nargs="*", metavar="KEY", help="idempotency keys")
    unpark.add_argument("--all", action="store_true", help="every parked attempt")
    unpark.set_defaults(handler=cmd_attempts_unpark)
    refunding = add("refund", cmd_refund, "refund (part of) a succeeded charge: publishes a refund request")
    refunding.add_argument("key", metavar="KEY", help="the charge's idempotency key")
    refunding.add_argument("--amount", type=int, help="in the minor unit (default: all that remains)")
    refunding.add_argument("--reason", help="kept with the refund and sent where the provider takes one")
    refunding.add_argument("--refund-key", help="the refund's own idempotency key (default: refund:KEY:N)")
    refunding.add_argument(
        "--then",
        choices=[action.value for action in SubscriptionAction],
        help="once the refund succeeds and nothing of the charge remains: cancel or pause its subscription",
    )
    refunding.add_argument(
        "--operator", help="who asks, recorded on the charge (default: $SUDO_USER or $USER)"
    )
    add_rollback_command(add)
    # The gateway parses its own flags (payd sandbox --help): the words after `sandbox`
    # reach it unparsed (main), so building this parser never imports it. --config is
    # accepted, as by every command, and unused: the gateway reads no configuration.
    sandbox = commands.add_parser(
        "sandbox",
        help="run the sandbox payment gateway (payd sandbox --help for its flags)",
        add_help=False,
    )
    sandbox.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sandbox.set_defaults(handler=cmd_sandbox, needs_config=False)
    return parser


def add_operator_commands(commands: Any) -> Any:
    """``payd attempts show|list|settle`` and ``payd dead list|replay`` (docs/runbook.md);
    returns the ``attempts`` group for its other subcommands."""
    from daemon.models import AttemptState  # noqa: PLC0415 (keep light commands light)

    def sub(group: Any, name: str, handler: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--config", default=argparse.SUPPRESS, help="configuration file")
        parser.set_defaults(handler=handler)
        return parser

    attempts = commands.add_parser("attempts", help="inspect attempts; settle a stuck unknown; unpark")
    attempts_commands = attempts.add_subparsers(dest="attempts_command", required=True)
    show = sub(attempts_commands, "show", cmd_attempts, "an attempt's whole story")
    show.add_argument("key", metavar="KEY", help="the idempotency key")
    show.add_argument("--json", action="store_true", help="the story as JSON (docs/runbook.md)")
    listing = sub(attempts_commands, "list", cmd_attempts, "attempts in one state, oldest first")
    listing.add_argument(
        "--state",
        default="unknown",
        choices=[state.value for state in AttemptState],
        help="(default: %(default)s)",
    )
    listing.add_argument("--provider", help="requested, or routed to by a failover")
    listing.add_argument("--older-than", metavar="D", help="created at least D ago: 15m, 2h, 3d")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (%(default)s)")
    listing.add_argument("--json", action="store_true", help="as JSON (docs/runbook.md)")
    settling = sub(
        attempts_commands,
        "settle",
        cmd_attempts,
        "close a stuck unknown attempt, or an unknown or pending refund, as the provider shows it",
    )
    settling.add_argument("key", metavar="KEY", help="the idempotency key")
    settling.add_argument("--as", dest="settle_as", required=True, choices=["succeeded", "failed"])
    settling.add_argument("--reason", required=True, help="what the provider's dashboard showed (recorded)")
    settling.add_argument("--operator", help="who you are (default: $SUDO_USER, then $USER)")
    settling.add_argument("--provider-ref", help="the provider's reference for the charge, if shown")

    dead = commands.add_parser("dead", help="the dead-letter queue: list, replay")
    dead_commands = dead.add_subparsers(dest="dead_command", required=True)
    dead_listing = sub(dead_commands, "list", cmd_dead, "show dead letters with their reasons (removes none)")
    dead_listing.add_argument("--limit", type=int, default=1000, help="at most this many (%(default)s)")
    dead_listing.add_argument("--json", action="store_true", help="as JSON (docs/runbook.md)")
    replay = sub(dead_commands, "replay", cmd_dead, "re-publish dead letters to the attempts queue")
    replay.add_argument("ids", nargs="*", metavar="ID", help="ids from payd dead list")
    replay.add_argument("--all", action="store_true", help="every dead letter")
    replay.add_argument("--operator", help="who you are (default: $SUDO_USER, then $USER)")
    replay.add_argument("--json", action="store_true", help="the report as JSON")
    return attempts_commands


def add_rollback_command(add: Callable[..., argparse.ArgumentParser]) -> None:
    """``payd rollback`` (docs/runbook.md, "Many charges: payd rollback")."""
    rolling = add("rollback", cmd_rollback, "refund many succeeded charges: paced, resumable, reported")
    rolling.add_argument("keys", nargs="*", metavar="KEY", help="charge idempotency keys to select")
    rolling.add_argument("--keys-file", metavar="FILE", help="charge keys, one a line")
    rolling.add_argument("--provider", help="the provider (connection) that took the money")
    rolling.add_argument("--since", metavar="WHEN", help="completed at or after (ISO 8601, UTC unless zoned)")
    rolling.add_argument("--until", metavar="WHEN", help="completed before (ISO 8601, UTC unless zoned)")
    rolling.add_argument("--plan", help="charges of subscriptions on this plan")
    rolling.add_argument("--amount-minor", metavar="N|MIN..MAX", help="charged amount, exact or a range")
    rolling.add_argument("--currency", help="ISO 4217 code, e.g. EUR")
    rolling.add_argument(
        "--dry-run", action="store_true", help="print what would be reversed; publish nothing"
    )
    rolling.add_argument(
        "--run", metavar="NAME", help="the run's name (A-Za-z0-9_-, 32 at most): new or resumed"
    )
    rolling.add_argument("--report", metavar="NAME", help="print a run's report again; publish nothing")
    rolling.add_argument("--reason", help="kept with each refund (default: rollback NAME)")
    rolling.add_argument(
        "--rate", type=float, default=50.0, help="refunds a second per provider, at most (%(default)s)"
    )
    rolling.add_argument("--wait", type=float, metavar="S", help="then wait up to S seconds for the outcomes")
    rolling.add_argument("--stop-if-halted", action="store_true", help="stop rather than wait out a halt")
    rolling.add_argument(
        "--confirm-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="stop when the broker does not confirm a publish within S seconds (%(default)s)",
    )
    rolling.add_argument("--operator", help="who you are (default: $SUDO_USER, then $USER)")
    rolling.add_argument("--json", action="store_true", help="the preview or report as JSON")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unparsed = parser.parse_known_args(argv)
    if args.command == "sandbox":
        args.sandbox_arguments = unparsed
    elif unparsed:
        parser.error(f"unrecognized arguments: {' '.join(unparsed)}")
    if not getattr(args, "needs_config", True):
        return int(args.handler(args))
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"payd: configuration error: {error}", file=sys.stderr)
        return 2
    for renamed in config.deprecations:  # stderr: the journal under systemd, the terminal otherwise
        print(f"payd: deprecated: {renamed}; the old name goes in the next release", file=sys.stderr)
    try:
        return int(args.handler(config, args))
    except ConfigError as error:  # found on use: a TLS file, a server that fails verification
        print(f"payd: configuration error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
