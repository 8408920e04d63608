"""Who may read and act: a bearer token when one is configured, loopback callers otherwise.

There are no cookies, so a page on another site cannot ride on a logged-in browser (no CSRF):
the dashboard sends the token in an `Authorization` header, and actions also need a JSON body,
which a cross-site form cannot send without a CORS preflight this server never grants. Clip
and spectrogram URLs carry a per-file key derived from the token, so a link in an event can be
opened on a phone without handing out the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path
from urllib.parse import urlsplit

from edge.errors import SettingsError
from edge.settings import WebSettings, is_loopback

MIN_TOKEN_CHARS = 16
"""Shorter tokens are refused: the dashboard may face a whole network."""
TOKEN_CHARS = re.compile(r"[!-~]+")
"""Printable ASCII: a token is sent in an HTTP header (a zero-width space pasted with one locked
the page in "daemon unreachable", and a non-ASCII one could never be sent by curl)."""
CLIP_KEY_CHARS = 32


def read_token(web: WebSettings) -> str | None:
    """The access token from `web.token_file` (its first line), or None when none is set."""
    path = web.token_file
    if path is None:
        return None
    try:
        lines = Path(path).read_text().strip().splitlines()
    except FileNotFoundError:
        raise SettingsError(f"web.token_file {path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise SettingsError(f"web.token_file {path}: {reason}") from None
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN_CHARS:
        raise SettingsError(
            f"web.token_file {path}: the token must be at least {MIN_TOKEN_CHARS} characters"
        )
    if not TOKEN_CHARS.fullmatch(token):
        raise SettingsError(
            f"web.token_file {path}: the token may hold printable ASCII only (letters, digits, "
            "punctuation; no spaces): it travels in an HTTP header, which a browser, curl or "
            "Prometheus cannot send other characters in (`openssl rand -hex 16` makes one)"
        )
    return token


def clip_key(token: str, name: str) -> str:
    """The key that opens one clip (and its spectrogram) without the token."""
    digest = hmac.new(token.encode(), f"clip:{name}".encode(), hashlib.sha256).hexdigest()
    return digest[:CLIP_KEY_CHARS]


class Gate:
    """Decides whether a request may read, act, or open one clip."""

    def __init__(self, token: str | None, public_url: str | None = None) -> None:
        self.token = token
        self.public_host = urlsplit(public_url).hostname if public_url else None
        """The host name a reverse proxy forwards under ([web] public_url)."""

    def bearer_ok(self, authorization: str | None) -> bool:
        """True without a token, or when the header is `Bearer <token>`."""
        if self.token is None:
            return True
        scheme, _, value = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.token.encode()
        )

    def clip_ok(self, authorization: str | None, name: str, key: str | None) -> bool:
        """True with the token, or with the clip's own key."""
        if self.token is None or self.bearer_ok(authorization):
            return True
        expected = clip_key(self.token, name).encode()
        return key is not None and hmac.compare_digest(key.encode(), expected)

    def host_ok(self, host_header: str | None) -> bool:
        """Without a token only loopback names, and public_url's (a proxy that keeps the
        Host header), may be asked for: a page that rebinds its own DNS name to 127.0.0.1
        must not read or drive the dashboard."""
        if self.token is not None:
            return True
        try:
            name = urlsplit(f"//{(host_header or '').strip()}").hostname
        except ValueError:
            return False
        return bool(name) and (is_loopback(name) or name == self.public_host)
