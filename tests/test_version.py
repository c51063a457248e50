"""``dynupdate --version`` (SPEC section 8): one version, from ``dynupdate.__version__``."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import dynupdate


def test_version_through_the_cli(cli):
    result = cli("--version")
    assert result.stdout == f"dynupdate {dynupdate.__version__}\n"


def test_version_as_a_real_command(tmp_path):
    """The installed entry point; no home is needed, none is made."""
    command = Path(sys.executable).with_name("dynupdate")
    home = tmp_path / "never"
    done = subprocess.run(
        [command, "--home", home, "--version"], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        0, f"dynupdate {dynupdate.__version__}\n", ""
    )
    assert not home.exists()


def test_the_installed_metadata_has_the_same_version():
    assert importlib.metadata.version("dynupdate") == dynupdate.__version__
