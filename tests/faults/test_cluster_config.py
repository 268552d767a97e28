"""The cluster settings: several broker nodes, Sentinels, and what a mistake in them says."""

from __future__ import annotations

import pytest

from daemon.broker import Broker
from daemon.config import ConfigError, parse_config
from daemon.secrets import load_secret
from daemon.tls import Link, plaintext_links
from tests.support import NAMESPACE, config_text, free_port


def _config(**sections: dict[str, object]) -> str:
    return config_text(sandbox_url="http://127.0.0.1:1", http_port=0, **sections)


def test_url_alone_is_still_a_one_node_list() -> None:
    """Existing configurations keep working: ``url`` without ``urls`` is the only node."""
    settings = parse_config(_config(rabbitmq={"url": "amqp://payd@mq1:5672/"})).rabbitmq
    assert settings.nodes == ("amqp://payd@mq1:5672/",)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"rabbitmq": {"urls": ["amqp://payd@mq1/", "amqps://payd@mq2/"]}},
            "rabbitmq.urls: mixes amqp and amqps; use one scheme for every node",
        ),
        ({"redis": {"sentinels": ["10.0.0.5"]}}, "redis.sentinels: '10.0.0.5' is not host:port"),
        (
            {"rabbitmq": {"quorum_initial_group_size": 0}},
            "rabbitmq.quorum_initial_group_size: Expected `int` >= 1",
        ),
    ],
)
def test_cluster_mistakes_name_the_key(sections: dict[str, dict[str, object]], message: str) -> None:
    """A half-encrypted cluster, a Sentinel without a port or a zero replica count is refused at
    start-up with the key named, instead of failing at the first failover."""
    with pytest.raises(ConfigError, match=message):
        parse_config(_config(**sections))


def test_a_remote_node_in_the_clear_is_a_plaintext_link_even_after_a_local_one() -> None:
    """``payd check-config`` warns of every broker node and Sentinel reached unencrypted off this
    host, not only of the first URL."""
    config = parse_config(
        _config(
            rabbitmq={"urls": ["amqp://payd@127.0.0.1:5672/", "amqp://payd@10.0.0.9:5672/"]},
            redis={"sentinels": ["127.0.0.1:26379", "10.0.0.7:26379"]},
        )
    )
    assert (Link.RABBITMQ, "10.0.0.9") in plaintext_links(config)
    assert (Link.REDIS, "10.0.0.7") in plaintext_links(config)


async def test_a_node_that_does_not_answer_is_passed_over_for_the_next() -> None:
    """Start-up with the first listed node down connects to the next one and says which it
    uses; with only the old ``url`` the dead node was all there was."""
    dead = f"amqp://payd@127.0.0.1:{free_port()}/"
    settings = parse_config(
        _config(rabbitmq={"namespace": NAMESPACE, "urls": [dead, "amqp://payd@127.0.0.1:5672/"]})
    ).rabbitmq
    broker = Broker(settings, load_secret("rabbitmq_password"))
    try:
        await broker.connect()
        assert broker.node == "127.0.0.1:5672"
        assert broker.nodes == (f"127.0.0.1:{dead.rsplit(':', 1)[1].strip('/')}", "127.0.0.1:5672")
    finally:
        await broker.close()
    assert broker.node is None
