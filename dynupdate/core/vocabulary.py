"""The words of the protocol and of the CLI, defined once.

Statuses, reasons, report states and rollout states are spelled here and
imported by the core, the server, the CLI and the reference endpoint: a word
of the protocol is never retyped. Each is a :class:`~enum.StrEnum`, so a
member *is* its spelling (in SQL parameters, XML attributes and JSON alike).

>>> Reason.OUTSIDE_WINDOW == "outside-window"
True
>>> Status("in-progress") is Status.IN_PROGRESS
True
>>> [state.value for state in RolloutState if state.active]
['running', 'paused', 'halted']
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["UPDATE_OFFERED", "Reason", "ReportState", "RolloutState", "Status"]

UPDATE_OFFERED = "update"
"""A device's ``last_reason`` when its last poll was offered an update (the answer's element)."""


class Status(StrEnum):
    """A device's update status (SPEC section 1), derived now, never stored."""

    NO_POLICY = "no-policy"
    UP_TO_DATE = "up-to-date"
    PENDING = "pending"
    IN_PROGRESS = "in-progress"
    FAILED = "failed"
    WAITING = "waiting"  # a rollout stages a version this device may not take yet
    HELD = "held"  # its attempts at the rollout's version are used up


class Reason(StrEnum):
    """Why a poll answer is ``noUpdate`` (SPEC section 3)."""

    NO_POLICY = "no-policy"
    IN_CALL = "in-call"
    UP_TO_DATE = "up-to-date"
    OUTSIDE_WINDOW = "outside-window"
    STAGED = "staged"
    RATE_LIMITED = "rate-limited"
    HELD = "held"
    FORBIDDEN = "forbidden"


class ReportState(StrEnum):
    """The ``state`` of a device in a status report."""

    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    INSTALLED = "installed"
    FAILED = "failed"

    @property
    def working(self) -> bool:
        """Whether the device says it is on its way (downloading or installing)."""
        return self in (ReportState.DOWNLOADING, ReportState.INSTALLING)


class RolloutState(StrEnum):
    """A rollout's state (SPEC section 6)."""

    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    COMPLETED = "completed"
    ABORTED = "aborted"

    @property
    def active(self) -> bool:
        """Running, paused or halted: the type's policy is frozen and one rollout at a time."""
        return self in (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.HALTED)
