"""Head office for remote-config and command tests: signs and publishes like `storelink hq` does."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from storelink.remote.signing import KeyPair, sign
from tests import contract_check
from tests.helpers import GatewayProcess, free_port, wait_for, write_config

STORE = "store-0042"


def desired(key: KeyPair, version: int, config: dict[str, Any], store: str = STORE) -> bytes:
    body = {"kind": "storelink.config", "store_id": store, "version": version, "config": config}
    return json.dumps(sign(body, key.private_b64)).encode()


def signed_command(key: KeyPair, command: str, args: dict[str, Any], store: str = STORE,
                   issued_at: float | None = None, cmd_id: str | None = None, **extra: Any) -> dict[str, Any]:
    body = {"kind": "storelink.command", "store_id": store, "command": command, "id": cmd_id or uuid.uuid4().hex,
            "issued_at": time.time() if issued_at is None else issued_at, "args": args, **extra}
    return sign(body, key.private_b64)


def base_config(tmp_path: Path, broker_port: int, key: KeyPair, http_port: int | None = None,
                **sections: dict[str, Any]) -> dict[str, Any]:
    """The same config as tests.helpers.write_config, as a dict head office would publish."""
    cfg: dict[str, Any] = {
        "store_id": STORE,
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "reconnect_min": 0.2, "reconnect_max": 1.0},
        "storage": {"path": str(tmp_path / "storelink.db")},
        "http": {"listen": f"127.0.0.1:{http_port or free_port()}", "token": "t" * 24},
        "trust": {"public_keys": [key.public_b64]},
        "remote": {"rollback_after": 3},
    }
    cfg.update(sections)
    return cfg


def start_gateway(tmp_path: Path, broker_port: int, key: KeyPair, extra: str = "") -> GatewayProcess:
    http_port = free_port()
    path = write_config(
        tmp_path / "storelink.toml", STORE, broker_port, http_port,
        f'token = "{"t" * 24}"\n[trust]\npublic_keys = ["{key.public_b64}"]\n[remote]\nrollback_after = 3\n'
        + extra,
    )
    return GatewayProcess(path, http_port).start()


class HeadOffice:
    """An MQTT 5 client that publishes (retained configs, commands) and collects replies by correlation data."""

    def __init__(self, port: int, protocol: int = mqtt.MQTTv5):
        self.protocol = protocol
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hq-{uuid.uuid4().hex[:8]}",
                                  protocol=protocol)
        self.replies: list[tuple[str, bytes | None, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self._ready = threading.Event()
        self.client.on_connect = lambda c, *_a: c.subscribe("hq/replies/#", 1)
        self.client.on_subscribe = lambda *_a: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._ready.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None)
        contract_check.check_reply(msg.topic, bytes(msg.payload))
        with self.lock:
            self.replies.append((msg.topic, corr, json.loads(msg.payload)))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def command(self, name: str, body: dict[str, Any], store: str = STORE, timeout: float = 10) -> dict[str, Any]:
        """Send a command with an MQTT 5 response topic + correlation data; return the matching reply."""
        corr = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = f"hq/replies/{store}"
        props.CorrelationData = corr
        self.client.publish(f"storelink/{store}/cmd/{name}", json.dumps(body).encode(), qos=1,
                            properties=props).wait_for_publish(5)

        def reply() -> dict[str, Any] | None:
            with self.lock:
                return next((r for _t, c, r in self.replies if c == corr), None)

        return wait_for(reply, timeout, what=f"a reply to {name}")  # type: ignore[no-any-return]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
