"""The gateway's configuration: one TOML file, validated by pydantic.

Unknown keys are errors everywhere (storelink.validation.StrictModel) because a misspelt key that is silently
ignored is how a store ends up running with a default nobody chose. Errors name the file and the dotted key path.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PrivateAttr, ValidationError, field_validator, model_validator

from storelink.devices.registry import validate_device_tables
from storelink.drivers.base import DeviceConfig
from storelink.prices.models import PricesConfig
from storelink.remote.models import CartSettings, RemoteConfigSettings
from storelink.update.models import UpdateSettings
from storelink.validation import Identifier, StrictModel, TcpPort, describe_validation_error

MAX_CONFIG_DEPTH = 16


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
    port: TcpPort = 1883
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
    request_timeout: float = Field(10.0, gt=0, le=300, description="seconds a client has to send a request's "
                                   "head, and again its body; an idle keep-alive connection is closed after it")
    max_connections: int = Field(256, ge=1, le=10_000, description="connections served at once; more get 503")
    max_connections_per_peer: int = Field(32, ge=1, le=10_000, description="of those, from one address")

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        _parse_listen(v)
        return v

    @property
    def host_port(self) -> tuple[str, int]:
        return _parse_listen(self.listen)


def _usable_public_key(text: str) -> str:
    from storelink.remote.signing import load_public_key

    load_public_key(text)  # ValueError says what is wrong (not base64, no such file, not Ed25519)
    return text


class TrustConfig(StrictModel):
    """Head-office Ed25519 public keys (base64 of the 32 raw bytes, or a PEM file path)."""

    # Each one is loaded at check time: a key that cannot verify anything is a config error, not a later
    # "bad signature" on every price batch.
    public_keys: list[Annotated[str, AfterValidator(_usable_public_key)]] = Field(default_factory=list)


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


def _unusable_values(data: Any, key: str = "") -> list[str]:
    """Keys whose value no setting can use: NaN or infinity (valid TOML, meaningless as a timeout or a limit), or
    nesting deeper than any section has (a config is at most a few levels deep)."""
    out: list[str] = []
    stack: list[tuple[Any, str, int]] = [(data, key, 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            out.append(f"{where or '(top level)'}: nested deeper than {MAX_CONFIG_DEPTH} levels")
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(f"{where}: {value} is not a usable value (nan/inf)")
        elif isinstance(value, dict):
            stack += [(v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    return sorted(out)


def parse_config(data: dict[str, Any], source: str = "<config>") -> GatewayConfig:
    """Validate a whole config in one pass: top-level and device problems are reported together."""
    problems: list[str] = []
    cfg: GatewayConfig | None = None
    unusable = _unusable_values(data)
    if unusable:
        raise ConfigError(source, unusable[:20])
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as err:
        problems += describe_validation_error(err, GatewayConfig)
    tables = data.get("devices", []) if isinstance(data, dict) else []
    devices, device_problems = validate_device_tables(tables if isinstance(tables, list) else [])
    problems += device_problems
    if problems or cfg is None:
        raise ConfigError(source, problems)
    cfg._device_configs = devices
    return cfg


def parse_config_text(text: str, source: str = "<config>") -> GatewayConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(source, [f"not valid TOML: {err}"]) from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(source, [f"not valid TOML: nested deeper than {MAX_CONFIG_DEPTH} levels"]) from None
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
