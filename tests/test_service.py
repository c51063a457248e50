"""contrib/dynupdate.service: systemd accepts it, and its ExecStart is a valid serve command."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command

from dynupdate.cli import app

UNIT = Path(__file__).parent.parent / "contrib" / "dynupdate.service"
INSTALLED = "/opt/dynupdate/bin/dynupdate"  # where the README installs it


def _settings() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, by key, in order (a key may be repeated)."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line.strip() and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


SETTINGS = _settings()


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    # verify checks that ExecStart's program exists: this venv's dynupdate stands in
    # for the installed one.
    ours = Path(sys.executable).parent / "dynupdate"
    assert ours.is_file(), ours
    unit = tmp_path / "dynupdate.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(ours)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # Warnings (an unknown key, a bad value) are printed but do not fail verify.
    assert "dynupdate.service" not in result.stderr + result.stdout, result.stderr


def test_exec_start_is_a_serve_command_the_cli_accepts():
    (exec_start,) = SETTINGS["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED
    root = get_command(app)
    # Parsed as the CLI parses it: an unknown option or a bad value raises here.
    ctx = root.make_context("dynupdate", argv[1:], resilient_parsing=False)
    name, command, rest = root.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
    assert name == "serve"
    sub = command.make_context(name, rest, parent=ctx)
    assert sub.params["port"] == 443 and not sub.args


def test_exec_start_check_catches_an_unknown_option():
    # The check above must fail for an option serve does not have.
    root = get_command(app)
    ctx = root.make_context("dynupdate", ["serve", "--listen", "0.0.0.0"])
    name, command, rest = root.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
    with pytest.raises(Exception, match="No such option: --listen"):
        command.make_context(name, rest, parent=ctx)


def test_the_home_is_the_state_directory():
    # serve uses DYNUPDATE_HOME; systemd makes /var/lib/<StateDirectory> writable.
    assert SETTINGS["StateDirectory"] == ["dynupdate"]
    assert SETTINGS["Environment"] == ["DYNUPDATE_HOME=/var/lib/dynupdate"]


def test_the_unit_runs_unprivileged_hardened_and_reloads_on_sighup():
    expected = {
        "User": "dynupdate",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillMode": "mixed",
        "KillSignal": "SIGTERM",
    }
    assert {key: SETTINGS[key][-1] for key in expected} == expected
    assert int(SETTINGS["LimitNOFILE"][0]) >= 65536
    assert "@system-service" in SETTINGS["SystemCallFilter"]
