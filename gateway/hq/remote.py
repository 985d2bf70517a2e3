"""`storelink hq push-config` and `storelink hq cmd`: head office's side of remote config and commands.

    storelink hq push-config store-0042.toml [--key hq.key] [--version N] [--config hq.toml] [--wait 90]
    storelink hq cmd store-0042 ping [--arg name=value ...] [--key hq.key] [--config hq.toml]

push-config validates the file with the gateway's own models, signs it, publishes it retained on
``{prefix}/{store}/config/desired`` and follows ``config/reported`` until the store answers. cmd sends one command
and prints the reply; the reply comes back on the store's own ``cmd-reply/{name}`` topic (the only place a store's
broker ACL lets it answer), matched by correlation data (MQTT 5) and ``correlation_id`` (3.1.1). Commands that
change something must be signed: every command is, when a signing key is configured (signing.key or --key).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from storelink import safe_json
from storelink.contract import Topics
from storelink.hq.config import HqConfig
from storelink.hq.connect import HqClient, connect


class Replies:
    """JSON objects arriving on one topic filter, kept with their MQTT 5 correlation data."""

    def __init__(self, client: HqClient, topic_filter: str):
        self.lock = threading.Lock()
        self.got: list[tuple[bytes | None, dict[str, Any]]] = []
        client.on_message = self._on_message
        client.subscribe_confirmed([topic_filter])

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        body = safe_json.message_object(msg.payload)
        if body is not None:
            with self.lock:
                self.got.append((getattr(getattr(msg, "properties", None), "CorrelationData", None), body))

    def snapshot(self) -> list[tuple[bytes | None, dict[str, Any]]]:
        with self.lock:
            return list(self.got)


def cmd_push_config(args: argparse.Namespace, cfg: HqConfig) -> int:
    from storelink.config import ConfigError, parse_config
    from storelink.remote.signing import sign

    try:
        data = tomllib.loads(Path(args.file).read_text(encoding="utf-8"))
        version = args.version or int(data.get("config_version") or 0) or int(time.time())
        data["config_version"] = version
        store_cfg = parse_config(data, str(args.file))
    except ConfigError as err:
        print(err.render() + "\nnothing was published", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:  # unreadable file, bad TOML
        print(f"{args.file}: {err}\nnothing was published", file=sys.stderr)
        return 1
    if store_cfg.mqtt.topic_prefix != cfg.topic_prefix:
        print(f"{args.file}: mqtt.topic_prefix is {store_cfg.mqtt.topic_prefix!r} but head office uses "
              f"{cfg.topic_prefix!r} (topic_prefix in {cfg.source}); nothing was published", file=sys.stderr)
        return 1
    key = cfg.signing_key()
    store = store_cfg.store_id
    body = sign({"kind": "storelink.config", "store_id": store, "version": version, "config": data}, key)
    topics = Topics(store, cfg.topic_prefix)
    client = connect(cfg, "config")
    try:
        reports = Replies(client, topics.config_reported)
        time.sleep(0.3)  # the retained (old) report arrives first; only a report about this version counts
        client.publish_confirmed(topics.config_desired, [json.dumps(body)], retain=True)
        print(f"config version {version} for {store} signed and published (retained)")
        if args.no_wait:
            return 0
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            mine = [r for _c, r in reports.snapshot() if r.get("version") == version]
            if mine:
                r = mine[-1]
                print(f"{store}: {r['status']} (running version {r['running_version']})")
                for k, msg in (r.get("errors") or {}).items():
                    print(f"  - {k}: {msg}")
                if r.get("restart_required"):
                    print(f"  takes effect at the next restart: {', '.join(r['restart_required'])}")
                return 0 if r["status"] in ("applied", "accepted") else 1
            time.sleep(0.1)
        print(f"{store}: no report within {args.wait:g}s (offline? it applies the retained config when back)")
        return 2
    finally:
        client.close()


def _parse_arg(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--arg takes name=value, got {text!r}")
    try:
        return name, json.loads(value)  # numbers, true/false, ["lists"]
    except ValueError:
        return name, value


def cmd_command(args: argparse.Namespace, cfg: HqConfig) -> int:
    from storelink.remote.signing import sign

    topics = Topics(args.store, cfg.topic_prefix)
    reply_topic = topics.command_reply(args.name)
    corr = uuid.uuid4().hex
    cmd_args = dict(args.arg or [])
    # reply_to/correlation_id in the JSON: what a 3.1.1 store answers to (MQTT 5 also gets the properties).
    target = {"reply_to": reply_topic, "correlation_id": corr}
    body: dict[str, Any]
    if cfg.signing.key is not None:  # --key or signing.key: signed (required for commands that change something)
        body = sign({"kind": "storelink.command", "store_id": args.store, "command": args.name,
                     "id": uuid.uuid4().hex, "issued_at": time.time(), "args": cmd_args, **target},
                    cfg.signing_key())
    else:
        body = {"args": cmd_args, **target}
    props = None
    if cfg.broker.protocol == "5":
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply_topic
        props.CorrelationData = corr.encode()
    client = connect(cfg, "cmd")
    try:
        replies = Replies(client, reply_topic)
        client.publish_confirmed(topics.command(args.name), [json.dumps(body)], properties=props)
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            mine = [r for c, r in replies.snapshot() if c == corr.encode() or r.get("correlation_id") == corr]
            if mine:
                print(json.dumps(mine[0], indent=2))
                return 0 if mine[0].get("ok") else 1
            time.sleep(0.05)
        print(f"{args.store}: no reply within {args.wait:g}s (offline?)", file=sys.stderr)
        return 2
    finally:
        client.close()


def add_parsers(sub: Any, connection: argparse.ArgumentParser, signing: argparse.ArgumentParser) -> None:
    p = sub.add_parser("push-config", parents=[connection, signing],
                       help="validate, sign and publish a store's whole config; follow the report")
    p.add_argument("file", type=Path, help="the store's config (TOML), as the gateway reads it")
    p.add_argument("--version", type=int, default=0, help="default: config_version in the file, else Unix time")
    p.add_argument("--wait", type=float, default=90.0, help="seconds to wait for config/reported")
    p.add_argument("--no-wait", action="store_true")
    p.set_defaults(hq_handler=cmd_push_config)
    c = sub.add_parser("cmd", parents=[connection, signing],
                       help="send a command (ping, status, reprint-labels, resync-prices, restart-device, update)")
    c.add_argument("store")
    c.add_argument("name", help="ping, status, reprint-labels, resync-prices, restart-device, or update (a release "
                                "install or rollback; `storelink hq release` sends it for a rollout)")
    c.add_argument("--arg", action="append", type=_parse_arg, metavar="NAME=VALUE",
                   help='a command argument; JSON values allowed: --arg skus=\'["A1","B2"]\' --arg all=true')
    c.add_argument("--wait", type=float, default=15.0)
    c.set_defaults(hq_handler=cmd_command)
