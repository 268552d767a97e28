"""Load test payd through its real front door: attempt requests into RabbitMQ, outcomes out of
``payd.events``, reported as locust requests so locust's statistics are payd's.

    locust -f load/locustfile.py --headless -u 50 -r 10 -t 5m --payd-rate 2 --csv load/results/run

Each locust user is one sender with its own AMQP connection, publishing attempt
requests (publisher confirms) at ``--payd-rate`` a second. One follower per
locust process reads ``payment.#`` from ``<namespace>.events`` and reports each
attempt as a request of type ``attempt``, named by its outcome (approved,
soft_decline, hard_decline, rate_limited, provider_error, unknown), timed from
publish to event. ``payment.failed`` and ``payment.unknown`` are failures, and
so is an attempt without an event within ``--payd-timeout`` (``timeout``).
When the run ends, the test waits up to ``--payd-drain`` seconds for the
attempts still on their way, so every published attempt is counted once.

Options (each also from its environment variable): --payd-amqp-url
(PAYD_AMQP_URL; the password, if the URL has none, comes from
PAYD_RABBITMQ_PASSWORD or $CREDENTIALS_DIRECTORY/rabbitmq_password),
--payd-namespace, --payd-provider, --payd-tokens, --payd-rate, --payd-timeout,
--payd-drain, --payd-currency, --payd-renewal-share, --payd-report-publish.
See docs/observability.md.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import gevent
from locust import User, constant_throughput, events, task
from locust.env import Environment
from locust.runners import MasterRunner
from locust.stats import CSV_STATS_INTERVAL_SEC

from daemon.secrets import load_secret

sys.path.insert(0, str(Path(__file__).resolve().parent / "locust"))
from payd_amqp import AMQP_ERRORS, AttemptPublisher, EventFollower, masked, with_password
from payd_traffic import AttemptFactory, AttemptTracker, TokenMix

log = logging.getLogger("payd.locust")
DEFAULT_URL = "amqp://payd@127.0.0.1:5672/"


def add_options(parser: Any) -> None:
    # On the parser itself, not an argument group: only the parser knows locust's is_secret.
    group = parser
    group.add_argument(
        "--payd-amqp-url",
        env_var="PAYD_AMQP_URL",
        default="",
        help=f"RabbitMQ URL (default {DEFAULT_URL}, or --host if it is an amqp:// URL); a URL "
        "without a password gets PAYD_RABBITMQ_PASSWORD or $CREDENTIALS_DIRECTORY/rabbitmq_password",
        is_secret=True,
    )
    group.add_argument(
        "--payd-namespace",
        env_var="PAYD_NAMESPACE",
        default="payd",
        help="payd's [rabbitmq] namespace: publishes to NS.attempts, follows NS.events",
    )
    group.add_argument("--payd-provider", env_var="PAYD_PROVIDER", default="sandbox", help="provider name")
    group.add_argument(
        "--payd-tokens",
        env_var="PAYD_TOKENS",
        default="pm_ok=94,pm_insufficient_funds=4,pm_stolen=2",
        help="payment method tokens with weights, TOKEN=WEIGHT,... (the sandbox's tokens pick outcomes)",
    )
    group.add_argument(
        "--payd-rate", env_var="PAYD_RATE", type=float, default=1.0, help="attempts per second per user"
    )
    group.add_argument(
        "--payd-timeout",
        env_var="PAYD_TIMEOUT",
        type=float,
        default=60.0,
        help="seconds without an event before an attempt counts as a timeout failure",
    )
    group.add_argument(
        "--payd-drain",
        env_var="PAYD_DRAIN",
        type=float,
        default=30.0,
        help="seconds to wait at the end for attempts still on their way",
    )
    group.add_argument("--payd-currency", env_var="PAYD_CURRENCY", default="EUR", help="ISO 4217 code")
    group.add_argument(
        "--payd-renewal-share",
        env_var="PAYD_RENEWAL_SHARE",
        type=float,
        default=0.0,
        help="share of attempts sent as renewals (subscription_id + cycle) of made-up subscriptions; "
        "never against a deployment with real subscriptions",
    )
    group.add_argument(
        "--payd-report-publish",
        env_var="PAYD_REPORT_PUBLISH",
        action="store_true",
        default=False,
        help="also report each confirmed publish as a request of type publish",
    )


class LoadTest:
    """This process's shared parts: settings, the request factory, the tracker, the follower."""

    def __init__(self, environment: Environment) -> None:
        options = environment.parsed_options
        assert options is not None, "locust parses its options before init"
        url = options.payd_amqp_url
        if not url and environment.host and environment.host.startswith("amqp"):
            url = environment.host
        secret = load_secret("rabbitmq_password")
        self.url = with_password(url or DEFAULT_URL, secret.reveal() if secret else None)
        self.namespace: str = options.payd_namespace
        self.rate: float = options.payd_rate
        self.drain_s: float = options.payd_drain
        self.report_publish: bool = options.payd_report_publish
        self.csv: bool = bool(options.csv_prefix)
        self.factory = AttemptFactory(
            provider=options.payd_provider,
            tokens=TokenMix.parse(options.payd_tokens),
            currency=options.payd_currency,
            renewal_share=options.payd_renewal_share,
        )
        self.tracker = AttemptTracker(
            environment.events.request.fire, prefix=self.factory.prefix, timeout_s=options.payd_timeout
        )
        self.follower: EventFollower | None = None
        self._follow: gevent.Greenlet | None = None

    def start_following(self) -> None:
        if self.follower is not None:
            return
        self.follower = EventFollower(self.url, self.namespace, f"locust-follower-{self.factory.run_id}")
        self._follow = gevent.spawn(self.follower.run, self.tracker.on_event, self.tracker.expire)
        log.info(
            "following %s.events (payment.#) on %s; publishing to %s.attempts",
            self.namespace,
            masked(self.url),
            self.namespace,
        )

    def drain(self) -> None:
        """Wait for attempts still on their way, then count the rest as timeouts."""
        deadline = time.monotonic() + self.drain_s
        while len(self.tracker) and time.monotonic() < deadline:
            gevent.sleep(0.1)
        if self.tracker.expire(everything=True):
            log.warning("%d attempts had no event %.0f s after the run", self.tracker.timed_out, self.drain_s)
        if self.csv:
            gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)  # let the CSV writer take the last numbers

    def stop_following(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        if self._follow is not None:
            self._follow.join(timeout=2)
        if self.follower is not None:
            self.follower.close()
        self.follower = self._follow = None


load_test: LoadTest | None = None


def on_init(environment: Environment, **_: Any) -> None:
    global load_test  # noqa: PLW0603 (one load test per process, built once locust parsed its options)
    if not isinstance(environment.runner, MasterRunner):  # the master sends nothing
        load_test = LoadTest(environment)


def on_test_start(environment: Environment, **_: Any) -> None:
    if load_test is not None:
        load_test.start_following()  # before the first publish, so no event is missed


def on_test_stop(environment: Environment, **_: Any) -> None:
    if load_test is not None and load_test.follower is not None:
        load_test.drain()
        load_test.stop_following()


def on_quitting(environment: Environment, **_: Any) -> None:
    if load_test is not None:
        load_test.stop_following()


events.init_command_line_parser.add_listener(add_options)
events.init.add_listener(on_init)
events.test_start.add_listener(on_test_start)
events.test_stop.add_listener(on_test_stop)
events.quitting.add_listener(on_quitting)


class AttemptSender(User):
    """One sender publishing attempt requests at ``--payd-rate`` a second."""

    def wait_time(self) -> float:
        return float(self._pacing(self))

    def on_start(self) -> None:
        assert load_test is not None
        self._test = load_test
        self._pacing = constant_throughput(load_test.rate)
        self._publisher: AttemptPublisher | None = None

    def on_stop(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    @task
    def send_attempt(self) -> None:
        test = self._test
        key, token, body = test.factory.next()
        started = time.perf_counter()
        try:
            if self._publisher is None:
                self._publisher = AttemptPublisher(test.url, test.namespace, f"locust-sender-{id(self):x}")
            self._publisher.publish(body, message_id=key)
        except AMQP_ERRORS as error:
            self.on_stop()  # a new connection on the next try
            self.environment.events.request.fire(
                request_type="publish",
                name=f"{test.namespace}.attempts",
                response_time=(time.perf_counter() - started) * 1000,
                response_length=len(body),
                exception=error,
                context={"token": token},
            )
            return
        test.tracker.published(key, token, started)
        if test.report_publish:
            self.environment.events.request.fire(
                request_type="publish",
                name=f"{test.namespace}.attempts",
                response_time=(time.perf_counter() - started) * 1000,
                response_length=len(body),
                exception=None,
                context={"token": token},
            )
