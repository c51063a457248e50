"""The decision during a staged rollout, as tables (SPEC section 6)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from test_decision import pkg

from dynupdate.core.decision import (
    DeviceState,
    Policy,
    RolloutView,
    Standing,
    decide_rollout,
    rollout_status,
)
from dynupdate.core.errors import InvalidInput
from dynupdate.core.gates import RolloutOptions, WaveEvidence, halt_reason, wave_gate
from dynupdate.core.vocabulary import RolloutState, Status
from dynupdate.core.waves import (
    Wave,
    bucket,
    covers,
    format_percent,
    parse_percent,
    parse_waves,
)
from dynupdate.core.windows import make_window, retry_at

NOW = datetime(2026, 11, 27, 16, 0, tzinfo=UTC)  # a Friday
STABLE = pkg("6.2.1")
V = pkg("6.2.2")
EXACT = Policy("GroupSeries", "6.2.1", allow_newer=False)
NEWER = Policy("GroupSeries", "6.2.1", allow_newer=True)
OPEN = make_window("fri", "15:00", "2h", "UTC")
CLOSED = make_window("fri", "22:00", "4h", "UTC")
WINDOW_RETRY = retry_at(CLOSED, NOW, "8211ABC", None)  # spread over the opening
TEN = Wave("10%", 1000)
TRIAL = Wave("trial", None)


def rollout(
    state: RolloutState = RolloutState.RUNNING,
    wave: Wave = TEN,
    policy: Policy | None = EXACT,
    stable=STABLE,
) -> RolloutView:
    return RolloutView(state, V, policy, stable, wave)


def device(version: str, in_call: bool = False) -> DeviceState:
    return DeviceState("8211ABC", "GroupSeries", version, in_call, None)


IN = Standing(bucket=999)  # inside the 10 % wave (buckets 0…999)
OUT = Standing(bucket=1000)  # just outside it
LIMIT = NOW + timedelta(minutes=7)
PAUSED, HALTED = RolloutState.PAUSED, RolloutState.HALTED


@pytest.mark.parametrize(
    ("view", "standing", "window", "state", "update", "opens", "reason", "retry"),
    [
        # rule 2 first: in a call, whatever the rollout says
        (rollout(), IN, None, device("6.2.1", in_call=True), None, False, "in-call", None),
        (rollout(), OUT, CLOSED, device("6.2.0", in_call=True), None, False, "in-call", None),
        # on V or newer: up to date, admitted or not, whatever the state
        (rollout(), IN, None, device("6.2.2"), None, False, "up-to-date", None),
        (rollout(), OUT, None, device("6.2.2.0"), None, False, "up-to-date", None),
        (rollout(), OUT, None, device("6.3"), None, False, "up-to-date", None),
        (rollout(PAUSED), IN, None, device("6.10.0"), None, False, "up-to-date", None),
        # admitted: offered V, opening an attempt unless one is open
        (rollout(), IN, None, device("6.2.1"), "6.2.2", True, None, None),
        (rollout(), IN, OPEN, device("6.2.0"), "6.2.2", True, None, None),
        (rollout(), Standing(999, attempt_open=True), None, device("6.2.1"), "6.2.2", False,
         None, None),
        # ... a trial device is in every wave, the trial wave admits only it
        (rollout(), Standing(9999, trial=True), None, device("6.2.1"), "6.2.2", True, None, None),
        (rollout(wave=TRIAL), Standing(0, trial=True), None, device("6.2.1"), "6.2.2", True,
         None, None),
        (rollout(wave=TRIAL), Standing(0), None, device("6.2.1"), None, False, "staged", None),
        # admitted, in this order: held, outside-window, rate-limited
        (rollout(), Standing(999, held=True, limited_until=LIMIT), CLOSED, device("6.2.1"),
         None, False, "held", None),
        (rollout(), Standing(999, limited_until=LIMIT), CLOSED, device("6.2.1"), None, False,
         "outside-window", WINDOW_RETRY),
        (rollout(), Standing(999, limited_until=LIMIT), OPEN, device("6.2.1"), None, False,
         "rate-limited", LIMIT),
        # ... retryAt at least 60 s after the answer
        (rollout(), Standing(999, limited_until=NOW), None, device("6.2.1"), None, False,
         "rate-limited", NOW + timedelta(seconds=60)),
        # ... an open attempt gets V again, the limits do not apply to it
        (rollout(), Standing(999, attempt_open=True, limited_until=LIMIT), None,
         device("6.2.1"), "6.2.2", False, None, None),
        # not admitted: the stable decision, with up-to-date and no-policy staged
        (rollout(), OUT, None, device("6.2.1"), None, False, "staged", None),
        (rollout(), OUT, None, device("6.2.0"), "6.2.1", False, None, None),
        (rollout(), OUT, CLOSED, device("6.2.0"), None, False, "outside-window",
         WINDOW_RETRY),
        # ... exact policy: a device between stable and V is offered stable (a downgrade)
        (rollout(), OUT, None, device("6.2.1.5"), "6.2.1", False, None, None),
        # ... allow-newer: it is not
        (rollout(policy=NEWER), OUT, None, device("6.2.1.5"), None, False, "staged", None),
        (rollout(policy=None, stable=None), OUT, None, device("6.2.0"), None, False, "staged",
         None),
        # paused or halted: V is offered to nobody, admitted or not
        (rollout(PAUSED), IN, None, device("6.2.1"), None, False, "staged", None),
        (rollout(HALTED), Standing(0, trial=True), None, device("6.2.1"), None, False,
         "staged", None),
        (rollout(HALTED), IN, None, device("6.2.0"), "6.2.1", False, None, None),
        (rollout(PAUSED), Standing(999, held=True), None, device("6.2.1"), None, False,
         "staged", None),
    ],
)  # fmt: skip
def test_decision_during_a_rollout(view, standing, window, state, update, opens, reason, retry):
    decision = decide_rollout(view, standing, window, state, NOW)
    assert (decision.package.version if decision.package else None) == update
    assert decision.opens_attempt is opens
    assert decision.reason == reason
    assert decision.retry_at == retry


@pytest.mark.parametrize(
    ("view", "standing", "version", "report", "attempted", "status"),
    [
        (rollout(), IN, "6.2.2", None, False, Status.UP_TO_DATE),
        (rollout(), Standing(999, held=True), "6.2.1", ("failed", "6.2.2"), True, Status.HELD),
        (rollout(PAUSED), Standing(5000, held=True), "6.2.1", None, True, Status.HELD),
        (rollout(), IN, "6.2.1", None, False, Status.PENDING),
        (rollout(), IN, "6.2.1", ("downloading", "6.2.2"), True, Status.IN_PROGRESS),
        (rollout(), IN, "6.2.1", ("installing", "6.2.2"), True, Status.IN_PROGRESS),
        (rollout(), IN, "6.2.1", ("failed", "6.2.2"), True, Status.FAILED),
        (rollout(), IN, "6.2.1", ("downloading", "6.2.1"), True, Status.PENDING),
        # an attempt in this rollout counts whatever the rollout's state
        (rollout(HALTED), OUT, "6.2.1", ("failed", "6.2.2"), True, Status.FAILED),
        # everyone else: the stable status, up-to-date and no-policy shown as waiting
        (rollout(), OUT, "6.2.1", None, False, Status.WAITING),
        (rollout(PAUSED), IN, "6.2.1", None, False, Status.WAITING),
        (rollout(policy=None, stable=None), OUT, "6.2.0", None, False, Status.WAITING),
        (rollout(), OUT, "6.2.0", None, False, Status.PENDING),
        (rollout(), OUT, "6.2.0", ("failed", "6.2.1"), False, Status.FAILED),
    ],
)  # fmt: skip
def test_status_during_a_rollout(view, standing, version, report, attempted, status):
    state, about = report or (None, None)
    assert rollout_status(view, standing, version, state, about, attempted=attempted) == status


def test_bucket_is_the_formula_of_the_spec():
    for serial in ("8211ABC", "", "EE4-17", "ü-ß", "x" * 64):
        digest = hashlib.sha256(serial.encode("utf-8")).hexdigest()
        assert bucket(serial) == int(digest[:16], 16) % 10000


@pytest.mark.parametrize(
    ("share", "bucket_", "covered"),
    [(1, 0, True), (1, 1, False), (100, 99, True), (100, 100, False), (10000, 9999, True)],
)
def test_a_wave_covers_the_buckets_below_its_share(share, bucket_, covered):
    assert covers(Wave("x", share), bucket=bucket_, trial=False) is covered
    assert covers(Wave("x", share), bucket=bucket_, trial=True)


@pytest.mark.parametrize(
    ("text", "shares"),
    [
        ("1%,10%,50%,100%", [100, 1000, 5000, 10000]),
        ("trial,100%", [None, 10000]),
        ("TRIAL, 0.5%, 100%", [None, 50, 10000]),
        ("0.01%,99.99%,100%", [1, 9999, 10000]),
        ("100%", [10000]),
    ],
)
def test_waves_parse(text, shares):
    assert [w.share for w in parse_waves(text)] == shares


def test_waves_keep_their_labels_as_given():
    assert [w.label for w in parse_waves("trial,0.5%,100%")] == ["trial", "0.5%", "100%"]


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "give shares"),
        ("1%,,100%", "give shares"),
        ("10%,5%,100%", "shares must go up (5% after 10%)"),
        ("10%,10%,100%", "shares must go up"),
        ("1%,50%", "the last wave must be 100%"),
        ("trial", "the last wave must be 100%"),
        ("1%,trial,100%", "'trial' can only be the first wave"),
        ("0%,100%", "from 0.01% to 100%"),
        ("1%,101%", "from 0.01% to 100%"),
        ("0.001%,100%", "use a percentage"),
        ("10,100", "use a percentage"),
        ("ten%,100%", "use a percentage"),
    ],
)
def test_bad_waves_are_refused_naming_the_value(text, names):
    with pytest.raises(InvalidInput, match="--waves") as error:
        parse_waves(text)
    assert names in str(error.value)


@pytest.mark.parametrize("value", [1, 50, 99, 100, 1234, 9999, 10000])
def test_percent_round_trips(value):
    assert parse_percent(format_percent(value), "--x") == value


def test_zero_percent_only_where_allowed():
    assert parse_percent("0%", "--max-failure-rate", zero=True) == 0
    with pytest.raises(InvalidInput, match="--min-success"):
        parse_percent("0%", "--min-success")


# Gates -------------------------------------------------------------------------------

OPENED = datetime(2026, 12, 2, 13, 5, tzinfo=UTC)
SOAKED = OPENED + timedelta(hours=1)


@pytest.mark.parametrize(
    ("failed", "outcomes", "halts"),
    [
        (0, 0, None),
        (4, 4, None),  # under --max-failures 5, and 4 outcomes < --min-devices 10
        (5, 5, "5 failed devices reached --max-failures 5"),
        (1, 10, None),  # 10 % is not over 10 %
        (2, 19, "2 of 19 outcomes failed (10.53%), over --max-failure-rate 10%"),
        (2, 20, None),
        (1, 9, None),  # a rate counts only from --min-devices outcomes
    ],
)
def test_halt_rules(failed, outcomes, halts):
    assert halt_reason(RolloutOptions(), failed=failed, outcomes=outcomes) == halts


@pytest.mark.parametrize(
    ("evidence", "now", "blocked_by", "needed"),
    [
        # a wave with no live device passes after its soak
        (WaveEvidence(), SOAKED, None, 0),
        (WaveEvidence(), SOAKED - timedelta(seconds=1), "soaking until 2026-12-02T14:05:00Z", 0),
        # fewer live devices than --min-devices: all of them are needed
        (WaveEvidence(3, 3, 0, 3), SOAKED, None, 3),
        (WaveEvidence(2, 2, 0, 3), SOAKED, "2 of 3 outcomes", 3),
        (WaveEvidence(10, 10, 0, 500), SOAKED, None, 10),
        # 95 % of outcomes and attempts in flight must be successes
        (WaveEvidence(20, 19, 0, 500), SOAKED, None, 10),
        (WaveEvidence(20, 19, 1, 500), SOAKED, "1 attempt in flight", 10),
        (WaveEvidence(20, 18, 0, 500), SOAKED, "18 of 20 succeeded, 95% needed", 10),
        (WaveEvidence(7, 7, 3, 40), OPENED,
         "soaking until 2026-12-02T14:05:00Z; 7 of 10 outcomes; 3 attempts in flight", 10),
    ],
)  # fmt: skip
def test_next_wave_gate(evidence, now, blocked_by, needed):
    gate = wave_gate(RolloutOptions(), evidence, opened_at=OPENED, now=now)
    assert gate.blocked_by == blocked_by
    assert gate.passed is (blocked_by is None)
    assert gate.needed == needed
    assert set(gate.to_dict()) == {"outcomes", "needed", "succeeded", "in_flight", "blocked_by"}


@pytest.mark.parametrize(
    ("option", "value"), [("min_devices", 0), ("max_attempts", 0), ("max_in_flight", 0)]
)
def test_options_refuse_nonsense(option, value):
    with pytest.raises(InvalidInput, match=option.replace("_", "-")):
        RolloutOptions(**{option: value})


def test_a_soak_shorter_than_the_install_timeout_warns():
    assert RolloutOptions(soak=timedelta(minutes=30)).warning
    assert RolloutOptions(soak=timedelta(hours=2)).warning is None
