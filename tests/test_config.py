"""Configuration: bad input names the key and the problem, and the process exits non-zero."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from daemon.config import ConfigError, parse_config
from tests.support import PAYD, config_text

GOOD = config_text(sandbox_url="http://127.0.0.1:8090", http_port=8080)


def test_the_shipped_config_toml_is_valid() -> None:
    config = parse_config((Path(__file__).parent.parent / "config.toml").read_text())
    assert "sandbox" in config.providers
    assert config.rabbitmq.namespace == "payd"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("[mysql]", "[mysql]\nhots = 'x'", "mysql: Object contains unknown field `hots`"),
        ("pool_size = 6", "pool_size = 'six'", "mysql.pool_size: Expected `int`, got `str`"),
        ("port = 8080", "port = 70000", "http.port: Expected `int` <= 65535"),
        ("lease_s = 30", "lease_s = -1", "pipeline.lease_s: Expected `float` > 0.0"),
        ('kind = "sandbox"', 'kind = "nosuch"', "providers.sandbox.kind: unknown provider kind 'nosuch'"),
        ("max_in_flight = 50", "max_in_flight = 0", "providers.sandbox.max_in_flight: Expected `int` >= 1"),
        (
            "max_in_flight = 50",
            "max_in_flight = 50\nbogus = 1",
            "providers.sandbox: Object contains unknown field `bogus`",
        ),
        ('log_level = "warning"', 'log_level = "loud"', "daemon.log_level: Invalid enum value 'loud'"),
        ("[daemon]", "[nonsense]\n[daemon]", "Object contains unknown field `nonsense`"),
    ],
)
def test_bad_keys_are_named(old: str, new: str, expected: str) -> None:
    text = GOOD.replace(old, new, 1)
    assert text != GOOD, "the mutation must apply"
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="test.toml")
    assert str(error.value).startswith(f"test.toml: {expected}"), str(error.value)


def test_lease_must_outlast_provider_timeouts() -> None:
    text = GOOD.replace("timeout_s = 2", "timeout_s = 20")
    with pytest.raises(ConfigError, match=r"pipeline\.lease_s: must exceed twice"):
        parse_config(text)


def test_not_toml_is_reported() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[mysql\nhost=", source="x.toml")


def test_a_provider_is_required() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        parse_config("[mysql]\nhost = 'db'\n")


@pytest.mark.parametrize("command", ["run", "check-config", "migrate"])
def test_commands_exit_2_naming_the_key(tmp_path: Path, command: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace("[rabbitmq]", "[rabbitmq]\nprefetchh = 5"))
    result = subprocess.run(
        [PAYD, command, "--config", str(path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "rabbitmq: Object contains unknown field `prefetchh`" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [PAYD, "check-config", "--config", str(tmp_path / "nope.toml")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def test_check_config_never_prints_secret_values(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(GOOD)
    secret = "s3cr3t-value-never-shown"
    result = subprocess.run(
        [PAYD, "check-config", "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PAYD_MYSQL_PASSWORD": secret},
    )
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    assert "mysql_password: set (environment PAYD_MYSQL_PASSWORD)" in result.stdout


def test_every_configuration_key_is_documented() -> None:
    """docs/configuration.md must name every key the code accepts, so the docs cannot drift."""
    import msgspec  # noqa: PLC0415

    from daemon.config import ProviderConfig, _RawConfig  # noqa: PLC0415
    from daemon.providers.registry import provider_kinds  # noqa: PLC0415

    docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    missing = []
    for section in msgspec.structs.fields(_RawConfig):
        if section.name == "providers":
            continue
        if f"## `[{section.name}]`" not in docs:
            missing.append(f"[{section.name}]")
        missing += [
            f"{section.name}.{key.name}"
            for key in msgspec.structs.fields(section.type)
            if f"| `{key.name}` |" not in docs
        ]
    provider_types = [ProviderConfig, *(kind.config_type for kind in provider_kinds().values())]
    for config_type in provider_types:
        missing += [
            f"providers.NAME.{key.name}"
            for key in msgspec.structs.fields(config_type)
            if f"| `{key.name}` |" not in docs and not _documented_elsewhere(key.name, config_type)
        ]
    assert not missing, f"undocumented configuration keys: {sorted(set(missing))}"


def _documented_elsewhere(key: str, config_type: type) -> bool:
    """Provider kinds other than the sandbox document their own keys in docs/providers/KIND.md."""
    module = config_type.__module__.split(".")
    if len(module) < 3 or module[2] == "sandbox":
        return False
    page = Path(__file__).parent.parent / "docs" / "providers" / f"{module[2]}.md"
    return page.exists() and f"`{key}`" in page.read_text()
