"""Reaching the MQTT broker: credentials and TLS from [mqtt], and why a connection failed
where paho says nothing (`probe_reason`), for the publisher and for `soundsentry doctor`."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edge.errors import SettingsError
from edge.settings import MqttSettings, mqtt_password

log = logging.getLogger(__name__)


PROBE_TIMEOUT_S = 2.0
"""How long a failed connection's reason is looked for (on paho's thread, between retries)."""

KEEPALIVE_TIMEOUT = 0x8D
"""MQTT 5 reason code paho gives when it hangs up after a keepalive with nothing heard."""

LOGIN_REFUSALS = frozenset({"Not authorized", "Bad user name or password"})

LOGIN_HINT = (
    " (the broker asks for another login: check [mqtt] username and password_file, or the "
    "broker's ACL; `soundsentry doctor` tests the login)"
)
"""Said with a refusal of the login: "Not authorized" was all a user saw (a review)."""


def configure_auth(client: mqtt.Client, s: MqttSettings) -> None:
    """Credentials and TLS from the settings (the password is never logged)."""
    if s.username:
        client.username_pw_set(s.username, mqtt_password(s))
    elif mqtt_password(s) is not None:  # the settings, a password file or the unit's credential
        log.warning(  # dropped without a word, and "Not authorized" was all a user saw (a review)
            "MQTT: a password is set but no [mqtt] username: MQTT sends a password only with a "
            "user name, so none is sent; set username"
        )
    if s.tls.enabled:
        for key in ("ca_file", "cert_file", "key_file"):  # ssl's own error names no file
            path = getattr(s.tls, key)
            if path is not None and (Path(path).is_dir() or not os.access(path, os.R_OK)):
                why = (
                    "a folder, not a file" if Path(path).is_dir()
                    else "not found" if not Path(path).exists()
                    else "not readable by this user"
                )  # fmt: skip
                raise SettingsError(f"mqtt.tls.{key} {path}: {why}")
        try:
            client.tls_set_context(tls_context(s))
        except (ssl.SSLError, ValueError) as exc:  # not a certificate, a key of another cert
            raise SettingsError(f"[mqtt.tls]: a certificate or key is unusable: {exc}") from None
        client.tls_insecure_set(s.tls.insecure)


def tls_context(s: MqttSettings) -> ssl.SSLContext:
    """The client's TLS context from [mqtt.tls], as paho's `tls_set` made it: one for the
    connection and for `probe_reason`'s handshake, so the probe names the reason the
    connection itself meets (two copies could drift apart)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if s.tls.cert_file:
        key = str(s.tls.key_file) if s.tls.key_file else None
        context.load_cert_chain(str(s.tls.cert_file), key)
    context.check_hostname = not s.tls.insecure  # before CERT_NONE, which it forbids
    context.verify_mode = ssl.CERT_NONE if s.tls.insecure else ssl.CERT_REQUIRED
    if s.tls.ca_file:
        context.load_verify_locations(str(s.tls.ca_file))
    else:
        context.load_default_certs()
    return context


HOST_CHECK = "check [mqtt] host and port, and that the broker runs"


def keepalive_timeout(reason: Any) -> bool:
    """paho's reason for a connection it ended itself, no packet heard within the keepalive
    (141, "Keep alive timeout"): blamed on a port that closed the connection (a broker stopped
    with SIGSTOP, in a review, which closed nothing)."""
    return getattr(reason, "value", None) == KEEPALIVE_TIMEOUT


CERT_DATES = (9, 10)
"""OpenSSL's X509_V_ERR_CERT_NOT_YET_VALID and X509_V_ERR_CERT_HAS_EXPIRED."""


def probe_reason(s: MqttSettings) -> tuple[str, str]:
    """Why a connection failed where paho says nothing, and what to check: asked of the network
    (a TCP connection, then with [mqtt.tls] the TLS handshake as the client makes it). A
    certificate refused was "the TLS or MQTT handshake failed", and "check host and port" beside
    it, whatever the cause (in a review)."""
    try:
        sock = socket.create_connection((s.host, s.port), timeout=PROBE_TIMEOUT_S)
    except OSError as exc:
        return str(exc) or type(exc).__name__, HOST_CHECK
    with sock:
        if not s.tls.enabled:
            return (
                "it takes TCP connections: the MQTT handshake failed",
                "a TLS port? then set [mqtt.tls] enabled; else is it an MQTT broker?",
            )
        try:
            with tls_context(s).wrap_socket(sock, server_hostname=s.host):
                pass
        except ssl.SSLCertVerificationError as exc:
            if exc.verify_code in CERT_DATES:  # a Pi's clock before NTP set it (a clock review)
                return (
                    f"TLS: the broker's certificate is refused: {exc.verify_message}, by this "
                    f"machine's clock ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
                    "is the clock right? A Pi without a real-time clock is wrong until NTP sets "
                    "it (`timedatectl`); else renew the certificate",
                )
            return (
                f"TLS: the broker's certificate is refused: {exc.verify_message}",
                "[mqtt.tls] ca_file must be the CA that signed it, and [mqtt] host a name the "
                "certificate holds",
            )
        except (ssl.SSLError, OSError) as exc:
            return (
                f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}",
                "check [mqtt.tls]",
            )
    return (
        "TCP and TLS connect: the MQTT handshake failed",
        "is it an MQTT broker, and does it take this client's certificate?",
    )
