"""The thread that sends the spool, as a mixin of `edge.publish.MqttPublisher`: spooled rows
handed to paho in order (at most MAX_HANDED awaiting their PUBACK), the broker's
acknowledgements read and the accepted rows deleted, refused rows offered again, paho's network
thread started again if it ends. A failed pass never ends the thread: it is logged once per
kind of failure (then at most every SENDER_LOG_INTERVAL_S) and retried with backoff.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Literal

import paho.mqtt.client as mqtt

if TYPE_CHECKING:
    from edge.spool import Spooled

log = logging.getLogger("edge.publish")
"""The publisher's logger: these are its records, and operators and tests select them by it."""

REPLY_LABEL = "a command's response topic"
"""How a reply's publish is logged (refused, over a size limit): one line for all of them, not
one a topic (each new topic of a flood was a line and a key kept for good, in a review)."""
SEND_BATCH = 50
MAX_HANDED = 100
"""Spooled messages handed to paho and not yet acknowledged, at most. The whole backlog was
handed over at once: about 1.8 KB of paho's memory per message (108 MB for 60,000, against
the unit's MemoryMax), and past 65,535 paho's message ids wrapped, so an old message's
acknowledgement deleted a newer row the broker never had (a review)."""
SENDER_IDLE_S = 0.5
REFUSED_LOG_INTERVAL_S = 600.0
"""Publishes the broker refuses on one topic are logged at once, then at most this often (with
how many were refused meanwhile), not once per message."""
SENDER_RETRY_MIN_S = 1.0
SENDER_RETRY_MAX_S = 30.0
"""A spool sender pass that failed is retried after SENDER_RETRY_MIN_S, doubling up to this: a
full disk fails every pass for as long as it lasts."""
NETWORK_RESTART_MIN_S = 2.0
"""paho's network thread, ended by an error it does not expect, is started again after this,
doubling up to SENDER_RETRY_MAX_S while it keeps ending."""
SENDER_LOG_INTERVAL_S = 60.0
"""The same failure of the spool sender is logged at once, then at most this often (with how
many passes failed meanwhile), not once per pass."""


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


