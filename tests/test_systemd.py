"""The systemd units verify, stay hardened, and agree with the daemon's drain timeout."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.config import parse_config
from tests.support import PAYD, ROOT

UNITS = ["payd.service", "payd@.service"]

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def installed_copy(tmp_path: Path, unit: str) -> Path:
    """The unit as installed, with its paths pointing at this checkout so verify can resolve them."""
    text = (ROOT / "systemd" / unit).read_text()
    text = text.replace("/opt/payd/.venv/bin/payd", PAYD).replace(
        "WorkingDirectory=/opt/payd", f"WorkingDirectory={ROOT}"
    )
    name = unit.replace("@.", "@test.") if "@." in unit else unit
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies(tmp_path: Path, unit: str) -> None:
    path = installed_copy(tmp_path, unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "payd" not in result.stderr, result.stderr  # no warning about our unit


@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_stays_low(tmp_path: Path, unit: str) -> None:
    """`systemd-analyze security` scores exposure 0-10; payd runs at 1.3 and must not regress past 2."""
    path = installed_copy(tmp_path, unit)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(path)],
        check=False,
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    assert float(match.group(1)) <= 2.0


@pytest.mark.parametrize("unit", UNITS)
def test_stop_timeout_covers_the_drain(unit: str) -> None:
    """systemd must not SIGKILL a daemon that is still inside its drain timeout."""
    text = (ROOT / "systemd" / unit).read_text()
    stop = re.search(r"^TimeoutStopSec=(\d+)s?$", text, re.MULTILINE)
    assert stop, "TimeoutStopSec is set"
    assert re.search(r"^Type=notify$", text, re.MULTILINE)
    assert re.search(r"^KillSignal=SIGTERM$", text, re.MULTILINE)
    drain = parse_config((ROOT / "config.toml").read_text()).daemon.drain_timeout_s
    assert int(stop.group(1)) >= drain + 10
    for credential in ("mysql_password", "rabbitmq_password", "control_token"):
        assert f"LoadCredential={credential}:" in text
