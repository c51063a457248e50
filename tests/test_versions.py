"""Version validation and the total order over version strings (SPEC section 2)."""

from __future__ import annotations

import doctest
import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import InvalidVersion, Version

import dynupdate.core.versions
from dynupdate.core.errors import InvalidInput
from dynupdate.core.versions import (
    MAX_VERSION_LENGTH,
    VersionKey,
    compare_versions,
    newest,
    same_version,
    validate_version,
    version_key,
)

ORDER = [
    # the spec's own examples
    ("6.2.1.1-600021", "6.2.2.0-100", -1),
    ("6.2.2.0-100", "6.10.0", -1),
    ("6.2.1.1-600021", "6.10.0", -1),
    ("6.2", "6.2.0", 0),
    ("6.2", "6.2.0.0", 0),
    ("6.10.0", "6.9.9", 1),
    ("10.0", "9.99.99", 1),
    ("0", "0.0", 0),
    ("v6.2", "6.2.0", 0),
    # GroupSeries: -N is the build (a PEP 440 post-release) of the dotted release
    ("6.2.1.1-600021", "6.2.1.1-600022", -1),
    ("6.2.1.1-600021", "6.2.1.1", 1),
    ("6.2.1.1-600021", "6.2.1.2", -1),
    ("6.2.1.1-600021", "6.2.1.1.post600021", 0),
    ("6.2.2.0-100", "6.2.2-100", 0),
    ("3.1.14-64008", "3.1.14-64009", -1),
    ("3.1.14-64008", "3.1.15", -1),
    ("3.1.14-64008", "3.1.9-99999", 1),
    # Trio and friends: the build as a fourth release number
    ("7.2.0.1234", "7.2.0.999", 1),
    ("7.2.0.1234", "7.2.1", -1),
    ("7.2.0.1234", "7.2.0", 1),
    ("7.2.0.1234", "7.2.0-5000", 1),
    ("6.3.1.8847", "6.3.1.10000", -1),
    ("6.3.1.8847", "6.3.2", -1),
    # _N is a build number, the same as -N
    ("2.6.1_0049", "2.6.1-49", 0),
    ("2.6.1_0049", "2.6.1.post49", 0),
    ("2.6.1_0049", "2.6.1_0050", -1),
    ("2.6.1_0049", "2.6.1", 1),
    ("2.6.1_0049", "2.6.1.1", -1),
    ("2.6.1_0049", "2.6.2", -1),
    # vendor suffixes: after every PEP 440 version of the same release
    ("5.9.0.PVR", "5.9.0", 1),
    ("5.9.0.PVR", "5.9.0-100", 1),
    ("5.9.0.PVR", "5.9.0+local", 1),
    ("5.9.0.PVR", "5.9.0rc1", 1),
    ("5.9.0.PVR", "5.9.0.1", -1),
    ("5.9.0.PVR", "5.9.1", -1),
    ("5.9.0.PVR", "5.9.0.0049", -1),
    ("5.2.0.PVR", "5.10.0.PVR", -1),
    ("5.9.0.PVR", "5.9.PVR", 0),
    ("5.9.0.PVR", "5.9.0.pvr", 0),
    ("5.9.0.PVR", "5.9.0-PVR", 0),
    ("5.9.0.PVR", "5.9.0.PVR.1", -1),
    ("5.9.0.PVR2", "5.9.0.PVR10", -1),
    ("5.9.0.PVR-a", "5.9.0.PVR-1", -1),
    ("6.2.1.1-600021.abc", "6.2.1.1-600021", 1),
    ("6.2.1.1-600021.abc", "6.2.1.2", -1),
    # pre-releases
    ("7.0.0rc1", "7.0.0", -1),
    ("7.0.0rc1", "7.0.0b9", 1),
    ("7.0.0rc1", "7.0.0.dev1", 1),
    ("7.0.0rc1", "6.9.9", 1),
    ("1.0.0-beta.2", "1.0.0b2", 0),
    ("1.0.0-beta.2", "1.0.0-beta.10", -1),
    ("1.0.0-beta.2", "1.0.0", -1),
    ("1.0.0-alpha", "1.0.0-alpha.1", -1),
    # epochs
    ("1!1.0", "9.0", 1),
    ("1!1.0", "2!0.1", -1),
    ("1!5.9.0.PVR", "9.9", 1),
    ("1!5.9.0.PVR", "1!5.9.0", 1),
    # local versions
    ("1.0+abc", "1.0", 1),
    ("1.0+abc", "1.0.post1", -1),
    ("1.0+abc", "1.0+abd", -1),
    ("1.0+abc", "1.0+ABC", 0),
    ("1.0+5", "1.0+abc", 1),
    # no leading number: before everything that has a release
    ("PVR", "0", -1),
    ("PVR", "0.0.1", -1),
    ("PVR", "1!0", -1),
    ("", "PVR", -1),
    ("", "0", -1),
    ("abc", "ABC", 0),
    ("abc", "abd", -1),
    ("build2", "build10", -1),
]