class SpoolSender:
    """The spool sender of `MqttPublisher`, which runs `_send_loop` on its own thread.

    It uses the publisher's settings, topics, spool and paho client; its connection state
    (`connected`, `_connected`, `_closing`, `_wake`, `_connection`, `_mid_lock`, `_sent_on`,
    `_topic_of`, `_last_unreachable`, `network_restarts`, `_network_wait_s`,
    `_network_restart_at`); the delivery's bookkeeping set by `_init_delivery` (`_inflight`,
    `_acked`, `_acked_rows`, `_remove_failed`, `_handed`, `_hand_again`, `_dropped_mids`, the
    messages in memory `_unspooled`, `_unspooled_mids`, `_unspooled_lock`, `_held`,
    `_memory_handed`, the refused rows `_refused_rows`, `_offer_refused_at`, `_offered`,
    `_offer_rest`, `_offer_retained`, `_accepted_offered`, `refused_retry_s`, and the throttles
    `_refused`, `_send_failures`); and its methods `_publish`, `_publish_retained`,
    `_latest_again`, `_send_unspooled` and `_spool_has_more`."""

    def _send_loop(self) -> None:
        """Send the spool until closed. A failed pass never ends the thread (nothing would be
        published again until a restart, while the daemon looks healthy): it is retried with
        backoff, and what was not sent or deleted stays in the spool."""
        retry_s = 0.0
        while not self._closing.is_set() or (self.connected and self._pending()):
            if retry_s and not self._closing.is_set():
                self._closing.wait(retry_s)
            else:
                self._wake.wait(SENDER_IDLE_S)
            self._wake.clear()
            try:
                self._watch_network()
                self._resolve_acks()
                if self.connected:
                    self._send_batch()
            except Exception as exc:  # a full disk or a bug must cost a pass, not the sender
                retry_s = min(max(2 * retry_s, SENDER_RETRY_MIN_S), SENDER_RETRY_MAX_S)
                self._log_send_failure(exc, retry_s)
                continue
            retry_s = 0.0
            if self._send_failures:
                log.info("MQTT: spool %s is sent again", self.spool.path)
                self._send_failures.clear()

    def _watch_network(self) -> None:
        """Start paho's network thread again if it ended while we are not closing. It ends on
        any error it does not expect (one raised in a callback, a host name its IDNA codec
        refuses), paho logs the traceback, and then nothing connects or is published again
        while the daemon looks healthy and spools every event. A fresh connection is opened
        (our on_connect may not have finished), then the thread; with backoff while it keeps
        ending."""
        alive = getattr(self.client, "_thread", True)  # a paho without it: not watched
        if self._closing.is_set() or alive is not None:
            if self.connected:
                self._network_wait_s = 0.0
            return
        now = time.monotonic()
        if now < self._network_restart_at:
            return
        self._network_wait_s = min(
            max(2 * self._network_wait_s, NETWORK_RESTART_MIN_S), SENDER_RETRY_MAX_S
        )
        self._network_restart_at = now + self._network_wait_s
        self.network_restarts += 1
        self._connected.clear()
        if self.network_restarts & (self.network_restarts - 1) == 0:  # 1, 2, 4, 8... times
            log.error(
                "MQTT: the network thread ended on an error (its traceback is above); "
                "connecting again (%d time(s) so far, then at most every %g s); events are "
                "spooled meanwhile",
                self.network_restarts,
                SENDER_RETRY_MAX_S,
            )
        where = f"{self.settings.host}:{self.settings.port}"
        try:
            self.client.reconnect()
        except Exception as exc:  # the thread's retries take it from here
            self._last_unreachable = f"cannot reach {where} ({type(exc).__name__}: {exc})"
        self.client.loop_start()

    def _log_send_failure(self, exc: Exception, retry_s: float) -> None:
        """One error for each new kind of failure, then at most one every SENDER_LOG_INTERVAL_S
        while it lasts, counting the failed passes in between."""
        kind = f"{type(exc).__name__}: {exc}"
        since = self._send_failures.due(kind)
        if since is None:
            return
        log.error(
            "MQTT: sending spool %s failed %d time(s) (%s): its messages stay in it and are "
            "retried in %g s, with backoff up to %g s (logged again at most every %g min)",
            self.spool.path,
            since,
            kind,
            retry_s,
            SENDER_RETRY_MAX_S,
            SENDER_LOG_INTERVAL_S / 60,
            exc_info=not isinstance(exc, sqlite3.Error),  # a bug's traceback, not a disk's
        )

    def _send_batch(self) -> None:
        self._taken_back()
        try:
            while self._hand_again:  # taken back from paho: before anything newer
                if not self.connected or len(self._inflight) >= MAX_HANDED:
                    return
                if self._hand_row(self._hand_again[0]) is None:
                    return
                self._hand_again.popleft()
        except sqlite3.Error:  # a spool that cannot be read: the messages in memory still go
            self._send_unspooled()
            raise
        try:
            rows = self.spool.after(self._handed, SEND_BATCH)
        except sqlite3.Error:  # a spool that cannot be read holds nothing to send before them
            self._send_unspooled()
            raise
        for row in rows:
            if not self.connected or len(self._inflight) >= MAX_HANDED:
                return  # an acknowledgement wakes the sender for the rest
            if not self._dropped_mids.empty():  # a reconnect took rows back meanwhile (the read
                self._wake.set()  # above waits on the card): they go first, in the next pass;
                return  # newer ones went before them (a review)
            if not self.spool.claim(row.id):  # a full spool dropped it since the read; from
                self._handed = row.id  # now on its end is kept if the spool fills
                continue
            info = self._publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:  # paho kept nothing: handed again later
                return
            self._handed = row.id
            if info.rc == mqtt.MQTT_ERR_PAYLOAD_SIZE:  # the broker's limit: as if refused
                self._refuse_later(row.id)
                continue
            self._inflight[info.mid] = row.id  # its ack is read on this thread, after this
        if self.spool.after(self._handed, 1):
            self._wake.set()
            return
        self._send_unspooled()
        if self._offer_rest or (
            self._offer_refused_at and time.monotonic() >= self._offer_refused_at
        ):
            self._offer_refused()

    def _offer_refused(self) -> None:
        """Publish the refused rows still in the spool again, oldest first (the broker's ACL
        may have been mended), after any sent meanwhile, at most MAX_HANDED awaiting their
        acknowledgement (all at once, a spool of refused rows took paho's memory and wrapped its
        message ids: accepted rows stayed in the spool); those refused again wait for the next
        offer. Retained messages are then re-sent at their latest."""
        if not self._offer_rest:  # a new offer: every refused row
            self._offer_rest = deque(sorted(self._refused_rows))
            self._refused_rows, self._offer_refused_at = [], 0.0
        while self._offer_rest:
            if not self.connected:  # the rest wait for the next offer
                self._postpone_offer()
                return
            if len(self._inflight) >= MAX_HANDED:
                return  # an acknowledgement wakes the sender for the rest
            rid = self._offer_rest[0]
            try:
                row = self._hand_row(rid)
            except Exception:  # a failing card: the rest wait for the next offer, not a restart
                self._postpone_offer()
                raise
            if row is None:  # paho kept nothing: offered again later
                return
            self._offer_rest.popleft()
            if row:
                self._offered.add(rid)
                self._offer_retained = self._offer_retained or row.retain
        if self._offer_retained:  # an old health message must not stay the broker's retained one
            self._offer_retained = False
            self._publish_retained()

    def _hand_row(self, rid: int) -> Spooled | Literal[False] | None:
        """Hand spool row `rid` to paho once more: the row when handed (its PUBACK awaited);
        False when it is gone (a full spool dropped it meanwhile) or still over the broker's limit
        (offered again with the refused); None when paho's queue took nothing (try later)."""
        found = self.spool.after(rid - 1, 1)
        if not found or found[0].id != rid or not self.spool.claim(rid):
            return False
        row = found[0]
        info = self._publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            return None
        if info.rc == mqtt.MQTT_ERR_PAYLOAD_SIZE:
            self._refuse_later(rid)
            return False
        self._inflight[info.mid] = rid
        return row

    def _refuse_later(self, row: int) -> None:
        """A spool row not taken now: offered again with the refused."""
        self._refused_rows.append(row)
        if not self._offer_refused_at:
            self._offer_refused_at = time.monotonic() + self.refused_retry_s

    def _postpone_offer(self) -> None:
        """The rows of an offer not yet made wait for the next one."""
        self._refused_rows.extend(self._offer_rest)
        self._offer_rest.clear()
        self._offer_refused_at = time.monotonic() + self.refused_retry_s

    def _taken_back(self) -> None:
        """What `_set_aside_largest` took back from paho is sent again, before anything newer:
        spool rows from the spool, messages in memory from memory. Read once `connected` was
        seen (it is set after they are put), so no newer row is handed before them."""
        while True:
            try:
                mids = self._dropped_mids.get_nowait()
            except queue.Empty:
                return
            rows = [self._inflight.pop(mid) for mid in mids if mid in self._inflight]
            self._offered.difference_update(rows)
            self._hand_again = deque(sorted({*self._hand_again, *rows}))
            back = [self._unspooled_mids.pop(m) for m in mids if m in self._unspooled_mids]
            with self._unspooled_lock:  # waiting in memory (a full card): first again, in order
                self._unspooled.extendleft(reversed(back))
                self._memory_handed = self._memory_handed or bool(back)

    def _resolve_acks(self) -> None:
        while True:
            try:
                mid, reason = self._acked.get_nowait()
            except queue.Empty:
                break
            with self._mid_lock:
                topic = self._topic_of.pop(mid, None)
                sent_on = self._sent_on.pop(mid, None)
            if topic and sent_on is not None and sent_on < self._connection:
                self._latest_again(topic)
            row = self._inflight.pop(mid, None)
            unspooled = self._unspooled_mids.pop(mid, None)
            offered = row is not None and row in self._offered
            if offered:
                self._offered.discard(row)
            if reason.is_failure:  # kept in the spool and offered again later
                if row is not None:
                    self._refuse_later(row)
                if unspooled is not None:  # into the spool once it takes messages again
                    with self._unspooled_lock:
                        self._held.append(unspooled)
                kept = (
                    f": kept in the spool, offered again every {_duration(self.refused_retry_s)}"
                    if row is not None
                    else ": kept in memory (the spool cannot be written), and spooled once it can"
                    if unspooled is not None
                    else ""
                )
                self._log_refusal(topic or "a topic", reason, kept)
            elif row is not None:  # others are acks of state and metrics, never spooled
                self._acked_rows.append(row)
                self._accepted_offered += offered
            if offered and not self._offered and not self._offer_rest and self._accepted_offered:
                log.info(
                    "MQTT: the broker accepted %d message(s) it had refused",
                    self._accepted_offered,
                )
                self._accepted_offered = 0
        self._remove_acked()

    def _remove_acked(self) -> None:
        """Delete the rows the broker accepted; one that cannot be deleted now (a full disk) is
        tried again next pass, and sent again (a QoS 1 duplicate) only if the daemon stops
        first. The pass goes on to send the rows after them (the spool still reads): the failed
        delete ended it, and an outage's events beyond the first MAX_HANDED stayed unsent for as
        long as the card was full (in a review)."""
        try:  # in one transaction: a synced commit per row was half of a message's syncs
            self.spool.remove_many(list(self._acked_rows))
            self._acked_rows.clear()
        except sqlite3.Error as exc:
            if not self._remove_failed:
                log.error(
                    "spool %s: messages the broker took cannot be deleted (%s); sending goes "
                    "on, and they are deleted once the card can be written",
                    self.spool.path,
                    exc,
                )
            self._remove_failed = True
            return
        if self._remove_failed:
            log.info("spool %s: the messages the broker took are deleted again", self.spool.path)
        self._remove_failed = False

    def _log_refusal(self, topic: str, reason: Any, kept: str) -> None:
        """One error for the first refused publish on `topic`, then at most one every
        REFUSED_LOG_INTERVAL_S, counting the refusals in between; `kept`: where it waits."""
        since = self._refused.due(topic)
        if since is None:
            return
        advice = (
            f"a requester asked for replies below {self.topics.response}, where the broker's ACL "
            f"does not let this device write: they still go to {self.topics.response}; ask for "
            f"that one, or let the device write below its topics (the fleet ACL's "
            f"`{self.topics.prefix}/%u/#` does)"
            if topic == REPLY_LABEL
            else "allow this user to write its topics in the broker's ACL"
        )
        log.error(
            "MQTT: the broker refused %d message(s) on %s (%s)%s; %s (logged again at most "
            "every %g min)",
            since,
            topic,
            reason,
            kept,
            advice,
            REFUSED_LOG_INTERVAL_S / 60,
        )

    def _pending(self) -> bool:
        """Something left for the sender; a spool that cannot be read has nothing it could send
        (its messages go at the next start), so closing does not wait for it."""
        waiting = self._inflight or self._acked_rows or self._unspooled or self._unspooled_mids
        return bool(waiting) or self._spool_has_more()
