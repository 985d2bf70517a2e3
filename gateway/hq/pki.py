"""The store CA: one X.509 CA that issues every store's client certificate, head office's own client
certificates and (for a broker without one) the broker's server certificate, and the revocation list (CRL) the
broker checks.

Layout of the PKI folder (``[pki] dir`` in hq.toml)::

    ca.pem, ca.key          the CA (key mode 600; keep the folder offline or in a secrets store)
    crl.pem                 the revocation list, rewritten by every revoke (the broker's crlfile)
    enrolled/{name}.json    one record per identity: role (store/hq), groups, every certificate issued to it

A store's certificate names it in its subject (CN = store id): the broker takes that as the client's user name
(Mosquitto ``use_identity_as_username``) and its ACL lets a user write only its own topics. Head-office identities
are called ``hq:{name}``; a colon is not allowed in a store id, so no store can ever be given head office's rights.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from storelink.system.files import write_atomically
from storelink.validation import is_identifier

KeyType = Literal["p256", "ed25519"]
Role = Literal["store", "hq"]
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
HQ_PREFIX = "hq:"
HQ_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,59}$"
_CLOCK_SKEW = dt.timedelta(minutes=5)  # a certificate valid "from now" is refused by a broker whose clock is behind


class PkiError(Exception):
    """Something about the CA or a certificate an operator must fix (one line)."""


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes
    serial: int
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key(key_type: KeyType) -> PrivateKey:
    return ed25519.Ed25519PrivateKey.generate() if key_type == "ed25519" else ec.generate_private_key(ec.SECP256R1())


def _digest(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()  # Ed25519 hashes itself


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_secret(path: Path, data: bytes) -> None:
    """A private key: mode 600 from the first byte (never readable by others, not even for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data, 0o600)
    os.chmod(path, 0o600)  # write_atomically keeps an existing file's mode; a key is 600 whatever it was


def hq_identity(name: str) -> str:
    if not re.fullmatch(HQ_NAME_RE, name):
        raise PkiError(f"head-office identity name {name!r}: letters, digits, '.', '_', '-' only")
    return HQ_PREFIX + name


# A store called "groups" would own {prefix}/groups/..., where the group price topics are.
RESERVED_STORE_IDS = frozenset({"groups"})


def check_store_id(store_id: str) -> None:
    if not is_identifier(store_id):
        raise PkiError(f"store id {store_id!r} is not valid (letters, digits, '.', '_', '-'; at most 64)")
    if store_id in RESERVED_STORE_IDS:
        raise PkiError(f"store id {store_id!r} is reserved (its topics would be the group topics)")


