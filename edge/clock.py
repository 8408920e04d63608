"""Whether the wall clock can be believed: a Raspberry Pi has no real-time clock.

At boot its clock is the last saved time (fake-hwclock) or 1970 until NTP sets it, forward by
hours, days or decades; a wrong real-time clock can put it years ahead. What judges the age of
a file by the wall clock (the clips' `max_age_days`) must not act on such a clock: a clock
review found every clip deleted at once by a clock 12 years ahead at start, and the clips of a
run made in 1970 deleted as 56 years old when NTP set the clock. Detection never reads the
wall clock (it counts audio samples); event times follow it, with a warning when it jumps.
"""

from __future__ import annotations

import time
from pathlib import Path

EARLIEST = 1_767_225_600.0
"""2026-01-01T00:00:00Z, before this release: a clock that says earlier is certainly wrong
(1970 at boot, or fake-hwclock's last save of an old card)."""
TIMESYNCD = Path("/run/systemd/timesync")
"""systemd-timesyncd's run folder (Raspberry Pi OS's NTP client): `synchronized` appears in it
once the clock was set (systemd 239 and later)."""


def synchronised() -> bool | None:
    """True when timesyncd has set the clock, False when it runs and has not yet, None when
    it does not run here: then the clock is taken as it comes. The kernel's own flag
    (adjtimex) is not asked: the unit denies the call (ProtectClock=), and where no NTP client
    runs in the machine's own namespace (a container, a VM whose host keeps the time) it says
    unsynchronised of a clock that is right."""
    if (TIMESYNCD / "synchronized").exists():
        return True
    if TIMESYNCD.is_dir():  # timesyncd runs and has not set the clock yet
        return False
    return None


def believable(now: float | None = None) -> str | None:
    """None when the wall clock can be believed; else why not, for a log line."""
    now = time.time() if now is None else now
    if now < EARLIEST:
        return f"the system clock says {time.strftime('%Y-%m-%d', time.gmtime(now))}"
    if synchronised() is False:
        return "the system clock is not synchronised yet (NTP)"
    return None
