"""The gateway's configuration: one TOML file, validated by pydantic.

Unknown keys are errors everywhere (storelink.validation.StrictModel) because a misspelt key that is silently
ignored is how a store ends up running with a default nobody chose. Errors name the file and the dotted key path.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from storelink.devices.registry import validate_device_tables
from storelink.drivers.base import DeviceConfig
from storelink.prices.models import PricesConfig
from storelink.remote.models import CartSettings, RemoteConfigSettings
from storelink.update.models import UpdateSettings
from storelink.validation import Identifier, StrictModel, describe_validation_error


class TlsConfig(StrictModel):
    ca: Path | None = Field(None, description="CA bundle that signed the broker's certificate")
    cert: Path | None = Field(None, description="client certificate (PEM)")
    key: Path | None = Field(None, description="client private key (PEM)")
    insecure_skip_verify: bool = Field(False, description="never in production: accept any broker certificate")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key must be given together")
        return self


class MqttConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = Field(None, repr=False)
    tls: TlsConfig | None = None
    keepalive: int = Field(30, ge=5, le=3600)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = Field(None, description="defaults to storelink-{store_id}")
    session_expiry: int = Field(7 * 24 * 3600, ge=0, description="seconds the broker keeps our session")
    max_inflight: int = Field(200, ge=1, le=65000, description="QoS 1 messages awaiting PUBACK")
    reconnect_min: float = Field(1.0, gt=0)
    reconnect_max: float = Field(60.0, gt=0)
    topic_prefix: str = Field("storelink", pattern=r"^[A-Za-z0-9_-]+$")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int | float) else v


class StorageConfig(StrictModel):
    path: Path = Path("/var/lib/storelink/storelink.db")
    max_bytes: int = Field(256 * 1024 * 1024, ge=64 * 1024, description="outbox cap (payload bytes)")
    max_events: int = Field(1_000_000, ge=100, description="outbox cap (events)")
    telemetry_kinds: list[str] = Field(
        default_factory=lambda: ["telemetry", "device", "scan"],
        description="event kinds (or 'prefix.*') evicted oldest-first when the outbox is full",
    )
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="FULL survives power loss; NORMAL survives only a process crash"
    )


def _parse_listen(value: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\]]*?)\]?:(\d+)", value)
    if not m:
        raise ValueError(f"listen must be HOST:PORT, got {value!r}")
    host, port = m.group(1), int(m.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    if host not in ("localhost", ""):
        try:
            ipaddress.ip_address(host)
        except ValueError as e:
            raise ValueError(f"listen host must be an IP address or localhost, got {host!r}") from e
    return host or "0.0.0.0", port


class HttpConfig(StrictModel):
    listen: str = "127.0.0.1:8080"
    token: str | None = Field(None, repr=False, min_length=16, description="bearer token for actions")
    max_body: int = Field(256 * 1024, ge=1024)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        _parse_listen(v)
        return v

    @property
    def host_port(self) -> tuple[str, int]:
        return _parse_listen(self.listen)


class TrustConfig(StrictModel):
    """Head-office Ed25519 public keys (base64 of the 32 raw bytes, or a PEM file path)."""

    public_keys: list[str] = Field(default_factory=list)


class LoggingConfig(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    journal: bool = Field(True, description="structured fields to the systemd journal when it is there")


class GatewayConfig(StrictModel):
    store_id: Identifier
    groups: list[Identifier] = Field(default_factory=list)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)  # type: ignore[arg-type]
    storage: StorageConfig = Field(default_factory=StorageConfig)  # type: ignore[arg-type]
    http: HttpConfig = Field(default_factory=HttpConfig)  # type: ignore[arg-type]
    trust: TrustConfig = Field(default_factory=TrustConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)  # type: ignore[arg-type]
    prices: PricesConfig = Field(default_factory=PricesConfig)  # type: ignore[arg-type]
    remote: RemoteConfigSettings = Field(default_factory=RemoteConfigSettings)  # type: ignore[arg-type]
    cart: CartSettings = Field(default_factory=CartSettings)  # type: ignore[arg-type]
    update: UpdateSettings = Field(default_factory=UpdateSettings)  # type: ignore[arg-type]
    # Raw device tables; each is validated by its driver's own model (storelink.devices.registry), so that a
    # retailer's driver found through an entry point is validated exactly like ours.
    devices: list[dict[str, Any]] = Field(default_factory=list)
    config_version: int = Field(0, ge=0, description="version of this config (remote config bumps it)")
    _device_configs: list[DeviceConfig] = PrivateAttr(default_factory=list)

    @property
    def device_configs(self) -> list[DeviceConfig]:
        """The `devices` tables, each validated by its driver's model (set by parse_config)."""
        return self._device_configs


class RunningConfig:
    """The config in force and the file it came from. Remote config swaps ``current`` while the gateway runs; a
    part that honours such a change reads ``current`` at each use instead of keeping a copy."""

    def __init__(self, config: GatewayConfig, path: Path | None = None):
        self.current = config
        self.path = path


class ConfigError(Exception):
    """A config file that cannot be used. The message names the file and each bad key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def render(self) -> str:
        lines = [f"{self.source}: invalid configuration"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> GatewayConfig:
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, describe_validation_error(err)) from None
    devices, problems = validate_device_tables(cfg.devices)
    if problems:
        raise ConfigError(source, problems)
    cfg._device_configs = devices
    return cfg


def parse_config_text(text: str, source: str = "<config>") -> GatewayConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(source, [f"not valid TOML: {err}"]) from None
    return parse_config(data, source)


def load_config(path: str | Path) -> GatewayConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(str(p), [f"cannot read: {err.strerror or err}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(p), ["not UTF-8 text"]) from None
    return parse_config_text(text, str(p))
