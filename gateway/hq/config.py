"""Head office's configuration: one ``hq.toml`` (``--config`` or ``STORELINK_HQ_CONFIG``), validated like the store's.

Unknown keys are errors, every problem names its dotted key, relative paths are relative to the file. Secrets
never come from the command line: the broker and database passwords come from an environment variable or a file
(``password_env`` / ``password_file``). Command-line flags override the file (`HqOverrides`). Without a file the
defaults are a plain-text broker on 127.0.0.1:1883, which is what the demo and a developer's laptop run.

Every `storelink hq` command and the services built on it (ingest, fleet updates) take their settings from
`HqConfig`; `storelink.hq.connect.connect()` turns it into a connected MQTT client, `storelink.hq.db.open_configured()`
into an open database.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import (
    AfterValidator,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from storelink.validation import StrictModel, describe_validation_error

CONFIG_ENV = "STORELINK_HQ_CONFIG"
PASSWORD_ENV = "STORELINK_HQ_PASSWORD"  # the broker password when hq.toml names no password_env/password_file


class HqConfigError(Exception):
    """A setting head office cannot run with. One line: the file and each bad key."""


def _relative_to_file(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base")
    return value if value.is_absolute() or base is None else Path(base) / value


FilePath = Annotated[Path, AfterValidator(_relative_to_file)]


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:8883``) -> (host, port). Raises ValueError saying what is wrong."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s/]+):(\d{1,5})", text.strip())
    if not m:
        raise ValueError(f"expected HOST:PORT (e.g. mqtt.example.com:8883), got {text!r}")
    host, port = (m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), int(m.group(4)))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    if m.group(1):
        ipaddress.IPv6Address(host)  # raises ValueError for a malformed one
    elif not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", host):
        raise ValueError(f"{host!r} is not a host name or IP address")
    return host, port


class _Secret(StrictModel):
    password_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                     description="environment variable holding the password")
    password_file: FilePath | None = Field(None, description="file holding the password (first line)")

    @model_validator(mode="after")
    def _one_source(self) -> _Secret:
        if self.password_env and self.password_file:
            raise ValueError("give password_env or password_file, not both")
        return self

    def read_password(self, where: str, default_env: str | None = None) -> str | None:
        """`where`: "FILE: section", for messages."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text(encoding="utf-8").splitlines()[0].strip() or None
            except (OSError, IndexError, UnicodeDecodeError) as err:
                raise HqConfigError(f"{where}.password_file: cannot read {self.password_file}: "
                                    f"{getattr(err, 'strerror', None) or err or 'empty file'}") from None
        name = self.password_env or default_env
        if name is None:
            return None
        value = os.environ.get(name)
        if self.password_env and not value:
            raise HqConfigError(f"{where}.password_env: the environment variable {name} is not set")
        return value


class TlsSettings(StrictModel):
    ca: FilePath | None = Field(None, description="CA that signed the broker's certificate (default: system CAs)")
    cert: FilePath | None = Field(None, description="head office's client certificate (hq ca hq-cert)")
    key: FilePath | None = Field(None, description="its private key")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be given together")
        return self


class BrokerSettings(_Secret):
    address: str = Field("127.0.0.1:1883", description="HOST:PORT head office connects to")
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = Field(None, description="when the broker wants one (not with client certificates)")
    tls: TlsSettings | None = None
    keepalive: int = Field(30, ge=5, le=3600)
    connect_timeout: float = Field(10.0, gt=0, le=300, description="seconds to get a CONNACK")

    @model_validator(mode="before")
    @classmethod
    def _protocol_as_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("protocol"), int | float):
            data = {**data, "protocol": str(data["protocol"])}
        return data

    @field_validator("address")
    @classmethod
    def _check_address(cls, v: str) -> str:
        parse_address(v)
        return v

    @property
    def host(self) -> str:
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]


class SigningSettings(StrictModel):
    key: FilePath | None = Field(None, description="Ed25519 private key that signs prices, configs, commands")
    trust: list[str] = Field(default_factory=list, description="more public keys stores should trust (a key "
                                                               "rotation): base64 or PEM file paths")


class PkiSettings(StrictModel):
    dir: FilePath = Field(Path("pki"), validate_default=True,
                          description="the store CA, its CRL and the enrolment records")
    cert_days: int = Field(825, ge=1, le=3650, description="validity of store and head-office certificates")


class EnrollSettings(StrictModel):
    template: FilePath | None = Field(None, description="a storelink.toml without store_id: the stores' config")
    out: FilePath = Field(Path("bundles"), validate_default=True,
                          description="hq enroll writes each bundle to out/STORE_ID/")
    broker: str | None = Field(None, description="HOST:PORT the stores connect to (default: broker.address)")

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, v: str | None) -> str | None:
        if v is not None:
            parse_address(v)
        return v


