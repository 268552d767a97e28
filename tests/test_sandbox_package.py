"""The sandbox gateway is its own distribution (``sandbox/``, package ``payd_sandbox``).

The production package neither ships nor loads it: ``payd`` builds its parser without
importing it, ``payd sandbox`` imports it only when run, and says in one line how to
install it when it is missing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import aiohttp
import pytest
import setuptools

from daemon.cli import SANDBOX_MISSING

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GATEWAY_MODULES = ("payd_sandbox", "aiohttp.web")

# Prints the gateway modules loaded once `payd ARGS...` has built its parser and run.
PROBE = """
import sys
from daemon.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("loaded:", sorted(m for m in sys.modules if m.startswith(GATEWAY_MODULES)))
""".replace("GATEWAY_MODULES", repr(GATEWAY_MODULES))

# A sitecustomize that makes chosen modules impossible to import, as if not installed.
BLOCKER = """
import importlib.abc
import os
import sys

BLOCKED = set(os.environ["BLOCK_MODULES"].split(","))


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
"""


def loaded_by(*argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=False, cwd=ROOT
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("loaded:")]
    assert lines, done.stderr
    if "check-config" in argv and "--help" not in argv:
        assert "config.toml: ok" in done.stdout, done.stderr  # the adapters were really loaded
    return lines[-1]


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["migrate", "--help"],
        ["check-config", "--help"],
        ["--config", "config.toml", "check-config"],
    ],
)
def test_payd_commands_do_not_load_the_gateway(argv: list[str]) -> None:
    """Building ``payd``'s parser imports neither payd_sandbox nor aiohttp's server, and
    checking the shipped config.toml (its ``sandbox`` provider's adapter included) does not
    either. (Failed before: the parser imported the gateway for ``payd sandbox``'s flags on
    every command.)"""
    assert loaded_by(*argv) == "loaded: []"


def test_the_probe_sees_the_gateway_when_it_is_loaded() -> None:
    """The check above can fail: ``payd sandbox --help`` does load the gateway, and the probe
    reports it."""
    seen = loaded_by("sandbox", "--help")
    assert "'payd_sandbox.gateway'" in seen
    assert "'aiohttp.web'" in seen


def blocked_env(tmp_path: Path, *modules: str) -> dict[str, str]:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    return os.environ | {"PYTHONPATH": str(tmp_path), "BLOCK_MODULES": ",".join(modules)}


def test_payd_sandbox_without_the_package_says_how_to_install_it(tmp_path: Path) -> None:
    """With payd_sandbox not importable, ``payd sandbox`` exits 1 with one line naming the
    distribution and the install command, and no traceback."""
    done = subprocess.run(
        [str(BIN / "payd"), "sandbox", "--port", "0"],
        capture_output=True,
        text=True,
        check=False,
        env=blocked_env(tmp_path, "payd_sandbox"),
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [SANDBOX_MISSING]
    assert "payd-sandbox" in SANDBOX_MISSING
    assert "pip install -e ./sandbox" in SANDBOX_MISSING
    # Other commands do not need it.
    helped = subprocess.run(
        [str(BIN / "payd"), "migrate", "--help"],
        capture_output=True,
        text=True,
        check=False,
        env=blocked_env(tmp_path, "payd_sandbox"),
        timeout=60,
    )
    assert helped.returncode == 0, helped.stderr


def test_a_broken_gateway_install_is_not_reported_as_missing(tmp_path: Path) -> None:
    """Only payd_sandbox itself missing means "not installed": a module missing inside it is
    shown as the error it is, not hidden behind the install hint."""
    done = subprocess.run(
        [str(BIN / "payd"), "sandbox", "--port", "0"],
        capture_output=True,
        text=True,
        check=False,
        env=blocked_env(tmp_path, "payd_sandbox.gateway"),
        timeout=60,
    )
    assert done.returncode != 0
    assert "ModuleNotFoundError: No module named 'payd_sandbox.gateway'" in done.stderr
    assert SANDBOX_MISSING not in done.stderr


async def test_payd_sandbox_serves_until_sigterm() -> None:
    """``payd sandbox`` hands its flags to the gateway, which listens, answers with the
    behaviour the flags set, and exits 0 on SIGTERM. ``--config`` is accepted and unused, as
    scripts/dev passes it."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / "payd"),
        "sandbox",
        "--config",
        "no-such-config.toml",
        "--port",
        "0",
        "--retry-after-s",
        "7",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
        assert line.startswith("sandbox gateway listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        async with aiohttp.ClientSession() as http, http.get(f"{url}/_sandbox/behaviour") as response:
            assert response.status == 200
            assert (await response.json())["retry_after_s"] == 7
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), timeout=60)
    assert returncode == 0


def test_the_production_wheel_leaves_the_gateway_out() -> None:
    """The package discovery payd's pyproject.toml configures finds daemon and no gateway;
    sandbox/pyproject.toml's finds the gateway and nothing of daemon."""

    def found(project: Path) -> list[str]:
        config = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
        include = config["tool"]["setuptools"]["packages"]["find"]["include"]
        return sorted(setuptools.find_packages(where=str(project), include=include))

    payd = found(ROOT)
    assert "daemon" in payd
    assert "daemon.providers.sandbox" in payd  # the adapter stays
    assert [name for name in payd if not name.startswith("daemon")] == []
    assert not any("payd_sandbox" in name for name in payd)
    gateway = found(ROOT / "sandbox")
    assert gateway == ["payd_sandbox", "payd_sandbox.dialects"]
