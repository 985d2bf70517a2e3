"""Simulated stores for rollout tests and demos: the update side of a gateway as head office sees it over MQTT.

Each one checks the signed ``update`` command like a gateway does (signature, store id, command name, age),
answers it on the response topic with the correlation data, and then reports on its retained
``{prefix}/{store}/update/state`` what a real store reports: downloading, installing, trial, and finally
healthy on the new release or rolled_back to the old one with a reason (for the stores told to fail). It does
not download or install anything: the real store side is tested end to end in tests/test_update_e2e.py.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from storelink.remote.models import SignedCommand
from storelink.remote.signing import SignatureError, verify
from storelink.update.models import UpdateArgs


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class SimulatedStore:
    def __init__(self, store_id: str, port: int, trusted: list[str], *, version: str = "1.0.0",
                 fail_with: str | None = None, step: float = 0.1, host: str = "127.0.0.1", prefix: str = "storelink",
                 groups: list[str] | None = None):
        self.store_id = store_id
        self.version = version
        self.fail_with = fail_with
        self.step = step
        self.trusted = trusted
        self.groups = groups or []
        self.base = f"{prefix}/{store_id}"
        self.commands: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{store_id}", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_a: c.subscribe(f"{self.base}/cmd/update", 1)
        self.client.on_subscribe = lambda *_a: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{store_id}: no subscription within 10 s")
        self._state("idle")

    def _state(self, state: str, **extra: Any) -> None:
        body = {"version": self.version, "state": state, "target": None, "rollout": None, "reason": None,
                "progress": None, "groups": self.groups, "ts": _now(), **extra}
        self.client.publish(f"{self.base}/update/state", json.dumps(body), qos=1, retain=True)

    def _reply(self, msg: mqtt.MQTTMessage, body: dict[str, Any]) -> None:
        props_in = getattr(msg, "properties", None)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = getattr(props_in, "CorrelationData", b"")
        topic = getattr(props_in, "ResponseTopic", None) or f"{self.base}/cmd-reply/update"
        self.client.publish(topic, json.dumps({"command": "update", "ts": _now(), **body}), qos=1,
                            properties=props)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            cmd = SignedCommand.model_validate(verify(msg.payload, self.trusted))
            args = UpdateArgs.model_validate(cmd.args)
        except (SignatureError, ValidationError) as err:
            self._reply(msg, {"ok": False, "code": "unauthorized", "error": str(err)[:200]})
            return
        if cmd.store_id != self.store_id or cmd.command != "update" or abs(time.time() - cmd.issued_at) > 300:
            self._reply(msg, {"ok": False, "code": "unauthorized", "error": "not for this store, or too old"})
            return
        self.commands.append(args.model_dump())
        target = args.release.version if args.release else args.version
        self._reply(msg, {"ok": True, "result": {"state": "downloading", "version": target}})
        threading.Thread(target=self._update, args=(args, target), daemon=True).start()

    def _update(self, args: UpdateArgs, target: str | None) -> None:
        common = {"target": target, "rollout": args.rollout}
        for phase in ("downloading", "installing", "trial"):
            self._state(phase, **common)
            time.sleep(self.step)
        if self.fail_with and args.action == "install":
            self._state("rolled_back", reason=self.fail_with, **common)
            return
        self.version = target or self.version
        self._state("healthy", **common)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
