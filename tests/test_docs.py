"""Every command has help, and the README documents it (as sqlite-utils does)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.main import get_command

from dynupdate.cli import app

README = (Path(__file__).parent.parent / "README.md").read_text()


def _commands():
    root = get_command(app)
    for name, command in root.commands.items():
        sub = getattr(command, "commands", None)
        if sub:
            for child in sub:
                yield f"{name} {child}", sub[child]
        else:
            yield name, command


COMMANDS = sorted(_commands(), key=lambda item: item[0])


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_command_has_help(name, command):
    assert command.help and command.help.strip(), f"{name} has no help"


@pytest.mark.parametrize("name", [n for n, _ in COMMANDS])
def test_command_is_in_readme(name):
    assert re.search(rf"`{re.escape(name)}\b", README), f"README does not document `{name}`"


def test_quick_start_is_two_commands():
    block = README.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    lines = [line for line in block.strip().splitlines() if line.strip()]
    assert [line.split("#")[0].strip() for line in lines] == ["make run", "make test"]


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "make test" in ci
