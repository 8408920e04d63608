"""The dashboard's HTTP server: the page, JSON endpoints, the live stream, clips, actions and
/metrics, on the standard library's ThreadingHTTPServer (no framework to install on the Pi).

Requests run on their own threads and touch the daemon only through the live view (copies
made by the loop) and `Detector.submit`, the queue MQTT commands use as well.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import ipaddress
import json
import logging
import math
import os
import queue
import re
import socket
import sys
import threading
import time
from base64 import b64encode
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import SplitResult, parse_qs, quote, unquote, urlsplit

import soundfile as sf

from edge.commands import MAX_COMMAND_BYTES
from edge.errors import SoundSentryError, install_extra
from edge.eventlog import read_events
from edge.features import FeatureParams
from edge.settings import Settings, WebSettings, is_loopback
from edge.web.auth import Gate, clip_key, read_token
from edge.web.live import LiveView, Stream
from edge.web.png import clip_spectrogram_png

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("dashboard.html")
COMMAND_WAIT_S = 10.0
"""How long an action waits for the daemon loop's reply."""
KEEPALIVE_S = 5.0
"""A comment line is sent this often on an idle stream, so proxies keep it open."""
CLIENT_TIMEOUT_S = 60.0
"""A connection that neither sends nor takes anything for this long (an idle keep-alive, a
browser gone without closing, a half-open link) gives its thread back; live streams write a
keep-alive every KEEPALIVE_S, so one that cannot take it for this long is let go too."""
SPECTROGRAMS_CACHED = 16
CLIP_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.(wav|png)\Z")
"""Clip names as edge/clips.py writes them (and their spectrograms); nothing else is served."""
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _logged_events(settings: Settings) -> list[dict[str, Any]]:
    """The device's logged events, oldest first; none (logged) when the log cannot be read, which
    is no reason for the dashboard not to start."""
    try:
        return [e.data for e in read_events(settings.data_dir)]
    except SoundSentryError as exc:
        log.warning("dashboard: earlier events not shown: %s", exc)
        return []


MAX_CONNECTIONS = 32
"""Connections served at once (live streams included); more are answered 503 and closed.
Without a cap every connection had a thread and a file of its own, before any check: a host on
the network that held a thousand open took the daemon's last file handles (its event log,
clips, MQTT and microphone could not open a file) and spun the web thread on accept()."""
MAX_PER_ADDRESS = 8
"""Of those, from one address: one host cannot take every slot from the others. At 16 two hosts
took them all; a browser opens 6 to one site at most, and at 6 one browser's next request often
came before the thread of its last had ended (a live stream and five spectrograms: 58 of 300
answered 503, in a review). Not for loopback behind a reverse proxy ([web] public_url): every
visitor comes from it there."""
MAX_READING = 12
"""Connections still reading their request line and headers at once; beyond it the oldest of
them is let go. A few addresses that trickled their headers in and reconnected at each deadline
held every slot (HEADER_DEADLINE_S bounds one, not a stream of them); a real request's headers
come in milliseconds, so it is seldom the oldest."""
MAX_HEADER_BYTES = 16 * 1024
"""A request's headers, in all (the request line has the standard library's 64 KB): it reads
100 lines of 64 KB each, and six such requests without any token took the daemon past the
unit's MemoryMax. More is a 431."""
STREAM_SEND_BUFFER = 16 * 1024
"""The kernel's send buffer of a live stream: at its default (up to 4 MB) a browser that stopped
reading (a frozen background tab) filled it for an hour before CLIENT_TIMEOUT_S could start,
holding one of the few stream slots."""
SEND_CHUNK = 64 * 1024
"""Bytes of a clip read and sent at once."""
HEADER_DEADLINE_S = 10.0
"""A request's line and headers must arrive within this, in all: CLIENT_TIMEOUT_S restarts
with every byte, so a client that sent a header byte a minute (slowloris) held its slot for
ever, and 32 such held the page (and Prometheus) off for everyone, without any token."""
_BUSY_BODY = b'{"ok":false,"detail":"too many connections"}'
BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nServer: SoundSentry\r\n"  # doctor: a busy page
    b"Content-Type: application/json\r\n"
    + f"Content-Length: {len(_BUSY_BODY)}\r\nConnection: close\r\n\r\n".encode()
    + _BUSY_BODY
)
BIND_RETRY_S = 30.0
"""A taken port is tried again this often: detection never waits for the dashboard."""


