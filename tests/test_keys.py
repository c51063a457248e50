"""Activation keys (SPEC section 7): key import/list/remove, and `activationKey` in polls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lxml import etree

from dynupdate.core import keys
from dynupdate.core.keys import import_keys, key_for, remembered_key

HEADER = "serial,version,key\n"


@pytest.fixture
def csv_file(tmp_path: Path):
    counter = iter(range(1000))

    def write(text: str | bytes) -> Path:
        path = tmp_path / f"keys-{next(counter)}.csv"
        if isinstance(text, str):
            text = text.encode()
        path.write_bytes(text)
        return path

    return write


def test_import_list_remove(cli, csv_file):
    path = csv_file(HEADER + "8211ABC,6.2.2.0-100,AAAA-1111\nEE4-17,1.4.0,BBBB-2222\n")
    result = cli("key", "import", path)
    assert "2 keys added, 0 replaced, 0 unchanged" in result.stderr
    assert cli.json("key", "list") == [
        {"serial": "8211ABC", "version": "6.2.2.0-100", "key": "AAAA-1111",
         "imported": cli.json("key", "list")[0]["imported"]},
        {"serial": "EE4-17", "version": "1.4.0", "key": "BBBB-2222",
         "imported": cli.json("key", "list")[1]["imported"]},
    ]  # fmt: skip
    assert [k["serial"] for k in cli.json("key", "list", "--serial", "EE4-17")] == ["EE4-17"]
    assert cli.json("key", "list", "--serial", "nobody") == []
    cli("key", "remove", "EE4-17", "1.4")  # another spelling of 1.4.0
    assert [k["serial"] for k in cli.json("key", "list")] == ["8211ABC"]
    error = cli("key", "remove", "EE4-17", "1.4.0", code=1).stderr
    assert "No activation key for 'EE4-17' '1.4.0'" in error


def test_bom_crlf_quotes_and_blank_lines_are_fine(cli, csv_file):
    path = csv_file(
        b"\xef\xbb\xbfserial,version,key\r\n8211ABC,6.2,\"K,with comma\"\r\n\r\nX1,7.0,K2\r\n"
    )
    cli("key", "import", path)
    assert {(k["serial"], k["key"]) for k in cli.json("key", "list")} == {
        ("8211ABC", "K,with comma"),
        ("X1", "K2"),
    }


def test_adds_or_replaces_and_reports_unchanged(cli, csv_file):
    cli("key", "import", csv_file(HEADER + "A1,6.2,old\nA2,6.2,same\n"))
    result = cli("key", "import", csv_file(HEADER + "A1,6.2.0,new\nA2,6.2,same\nA3,6.2,more\n"))
    assert "1 keys added, 1 replaced, 1 unchanged" in result.stderr
    keys = {(k["serial"], k["version"]): k["key"] for k in cli.json("key", "list")}
    # 6.2.0 is 6.2: the key is replaced, kept under the new spelling, not duplicated.
    assert keys == {("A1", "6.2.0"): "new", ("A2", "6.2"): "same", ("A3", "6.2"): "more"}


BAD_FILES = [
    ("serial,key\nA1,K\n", 1, "header"),
    ("", 1, "header"),
    (HEADER + "A1,6.2,K\nA2,6.2\n", 3, "missing field"),
    (HEADER + "A1,6.2,K,extra\n", 2, "more than 3 fields"),
    (HEADER + "A1,,K\n", 2, "version is empty"),
    (HEADER + ",6.2,K\n", 2, "serial is empty"),
    (HEADER + "A1,6.2,\n", 2, "key is empty"),
    (HEADER + "A1,6.2 beta,K\n", 2, "Invalid version '6.2 beta'"),
    (HEADER + "A1," + "1" * 65 + ",K\n", 2, "Invalid version"),
    (HEADER + "A1,6.2\x1b[31m,K\n", 2, "Invalid version"),
    (HEADER + "A 1,6.2,K\n", 2, "contains spaces"),
    (HEADER + "A1,6.2, K\n", 2, "surrounding spaces"),
    (HEADER + "A1,6.2,K\x07\n", 2, "control"),
    (HEADER + "A1,6.2,K1\nA2,6.2,K\nA1,6.2.0,K2\n", 4, "another key than on line 2"),
    (HEADER + 'A1,6.2,"unclosed\n', 2, "not valid CSV"),
]


@pytest.mark.parametrize(("text", "line", "why"), BAD_FILES)
def test_one_bad_line_refuses_the_whole_file(cli, csv_file, text, line, why):
    cli("key", "import", csv_file(HEADER + "KEEP,1.0,kept\n"))
    entries = len(cli.json("log"))
    path = csv_file(text)
    error = cli("key", "import", path, code=1).stderr
    assert error.count("\n") == 1 and "Traceback" not in error
    assert f"line {line}:" in error and why in error and "nothing imported" in error, error
    assert [k["serial"] for k in cli.json("key", "list")] == ["KEEP"]
    assert len(cli.json("log")) == entries


def test_the_same_pair_twice_with_the_same_key_is_fine(cli, csv_file):
    cli("key", "import", csv_file(HEADER + "A1,6.2,K\nA1,6.2,K\n"))
    assert len(cli.json("key", "list")) == 1


def test_not_utf8_names_the_line(cli, csv_file):
    error = cli("key", "import", csv_file(b"serial,version,key\nA1,6.2,K\nA2,6.2,\xff\n"), code=1)
    assert "line 3: not UTF-8" in error.stderr


def test_missing_file_is_one_line(cli, tmp_path):
    assert "No file" in cli("key", "import", tmp_path / "nope.csv", code=1).stderr


def test_the_audit_log_names_serial_and_version_never_the_key(cli, csv_file):
    cli("key", "import", csv_file(HEADER + "A1,6.2,SECRET-ONE\nA2,7.0,SECRET-TWO\n"))
    cli("key", "import", csv_file(HEADER + "A1,6.2,SECRET-THREE\n"))
    cli("key", "remove", "A2", "7.0")
    log = cli("log", "--json").stdout + cli("log").stdout
    assert "SECRET" not in log
    remove, replace, add = cli.json("log")
    assert add["action"] == "key.import" and add["type"] is None
    assert add["detail"]["added"] == [["A1", "6.2"], ["A2", "7.0"]]
    assert replace["detail"]["replaced"] == [["A1", "6.2"]]
    assert remove["action"] == "key.remove"
    assert remove["detail"] == {"serial": "A2", "version": "7.0"}


def test_a_large_import_is_one_transaction(home, tmp_path):
    path = tmp_path / "many.csv"
    path.write_text(HEADER + "".join(f"S{i:06d},6.2.2,K{i}\n" for i in range(20_000)))
    result = import_keys(home.db, path)
    assert result.added == 20_000
    assert home.db.execute("SELECT count(*) FROM activation_keys").fetchone()[0] == 20_000
    [entry] = home.db.execute("SELECT detail FROM audit_log").fetchall()
    assert len(json.loads(entry[0])["added"]) == 20_000
    assert key_for(home.db, "S012345", "6.2.2.0") == "K12345"
    assert key_for(home.db, "S012345", "6.2.3") is None


def test_remembered_keys_are_read_once_and_bounded(home, csv_file, monkeypatch):
    import_keys(home.db, csv_file(HEADER + "S1,6.2.2,K1\nS2,6.2.2,K2\nS3,6.2.2,K3\n"))
    memo: dict = {}
    assert remembered_key(memo, home.db, "S1", "6.2.2") == "K1"
    assert remembered_key(memo, home.db, "S9", "6.2.2") is None  # a miss is remembered too
    # Read once: the memo answers even after the row has gone (the server drops the
    # memo with its fleet state when keys change; this shows it is not read again).
    with home.db.conn:
        home.db.conn.execute("DELETE FROM activation_keys WHERE serial = 'S1'")
    assert remembered_key(memo, home.db, "S1", "6.2.2") == "K1"
    monkeypatch.setattr(keys, "KEYS_REMEMBERED", 3)
    assert remembered_key(memo, home.db, "S2", "6.2.2") == "K2"  # the third pair
    assert remembered_key(memo, home.db, "S3", "6.2.2") == "K3"  # full: forgotten, then read
    assert memo == {("S3", "6.2.2"): "K3"}


# Over real HTTPS ---------------------------------------------------------------------------


def _poll(server, serial: str, version: str, peripheral: str = "") -> etree._Element:
    body = (
        f'<poll protocol="1"><endpoint serial="{serial}" type="GroupSeries" version="{version}"/>'
        f"{peripheral}</poll>"
    )
    status, _, answer = server.request("POST", "/poll", body)
    assert status == 200, answer
    return etree.fromstring(answer)


def test_poll_update_carries_the_devices_key_for_the_offered_version(
    cli, csv_file, make_file, home_dir, start_server
):
    cli("package", "add", make_file(b"gs"), "--type", "GroupSeries", "--version", "6.2.2.0-100")
    cli("package", "add", make_file(b"cam"), "--type", "EagleEyeIV", "--version", "1.5.0")
    cli("policy", "set", "GroupSeries", "--version", "6.2.2.0-100")
    cli("policy", "set", "EagleEyeIV", "--version", "1.5")
    keys = (
        HEADER
        + "8211ABC,6.2.2.0-100,KEY-8211-622\n"  # for the offered version
        + "9300XYZ,6.2.1,KEY-9300-621\n"  # for another version only
        + "EE4-17,1.5.0,KEY-CAM-<&\"'>\n"  # a peripheral's, with XML to escape
    )
    cli("key", "import", csv_file(keys))
    server = start_server(home_dir)
    camera = '<peripheral serial="EE4-17" type="EagleEyeIV" version="1.4.0"/>'
    endpoint, cam = _poll(server, "8211ABC", "6.2.1", camera)
    assert endpoint.tag == cam.tag == "update"
    assert endpoint.get("activationKey") == "KEY-8211-622"
    assert cam.get("activationKey") == "KEY-CAM-<&\"'>"
    [other] = _poll(server, "9300XYZ", "6.2.1")
    assert other.tag == "update" and "activationKey" not in other.attrib
    [nokey] = _poll(server, "1234567", "6.2.1")
    assert nokey.tag == "update" and "activationKey" not in nokey.attrib
    [uptodate] = _poll(server, "8211ABC", "6.2.2.0-100")
    assert uptodate.tag == "noUpdate" and "activationKey" not in uptodate.attrib
    # A key imported while the server runs is sent with the next offer.
    cli("key", "import", csv_file(HEADER + "1234567,6.2.2.0-100,KEY-NEW\n"))
    [fresh] = _poll(server, "1234567", "6.2.1")
    assert fresh.get("activationKey") == "KEY-NEW"
    cli("key", "remove", "8211ABC", "6.2.2.0-100")
    [gone] = _poll(server, "8211ABC", "6.2.1")
    assert gone.tag == "update" and "activationKey" not in gone.attrib
    server.stop()
    log = "".join(server.log)
    assert "8211ABC poll update" in log  # the access log is on
    assert "KEY-" not in log
    server.assert_no_traceback()
