"""`storelink hq` price commands: keygen, publish-prices (validate, sign, chunk, publish, follow), status.

    storelink hq keygen --out hq-prices.key
    storelink hq publish-prices prices.csv --store store-0042 [--key hq-prices.key] [--version N] [--config hq.toml]
    storelink hq status [--config hq.toml | --broker HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from storelink import safe_json
from storelink.contract import Topics
from storelink.hq.batch import CsvProblems, build_batch, read_csv
from storelink.hq.config import HqConfig, HqConfigError
from storelink.hq.connect import HqClient, connect


class Follower:
    """Collects retained state and events for the stores we care about."""

    def __init__(self, client: HqClient, filters: list[str]):
        self.lock = threading.Lock()
        self.messages: list[tuple[str, dict[str, Any]]] = []
        client.on_message = self._on_message
        client.subscribe_confirmed(filters)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        body = safe_json.message_object(msg.payload, empty_as_object=True)
        if body is not None:
            with self.lock:
                self.messages.append((msg.topic, body))

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            out, self.messages = self.messages, []
        return out


# -- keygen ---------------------------------------------------------------------------------------------------
def cmd_keygen(args: argparse.Namespace, _cfg: HqConfig) -> int:
    from storelink.remote.signing import keygen

    out: Path = args.out
    if out.exists() and not args.force:
        print(f"{out} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    pair = keygen()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pair.private_b64 + "\n")
    print(f"private key written to {out} (mode 600; keep it secret, keep a backup)")
    print(f"key id {pair.key_id}; add this line's key to every store's config:")
    print(f'[trust]\npublic_keys = ["{pair.public_b64}"]')
    return 0


# -- publish-prices -------------------------------------------------------------------------------------------
def cmd_publish(args: argparse.Namespace, cfg: HqConfig) -> int:
    try:
        items = read_csv(args.file)
    except CsvProblems as err:
        print(f"{args.file}: {len(err.problems)} problem(s); nothing was published", file=sys.stderr)
        for p in err.problems[:50]:
            print(f"  - {p}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"{args.file}: {err.strerror or err}", file=sys.stderr)
        return 1
    key = cfg.signing_key()
    version = args.version or int(time.time())
    batch_id = args.batch_id or f"{args.store or args.group}-v{version}"
    try:
        effective = datetime.fromisoformat(args.effective_at) if args.effective_at else None
    except ValueError:
        raise HqConfigError(f"--effective-at: not an ISO 8601 time: {args.effective_at!r}") from None
    if effective is not None and effective.tzinfo is None:
        raise HqConfigError(f"--effective-at: give a timezone (e.g. {args.effective_at}+01:00 or ...Z)")
    b = build_batch(items, version=version, batch_id=batch_id, store=args.store, group=args.group,
                    currency=args.currency, key=key, mode=args.mode, effective_at=effective)
    size = sum(len(m) for m in b.messages)
    print(f"{len(items)} items valid; batch {batch_id} version {version}: {len(b.messages) - 1} chunk(s), "
          f"{size / 1024:.0f} KiB signed")
    client = connect(cfg, "publish")
    try:
        follower = None
        if args.store:
            store = Topics(args.store, cfg.topic_prefix)
            follower = Follower(client, [f"{store.base}/events/+", store.prices_state])
            topic = store.prices_batch
        else:
            topic = Topics("-", cfg.topic_prefix).group_prices_batch(args.group)
        client.publish_confirmed(topic, b.messages)
        print(f"published to {topic}")
        from storelink.hq.published import record_published

        print(record_published(cfg, b, items))
        if args.store:
            client.publish_confirmed(store.prices_desired, [json.dumps({"version": version, "batch_id": batch_id})],
                                     retain=True)
        if follower is None or args.no_wait:
            return 0
        return _follow(follower, batch_id, version, args.wait)
    finally:
        client.close()


def _follow(follower: Follower, batch_id: str, version: int, wait: float) -> int:
    deadline = time.monotonic() + wait
    last_line = ""
    while time.monotonic() < deadline:
        for topic, body in follower.take():
            if topic.endswith("/prices/state"):
                p = body.get("pending") or {}
                if p.get("batch_id") == batch_id:
                    line = (f"  {p.get('phase')}: chunks {p.get('chunks_done')}/{p.get('chunks_total')}"
                            f", {p.get('changed') if p.get('changed') is not None else '?'} changed")
                    if line != last_line:
                        print(line, flush=True)
                        last_line = line
                continue
            data = body.get("data", {})
            if data.get("batch_id") != batch_id and data.get("version") != version:
                continue
            kind = body.get("kind", "")
            if kind == "price.rejected":
                print(f"REJECTED: {data.get('reason')}: {data.get('detail')}")
                return 2
            if kind == "price.aborted":
                print(f"ABORTED: {data.get('reason')}")
                return 3
            if kind == "price.prepared":
                print(f"  prepared on {', '.join(data.get('targets') or []) or 'no devices'}", flush=True)
            if kind == "price.committed":
                devices = data.get("devices") or {}
                print(f"COMMITTED version {version}: {data.get('changed')} SKU(s) changed; devices: "
                      + (", ".join(f"{d}={s}" for d, s in sorted(devices.items())) or "none"))
                return 0
        time.sleep(0.2)
    print(f"no outcome within {wait:.0f} s (the store may be offline; it will ask for a resend when back)")
    return 4


# -- status ---------------------------------------------------------------------------------------------------
def fleet_rows(messages: list[tuple[str, dict[str, Any]]], prefix: str = "storelink") -> list[dict[str, Any]]:
    stores: dict[str, dict[str, Any]] = {}
    for topic, body in messages:
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != prefix or parts[1] == "groups":
            continue
        row = stores.setdefault(parts[1], {"store": parts[1]})
        if parts[2] == "status":
            row["online"] = body.get("state")
        elif parts[2:] == ["prices", "state"]:
            row["version"] = body.get("active_version")
            p = body.get("pending") or {}
            row["pending"] = f"v{p.get('version')} {p.get('phase')}" if p else "-"
            devs = body.get("devices") or {}
            row["stale"] = sorted(d for d, v in devs.items() if v.get("state") == "stale")
            row["devices"] = len(devs)
            row["drift"] = body.get("drift", 0)
            last = body.get("last") or {}
            row["last"] = f"{last.get('outcome')} v{last.get('version')}" if last else "-"
    return sorted(stores.values(), key=lambda r: r["store"])


def cmd_status(args: argparse.Namespace, cfg: HqConfig) -> int:
    client = connect(cfg, "status")
    try:
        prefix = cfg.topic_prefix
        follower = Follower(client, [f"{prefix}/+/status", f"{prefix}/+/prices/state"])
        time.sleep(args.listen)  # retained messages arrive right after SUBSCRIBE
        rows = fleet_rows(follower.take(), prefix)
    finally:
        client.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    newest = max((r.get("version") or 0 for r in rows), default=0)
    print(f"{'STORE':<20} {'LINK':<8} {'VERSION':>11} {'PENDING':<22} {'DEVICES':>7} {'DRIFT':>5}  STALE / NOTE")
    for r in rows:
        note = ", ".join(r.get("stale") or [])
        if r.get("version") is not None and r["version"] < newest:
            note = (note + "; " if note else "") + "behind"
        version = r.get("version") if r.get("version") is not None else "-"
        print(f"{r['store']:<20} {r.get('online') or '?':<8} {version:>11} {r.get('pending', '-'):<22}"
              f" {r.get('devices', 0):>7} {r.get('drift', 0):>5}  {note}")
    print(f"{len(rows)} store(s) on {cfg.broker.address} under {prefix}/")
    return 0


# -- argparse -------------------------------------------------------------------------------------------------
def add_parsers(sub: Any, connection: argparse.ArgumentParser, signing: argparse.ArgumentParser,
                local: argparse.ArgumentParser, database: argparse.ArgumentParser) -> None:
    """Parent parsers: `connection` --config and the broker flags, `signing` --key, `local` --config alone,
    `database` --database (where publish-prices records its batch)."""
    k = sub.add_parser("keygen", parents=[local], help="create a head-office Ed25519 signing key")
    k.add_argument("--out", type=Path, default=Path("hq-prices.key"))
    k.add_argument("--force", action="store_true")
    k.set_defaults(hq_handler=cmd_keygen)
    pub = sub.add_parser("publish-prices", parents=[connection, signing, database],
                         help="validate, sign, chunk and publish a price list; follow the store")
    pub.add_argument("file", type=Path, help="CSV: sku,price[,gtin,unit_price,unit_basis,description,promo_*]")
    to = pub.add_mutually_exclusive_group(required=True)
    to.add_argument("--store")
    to.add_argument("--group")
    pub.add_argument("--version", type=int, default=0, help="price version (default: the current Unix time)")
    pub.add_argument("--batch-id", default="")
    pub.add_argument("--currency", default="EUR")
    pub.add_argument("--mode", choices=["full", "delta"], default="full",
                     help="full: the file is the whole price list; delta: only these SKUs change")
    pub.add_argument("--effective-at", default="", help="ISO 8601 with timezone; default: at once")
    pub.add_argument("--wait", type=float, default=120.0, help="seconds to follow the store (default 120)")
    pub.add_argument("--no-wait", action="store_true")
    pub.set_defaults(hq_handler=cmd_publish)
    st = sub.add_parser("status", parents=[connection], help="fleet table: which store runs which price version")
    st.add_argument("--listen", type=float, default=1.5, help="seconds to collect retained messages")
    st.add_argument("--json", action="store_true")
    st.set_defaults(hq_handler=cmd_status)