class Dashboard:
    """The server, bound at construction and served on a thread. A taken port (another
    instance's dashboard, another service on it) is one error line, not a stop: detection runs
    without the page, and the port is tried again every BIND_RETRY_S until it is free."""

    def __init__(self, settings: Settings) -> None:
        try:
            from edge.web.prometheus import registry_for
        except ImportError:
            raise SoundSentryError(
                "the dashboard needs the [web] extra: " + install_extra("web")
            ) from None
        self.web = settings.web
        self.token = read_token(self.web)
        self.gate = Gate(self.token, self.web.public_url)
        self.clips = settings.data_dir / "clips"
        self.live = LiveView(self._links)
        self.live.device_id = settings.device_id
        self.live.seed(_logged_events(settings))  # the evidence outlives a restart
        self.registry = registry_for(self.live, settings.device_id)
        self.page, self.csp = _page(PAGE.read_bytes())
        self.submit: Callable[[Callable[[], None]], bool] = lambda work: False
        self.features: Callable[[], FeatureParams] | None = None
        self._handle_payload: Callable[[bytes], Any] = lambda payload: None
        self.on_page: Callable[[str], None] | None = None
        """Called (on the web thread) with `page_url` when the port is had only after the
        start: Home Assistant's link to the page comes then, not at the next start."""
        self._stopping = threading.Event()
        self._serving = threading.Event()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        try:
            self._server = _bind(self.web, self)
        except PortTakenError as exc:
            if exc.retry:
                log.error("%s; detection runs without the dashboard, which tries the port "
                          "again every %g s", exc, BIND_RETRY_S)  # fmt: skip
            else:  # a port below 1024 for the service's user, a mistyped host: say so, once
                log.error("%s; detection runs without the dashboard (mend [web] host or port "
                          "and restart)", exc)  # fmt: skip
                self._stopping.set()
        self._thread = threading.Thread(target=self._serve, name="web", daemon=True)

    @property
    def port(self) -> int:
        """The port listened on (the configured one while it is taken)."""
        return int(self._server.server_address[1]) if self._server else self.web.port

    def _serve(self) -> None:
        """Serve; first, while the port is taken, try it again every BIND_RETRY_S."""
        while self._server is None:
            if self._stopping.wait(BIND_RETRY_S):
                return
            try:
                self._server = _bind(self.web, self)
            except PortTakenError as exc:
                if not exc.retry:
                    log.error("%s; the dashboard stops trying", exc)
                    return
                continue
            log.info("dashboard on %s/ (its port is free now)", self._listen_url())
            page = self.page_url()
            if page is not None and self.on_page is not None:
                self.on_page(page)
        with self._lock:  # stop() shuts down exactly the server that serves
            if self._stopping.is_set():
                return
            self._serving.set()
        self._server.serve_forever()  # returns at once if shutdown() already asked

    def start(self, detector: Any, handle_payload: Callable[[bytes], Any]) -> None:
        """Serve for `detector`; actions go through `handle_payload` on the loop's thread."""
        gave_up = self._stopping.is_set()  # no page this run: no links to it, no advice on it
        detector.clip_url = self.clip_url if self.base_url() and not gave_up else None
        self.live.attach(detector.status)
        self.features = lambda: detector.bundle.features
        self.submit = detector.submit
        self._handle_payload = handle_payload
        self._thread.start()
        if gave_up:
            return
        if self._server is not None:
            log.info("dashboard on %s/", self._listen_url())
        if self.web.public_url and self.token is None:
            log.warning(
                "dashboard: [web] public_url is set but no token_file: whoever reaches %s "
                "reads and drives this device through it (a reverse proxy's requests come from "
                "loopback); set [web] token_file unless the proxy checks who asks",
                self.web.public_url,
            )
        if self.base_url() is None:
            log.warning(
                "dashboard: %s/ is reached from this machine only, so events carry no clip_url "
                "and Home Assistant no link to the page; set [web] public_url to the address "
                "phones reach it at (e.g. a reverse proxy), or listen beyond loopback ([web] "
                "host, with a token_file)",
                self._listen_url(),
            )

    def stop(self) -> None:
        """Close the live streams and stop serving (or trying to)."""
        with self._lock:
            self._stopping.set()
            serving = self._serving.is_set()
        self.live.close_streams()
        if self._server is not None:
            self._server.guesses.flush()
        if serving and self._server is not None:
            self._server.shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._server is not None:
            self._server.server_close()

    def base_url(self) -> str | None:
        """Where others reach the dashboard: public_url, or the address listened on; None when
        that is loopback (a link to 127.0.0.1 opens nothing on a phone)."""
        if self.web.public_url:
            return self.web.public_url.rstrip("/")
        if is_loopback(self.web.host):
            return None
        return self._listen_url()

    def _listen_url(self) -> str:
        """The address listened on, as a URL (the host name when bound to all addresses)."""
        host = self.web.host
        if host in WILDCARD_HOSTS:
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def page_url(self) -> str | None:
        """`base_url` while this page holds its port; None while another holds it: the links
        of a second instance whose [web] port was taken led to the first one's page (the fan's
        clips 404 there, Home Assistant's link to the fan opened the pump's page: a review)."""
        return self.base_url() if self._server is not None else None

    def clip_url(self, name: str) -> str | None:
        """The stable URL of a clip (with its key when a token guards the dashboard), while
        this page is served (`page_url`)."""
        if self._server is None:
            return None
        return f"{self.base_url() or self._listen_url()}/{self._clip_path(name)}"

    def _clip_path(self, name: str) -> str:
        key = f"?key={clip_key(self.token, Path(name).stem)}" if self.token else ""
        return f"clips/{quote(name)}{key}"

    def _links(self, event: dict[str, Any]) -> dict[str, Any]:
        """Relative links of an event's clip and spectrogram, for the page."""
        clip = event.get("clip")
        if isinstance(clip, str) and clip:
            stem = Path(clip).stem
            event["links"] = {
                "clip": self._clip_path(clip),
                "spectrogram": self._clip_path(f"{stem}.png"),
            }
        return event

    def events(self) -> list[dict[str, Any]]:
        """The recent events, newest first, without links to clips that retention (or a hand)
        has deleted since: `clip_gone` says the clip was kept once, where a link gave a 404."""
        events = self.live.events()
        for event in events:
            if event.get("links") and self.clip_file(str(event.get("clip"))) is None:
                event["links"], event["clip_gone"] = None, True
        return events

    def command(self, payload: bytes) -> tuple[HTTPStatus, dict[str, Any]]:
        """Run a command on the daemon loop and wait for its reply."""
        replies: queue.Queue[Any] = queue.Queue(1)
        if not self.submit(lambda: replies.put(self._handle_payload(payload))):
            return HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "detail": "command queue full"}
        try:
            reply = replies.get(timeout=COMMAND_WAIT_S)
        except queue.Empty:
            return HTTPStatus.GATEWAY_TIMEOUT, {"ok": False, "detail": "no reply from the daemon"}
        return (HTTPStatus.OK if reply.ok else HTTPStatus.BAD_REQUEST), reply.to_dict()

    def clip_file(self, name: str) -> Path | None:
        """The WAV a clip or spectrogram name refers to, if it is a file inside the clips
        folder; None for anything else (other folders, links out, other kinds of file)."""
        if not CLIP_NAME.match(name):
            return None
        wav = self.clips / f"{Path(name).stem}.wav"
        try:
            real, folder = wav.resolve(strict=True), self.clips.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        return real if real.parent == folder and real.is_file() else None

    def spectrogram(self, wav: Path) -> bytes:
        """The PNG spectrogram of a clip (cached while the file is unchanged)."""
        assert self.features is not None
        return render_spectrogram(wav, self.features())