class DatabaseSettings(_Secret):
    """Head office's event store (`storelink hq ingest`, `hq serve`, and `hq publish-prices` records there)."""

    url: str = Field(description="postgresql://USER@HOST[:PORT]/DATABASE (the password: password_env/_file) or "
                                 "sqlite:///PATH (relative to this file)")

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str, info: ValidationInfo) -> str:
        if v.startswith("sqlite:///"):
            path = Path(v.removeprefix("sqlite:///"))
            if not path.name:
                raise ValueError("names no file (sqlite:///PATH/TO/FILE.db)")
            return f"sqlite:///{_relative_to_file(path, info)}"
        parts = urlsplit(v)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(f"must start with postgresql:// or sqlite:///, got {parts.scheme or 'no scheme'}")
        if parts.password:
            raise ValueError("must not contain the password: use password_env or password_file")
        if not parts.path.strip("/"):
            raise ValueError("names no database (postgresql://USER@HOST/DATABASE)")
        try:
            parts.port  # noqa: B018  # raises ValueError for a port out of range
        except ValueError as err:
            raise ValueError(str(err)) from None
        return v

    @model_validator(mode="after")
    def _no_sqlite_password(self) -> DatabaseSettings:
        if self.url.startswith("sqlite:") and (self.password_env or self.password_file):
            raise ValueError("an SQLite file has no password (password_env/password_file are for PostgreSQL)")
        return self


class HqConfig(StrictModel):
    topic_prefix: str = Field("storelink", pattern=r"^[A-Za-z0-9_-]+$", description="the stores' mqtt.topic_prefix")
    broker: BrokerSettings = Field(default_factory=BrokerSettings)  # type: ignore[arg-type]
    signing: SigningSettings = Field(default_factory=SigningSettings)  # type: ignore[arg-type]
    pki: PkiSettings = Field(default_factory=PkiSettings)  # type: ignore[arg-type]
    enroll: EnrollSettings = Field(default_factory=EnrollSettings)  # type: ignore[arg-type]
    database: DatabaseSettings | None = None
    _source: str = PrivateAttr("(defaults)")

    @property
    def source(self) -> str:
        """Where it was read from (a path, or "(defaults)"), for messages."""
        return self._source

    def broker_password(self) -> str | None:
        return self.broker.read_password(f"{self.source}: broker", PASSWORD_ENV)

    def database_password(self) -> str | None:
        """The [database] password (password_env / password_file); None without one or without [database]."""
        return self.database.read_password(f"{self.source}: database") if self.database is not None else None

    @property
    def database_url(self) -> str | None:
        """[database] url (``--database`` overrides it); None when neither names one (storelink.hq.db's
        open_configured then uses the embedded default)."""
        return self.database.url if self.database is not None else None

    def signing_key(self) -> Ed25519PrivateKey:
        """The private key that signs prices, configs and commands (signing.key, or --key)."""
        from storelink.remote.signing import load_private_key

        path = self.signing.key
        if path is None:
            raise HqConfigError(f"{self.source}: signing.key: no signing key (give --key FILE or set [signing] key; "
                                "make one with storelink hq keygen)")
        try:
            return load_private_key(path.read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError) as err:
            raise HqConfigError(f"{self.source}: signing.key: cannot read {path}: "
                                f"{getattr(err, 'strerror', None) or err}") from None
        except ValueError as err:
            raise HqConfigError(f"{self.source}: signing.key: {path}: {err}") from None


@dataclass(frozen=True)
class HqOverrides:
    """Command-line flags; None leaves the file's value."""

    broker: str | None = None
    protocol: str | None = None
    username: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    topic_prefix: str | None = None
    signing_key: Path | None = None
    database: str | None = None  # --database: [database] url

    def apply(self, data: dict[str, Any]) -> dict[str, Any]:
        out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
        broker = out.setdefault("broker", {})
        if not isinstance(broker, dict):
            return out  # the validation error names it
        for key, value in (("address", self.broker), ("protocol", self.protocol), ("username", self.username)):
            if value is not None:
                broker[key] = value
        # A path on the command line is relative to the working directory, not to hq.toml.
        tls = {k: str(v.absolute()) for k, v in (("ca", self.tls_ca), ("cert", self.tls_cert), ("key", self.tls_key))
               if v is not None}
        if tls:
            broker["tls"] = {**(broker.get("tls") or {}), **tls}
        if self.topic_prefix is not None:
            out["topic_prefix"] = self.topic_prefix
        if self.signing_key is not None:
            out["signing"] = {**(out.get("signing") or {}), "key": str(self.signing_key.absolute())}
        if self.database is not None:
            url = self.database
            if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_absolute():
                url = f"sqlite:///{Path(url.removeprefix('sqlite:///')).absolute()}"
            section = out.get("database")
            keep = isinstance(section, dict) and not url.startswith("sqlite:")  # a file has no password to keep
            out["database"] = {**(section if keep and isinstance(section, dict) else {}), "url": url}
        return out


def load_hq_config(path: Path | None = None, overrides: HqOverrides | None = None) -> HqConfig:
    """`path`, else $STORELINK_HQ_CONFIG, else the defaults; flags applied on top. Raises HqConfigError."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    data: dict[str, Any] = {}
    source, base = "(defaults)", None
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise HqConfigError(f"{path}: cannot read: {err.strerror or err}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise HqConfigError(f"{path}: not valid TOML: {err}") from None
        base = path.absolute().parent
    data = (overrides or HqOverrides()).apply(data)
    for section in ("pki", "enroll"):  # built from the file's values, so their default paths are relative to it
        data.setdefault(section, {})
    try:
        cfg = HqConfig.model_validate(data, context={"base": base})
    except ValidationError as err:
        raise HqConfigError(f"{source}: " + "; ".join(describe_validation_error(err, HqConfig))) from None
    cfg._source = source
    return cfg