@pytest.mark.parametrize(("a", "b", "expected"), ORDER)
def test_order_table(a, b, expected):
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected
    assert same_version(a, b) is (expected == 0)
    assert (version_key(a) < version_key(b)) is (expected < 0)
    assert (version_key(a) > version_key(b)) is (expected > 0)
    if expected == 0:
        assert hash(version_key(a)) == hash(version_key(b))


def test_table_is_big_enough_and_each_string_valid_or_deliberately_not():
    assert len(ORDER) >= 50
    for text in {s for a, b, _ in ORDER for s in (a, b)} - {""}:
        assert validate_version(text) == text


def test_sorting_a_fleet():
    fleet = ["6.10.0", "PVR", "6.2.2.0-100", "5.9.0.PVR", "6.2.1.1-600021", "6.2", "5.9.0",
             "7.0.0rc1", "2.6.1_0049", "5.9.0-100"]
    assert sorted(fleet, key=version_key) == [
        "PVR", "2.6.1_0049", "5.9.0", "5.9.0-100", "5.9.0.PVR", "6.2", "6.2.1.1-600021",
        "6.2.2.0-100", "6.10.0", "7.0.0rc1",
    ]


def test_newest():
    assert newest(["6.2.1.1-600021", "6.10.0", "6.2.2.0-100"]) == "6.10.0"
    assert newest(iter(["5.9.0", "5.9.0.PVR"])) == "5.9.0.PVR"
    assert newest(["6.2", "6.2.0"]) == "6.2", "the first of equal ones, as given"
    assert newest([]) is None


def test_strings_are_kept_as_given():
    key = version_key("6.2.1.1-600021")
    assert key.text == "6.2.1.1-600021"
    assert repr(key) == "<VersionKey('6.2.1.1-600021')>"
    assert newest(["V6.2.0", "6.1"]) == "V6.2.0"


def test_key_is_immutable_and_only_compares_with_keys():
    key = version_key("6.2")
    with pytest.raises(AttributeError):
        key.epoch = 1  # type: ignore[misc]
    assert key != "6.2"
    with pytest.raises(TypeError):
        _ = key < "6.3"  # type: ignore[operator]
    assert len({version_key("6.2"), version_key("6.2.0"), version_key("v6.2.0.0")}) == 1


def test_huge_numbers_do_not_raise():
    nines, big = "9" * 5000, "1" + "0" * 5000
    assert compare_versions(nines, big) == -1
    assert compare_versions("1." + nines, "1." + "9" * 4999) == 1
    assert compare_versions(f"{nines}!1.0", "1!1.0") == 1
    hash(version_key(nines + ".PVR"))


def test_module_doctests():
    result = doctest.testmod(dynupdate.core.versions)
    assert result.failed == 0
    assert result.attempted >= 10


# validate_version ----------------------------------------------------------

@pytest.mark.parametrize("text", [
    "6.2.1.1-600021", "6.2.2.0-100", "7.2.0.1234", "5.9.0.PVR", "2.6.1_0049", "3.1.14-64008",
    "7.0.0rc1", "1.0.0-beta.2", "1!1.0", "1.0+abc", "1.0~rc1", "a", "0", "x" * MAX_VERSION_LENGTH,
])
def test_validate_accepts(text):
    assert validate_version(text) is text


@pytest.mark.parametrize(("text", "why"), [
    ("", "it is empty"),
    ("   ", "it is blank"),
    ("\t\n", "it is blank"),
    (" 6.2", "starts or ends with whitespace"),
    ("6.2\n", "starts or ends with whitespace"),
    ("6.2 beta", "contains whitespace"),
    ("6.2\u00a0beta", "contains whitespace"),
    ("6.2\x00", "control character"),
    ("6.\x1b[31m2", "control character"),
    ("6.2\x7f", "control character"),
    ("x" * (MAX_VERSION_LENGTH + 1), "longer than 64 characters"),
    ("7" * 10_000, "longer than 64 characters"),
    ("<>&\"'", "'<' is not allowed"),
    ("6.2/../..", "'/' is not allowed"),
    ("6.2;rm", "';' is not allowed"),
    ("\u0663.\u0662", "is not allowed"),
    ("6.2\u200b", "is not allowed"),
    ("6.2é", "'é' is not allowed"),
])
def test_validate_rejects(text, why):
    with pytest.raises(InvalidInput) as caught:
        validate_version(text)
    message = str(caught.value)
    assert message.startswith("Invalid version ") and message.endswith(".")
    assert why in message
    assert message.isprintable(), "control characters are escaped"
    assert len(message) < 200, "a long value is cut short"