_RENDERING = threading.Lock()
"""One spectrogram is drawn at a time: each takes up to 100 MB for an hour-long clip, and the
connection caps let eight come at once (481 MB in a review, past the unit's MemoryMax); a
request for a clip being drawn waits and takes the cached image."""


def render_spectrogram(wav: Path, params: FeatureParams) -> bytes:
    """The PNG spectrogram of a clip, drawn once while the file is unchanged."""
    with _RENDERING:
        return _spectrogram(wav, wav.stat().st_mtime_ns, params)


@lru_cache(maxsize=SPECTROGRAMS_CACHED)
def _spectrogram(wav: Path, _mtime_ns: int, params: FeatureParams) -> bytes:
    return clip_spectrogram_png(wav, params)


def _page(html: bytes) -> tuple[bytes, str]:
    """The page and a Content-Security-Policy that allows its own inline script and style
    (by hash) and nothing from elsewhere."""
    text = html.decode()
    hashes = {}
    for tag in ("script", "style"):
        match = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.S)
        body = match.group(1) if match else ""
        hashes[tag] = b64encode(hashlib.sha256(body.encode()).digest()).decode()
    csp = (
        "default-src 'none'; connect-src 'self'; img-src 'self'; media-src 'self'; "
        f"script-src 'sha256-{hashes['script']}'; style-src 'sha256-{hashes['style']}'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, csp


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    dashboard: Dashboard
    slots: threading.BoundedSemaphore

    per_address: dict[str, int]
    lock: threading.Lock
    guesses: _Guesses
    reading: OrderedDict[int, Handler]
    """Connections still reading their headers, oldest first (under `lock`)."""

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection while fewer than MAX_CONNECTIONS are served, and fewer
        than MAX_PER_ADDRESS from its address; else a 503 and close."""
        host = _host(client_address)
        with self.lock:
            # behind a reverse proxy every visitor comes from its loopback address: six pages
            # in all took every slot of it, from everyone
            crowded = self.per_address.get(host, 0) >= MAX_PER_ADDRESS and not _proxied(
                self.dashboard.web, host
            )
            if not crowded:
                self.per_address[host] = self.per_address.get(host, 0) + 1
        if crowded or not self.slots.acquire(blocking=False):
            if not crowded:
                self._leave(host)
            with contextlib.suppress(OSError):
                request.setblocking(False)  # never wait on a client that does not read
                request.send(BUSY)
            self.close_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            self._leave(host)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """socketserver's, with the slot given back before the socket is closed: a browser
        has its whole reply at the close and may ask again at once, and given back after it
        (when the thread ended), its next request met a 503 now and then (3 of 200 at one per
        address, in a review)."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.slots.release()
            self._leave(_host(client_address))
            self.shutdown_request(request)

    def _leave(self, host: str) -> None:
        with self.lock:
            left = self.per_address.get(host, 0) - 1
            if left > 0:
                self.per_address[host] = left
            else:
                self.per_address.pop(host, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client gone mid-reply (a phone that stops an audio download, a closed tab) is
        routine: one DEBUG line. Anything else: one ERROR line with its traceback in the log,
        not socketserver's print to stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("web: %s went away: %s", client_address[0], exc)
            return
        log.error("web: a request from %s failed", client_address[0], exc_info=True)


def _proxied(web: WebSettings, host: str) -> bool:
    """A request through the reverse proxy `public_url` names: every visitor's comes from its
    loopback address, so one address is everyone (no per-address slot cap, no lockout)."""
    return bool(web.public_url) and _is_loopback(host)


def _is_loopback(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1) as `_host` gives it."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host(client_address: Any) -> str:
    """The address a connection comes from (an IPv4 or IPv6 socket's first field), an IPv4
    client of a dual-stack socket by its IPv4 address. Not an IPv6 host's /64: every host of
    a LAN shares it, and one would take the slots of all the others."""
    if not isinstance(client_address, tuple):
        return ""
    try:
        address = ipaddress.ip_address(client_address[0])
    except ValueError:  # a scoped link-local address (fe80::1%eth0): as it is
        return str(client_address[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


GUESS_BUDGET = 20
"""Wrong tokens (or clip keys) one address may send within GUESS_WINDOW_S..."""
GUESS_WINDOW_S = 600.0
LOCKOUT_S = 600.0
"""...beyond which its tokens are not even checked for this long: 429 (300 guesses a second
were answered, none logged: a security review). Answering each wrong token late instead held
a connection slot per guess, and a few tokenless clients took every slot from the page and
Prometheus (a review of that). Behind a reverse proxy (`public_url`, every visitor from
loopback) the addresses cannot be told apart and locking loopback out would lock out everyone:
there the wrong tokens are logged, and the proxy is the place to limit them."""
GUESSERS_KEPT = 1024
"""Addresses whose wrong tokens are counted at once (a scan of an IPv6 LAN stays bounded)."""


GUESS_LOG_EVERY_S = 60.0
"""Wrong tokens and lockouts are logged at most this often, all addresses together, with the
counts since: a line per address flooded the journal from an IPv6 LAN's many addresses (a
review: 2,000 lines in 3 s)."""


class _Guesses:
    """Wrong tokens per address (a count per fixed window: memory that does not grow with the
    rate of guesses), addresses locked out for sending too many, and a log that says so."""

    def __init__(self, exempt: Callable[[str], bool]) -> None:
        self._lock = threading.Lock()
        self._wrong: dict[str, tuple[float, int]] = {}
        """Per address: when its window began, and its wrong tokens in it."""
        self._locked_until: dict[str, float] = {}
        self._exempt = exempt
        self._logged_at = -math.inf
        self._unsaid = [0, set(), set()]  # wrong tokens, their addresses, addresses locked out

    def locked(self, host: str) -> float:
        """Seconds `host` stays locked out (0: it may try)."""
        with self._lock:
            left = self._locked_until.get(host, 0.0) - time.monotonic()
            return left if left > 0 else 0.0

    def wrong(self, host: str) -> None:
        """Count a wrong token (or clip key) from `host`; lock it out once over the budget."""
        now = time.monotonic()
        with self._lock:
            if len(self._wrong) >= GUESSERS_KEPT and host not in self._wrong:
                self._forget(now)
            began, count = self._wrong.get(host, (now, 0))
            if now - began > GUESS_WINDOW_S:
                began, count = now, 0
            count += 1
            lock = count > GUESS_BUDGET and not self._exempt(host)
            if lock:
                self._locked_until[host] = now + LOCKOUT_S
                began, count = now, 0
            self._wrong[host] = (began, count)
            self._unsaid[0] += 1
            if len(self._unsaid[1]) < GUESSERS_KEPT:
                self._unsaid[1].add(host)
            if lock and len(self._unsaid[2]) < GUESSERS_KEPT:
                self._unsaid[2].add(host)
            said = self._take_unsaid(now)
        if said:
            log.warning("web: %s", said)

    def flush(self) -> None:
        """Log what has not been said (at a stop)."""
        with self._lock:
            said = self._take_unsaid(math.inf)
        if said:
            log.warning("web: %s", said)

    def _take_unsaid(self, now: float) -> str:
        """The line for the wrong tokens not yet logged, when one is due (under `_lock`)."""
        count, hosts, locked = self._unsaid
        if not count or now - self._logged_at < GUESS_LOG_EVERY_S:
            return ""
        self._logged_at = now if math.isfinite(now) else self._logged_at
        self._unsaid = [0, set(), set()]
        line = f"{count} request(s) with a wrong token from {_addresses(hosts)}"
        if locked:
            line += (
                f"; locked out for {LOCKOUT_S / 60:g} min (429, its tokens unchecked), over "
                f"{GUESS_BUDGET} within {GUESS_WINDOW_S / 60:g} min: {_addresses(locked)}"
            )
        if any(self._exempt(h) for h in hosts):
            line += "; through the reverse proxy nobody is locked out: limit guesses there"
        return line

    def _forget(self, now: float) -> None:
        """Drop what is over (under `_lock`); all counts, should that not be enough."""
        for host in [h for h, (b, _) in self._wrong.items() if now - b > GUESS_WINDOW_S]:
            del self._wrong[host]
        for host in [h for h, until in self._locked_until.items() if until <= now]:
            del self._locked_until[host]
        if len(self._wrong) >= GUESSERS_KEPT:
            self._wrong.clear()


def _addresses(hosts: set[str], shown: int = 5) -> str:
    names = sorted(hosts)
    plus = "+" if len(names) >= GUESSERS_KEPT else ""  # counted up to that many
    more = f" and {len(names) - shown}{plus} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


class _HeaderCap:
    """A connection's reader that, while `left` is set (its headers being read), refuses more
    than that many bytes in all: LineTooLong, which the standard library answers 431."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.left: int | None = None

    def readline(self, limit: int = -1) -> bytes:
        if self.left is None:
            return self._raw.readline(limit)
        cap = self.left + 1 if limit < 0 else min(limit, self.left + 1)
        line = self._raw.readline(cap)
        self.left -= len(line)
        if self.left < 0:
            raise http.client.LineTooLong(f"request headers over {MAX_HEADER_BYTES} bytes")
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class PortTakenError(SoundSentryError):
    """The dashboard's address cannot be listened on (for now)."""

    retry = True
    """False when trying again cannot help (no permission, no such host name)."""


def _bind(web: WebSettings, dashboard: Dashboard) -> _Server:
    """Bind the listening socket now, so a taken port is one line at start."""
    family = socket.AF_INET6 if ":" in web.host else socket.AF_INET
    server_class = type("Server", (_Server,), {"address_family": family})
    try:
        server = server_class((web.host, web.port), Handler)
    except OSError as exc:
        error = PortTakenError(
            f"web: cannot listen on {web.host}:{web.port}: {exc.strerror or exc}"
        )
        error.retry = exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) or (
            isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN  # DNS not up yet
        )
        raise error from None
    server.dashboard = dashboard
    server.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    server.per_address, server.lock = {}, threading.Lock()
    server.reading = OrderedDict()
    server.guesses = _Guesses(lambda host: _proxied(web, host))
    return server


class Handler(BaseHTTPRequestHandler):
    """One request: route, check who asks, answer."""

    server: _Server
    timeout = CLIENT_TIMEOUT_S  # socket timeout, set by StreamRequestHandler.setup

    def version_string(self) -> str:
        """The Server header: the name, no versions."""
        return "SoundSentry"

    def setup(self) -> None:
        """The connection, with HEADER_DEADLINE_S for its request line and headers, and among
        MAX_READING that read them at once (the oldest beyond is let go)."""
        super().setup()
        self.rfile = _HeaderCap(self.rfile)
        self._deadline = threading.Timer(HEADER_DEADLINE_S, self._too_slow)
        self._deadline.daemon = True
        self._deadline.start()
        with self.server.lock:
            self.server.reading[id(self)] = self
            oldest = (
                self.server.reading.popitem(last=False)[1]
                if len(self.server.reading) > MAX_READING
                else None
            )
        if oldest is not None:
            oldest._too_slow()

    def _read(self) -> None:
        """Its headers are in (or it ends): no longer among those reading them."""
        self._deadline.cancel()
        with self.server.lock:
            self.server.reading.pop(id(self), None)

    def _too_slow(self) -> None:
        with contextlib.suppress(OSError):  # the reading thread then sees the end and goes
            self.connection.shutdown(socket.SHUT_RDWR)

    def parse_request(self) -> bool:
        """Reads the headers, MAX_HEADER_BYTES at most; once they are in, the deadline no longer
        applies."""
        self.rfile.left = MAX_HEADER_BYTES
        try:
            return super().parse_request()
        finally:
            self.rfile.left = None
            self._read()

    def finish(self) -> None:
        self._read()
        super().finish()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own errors (a malformed request line, an over-long URL, too
        many headers, an unknown method) as the JSON and headers of every other reply."""
        self.close_connection = True
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        if not hasattr(self, "command") or self.command is None:
            self.command = "GET"  # a request line that did not parse: the body is still sent
        self._error(status, message or status.phrase)

    def log_message(self, format: str, *args: Any) -> None:
        """Access log at DEBUG (never the query string: clip keys stay out of logs)."""
        path = getattr(self, "path", "").partition("?")[0]  # unset for a malformed request line
        log.debug("%s %s %s", self.client_address[0], getattr(self, "command", None), path)

    @property
    def dash(self) -> Dashboard:
        return self.server.dashboard

    def _target(self) -> SplitResult | None:
        """The request's target, or None once answered 400: urlsplit refuses some (a broken
        IPv6 host in a full URL), before any check, from anyone on the network."""
        try:
            return urlsplit(self.path)
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "bad request target")
            return None

    def do_GET(self) -> None:
        """Read routes."""
        url = self._target()
        if url is None:
            return None
        path = url.path
        if not self.dash.gate.host_ok(self.headers.get("Host")):
            return self._error(HTTPStatus.FORBIDDEN, "unknown host name")
        if path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, self.dash.page, "text/html; charset=utf-8", page=True)
        if path == "/favicon.ico":  # browsers ask for it; there is none
            return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon", cache=True)
        if path.startswith("/clips/"):
            return self._clip(unquote(path.removeprefix("/clips/")), url.query)
        routes: dict[str, Callable[[], None]] = {
            "/api/state": lambda: self._json(HTTPStatus.OK, self.dash.live.snapshot()),
            "/api/events": lambda: self._json(HTTPStatus.OK, {"events": self.dash.events()}),
            "/api/stream": self._stream,
            "/metrics": self._metrics,
        }
        if path not in routes:
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        if not self._allowed(self.dash.gate.bearer_ok):
            return None
        routes[path]()

    def do_HEAD(self) -> None:
        """The headers of a GET (monitors, `curl -I`, players probing a clip); not a stream."""
        url = self._target()
        if url is None:
            return None
        if url.path == "/api/stream":  # a 405 names what is allowed (HTTP says it must)
            detail, allow = "the live stream answers GET only", {"Allow": "GET"}
            return self._error(HTTPStatus.METHOD_NOT_ALLOWED, detail, allow)
        return self.do_GET()

    def do_POST(self) -> None:
        """Actions: a JSON command with the token (when one is set), answered by the daemon."""
        if not self.dash.gate.host_ok(self.headers.get("Host")):
            return self._error(HTTPStatus.FORBIDDEN, "unknown host name")
        url = self._target()
        if url is None:
            return None
        if url.path != "/api/command":
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        if not self._allowed(self.dash.gate.bearer_ok):
            return None
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        body = self._body()
        if body is not None:
            self._json(*self.dash.command(body))

    def _body(self) -> bytes | None:
        given = self.headers.get("Content-Length")
        if given is None:
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            return None
        digits = re.fullmatch(r"[ \t]*([0-9]{1,15})[ \t]*", given)  # as HTTP has it: not -1
        if digits is None:
            self._error(HTTPStatus.BAD_REQUEST, "bad Content-Length")  # was "too large"
            return None
        length = int(digits.group(1))
        if length > MAX_COMMAND_BYTES:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "command too large")
            return None
        body = self.rfile.read(length)
        if len(body) != length:  # the client went before its whole command: none is run
            self.close_connection = True
            return None
        return body

    def _clip(self, name: str, query: str) -> None:
        key = parse_qs(query).get("key", [None])[0]
        if not self._allowed(lambda a: self.dash.gate.clip_ok(a, Path(name).stem, key), key):
            return None
        wav = self.dash.clip_file(name)
        if wav is None:
            return self._error(HTTPStatus.NOT_FOUND, "no such clip")
        png = name.endswith(".png")
        try:  # the file only: a phone that stops a download mid-way is no unreadable clip
            if not png:  # read as it is sent: a clip may be an hour (115 MB) long
                clip = open(wav, "rb")  # noqa: SIM115 (closed by _send_file)
            else:
                data = self.dash.spectrogram(wav)
        except (OSError, sf.LibsndfileError, ValueError) as exc:  # removed by retention meanwhile,
            log.warning("web: clip %s cannot be served: %s", name, exc)  # or a damaged file
            return self._error(HTTPStatus.NOT_FOUND, "clip gone or unreadable")
        if not png:
            return self._send_file(clip, "audio/wav")
        return self._send(HTTPStatus.OK, data, "image/png", cache=True)

    def _send_file(self, clip: BinaryIO, kind: str) -> None:
        """The whole file, or one `Range: bytes=a-b` of it (phones play audio only so), read
        SEND_CHUNK at a time: read whole, every range request of an hour's clip took 115 MB."""
        with clip as fh:
            size = os.fstat(fh.fileno()).st_size
            # at most 15 digits (a petabyte): int() refuses over 4,300, and a longer one is no
            # range of a clip; an unusable Range is ignored (the whole file), as HTTP says
            match = re.fullmatch(
                r"bytes=(\d{0,15})-(\d{0,15})", self.headers.get("Range", "").strip()
            )
            start, end, status, extra = 0, size - 1, HTTPStatus.OK, {}
            if match and any(match.groups()):
                first, last = match.groups()
                start = int(first) if first else max(0, size - int(last))
                end = min(int(last), size - 1) if first and last else size - 1
                if start >= size or start > end:  # with the security headers, as every reply
                    unsatisfiable = HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
                    self._head(unsatisfiable, kind, 0, extra={"Content-Range": f"bytes */{size}"})
                    return
                status, extra = (
                    HTTPStatus.PARTIAL_CONTENT,
                    {"Content-Range": f"bytes {start}-{end}/{size}"},
                )
            self._head(status, kind, max(0, end - start + 1), cache=True, extra=extra)
            if self.command == "HEAD":
                return
            fh.seek(start)
            left = end - start + 1
            while left > 0 and (chunk := fh.read(min(SEND_CHUNK, left))):
                self.wfile.write(chunk)
                left -= len(chunk)

    def _metrics(self) -> None:
        from edge.web.prometheus import exposition

        self._send(HTTPStatus.OK, *exposition(self.dash.registry))

    def _stream(self) -> None:
        """Server-sent events: a snapshot, then every window, state, health, event, reply."""
        live = self.dash.live
        stream = live.open_stream()
        if stream is None:
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, "too many live streams")
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")  # nginx in front: no buffering
            self._common_headers()
            self.end_headers()
            first = {**live.snapshot(), "events": self.dash.events()}
            if self.dash.features is not None:  # the spectrograms' frequency axis, bottom to top
                params = self.dash.features()
                first["spectrogram_hz"] = [params.fmin, params.top_hz]
            self._event("snapshot", json.dumps(first, separators=(",", ":")))
            self._pump(stream)
        except OSError:  # the browser went away
            pass
        finally:
            live.close_stream(stream)

    def _pump(self, stream: Stream) -> None:
        while not stream.dropped:
            try:
                name, text = stream.queue.get(timeout=KEEPALIVE_S)
            except queue.Empty:
                self.wfile.write(b": keepalive\n\n")
                self.wfile.flush()
                continue
            if name == "close":
                return
            self._event(name, text)

    def _event(self, name: str, text: str) -> None:
        self.wfile.write(f"event: {name}\ndata: {text}\n\n".encode())
        self.wfile.flush()

    def _json(self, status: HTTPStatus, data: Any, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(data, separators=(",", ":")).encode()
        self._send(status, body, "application/json", extra=extra)

    def _allowed(self, ok: Callable[[str | None], bool], key: str | None = None) -> bool:
        """Whether the request's token (or clip key) lets it through; if not, it has been
        answered: 401, or 429 while its address is locked out for guessing (its tokens are
        then not checked at all). A request with none (a page before its token is entered)
        counts as no guess."""
        authorization = self.headers.get("Authorization")
        given = authorization is not None or key is not None
        host = _host(self.client_address)
        left = self.server.guesses.locked(host) if given else 0.0
        if left:
            detail = "too many wrong tokens from this address: try again later"
            self._error(HTTPStatus.TOO_MANY_REQUESTS, detail, {"Retry-After": f"{left:.0f}"})
            return False
        if ok(authorization):
            return True
        if given:
            self.server.guesses.wrong(host)
        self._error(HTTPStatus.UNAUTHORIZED, "token required")
        return False

    def _error(self, status: HTTPStatus, detail: str, extra: dict[str, str] | None = None) -> None:
        self._json(status, {"ok": False, "detail": detail}, extra)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        kind: str,
        page: bool = False,
        cache: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        self._head(status, kind, len(body), page, cache, extra)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _head(
        self,
        status: HTTPStatus,
        kind: str,
        length: int,
        page: bool = False,
        cache: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        """The status line and headers of a response of `length` bytes (a 204 has neither
        body nor length, as HTTP says)."""
        self.send_response(status)
        if status != HTTPStatus.NO_CONTENT:
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "private, max-age=3600" if cache else "no-store")
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="soundsentry"')
        if page:
            self.send_header("Content-Security-Policy", self.dash.csp)
        if kind.startswith("audio/"):
            self.send_header("Accept-Ranges", "bytes")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self._common_headers()
        self.end_headers()

    def _common_headers(self) -> None:
        for name, value in HEADERS.items():
            self.send_header(name, value)
