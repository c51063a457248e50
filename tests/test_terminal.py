"""Device-sent text is shown as the text it is: never Rich markup, emoji codes or escapes.

SPEC section 8. The values reach the database as a poll and a report put them
there (``record_polls``/``record_reports``, what the server calls after the
protocol validator, which lets markup through but refuses control characters
in serials, types and versions), or written straight into it, as an older or
tampered database holds them. Every command that shows them then runs, through
``CliRunner`` and, so that Rich would really emit colours and hyperlinks, in a
subprocess on a forced terminal.
"""

from __future__ import annotations

import doctest
import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from dynupdate.cli import _output
from dynupdate.cli._output import visible
from dynupdate.core.db import DB_NAME
from dynupdate.core.registry import Sighting, StatusReport, record_polls, record_reports

LINK = "[link=https://evil.example/]E9[/link]"  # a terminal hyperlink, if parsed
CLOSE = "[/x]"  # a MarkupError that used to stop `endpoint list`
FAKE_VERSION = "[white]6.2.2.0-100[/white]"  # would show a version that is not the stored one
EMOJI = ":smile:"
# What the protocol refuses in a serial but takes in a detail or a model.
OSC8 = "\x1b]8;;https://evil.example/\x07click\x1b]8;;\x07"
DETAIL = f"flash failed {OSC8} \x9b31m red \u202egnp.exe \x1b[2J"
MODEL = f"{EMOJI} [bold]Room[/bold] \x1b[5mblink\x08\x7f"
# Written into the database directly, as the server would refuse them.
RAW_SERIAL = "RAW\x1b[31m-1\u200b"
RAW_TYPE = "GS\x1b]0;pwned\x07"

# What a terminal would obey rather than show, and what Rich makes of emoji codes.
OBEYED = ["\x1b", "\x07", "\x08", "\x7f", "\x9b", "\u202e", "\u200b", "😄"]


@pytest.fixture
def fleet(home, make_file, cli):
    """A managed type GS and devices that sent hostile text, as polls and reports record it."""
    cli("package", "add", make_file(b"gs"), "--type", "GS", "--version", "6.2.2.0-100")
    cli("policy", "set", "GS", "--version", "6.2.2.0-100")
    now = datetime.now(UTC)
    record_polls(
        home.db,
        [
            (Sighting(LINK, "GS", FAKE_VERSION, model=MODEL), now),
            (Sighting(CLOSE, "GS", EMOJI, parent_serial=LINK), now),
            (Sighting("RAW-1", "GS", "6.1"), now),
        ],
    )
    record_reports(home.db, [(StatusReport(LINK, "GS", FAKE_VERSION, "failed", DETAIL), now)])
    with sqlite3.connect(home.path / DB_NAME) as raw:
        raw.execute(
            "UPDATE endpoints SET serial = ?, type = ?, type_key = ? WHERE serial = 'RAW-1'",
            (RAW_SERIAL, RAW_TYPE, RAW_TYPE.casefold()),
        )
        raw.execute("UPDATE endpoint_history SET serial = ? WHERE serial = 'RAW-1'", (RAW_SERIAL,))
    return home


def assert_literal(output: str, *values: str) -> None:
    for value in values:
        assert visible(value) in output, f"{value!r} not shown literally in:\n{output}"
    for char in OBEYED:
        assert char not in output, f"{char!r} reached the terminal:\n{output}"


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["endpoint", "list"], [LINK, CLOSE, FAKE_VERSION, EMOJI, RAW_SERIAL, RAW_TYPE]),
        (["endpoint", "show", LINK], [LINK, CLOSE, FAKE_VERSION, EMOJI, DETAIL, MODEL]),
        (["endpoint", "show", RAW_SERIAL], [RAW_SERIAL, RAW_TYPE]),
        (["overview"], [FAKE_VERSION, EMOJI, RAW_TYPE]),
        (["policy", "set", "GS", "--version", "6.2.2.0-100", "--dry-run"], [FAKE_VERSION, EMOJI]),
        (["window", "set", "--start", "00:00", "--duration", "1h", "--dry-run"], [EMOJI]),
    ],
    ids=["endpoint-list", "endpoint-show", "endpoint-show-raw", "overview", "policy-dry-run",
         "window-dry-run"],
)  # fmt: skip
def test_every_table_shows_device_text_literally(fleet, cli, command, shown):
    result = cli(*command)
    assert_literal(result.stdout + result.stderr, *shown)


def test_package_tables_show_a_hostile_name_and_description_literally(cli, make_file):
    name = f"gs-{EMOJI}[bold]-\x1b[31m.pup"
    description = f"{LINK} {CLOSE} {EMOJI}"
    cli("package", "add", make_file(b"x", name=name), "--type", "GS", "--version", "1.0",
        "--description", description)  # fmt: skip
    assert_literal(cli("package", "list").stdout, name, description)
    assert_literal(cli("package", "show", "GS", "1.0").stdout, name, description)