def test_validate_message_names_the_value():
    with pytest.raises(InvalidInput, match=r"^Invalid version '6\.2\\x00': "):
        validate_version("6.2\x00")
    with pytest.raises(InvalidInput, match=r"^Invalid version '6\.2 beta': it contains whitespace"):
        validate_version("6.2 beta")


# properties ------------------------------------------------------------------

numbers = st.integers(min_value=0, max_value=30).map(str) | st.sampled_from(
    ["00", "0049", "600021"]
)
releases = st.lists(numbers, min_size=1, max_size=4).map(".".join)
suffixes = st.sampled_from([
    "", "-123", "-0", "_0049", "_7", ".PVR", ".pvr", "-PVR", "rc1", "-rc.2", "b3", ".post2",
    ".dev1", "+local", "+abc.5", "+ABC", ".a", "x", "-beta.2", ".PVR2", ".PVR10", "~rc1", "!", "_x",
])
version_like = st.builds(
    lambda v, epoch, release, suffix, extra: f"{v}{epoch}{release}{suffix}{extra}",
    st.sampled_from(["", "", "", "v", "V"]),
    st.sampled_from(["", "", "", "", "1!", "2!"]),
    releases,
    suffixes,
    suffixes | st.text(alphabet="abcXYZ019._-+", max_size=3),
)
any_string = (
    version_like | st.text(max_size=12) | st.text(alphabet="0123456789.-_+!abPVR", max_size=10)
)

FAST = settings(max_examples=300, deadline=None)
QUICK = settings(max_examples=150, deadline=None)


def _sign(a: VersionKey, b: VersionKey) -> int:
    return (a > b) - (a < b)


@FAST
@given(any_string, any_string, any_string)
def test_total_order(a, b, c):
    """Totality, antisymmetry, hash consistency and transitivity, over three strings."""
    keys = [version_key(s) for s in (a, b, c)]
    for (x, kx), (y, ky) in itertools.permutations(zip((a, b, c), keys, strict=True), 2):
        assert [kx < ky, kx == ky, kx > ky].count(True) == 1
        assert (kx <= ky) == (kx < ky or kx == ky)
        assert (kx >= ky) == (kx > ky or kx == ky)
        assert compare_versions(x, y) == -compare_versions(y, x) == _sign(kx, ky)
        if kx == ky:
            assert hash(kx) == hash(ky)
    for x, y, z in itertools.permutations(keys):
        if x <= y <= z:
            assert x <= z
        if x < y <= z:
            assert x < z
        if x == y == z:
            assert x == z and hash(x) == hash(z)


@QUICK
@given(version_like, st.sampled_from([".0", ".0.0"]), st.booleans(), st.booleans())
def test_spellings_of_one_version_are_equal(text, zeros, upper, v_prefix):
    key = version_key(text)
    variants = [text.upper() if upper else text.lower(), f" {text}\n"]
    if v_prefix and not text.lower().startswith("v"):
        variants.append("v" + text)
    head, sep, tail = text.partition("+")
    if re.fullmatch(r"[vV]?([0-9]+!)?[0-9]+(\.[0-9]+)*", head):
        variants.append(head + zeros + sep + tail)
    for variant in variants:
        assert version_key(variant) == key, variant
        assert hash(version_key(variant)) == hash(key)


@QUICK
@given(st.lists(any_string, max_size=10), st.randoms(use_true_random=False))
def test_sorting_does_not_depend_on_input_order(given_order, rng):
    shuffled = list(given_order)
    rng.shuffle(shuffled)
    first = [version_key(s) for s in sorted(given_order, key=version_key)]
    second = [version_key(s) for s in sorted(shuffled, key=version_key)]
    assert first == second
    if given_order:
        assert same_version(newest(given_order), newest(shuffled))
        assert version_key(newest(given_order)) == first[-1]


def _pep440(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


@QUICK
@given(version_like, version_like)
def test_agrees_with_packaging_where_both_parse(a, b):
    va, vb = _pep440(a), _pep440(b)
    if va is not None and vb is not None:
        assert compare_versions(a, b) == (va > vb) - (va < vb)


@QUICK
@given(any_string)
def test_validate_accepts_or_raises_invalid_input_only(text):
    try:
        assert validate_version(text) is text
    except InvalidInput as error:
        assert str(error).startswith("Invalid version ")
    else:
        assert 0 < len(text) <= MAX_VERSION_LENGTH
        assert all(c.isascii() and (c.isalnum() or c in "._+~!-") for c in text)