class StoreCA:
    """The CA on disk. `StoreCA.create()` makes one; `StoreCA(path)` opens an existing one."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.cert_path = directory / "ca.pem"
        self.key_path = directory / "ca.key"
        self.crl_path = directory / "crl.pem"
        self.records_dir = directory / "enrolled"
        try:
            self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except FileNotFoundError:
            raise PkiError(f"no store CA in {directory} (create one: storelink hq ca init)") from None
        except (OSError, ValueError, TypeError) as err:
            raise PkiError(f"cannot read the store CA in {directory}: {err}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise PkiError(f"{self.key_path}: not a P-256 or Ed25519 key")
        self.key: PrivateKey = key
        self.key_type: KeyType = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "p256"

    @classmethod
    def create(cls, directory: Path, *, key_type: KeyType = "p256", days: int = 3650,
               name: str = "StoreLink store CA") -> StoreCA:
        if (directory / "ca.key").exists():
            raise PkiError(f"{directory / 'ca.key'} exists: a store CA is already there (never replaced "
                           "by accident; every enrolled store depends on it)")
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key = _new_key(key_type)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, _digest(key))
        )
        write_secret(directory / "ca.key", key_pem(key))
        write_atomically(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        ca = cls(directory)
        ca.write_crl()  # the broker's crlfile must exist (and be signed) before the first revocation
        return ca

    # -- issuing --------------------------------------------------------------------------------------------
    def _leaf(self, cn: str, days: int, usage: x509.ObjectIdentifier,
              sans: list[x509.GeneralName] | None = None) -> Issued:
        if days < 1:
            raise PkiError("a certificate must be valid for at least one day")
        key = _new_key(self.key_type)
        now = _now()
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        serial = x509.random_serial_number()
        b = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - _CLOCK_SKEW).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self.key, _digest(self.key))
        return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem(key), serial, not_after)

    def issue_client(self, identity: str, *, role: Role, days: int, groups: list[str] | None = None) -> Issued:
        """A client certificate for a store (identity = store id) or head office (identity = hq:name), recorded."""
        if role == "store":
            check_store_id(identity)
        elif not identity.startswith(HQ_PREFIX):
            raise PkiError(f"head-office identities are named {HQ_PREFIX}NAME, not {identity!r}")
        issued = self._leaf(identity, days, ExtendedKeyUsageOID.CLIENT_AUTH)
        record = self.record(identity) or {"identity": identity, "role": role, "certificates": []}
        if record["role"] != role:
            raise PkiError(f"{identity} is enrolled as {record['role']}, not {role}")
        record["groups"] = sorted(set(groups or []))
        record["certificates"].append({"serial": format(issued.serial, "x"), "issued_at": _iso(_now()),
                                       "not_after": _iso(issued.not_after), "revoked_at": None})
        self._save_record(record)
        return issued

    def issue_server(self, hosts: list[str], *, days: int) -> Issued:
        """A broker certificate (for a broker that has none from another CA): names are DNS names or IPs."""
        if not hosts:
            raise PkiError("name at least one host name or IP address the stores connect to")
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        return self._leaf(hosts[0], days, ExtendedKeyUsageOID.SERVER_AUTH, sans)

    # -- records and revocation -----------------------------------------------------------------------------
    def _record_path(self, identity: str) -> Path:
        return self.records_dir / f"{identity.replace(':', '_')}.json"

    def record(self, identity: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._record_path(identity).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise PkiError(f"cannot read the enrolment record of {identity}: {err}") from None
        return data if isinstance(data, dict) else None

    def records(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.records_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise PkiError(f"cannot read enrolment record {path}: {err}") from None
            out.append(data)
        return out

    def _save_record(self, record: dict[str, Any]) -> None:
        self.records_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(self._record_path(record["identity"]), json.dumps(record, indent=1).encode(), 0o644)

    def revoke(self, identity: str, serial: str | None = None) -> list[str]:
        """Revoke every certificate of `identity` (or only `serial`), rewrite the CRL; returns the serials."""
        record = self.record(identity)
        if record is None:
            raise PkiError(f"{identity} was never enrolled here (see {self.records_dir})")
        now = _iso(_now())
        done = []
        for cert in record["certificates"]:
            if cert["revoked_at"] is None and serial in (None, cert["serial"]):
                cert["revoked_at"] = now
                done.append(cert["serial"])
        if serial is not None and not done:
            raise PkiError(f"{identity} has no unrevoked certificate with serial {serial}")
        self._save_record(record)
        self.write_crl()
        return done

    def write_crl(self) -> None:
        now = _now()
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
             .last_update(now - _CLOCK_SKEW).next_update(self.cert.not_valid_after_utc))
        for record in self.records() if self.records_dir.is_dir() else []:
            for cert in record["certificates"]:
                if cert["revoked_at"]:
                    b = b.add_revoked_certificate(
                        x509.RevokedCertificateBuilder().serial_number(int(cert["serial"], 16))
                        .revocation_date(dt.datetime.fromisoformat(cert["revoked_at"])).build())
        crl = b.sign(self.key, _digest(self.key))
        write_atomically(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)


def active(record: dict[str, Any]) -> bool:
    """The identity holds at least one certificate that is neither revoked nor expired."""
    now = _now()
    return any(c["revoked_at"] is None and dt.datetime.fromisoformat(c["not_after"]) > now
               for c in record["certificates"])


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="seconds")
