"""The rollout model on a real database: start, transitions, attempts, gates (SPEC section 6)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dynupdate.core import attempts, rollout_records, rollouts, trial
from dynupdate.core.attempts import Seen
from dynupdate.core.audit import list_entries, verify
from dynupdate.core.db import write
from dynupdate.core.errors import Conflict, NotFound
from dynupdate.core.gates import RolloutOptions
from dynupdate.core.packages import add_package, get_package, list_packages, remove_package
from dynupdate.core.policies import disable_policy, get_policy, set_policy
from dynupdate.core.registry import Sighting, record_polls
from dynupdate.core.waves import bucket, parse_waves

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
TYPE = "GroupSeries"


@pytest.fixture
def gs(home, make_file):
    """GroupSeries 6.2.1 (the version to use, exact) and 6.2.2 uploaded."""
    add_package(home.db, home.store, make_file(b"6.2.1"), TYPE, "6.2.1")
    add_package(home.db, home.store, make_file(b"6.2.2"), TYPE, "6.2.2")
    set_policy(home.db, TYPE, "6.2.1")
    return home


def register(home, serials, version="6.2.1", at=T0, parent=None):
    record_polls(
        home.db,
        [
            (Sighting(s, TYPE, version, None, None, None, False, "127.0.0.1", parent, None), at)
            for s in serials
        ],
    )


def serials_in(low: int, high: int, count: int, prefix: str = "D") -> list[str]:
    """``count`` serials whose bucket is in [low, high)."""
    found = []
    n = 0
    while len(found) < count:
        serial = f"{prefix}{n}"
        if low <= bucket(serial) < high:
            found.append(serial)
        n += 1
    return found


def start(home, *, now=T0, **options):
    return rollouts.start_rollout(home.db, TYPE, "6.2.2", RolloutOptions(**options), now=now)


def summary(home, now=T0):
    (only,) = rollout_records.rollout_views(home.db, TYPE, now=now)
    return only.to_dict()


def note(home, rollout, seen, now):
    with write(home.db):
        return attempts.note_devices(home.db, rollout.id, seen, now)


# Start -----------------------------------------------------------------------------------


def test_start_freezes_the_stable_version_and_logs(gs):
    rollout = start(gs)
    assert (rollout.state, rollout.wave, rollout.stable_version) == ("running", 1, "6.2.1")
    data = summary(gs)
    assert data["waves"] == ["1%", "10%", "50%", "100%"]
    assert data["next_wave_at"] == "2026-12-02T13:00:00Z"
    assert data["gate"]["blocked_by"].startswith("soaking until")
    (entry, *_) = list_entries(gs.db)
    assert (entry.action, entry.type, entry.detail["version"]) == ("rollout.start", TYPE, "6.2.2")
    assert verify(gs.db).intact


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda h: None, None),
        (lambda h: set_policy(h.db, TYPE, "6.2.2"), "not newer than the stable version 6.2.2"),
        (lambda h: rollouts.start_rollout(h.db, TYPE, "6.2.2"), "one rollout of a type at a time"),
    ],
)
def test_start_refusals(gs, setup, message):
    setup(gs)
    before = len(list_entries(gs.db))
    if message is None:
        start(gs)
        return
    with pytest.raises(Conflict, match=message):
        start(gs)
    assert len(list_entries(gs.db)) == before  # a refused start logs nothing


def test_start_refuses_an_unknown_version_and_a_version_with_a_newer_package(gs, make_file):
    with pytest.raises(NotFound, match=r"No package GroupSeries 9\.9"):
        rollouts.start_rollout(gs.db, TYPE, "9.9")
    add_package(gs.db, gs.store, make_file(b"6.3"), TYPE, "6.3")
    with pytest.raises(Conflict, match=r"has 6\.3, newer than 6\.2\.2"):
        start(gs)


def test_stable_under_allow_newer_is_the_newest_package_below_v(gs, make_file):
    add_package(gs.db, gs.store, make_file(b"6.1"), TYPE, "6.1")
    set_policy(gs.db, TYPE, "6.1", allow_newer=True)
    assert start(gs).stable_version == "6.2.1"


def test_a_type_without_a_policy_has_no_stable_version(gs):
    disable_policy(gs.db, TYPE)
    assert start(gs).stable_version is None


def test_the_policy_is_frozen_and_the_packages_kept_while_active(gs, make_file):
    add_package(gs.db, gs.store, make_file(b"6.1"), TYPE, "6.1")
    set_policy(gs.db, TYPE, "6.1", allow_newer=True)  # the policy itself needs neither
    start(gs)
    with pytest.raises(Conflict, match=r"A rollout of GroupSeries is running \(wave 1 of 4\)"):
        set_policy(gs.db, TYPE, "6.2.2")
    with pytest.raises(Conflict, match="rollout abort GroupSeries first"):
        disable_policy(gs.db, TYPE)
    with pytest.raises(Conflict, match="is the stable version of the running rollout"):
        remove_package(gs.db, gs.store, TYPE, "6.2.1")
    with pytest.raises(Conflict, match=r"GroupSeries 6\.2\.2 is"):
        remove_package(gs.db, gs.store, TYPE, "6.2.2")
    # a package uploaded meanwhile is blocked
    package, _ = add_package(gs.db, gs.store, make_file(b"6.4"), TYPE, "6.4")
    assert package.blocked and get_package(gs.db, TYPE, "6.4").blocked


# Transitions -------------------------------------------------------------------------------


def test_each_command_only_from_its_states(gs):
    start(gs)
    with pytest.raises(Conflict, match="is running: rollout resume works only when it is paused"):
        rollouts.resume_rollout(gs.db, TYPE, now=T0)
    rollouts.pause_rollout(gs.db, TYPE, now=T0)
    for command in (rollouts.pause_rollout, rollouts.advance_rollout):
        with pytest.raises(Conflict, match="is paused"):
            command(gs.db, TYPE, now=T0)
    assert rollouts.resume_rollout(gs.db, TYPE, now=T0).state == "running"
    rollouts.abort_rollout(gs.db, TYPE, now=T0)
    with pytest.raises(
        NotFound, match=r"No active rollout of GroupSeries \(the latest is aborted\)"
    ):
        rollouts.pause_rollout(gs.db, TYPE, now=T0)
    actions = [e.action for e in reversed(list_entries(gs.db))][-4:]
    assert actions == ["rollout.start", "rollout.pause", "rollout.resume", "rollout.abort"]


def test_abort_blocks_v_and_allow_newer_targets_the_stable_version_again(gs):
    set_policy(gs.db, TYPE, "6.2.1", allow_newer=True)
    assert get_policy(gs.db, TYPE).target_version == "6.2.2"  # before: V is the target
    start(gs)
    rollouts.abort_rollout(gs.db, TYPE, now=T0)
    assert get_package(gs.db, TYPE, "6.2.2").blocked
    assert get_policy(gs.db, TYPE).target_version == "6.2.1"
    # naming it again unblocks it
    rollouts.start_rollout(gs.db, TYPE, "6.2.2")
    assert not get_package(gs.db, TYPE, "6.2.2").blocked


def test_advance_opens_the_next_wave_then_completes(gs):
    start(gs, waves=parse_waves("10%,100%"))
    assert rollouts.advance_rollout(gs.db, TYPE, now=T0).wave == 2
    done = rollouts.advance_rollout(gs.db, TYPE, now=T0)
    assert done.state == "completed" and done.finished_at == T0
    assert get_policy(gs.db, TYPE).version_to_use == "6.2.2"
    assert not get_policy(gs.db, TYPE).allow_newer  # the flag kept
    actions = [e.action for e in list_entries(gs.db)][:4]
    assert actions == [
        "rollout.completed",
        "rollout.advance",
        "rollout.wave-opened",
        "rollout.advance",
    ]


# Attempts, gates and halts --------------------------------------------------------------------


def test_a_wave_passes_on_its_own_evidence_after_its_soak(gs):
    first = serials_in(0, 1000, 3)
    register(gs, first + serials_in(1000, 10000, 5, "L"))
    rollout = start(gs, waves=parse_waves("10%,100%"))
    for serial in first:
        assert attempts.reserve_attempt(gs.db, rollout.id, serial, None, now=T0) is None
    assert summary(gs)["gate"] == {
        "outcomes": 0,
        "needed": 3,
        "succeeded": 0,
        "in_flight": 3,
        "blocked_by": "soaking until 2026-12-02T13:00:00Z; 0 of 3 outcomes; 3 attempts in flight",
    }
    later = T0 + timedelta(minutes=70)
    note(gs, rollout, [Seen(s, "6.2.2") for s in first], later)  # back on V: verified
    assert rollouts.evaluate(gs.db, now=later) == ["GroupSeries 6.2.2 wave 2 opened"]
    data = summary(gs, later)
    assert (data["wave"], data["succeeded"], data["offered"]) == (2, 3, 3)
    assert list_entries(gs.db)[0].actor == "server"


def test_failures_halt_in_the_transaction_that_records_them(gs):
    first = serials_in(0, 100, 5)
    register(gs, first)
    rollout = start(gs, max_failures=2)
    for serial in first:
        attempts.reserve_attempt(gs.db, rollout.id, serial, None, now=T0)
    assert note(gs, rollout, [Seen(first[0], "6.2.2", "failed", "disk full")], T0) is None
    reason = note(gs, rollout, [Seen(first[1], "6.2.2", "failed", "boot loop")], T0)
    assert reason == "2 failed devices reached --max-failures 2"
    data = summary(gs)
    assert (data["state"], data["failed"], data["halt_reason"]) == ("halted", 2, reason)
    assert list_entries(gs.db)[0].action == "rollout.halted"
    # resume acknowledges: the halt rules count afresh
    rollouts.resume_rollout(gs.db, TYPE, now=T0 + timedelta(minutes=1))
    later = T0 + timedelta(minutes=2)
    assert note(gs, rollout, [Seen(first[2], "6.2.2", "failed", "x")], later) is None
    assert note(gs, rollout, [Seen(first[3], "6.2.2", "failed", "y")], later) is not None


def test_a_revert_fails_a_verified_success(gs):
    (serial,) = serials_in(0, 100, 1)
    register(gs, [serial])
    rollout = start(gs)
    attempts.reserve_attempt(gs.db, rollout.id, serial, None, now=T0)
    note(gs, rollout, [Seen(serial, "6.2.2")], T0)
    assert summary(gs)["succeeded"] == 1
    note(gs, rollout, [Seen(serial, "6.2.1")], T0 + timedelta(minutes=5))
    data = summary(gs)
    assert (data["succeeded"], data["failed"]) == (0, 1)
    row = gs.db.execute("SELECT detail FROM rollout_devices WHERE serial = ?", (serial,))
    assert row.fetchone()[0] == "reverted to 6.2.1"


def test_an_installed_report_alone_does_not_verify(gs):
    (serial,) = serials_in(0, 100, 1)
    register(gs, [serial])
    rollout = start(gs)
    attempts.reserve_attempt(gs.db, rollout.id, serial, None, now=T0)
    note(gs, rollout, [Seen(serial, "6.2.2", "installed")], T0)
    assert summary(gs)["succeeded"] == 0
    # back on the old version
    note(gs, rollout, [Seen(serial, "6.2.1")], T0 + timedelta(minutes=5))
    assert summary(gs)["failed"] == 1


def test_install_timeout_fails_an_attempt_not_counting_pauses(gs):
    (serial,) = serials_in(0, 100, 1)
    register(gs, [serial])
    rollout = start(gs, install_timeout=timedelta(hours=2))
    attempts.reserve_attempt(gs.db, rollout.id, serial, None, now=T0)
    rollouts.pause_rollout(gs.db, TYPE, now=T0 + timedelta(hours=1))
    rollouts.resume_rollout(gs.db, TYPE, now=T0 + timedelta(hours=5))
    # open 5h30m, of which 4h paused: 1h30m counts
    assert rollouts.evaluate(gs.db, now=T0 + timedelta(hours=5, minutes=30)) == []
    events = rollouts.evaluate(gs.db, now=T0 + timedelta(hours=6, minutes=1))
    assert events[0] == f"GroupSeries 6.2.2: {serial} timed out"


def test_max_in_flight_and_max_per_hour_are_never_exceeded(gs):
    devices = serials_in(0, 100, 6)
    register(gs, devices)
    rollout = start(gs, max_in_flight=2, max_per_hour=3)
    answers = [attempts.reserve_attempt(gs.db, rollout.id, s, None, now=T0) for s in devices[:3]]
    assert answers[:2] == [None, None]
    assert answers[2] == T0 + timedelta(hours=2)  # the oldest in flight times out then
    # an open attempt keeps its slot: the same device gets V again
    assert attempts.reserve_attempt(gs.db, rollout.id, devices[0], None, now=T0) is None
    note(gs, rollout, [Seen(devices[0], "6.2.2"), Seen(devices[1], "6.2.2")], T0)
    at = T0 + timedelta(minutes=5)
    assert attempts.reserve_attempt(gs.db, rollout.id, devices[2], None, now=at) is None
    # three attempts opened within the hour: the fourth waits for the first to age out
    assert attempts.reserve_attempt(gs.db, rollout.id, devices[3], None, now=at) == (
        T0 + timedelta(hours=1)
    )


def test_held_after_max_attempts_and_retry(gs):
    (serial,) = serials_in(0, 100, 1)
    register(gs, [serial])
    rollout = start(gs, max_attempts=2, max_failures=10)
    for _ in range(2):
        attempts.reserve_attempt(gs.db, rollout.id, serial, None, now=T0)
        note(gs, rollout, [Seen(serial, "6.2.2", "failed", "no")], T0)
    assert attempts.device_standing(gs.db, rollout.id, serial) == (True, True, False)
    assert summary(gs)["held"] == 1
    attempts.retry_device(gs.db, serial)
    assert attempts.device_standing(gs.db, rollout.id, serial)[1] is False
    assert list_entries(gs.db)[0].action == "endpoint.retry"
    with pytest.raises(Conflict, match="is not held"):
        attempts.retry_device(gs.db, serial)
    with pytest.raises(NotFound, match="No endpoint 'nope'"):
        attempts.retry_device(gs.db, "nope")


def test_devices_offered_v_before_the_start_count_as_offered(gs):
    (serial,) = serials_in(0, 10000, 1)
    record_polls(
        gs.db,
        [(Sighting(serial, TYPE, "6.2.1", None, None, None, False, "a", None, "6.2.2"), T0)],
    )
    start(gs)
    data = summary(gs)
    assert (data["offered"], data["in_flight"]) == (1, 1)


# Trial devices and the dry run ------------------------------------------------------------------


def test_trial_wave_admits_the_trial_devices_and_their_peripherals(gs):
    endpoint = serials_in(9000, 10000, 1)[0]
    register(gs, [endpoint])
    register(gs, ["CAM-1"], parent=endpoint)
    assert trial.add_trial(gs.db, [endpoint, "NOT-YET"]) == [endpoint, "NOT-YET"]
    assert trial.add_trial(gs.db, [endpoint]) == []  # already one: no change, no entry
    listed = {t["serial"]: t["type"] for t in trial.list_trial(gs.db)}
    assert listed == {endpoint: TYPE, "NOT-YET": None}
    plan = rollouts.plan_rollout(gs.db, TYPE, "6.2.2", RolloutOptions(parse_waves("trial,100%")))
    assert plan.waves == [{"wave": "trial", "devices": 2}, {"wave": "100%", "devices": 2}]
    with pytest.raises(NotFound, match="'X' is not a trial device"):
        trial.remove_trial(gs.db, [endpoint, "X"])
    assert {t["serial"] for t in trial.list_trial(gs.db)} == {endpoint, "NOT-YET"}


def test_the_dry_run_counts_known_devices_per_wave_and_changes_nothing(gs):
    register(
        gs, serials_in(0, 100, 2) + serials_in(100, 1000, 3, "B") + serials_in(5000, 10000, 4, "C")
    )
    before = len(list_entries(gs.db))
    plan = rollouts.plan_rollout(gs.db, TYPE, "6.2.2")
    assert [w["devices"] for w in plan.waves] == [2, 5, 5, 9]
    assert rollout_records.active_rollout(gs.db, TYPE) is None
    assert len(list_entries(gs.db)) == before
    assert [p.version for p in list_packages(gs.db, TYPE)] == ["6.2.1", "6.2.2"]


def test_a_poll_received_before_the_installed_report_is_no_revert(gs):
    # Another worker's writer may write a poll it received before the device's
    # installed report (or its success) only after them: that is no revert.
    (serial,) = serials_in(0, 100, 1)
    register(gs, [serial])
    rollout = start(gs)
    attempts.reserve_attempt(gs.db, rollout.id, serial, None, now=T0)
    later = T0 + timedelta(seconds=30)
    note(gs, rollout, [Seen(serial, "6.2.2", "installed", at=later)], later)
    note(gs, rollout, [Seen(serial, "6.2.1", at=T0 + timedelta(seconds=29))], later)
    assert summary(gs)["failed"] == 0
    note(gs, rollout, [Seen(serial, "6.2.2", at=later + timedelta(seconds=1))], later)
    note(gs, rollout, [Seen(serial, "6.2.1", at=later + timedelta(microseconds=500_000))], later)
    assert (summary(gs)["succeeded"], summary(gs)["failed"]) == (1, 0)
    note(gs, rollout, [Seen(serial, "6.2.1", at=later + timedelta(seconds=2))], later)
    assert (summary(gs)["succeeded"], summary(gs)["failed"]) == (0, 1)
