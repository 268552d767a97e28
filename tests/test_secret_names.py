"""One key names an adapter's credential, ``secret_name``; the old spellings still load for one
release, with a warning, and are honoured."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.config import ConfigError, parse_config
from daemon.providers.adyen.client import AdyenProvider, AdyenProviderConfig
from daemon.providers.registry import provider_config_type
from tests.support import PAYD, config_text

REQUIRED: dict[str, dict[str, Any]] = {
    "stripe": {},
    "adyen": {"merchant_account": "PaydTest"},
    "checkout": {"processing_channel_id": "pc_payd"},
    "iyzico": {},
}
OLD_SPELLINGS = [
    ("adyen", "credential_name", "secret_name"),
    ("checkout", "api_key_secret", "secret_name"),
    ("iyzico", "api_key_secret", "secret_name"),
    ("iyzico", "secret_key_secret", "signing_secret_name"),
]


def text_with(kind: str, **keys: Any) -> str:
    table = {"kind": kind, "base_url": "http://127.0.0.1:1", "max_in_flight": 5} | REQUIRED[kind] | keys
    return config_text(sandbox_url="http://127.0.0.1:1", http_port=0, **{f"providers__{kind}": table})


@pytest.mark.parametrize("kind", sorted(REQUIRED))
def test_every_credential_key_is_spelled_secret_name(kind: str) -> None:
    """Each built-in kind with credentials has ``secret_name``, and every other key naming a
    secret ends in ``_secret_name`` unless it is a deprecated spelling. (Adyen said
    ``credential_name``, Checkout.com and iyzico ``api_key_secret``.)"""
    config_type = provider_config_type(kind)
    names = {field.name for field in msgspec.structs.fields(config_type)}
    assert "secret_name" in names
    current = names - set(config_type.renamed_keys)
    about_secrets = {name for name in current if "secret" in name or "credential" in name}
    assert {name for name in about_secrets if not name.endswith("secret_name")} == set()


@pytest.mark.parametrize(("kind", "old", "new"), OLD_SPELLINGS)
def test_an_old_spelling_still_loads_with_a_warning(tmp_path: Path, kind: str, old: str, new: str) -> None:
    """A config.toml written for the previous release still passes ``payd check-config``: the
    old key's value lands in the new key, and stderr says which key to rename."""
    path = tmp_path / "config.toml"
    path.write_text(text_with(kind, **{old: "renamed_secret"}))
    checked = subprocess.run(
        [PAYD, "check-config", "--config", str(path)], check=False, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    assert f"payd: deprecated: providers.{kind}.{old} is now {new}" in checked.stderr
    assert f'"{new}": "renamed_secret"' in checked.stdout


def test_both_spellings_at_once_is_an_error() -> None:
    """Given the old and the new key with different values, payd refuses to guess."""
    text = text_with("checkout", api_key_secret="one_key", secret_name="other_key")
    with pytest.raises(
        ConfigError, match=r"providers\.checkout: api_key_secret is the old name of secret_name"
    ):
        parse_config(text)


async def test_the_old_spelling_decides_which_secret_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider reads the secret the old key names, not its kind's default: with only the
    default secret set, start-up fails naming the renamed one."""
    monkeypatch.setenv("PAYD_ADYEN_API_KEY", "the-default-key")
    monkeypatch.delenv("PAYD_ADYEN_RENAMED_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    table = {"kind": "adyen", "base_url": "http://127.0.0.1:1", "max_in_flight": 1}
    config = msgspec.convert(
        table | REQUIRED["adyen"] | {"credential_name": "adyen_renamed_key"}, AdyenProviderConfig
    )
    with pytest.raises(ConfigError, match="PAYD_ADYEN_RENAMED_KEY"):
        AdyenProvider("adyen", config)
    monkeypatch.setenv("PAYD_ADYEN_RENAMED_KEY", "the-renamed-key")
    provider = AdyenProvider("adyen", config)
    await provider.close()
