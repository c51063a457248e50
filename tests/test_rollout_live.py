"""K, the live devices a wave's gate waits for, and each wave's own devices (SPEC section 6)."""

from __future__ import annotations

from datetime import timedelta

from test_rollouts import T0, TYPE, gs, register, serials_in  # noqa: F401 (gs: a fixture)

from dynupdate.core import rollout_records, rollouts, trial
from dynupdate.core.gates import RolloutOptions
from dynupdate.core.waves import bucket, parse_waves


def live(home, **options) -> int:
    rollout = rollouts.start_rollout(home.db, TYPE, "6.2.2", RolloutOptions(**options), now=T0)
    return rollout_records.wave_evidence(home.db, rollout, T0).live


def test_k_counts_own_devices_older_than_v_heard_from_within_7_days(gs):  # noqa: F811
    first, later = serials_in(0, 1000, 6), serials_in(1000, 10_000, 3, "L")
    register(gs, first[:2])  # live, older than V
    register(gs, first[2:3], version="6.2.2")  # on V: not waiting for anything
    register(gs, first[3:4], version="7.0")  # newer than V
    register(gs, first[4:], at=T0 - timedelta(days=8))  # silent for 8 days
    register(gs, later)  # another wave's
    assert live(gs, waves=parse_waves("10%,100%")) == 2


def test_k_is_counted_only_up_to_min_devices(gs):  # noqa: F811
    register(gs, serials_in(0, 10_000, 12))
    # The gate needs min(--min-devices, K): past it, more rows change nothing.
    assert live(gs, waves=parse_waves("100%"), min_devices=5) == 5


def test_wave_progress_counts_each_device_in_its_own_wave(gs):  # noqa: F811
    endpoints = [f"E{n}" for n in range(400)]
    register(gs, endpoints)
    cameras = {f"C{n}": endpoints[n * 7] for n in range(40)}
    for serial, parent in cameras.items():
        register(gs, [serial], parent=parent)
    named = {endpoints[3], endpoints[7 * 5], "C11", "never-seen"}  # a camera's endpoint too
    trial.add_trial(gs.db, named)
    parents = {**dict.fromkeys(endpoints), **cameras}
    for waves in ("1%,10%,50%,100%", "trial,10%,100%"):
        options = RolloutOptions(parse_waves(waves))
        rollout = rollouts.start_rollout(gs.db, TYPE, "6.2.2", options, now=T0)
        expected = [0] * len(options.waves)
        for serial, parent in parents.items():
            is_trial = serial in named or parent in named
            lead = bucket(parent or serial)
            if is_trial:
                expected[0] += 1
                continue
            shares = [w.share for w in options.waves]
            expected[next(i for i, s in enumerate(shares) if s is not None and lead < s)] += 1
        progress = rollout_records.wave_progress(gs.db, rollout)
        assert [w["devices"] for w in progress] == expected
        assert sum(expected) == len(parents)
        rollouts.abort_rollout(gs.db, TYPE, now=T0)  # a start unblocks V again
