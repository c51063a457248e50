"""Every command line in docs/rollouts.md parses, so the guide cannot drift from the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynupdate.cli import app

GUIDE = Path(__file__).parent.parent / "docs" / "rollouts.md"


def command_lines(text: str) -> list[str]:
    """The ``dynupdate …`` lines of the guide's sh blocks, continuations joined."""
    lines = []
    for block in re.findall(r"^ *```sh\n(.*?)^ *```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ").removesuffix("&").strip()
            if line.startswith("dynupdate"):
                lines.append(line)
    return lines


COMMANDS = command_lines(GUIDE.read_text())


def test_the_guide_has_its_commands():
    assert len(COMMANDS) >= 20
    used = {" ".join(shlex.split(line, comments=True)[1:3]) for line in COMMANDS}
    assert {"rollout start", "rollout advance", "rollout resume", "rollout abort"} <= used
    assert {"trial add", "endpoint retry", "endpoint show", "simulate --url"} <= used


@pytest.mark.parametrize("line", COMMANDS)
def test_each_command_line_parses(line):
    # --help after the line: Typer parses every option and argument name first, so
    # an unknown command or option fails (exit 2) before the help is printed.
    args = shlex.split(line, comments=True)
    assert args[0] == "dynupdate"
    result = CliRunner().invoke(app, [*args[1:], "--help"])
    assert result.exit_code == 0, f"{line}\n{result.output}"
    assert "Usage: " in result.output


@pytest.mark.parametrize(
    "line",
    [
        "dynupdate rollout start GroupSeries --version 6.2.2 --wave 1%",
        "dynupdate rollout promote GroupSeries",
        "dynupdate simulate --url https://h:8443 --fleet T=1 --fail-versions T=2:5%",
    ],
)
def test_a_drifted_line_is_caught(line):
    args = shlex.split(line)
    assert CliRunner().invoke(app, [*args[1:], "--help"]).exit_code == 2
