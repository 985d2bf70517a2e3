"""`storelink hq push-config` and `storelink hq cmd`: head office's side of remote config and commands.

    storelink hq push-config store-0042.toml --key hq.key [--version N] [--broker HOST:PORT] [--wait 90]
    storelink hq cmd store-0042 ping [--arg name=value ...] [--key hq.key] [--broker HOST:PORT]

push-config validates the file with the gateway's own models, signs it, publishes it retained on
``storelink/{store}/config/desired`` and follows ``config/reported`` until the store answers. cmd sends one command
with an MQTT 5 response topic and correlation data and prints the reply; commands that change something are
signed when --key is given (they are refused otherwise). storelink.hq puts them in the `hq` group.
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

PREFIX = "storelink"


def _key(path: str) -> Any:
    from storelink.remote.signing import load_private_key

    return load_private_key(Path(path).read_text().strip())


def _collect(client: Any, topic: str) -> tuple[list[tuple[bytes | None, dict[str, Any]]], threading.Lock]:
    got: list[tuple[bytes | None, dict[str, Any]]] = []
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            return
        if isinstance(body, dict):
            with lock:
                got.append((getattr(getattr(msg, "properties", None), "CorrelationData", None), body))

    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.subscribe(topic, 1)
    subscribed.wait(10)
    return got, lock


def cmd_push_config(args: argparse.Namespace) -> int:
    from storelink.config import ConfigError, parse_config
    from storelink.hq.prices import _client
    from storelink.remote.signing import sign

    try:
        data = tomllib.loads(Path(args.file).read_text(encoding="utf-8"))
        version = args.version or int(data.get("config_version") or 0) or int(time.time())
        data["config_version"] = version
        cfg = parse_config(data, str(args.file))
        key = _key(args.key)
    except ConfigError as err:
        print(err.render() + "\nnothing was published", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:  # unreadable file, bad TOML, bad key
        print(f"{err}\nnothing was published", file=sys.stderr)
        return 1
    store = cfg.store_id
    body = sign({"kind": "storelink.config", "store_id": store, "version": version, "config": data}, key)
    base = f"{PREFIX}/{store}"
    client = _client(args.broker, "config")
    client.loop_start()
    try:
        reports, lock = _collect(client, f"{base}/config/reported")
        time.sleep(0.3)  # the retained (old) report arrives first; only a report about this version counts
        client.publish(f"{base}/config/desired", json.dumps(body), qos=1, retain=True).wait_for_publish(10)
        print(f"config version {version} for {store} signed and published (retained)")
        if args.no_wait:
            return 0
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            with lock:
                mine = [r for _c, r in reports if r.get("version") == version]
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
        client.loop_stop()
        client.disconnect()


def _parse_arg(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--arg takes name=value, got {text!r}")
    try:
        return name, json.loads(value)  # numbers, true/false, ["lists"]
    except ValueError:
        return name, value


def cmd_command(args: argparse.Namespace) -> int:
    from storelink.hq.prices import _client
    from storelink.remote.signing import sign

    cmd_args = dict(args.arg or [])
    if args.key:
        try:
            key = _key(args.key)
        except (OSError, ValueError) as err:
            print(f"{args.key}: {err}", file=sys.stderr)
            return 1
        body: dict[str, Any] = sign({"kind": "storelink.command", "store_id": args.store, "command": args.name,
                                     "id": uuid.uuid4().hex, "issued_at": time.time(), "args": cmd_args}, key)
    else:
        body = {"args": cmd_args}
    reply_topic = f"hq/replies/{uuid.uuid4().hex[:12]}"
    corr = uuid.uuid4().bytes
    client = _client(args.broker, "cmd")
    client.loop_start()
    try:
        replies, lock = _collect(client, reply_topic)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply_topic
        props.CorrelationData = corr
        client.publish(f"{PREFIX}/{args.store}/cmd/{args.name}", json.dumps(body), qos=1,
                       properties=props).wait_for_publish(10)
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            with lock:
                mine = [r for c, r in replies if c == corr]
            if mine:
                print(json.dumps(mine[0], indent=2))
                return 0 if mine[0].get("ok") else 1
            time.sleep(0.05)
        print(f"{args.store}: no reply within {args.wait:g}s (offline?)", file=sys.stderr)
        return 2
    finally:
        client.loop_stop()
        client.disconnect()


def add_hq_subcommands(sub: Any) -> None:
    """Adds push-config and cmd to the `storelink hq` subparsers (storelink.hq assembles the group)."""
    p = sub.add_parser("push-config", help="validate, sign and publish a store's whole config; follow the report")
    p.add_argument("file", type=Path, help="the store's config (TOML), as the gateway reads it")
    p.add_argument("--key", required=True, help="private key file from `storelink hq keygen`")
    p.add_argument("--version", type=int, default=0, help="default: config_version in the file, else Unix time")
    p.add_argument("--broker", default="127.0.0.1:1883")
    p.add_argument("--wait", type=float, default=90.0, help="seconds to wait for config/reported")
    p.add_argument("--no-wait", action="store_true")
    p.set_defaults(hq_handler=cmd_push_config)
    c = sub.add_parser("cmd", help="send a command (ping, status, reprint-labels, resync-prices, restart-device)")
    c.add_argument("store")
    c.add_argument("name")
    c.add_argument("--arg", action="append", type=_parse_arg, metavar="NAME=VALUE",
                   help='a command argument; JSON values allowed: --arg skus=\'["A1","B2"]\' --arg all=true')
    c.add_argument("--key", help="sign the command (required for commands that change something)")
    c.add_argument("--broker", default="127.0.0.1:1883")
    c.add_argument("--wait", type=float, default=15.0)
    c.set_defaults(hq_handler=cmd_command)
