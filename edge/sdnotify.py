"""systemd notifications (READY=1, WATCHDOG=1, STATUS=...) without a dependency.

A no-op when the process was not started by systemd with Type=notify ($NOTIFY_SOCKET unset).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

BUSY_LIMIT_S = 600.0
"""The longest a piece of work on the loop (`busy`) is kept alive: one that hangs beyond it
stops the pings, and systemd restarts the service."""


class SystemdNotifier:
    """Sends sd_notify datagrams to $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() else None
        self._last_ping = float("-inf")

    @property
    def enabled(self) -> bool:
        """True when running under systemd's notify protocol."""
        return bool(self.address)

    def notify(self, message: str) -> bool:
        """Send one notification; False (and a debug log) when it cannot be sent."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)  # never let a slow reader stall the audio loop
                sock.sendto(message.encode(), self.address)
            return True
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", message, exc)
            return False

    def ready(self, status: str = "") -> bool:
        """READY=1 (with an optional STATUS line)."""
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the service is alive and doing its job (sent at most every
        WatchdogSec/4, or every second without a watchdog)."""
        now = time.monotonic()
        if now - self._last_ping < (self.watchdog_s / 4 if self.watchdog_s else 1.0):
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """STATUS=...: a line shown by `systemctl status`."""
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        """STOPPING=1."""
        return self.notify("STOPPING=1")

    @contextmanager
    def busy(self, limit_s: float = BUSY_LIMIT_S) -> Iterator[None]:
        """Keep the watchdog fed while the loop does one long piece of work (a refit of the
        site's model takes seconds on a Pi, more on a big site set): pings from a thread every
        WatchdogSec/4 for at most `limit_s`. Without a watchdog, nothing."""
        if not self.watchdog_s or not self.address:
            yield
            return
        done = threading.Event()
        until = time.monotonic() + limit_s

        def ping() -> None:
            while not done.wait(self.watchdog_s / 4) and time.monotonic() < until:
                self.notify("WATCHDOG=1")

        pinger = threading.Thread(target=ping, name="watchdog-busy", daemon=True)
        pinger.start()
        try:
            yield
        finally:
            done.set()
            pinger.join()
            self._last_ping = float("-inf")  # the loop's next tick pings at once