def test_an_error_naming_a_hostile_value_prints_it_literally(fleet, cli):
    serial = f"{CLOSE}{EMOJI}{OSC8}\u202e"
    result = cli("endpoint", "show", serial, code=1)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    assert_literal(result.stderr, serial)


def test_a_confirmation_echoing_a_value_prints_it_literally(fleet, cli, tmp_path):
    dest = tmp_path / f"backup-{EMOJI}-[bold]b[/bold]-\x1b[31m-\u202e"
    result = cli("backup", dest)
    assert result.stderr.count("\n") == 1
    assert_literal(result.stderr, str(dest))


def test_json_is_the_exact_value_and_sends_no_control_character_raw(fleet, cli):
    result = cli("endpoint", "list", "--json")
    rows = {row["serial"]: row for row in json.loads(result.stdout)}
    assert rows[LINK]["version"] == FAKE_VERSION
    assert rows[CLOSE]["version"] == EMOJI
    assert rows[RAW_SERIAL]["type"] == RAW_TYPE
    shown = json.loads(cli("endpoint", "show", LINK, "--json").stdout)
    assert (shown["model"], shown["report_detail"]) == (MODEL, DETAIL)
    for char in OBEYED[:-1]:  # JSON keeps the emoji of a device as it is
        assert char not in result.stdout
    assert "\\u009b" in cli("endpoint", "show", LINK, "--json").stdout


def test_the_output_module_doctests():
    assert doctest.testmod(_output).failed == 0


# -- on a terminal: Rich emits colours and would emit OSC 8 hyperlinks ----------------------

TERMINAL = {"FORCE_COLOR": "1", "TERM": "xterm-256color", "COLUMNS": "300", "LINES": "50"}


def on_terminal(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **TERMINAL}
    environment.pop("NO_COLOR", None)
    return subprocess.run(
        [sys.executable, "-m", "dynupdate", *args], env=environment, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


def test_the_forced_terminal_would_show_markup_as_a_hyperlink():
    """The control: on this terminal, markup that is parsed does become an OSC 8 link."""
    code = f"from rich.console import Console; Console().print({LINK!r})"
    environment = {**os.environ, **TERMINAL}
    environment.pop("NO_COLOR", None)
    printed = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=60
    ).stdout
    assert "\x1b]8;" in printed and "https://evil.example/" in printed


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["endpoint", "list"], [LINK, CLOSE, FAKE_VERSION, EMOJI, RAW_SERIAL, RAW_TYPE]),
        (["endpoint", "show", LINK], [LINK, FAKE_VERSION, DETAIL, MODEL]),
        (["overview"], [FAKE_VERSION, EMOJI, RAW_TYPE]),
    ],
    ids=["endpoint-list", "endpoint-show", "overview"],
)
def test_on_a_terminal_there_are_colours_but_no_hyperlink_or_device_escape(fleet, command, shown):
    result = on_terminal("--home", str(fleet.path), *command)
    assert result.returncode == 0, result.stderr
    assert "\x1b[1m" in result.stdout, "the console is a colour terminal: bold headers"
    ours = result.stdout.replace("\x1b[1m", "").replace("\x1b[3m", "").replace("\x1b[0m", "")
    assert_literal(ours, *shown)


def test_overview_watch_shows_device_text_literally_live(fleet):
    environment = {**os.environ, **TERMINAL}
    environment.pop("NO_COLOR", None)
    watch = subprocess.Popen(
        [sys.executable, "-m", "dynupdate", "--home", str(fleet.path), "overview", "--watch",
         "--interval", "1s"],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        os.set_blocking(watch.stdout.fileno(), False)
        seen = b""
        deadline = time.monotonic() + 30
        while b"Versions" not in seen or seen.count("└".encode()) < 2:
            assert watch.poll() is None, watch.stderr.read().decode()
            assert time.monotonic() < deadline, seen
            seen += watch.stdout.read() or b""
            time.sleep(0.05)
    finally:
        watch.terminate()
        watch.wait(timeout=10)
        watch.stdout.close()
        watch.stderr.close()
    # Live redraws with cursor moves and hides the cursor: those are Rich's, not a device's.
    text = seen.decode()
    for ours in ("\x1b[1m", "\x1b[3m", "\x1b[0m", "\x1b[?25l", "\x1b[?25h", "\x1b[2K", "\x1b[1A"):
        text = text.replace(ours, "")
    text = text.replace("\r", "")
    assert_literal(text, FAKE_VERSION, EMOJI, RAW_TYPE)


def test_visible_escapes_what_a_terminal_obeys_and_keeps_the_rest():
    assert visible("Zürich 東京 [/x] :smile: \\x") == "Zürich 東京 [/x] :smile: \\x"
    assert visible("a\x1b[31mb\x9bc\x07\x00\n\t") == "a\\x1b[31mb\\x9bc\\x07\\x00\\n\\t"
    bidi_and_invisible = "\u202e\u2066\u200b\ufeff\U000e0041"
    assert visible(bidi_and_invisible) == "\\u202e\\u2066\\u200b\\ufeff\\U000e0041"
