"""Why an MQTT connection failed, in words that say what an operator must fix.

Shared by the store's uplink and head office's `storelink hq` client, so a refusal reads the same on both sides.
paho reports little: a failed TCP or TLS connect raises inside its network thread (``on_connect_fail`` is called
while that exception is being handled, so ``sys.exc_info()`` still holds it), and a broker that refuses the client
certificate after the TLS 1.3 handshake shows up only as "disconnected: Unspecified error" plus an error line in
paho's log. ``SocketErrorTrap`` keeps that line; ``problem_from_*`` turn each into a ``LinkProblem``.

Mosquitto closes the connection without a TLS alert as often as with one, so a refused client certificate cannot
always be told apart (revoked, or from a CA the broker does not trust); what the client can check itself (no
certificate configured, expired, not yet valid) it says precisely.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from paho.mqtt.reasoncodes import ReasonCode


@dataclass(frozen=True)
class LinkProblem:
    code: str  # stable, for alerts: dns, refused, timeout, unreachable, tls_unknown_ca, client_cert_revoked, ...
    message: str  # one line, what to fix

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Endpoint:
    """What was dialled, and the config keys to name in a message (``mqtt`` for a store, ``broker`` for hq)."""

    host: str
    port: int
    section: str = "mqtt"
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    connect_timeout: float = 5.0
    protocol: str = "5"
    address_key: str = "mqtt.host"  # the setting that names the broker: mqtt.host, broker.address

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


# -- before the MQTT CONNECT: DNS, TCP, the TLS handshake ------------------------------------------------------
def problem_from_exception(exc: BaseException | None, ep: Endpoint) -> LinkProblem:
    if isinstance(exc, socket.gaierror):
        return LinkProblem("dns", f"cannot resolve the broker's host name {ep.host!r} (DNS): check "
                                  f"{ep.address_key} and the name servers")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _server_cert_problem(exc, ep)
    if ep.tls and isinstance(exc, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError):
        # During the handshake (TLS 1.3 checks our certificate only after it): not a TLS listener.
        return LinkProblem("tls_not_tls", f"TLS handshake failed: {ep.where} hung up (is it a TLS port? a plain "
                                          f"MQTT port needs no {ep.section}.tls)")
    if isinstance(exc, ssl.SSLError):
        return problem_from_socket_error(str(exc), ep) or LinkProblem(
            "tls_failed", f"TLS handshake with {ep.where} failed: {exc.reason or exc}")
    if isinstance(exc, ConnectionRefusedError):
        return LinkProblem("refused", f"connection refused by {ep.where}: no broker listens there (broker "
                                      "down, wrong port, or a firewall rejects it)")
    if isinstance(exc, TimeoutError):
        return LinkProblem("timeout", f"no answer from {ep.where} within {ep.connect_timeout:g} s (firewall, "
                                      "wrong address, or the broker is overloaded)")
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
        return LinkProblem("unreachable", f"no route to {ep.where} ({exc.strerror}): check the network")
    if isinstance(exc, OSError):
        return LinkProblem("network", f"cannot connect to {ep.where}: {exc.strerror or exc}")
    return LinkProblem("unreachable", f"cannot reach broker {ep.where}")


def _server_cert_problem(exc: ssl.SSLCertVerificationError, ep: Endpoint) -> LinkProblem:
    why = exc.verify_message or str(exc)
    if "Hostname mismatch" in why or "IP address mismatch" in why:
        return LinkProblem("tls_hostname", f"broker certificate verify failed: hostname mismatch: the broker's "
                                           f"certificate is not valid for {ep.host!r} (connect by a name it "
                                           f"lists, or issue it for this name)")
    if "expired" in why:
        return LinkProblem("tls_expired", f"broker certificate verify failed: expired: the certificate of "
                                          f"{ep.where} must be renewed")
    if "not yet valid" in why:
        return LinkProblem("tls_not_yet_valid", "broker certificate verify failed: not yet valid (is this "
                                                "device's clock right?)")
    if "issuer" in why or "self-signed" in why or "self signed" in why:
        ca = str(ep.ca) if ep.ca else "the system's CA store"
        return LinkProblem("tls_unknown_ca", f"broker certificate verify failed: unknown CA: {ep.where} "
                                             f"presents a certificate not signed by the CA in {ca} "
                                             f"({ep.section}.tls.ca)")
    return LinkProblem("tls_verify", f"broker certificate verify failed: {why}")


# -- after the handshake: what paho logged when the broker hung up ---------------------------------------------
_ALERTS = {
    "CERTIFICATE_REQUIRED": "client_cert_missing",
    "CERTIFICATE_REVOKED": "client_cert_revoked",
    "CERTIFICATE_EXPIRED": "client_cert_expired",
    "UNKNOWN_CA": "client_cert_unknown_ca",
    "BAD_CERTIFICATE": "client_cert_refused",
    "CERTIFICATE_UNKNOWN": "client_cert_refused",
    "HANDSHAKE_FAILURE": "client_cert_refused",
}
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_RECORD",
            "HTTP_REQUEST")


def problem_from_socket_error(text: str, ep: Endpoint) -> LinkProblem | None:
    """`text`: a socket error as paho logs it ("failed to receive on socket: [SSL: ...] ..."). None: not TLS."""
    upper = text.upper()
    if any(s in upper for s in _NOT_TLS):
        return LinkProblem("tls_not_tls", f"TLS handshake failed: {ep.where} does not speak TLS (a plain MQTT "
                                          f"port? use the broker's TLS port, or drop {ep.section}.tls)")
    for alert, code in _ALERTS.items():
        if f"ALERT_{alert}" in upper:
            return _client_cert_problem(code, ep)
    if ep.tls and ("EOF" in upper or "RESET" in upper or "BROKEN PIPE" in upper):
        return _client_cert_problem(None, ep)
    return None


def _client_cert_problem(alert_code: str | None, ep: Endpoint) -> LinkProblem:
    """The broker closed the TLS connection before answering CONNECT: it did not take our certificate."""
    fix = f"{ep.section}.tls.cert and {ep.section}.tls.key"
    if ep.cert is None or alert_code == "client_cert_missing":
        return LinkProblem("client_cert_missing", f"the broker requires a client certificate and none was "
                                                  f"presented ({fix})")
    try:
        cert = x509.load_pem_x509_certificate(ep.cert.read_bytes())
    except (OSError, ValueError) as err:
        return LinkProblem("client_cert_unreadable", f"client certificate {ep.cert} cannot be read: {err}")
    subject = cert.subject.rfc4514_string()
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < now or alert_code == "client_cert_expired":
        return LinkProblem("client_cert_expired", f"client certificate refused: expired on "
                                                  f"{cert.not_valid_after_utc:%Y-%m-%d} ({subject}): issue a new one")
    if cert.not_valid_before_utc > now:
        return LinkProblem("client_cert_not_yet_valid", f"client certificate refused: not valid before "
                                                        f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                                                        f"({subject}; is this device's clock right?)")
    if alert_code == "client_cert_revoked":
        return LinkProblem("client_cert_revoked", f"client certificate refused: revoked ({subject}, serial "
                                                  f"{cert.serial_number:x}): head office revoked it; re-enrol")
    issuer = cert.issuer.rfc4514_string()
    foreign = _issuer_not_in(cert, ep.ca)
    if alert_code == "client_cert_unknown_ca" or foreign:
        return LinkProblem("client_cert_unknown_ca", f"client certificate refused: unknown CA: {subject} is "
                                                     f"issued by {issuer!r}, a CA the broker does not trust")
    return LinkProblem("client_cert_refused", f"client certificate refused by the broker ({subject}, serial "
                                              f"{cert.serial_number:x}, issued by {issuer!r}): revoked, or not "
                                              "from a CA it trusts")


def _issuer_not_in(cert: x509.Certificate, ca_file: Path | None) -> bool:
    """True when the CA file (the CA that signed the broker) did not issue our certificate either: in a StoreLink
    PKI one CA signs both, so a client certificate from another CA is the likely refusal."""
    if ca_file is None:
        return False
    try:
        cas = x509.load_pem_x509_certificates(ca_file.read_bytes())
    except (OSError, ValueError):
        return False
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return False
    return True


# A refused certificate with a TLS alert names the reason; the same refusal without one (a race in the broker)
# is only "refused". Once the specific reason is known, the vague one does not replace it.
SPECIFIC_CERT_PROBLEMS = frozenset({"client_cert_revoked", "client_cert_unknown_ca", "client_cert_expired",
                                    "client_cert_missing"})


# -- the broker's answer to CONNECT, and losing a connection ---------------------------------------------------
def problem_from_connack(reason: ReasonCode, ep: Endpoint) -> LinkProblem:
    value = reason.value
    if value in (1, 132):
        other = "3.1.1" if ep.protocol == "5" else "5"
        return LinkProblem("protocol", f"broker refused connection: it does not speak MQTT {ep.protocol} "
                                       f"(set {ep.section}.protocol = \"{other}\")")
    if value in (4, 134):
        return LinkProblem("bad_credentials", f"broker refused connection: bad user name or password "
                                              f"({ep.section}.username / password)")
    if value in (5, 135):
        return LinkProblem("not_authorised", "broker refused connection: not authorised (it does not admit "
                                             "this identity: user name/password, certificate or ACL)")
    if value in (2, 133):
        return LinkProblem("client_id", f"broker refused connection: client id not accepted ({ep.section}"
                                        ".client_id)")
    if value == 138:
        return LinkProblem("banned", "broker refused connection: this client is banned")
    if value in (3, 136, 137):
        return LinkProblem("broker_unavailable", f"broker refused connection: {reason} (try again later)")
    return LinkProblem("refused_connect", f"broker refused connection: {reason}")


def problem_closed_before_connack(ep: Endpoint, socket_error: str | None) -> LinkProblem:
    found = problem_from_socket_error(socket_error, ep) if socket_error else None
    if found is not None:
        return found
    if ep.tls:
        return _client_cert_problem(None, ep)
    return LinkProblem("closed", f"{ep.where} closed the connection without answering MQTT CONNECT (a TLS-only "
                                 f"port? then set {ep.section}.tls)")


def problem_from_disconnect(reason: ReasonCode, socket_error: str | None) -> LinkProblem:
    if reason.value == 142:
        return LinkProblem("session_taken_over", "disconnected: another client connected with this client id "
                                                 "(session taken over)")
    if reason.value == 135:
        return LinkProblem("not_authorised", "disconnected by the broker: not authorised")
    if socket_error:
        return LinkProblem("lost", f"disconnected: {socket_error.split(': ', 1)[-1]}")
    if reason.value == 128:  # paho's "Unspecified error": the socket closed under it, without a word
        return LinkProblem("lost", "disconnected: the broker closed the connection (restarted or stopped?)")
    return LinkProblem("lost", f"disconnected: {reason}")


class SocketErrorTrap(logging.Handler):
    """Keeps the last socket error paho logs. Given to paho as its logger (``enable_logger``) at ERROR level, so
    paho's per-packet debug lines cost one level check and are never formatted."""

    def __init__(self, forward_to: logging.Logger | None = None):
        super().__init__(logging.ERROR)
        self.last: str | None = None
        self.logger = logging.Logger("storelink.paho")  # not in the logging tree: paho's lines stay here
        self.logger.setLevel(logging.DEBUG if forward_to is not None else logging.ERROR)
        self.logger.addHandler(self)
        if forward_to is not None:  # debugging: paho's own lines go on to the "paho" logger as well
            self.logger.parent = forward_to
        self.logger.propagate = forward_to is not None

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "on socket" in text:
            self.last = text

    def take(self) -> str | None:
        text, self.last = self.last, None
        return text
