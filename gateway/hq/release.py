"""`storelink hq release`: build a signed release bundle, roll it out in rings, follow, resume, roll back.

    storelink hq release build WHEELHOUSE --key hq.key --out dist/          -> dist/storelink-<v>.bundle
    storelink hq release publish BUNDLE --url https://.../storelink-<v>.bundle --key hq.key
                                 (--store S [--store S2] | --group G | --rings rings.toml [--ring NAME])
    storelink hq release status [ROLLOUT]
    storelink hq release resume ROLLOUT          a halted rollout goes on with its next ring
    storelink hq release rollback ROLLOUT        every store the rollout reached goes back to its previous release

The bundle is served by any HTTPS server (the stores resume interrupted downloads with Range requests); head
office only sends each store a signed ``update`` command with the URL, size and SHA-256. The broker, TLS identity,
topic prefix and signing key come from hq.toml (storelink.hq.config), as for every `storelink hq` command.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from storelink import safe_json
from storelink.hq.config import HqConfig
from storelink.hq.connect import connect
from storelink.hq.rollout import Rollout, RolloutError, load_rings, run_rollout
from storelink.system.schema import rollback_problems
from storelink.update.manifest import WHEEL_RE, BundleError, file_sha256, verify_bundle, write_bundle

_ARCH_RE = re.compile(r"(x86_64|aarch64|armv7l|armv6l|i686)$")


# -- build ----------------------------------------------------------------------------------------------------
def _schemas_of(wheel: Path) -> dict[str, Any]:
    """The release's own storelink.system.schema.SCHEMAS, read from its wheel (-I -S: no site, no editable hook)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from storelink.system import schema; "
            "print(json.dumps(schema.schemas_as_dict()))")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(wheel)], capture_output=True, text=True,
                            timeout=60, check=False)
    if result.returncode != 0:
        raise BundleError(f"cannot read the schema versions from {wheel.name}: {result.stderr.strip()[-300:]}")
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _platform_of(wheels: list[Path]) -> tuple[str, str]:
    pythons, machines = set(), set()
    for w in wheels:
        parts = w.name[:-4].split("-")
        py, plat = parts[-3], parts[-1]
        if py.startswith("cp") and py[2:].isdigit():
            pythons.add(f"{py[2]}.{py[3:]}")
        for tag in plat.split("."):
            m = _ARCH_RE.search(tag)
            if m:
                machines.add(m.group(1))
    if len(pythons) > 1 or len(machines) > 1:
        raise BundleError(f"the wheelhouse mixes platforms: Python {sorted(pythons)}, {sorted(machines)}")
    return (pythons.pop() if pythons else f"{sys.version_info.major}.{sys.version_info.minor}",
            machines.pop() if machines else platform.machine())


def build_release(wheelhouse: Path, key: Any, out_dir: Path, *, extras: str = "all", notes: str = "") -> Path:
    from storelink.remote.signing import sign

    wheels = sorted(wheelhouse.glob("*.whl"))
    own = [w for w in wheels if (m := WHEEL_RE.match(w.name)) and m["dist"] == "storelink"]
    if len(own) != 1:
        raise BundleError(f"{wheelhouse} must hold exactly one storelink wheel, found {len(own)}")
    version = WHEEL_RE.match(own[0].name)["ver"]  # type: ignore[index]
    python, machine = _platform_of(wheels)
    manifest = {
        "kind": "storelink.release", "format": 1, "version": version,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "python": python, "machine": machine,
        "requirement": f"storelink[{extras}]=={version}" if extras else f"storelink=={version}",
        "wheels": [{"file": w.name, "sha256": file_sha256(w), "size": w.stat().st_size} for w in wheels],
        "schemas": _schemas_of(own[0]), "notes": notes,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"storelink-{version}.bundle"
    write_bundle(out, sign(manifest, key), wheels)
    return out


def cmd_build(args: argparse.Namespace, cfg: HqConfig) -> int:
    key = cfg.signing_key()
    try:
        out = build_release(args.wheelhouse, key, args.out, extras=args.extras, notes=args.notes)
    except (BundleError, OSError, ValueError) as err:
        print(f"{getattr(err, 'reason', None) or err}\nno bundle was written", file=sys.stderr)
        return 1
    print(f"{out}: {out.stat().st_size} bytes, sha256 {file_sha256(out)}")
    return 0


# -- talking to the stores ------------------------------------------------------------------------------------
class Fleet:
    """One MQTT connection: retained update/state of every store, and signed commands with replies. Each store
    answers on its own ``cmd-reply/update`` (the only place its broker ACL lets it answer), matched by correlation
    data (MQTT 5) or ``correlation_id`` (3.1.1)."""

    def __init__(self, cfg: HqConfig, key: Any = None, listen: float = 0.0):
        self.key = key
        self.prefix = cfg.topic_prefix
        self.v5 = cfg.broker.protocol == "5"
        self.lock = threading.Lock()
        self.states: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, dict[str, Any]] = {}
        self.client = connect(cfg, "release")
        self.client.on_message = self._on_message
        try:
            self.client.subscribe_confirmed([f"{self.prefix}/+/update/state", f"{self.prefix}/+/cmd-reply/update"])
        except BaseException:
            self.client.close()
            raise
        time.sleep(listen)  # the retained states of every store arrive right after SUBSCRIBE

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        body = safe_json.message_object(msg.payload)
        if body is None:
            return
        with self.lock:
            if msg.topic.endswith("/cmd-reply/update"):
                corr = getattr(getattr(msg, "properties", None), "CorrelationData", None)
                key = bytes(corr).decode(errors="replace") if corr else body.get("correlation_id")
                if isinstance(key, str):
                    self.replies[key] = body
            else:
                self.states[msg.topic.split("/")[1]] = body

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return dict(self.states)

    def send(self, store: str, args: dict[str, Any], wait: float = 15.0) -> dict[str, Any] | None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from storelink.remote.signing import sign

        reply_topic, corr = f"{self.prefix}/{store}/cmd-reply/update", uuid.uuid4().hex
        body = sign({"kind": "storelink.command", "store_id": store, "command": "update", "id": uuid.uuid4().hex,
                     "issued_at": time.time(), "args": args, "reply_to": reply_topic, "correlation_id": corr},
                    self.key)
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic, props.CorrelationData = reply_topic, corr.encode()
        self.client.publish_confirmed(f"{self.prefix}/{store}/cmd/update", [json.dumps(body)], properties=props,
                                      timeout=10)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self.lock:
                if corr in self.replies:
                    return self.replies.pop(corr)
            time.sleep(0.05)
        return None

    def close(self) -> None:
        self.client.close()


# -- publish / resume / rollback / status ----------------------------------------------------------------------
def _targets(args: argparse.Namespace, fleet: Fleet) -> tuple[list[dict[str, Any]], float | None]:
    if args.rings:
        rings, threshold = load_rings(args.rings)
        if args.ring:
            rings = [r for r in rings if r["name"] == args.ring]
            if not rings:
                raise RolloutError(f"no ring {args.ring!r} in {args.rings}")
        return rings, threshold
    if args.group:
        stores = sorted(s for s, st in fleet.snapshot().items() if args.group in (st.get("groups") or []))
        if not stores:
            raise RolloutError(f"no store reports group {args.group!r} (stores report groups in update/state)")
        return [{"name": f"group {args.group}", "stores": stores}], None
    return [{"name": "stores", "stores": list(args.store)}], None


def _previous_rollout_schemas(directory: Path) -> dict[str, Any] | None:
    last = Rollout.latest(directory) if directory.is_dir() else None
    return (last.data.get("schemas") if last and last.data.get("status") == "done" else None)


def cmd_publish(args: argparse.Namespace, cfg: HqConfig) -> int:
    key = cfg.signing_key()
    try:
        verified = verify_bundle(args.bundle, [key.public_key()])
    except BundleError as err:
        print(f"{args.bundle}: {err.reason}; nothing was published", file=sys.stderr)
        return 1
    manifest = verified.manifest
    schemas = {k: v.model_dump() for k, v in manifest.schemas.items()}
    previous = _previous_rollout_schemas(args.rollouts)
    blocked = rollback_problems(previous, schemas) if previous else []
    if blocked and not args.allow_irreversible:
        print("release " + manifest.version + " cannot be rolled back past: " + "; ".join(blocked)
              + "\nrefusing without --allow-irreversible; nothing was published", file=sys.stderr)
        return 1
    fleet = Fleet(cfg, key, args.listen)
    try:
        rings, threshold = _targets(args, fleet)
        rollout = Rollout(args.rollouts / f"{manifest.version}-{int(time.time())}.json", {
            "version": manifest.version, "release": {"version": manifest.version, "url": args.url,
                                                     "sha256": file_sha256(args.bundle),
                                                     "size": args.bundle.stat().st_size},
            "rings": rings, "threshold": args.threshold if args.threshold is not None else (threshold or 0.0),
            "ring": 0, "status": "running", "reason": None, "stores": {}, "schemas": schemas,
            "allow_irreversible": args.allow_irreversible, "ignore_window": args.ignore_window})
        rollout.data["id"] = rollout.path.stem
        rollout.save()
        print(f"rollout {rollout.id}: release {manifest.version} to {sum(len(r['stores']) for r in rings)} "
              f"store(s) in {len(rings)} ring(s), threshold {rollout.data['threshold']:.0%}")
        status = run_rollout(rollout, fleet.send, fleet.snapshot, ring_timeout=args.ring_timeout)
    except RolloutError as err:
        print(str(err), file=sys.stderr)
        return 1
    finally:
        fleet.close()
    return 0 if status == "done" else 3


def cmd_resume(args: argparse.Namespace, cfg: HqConfig) -> int:
    try:
        rollout = Rollout.load(args.rollouts, args.rollout)
        if rollout.data["status"] != "halted":
            raise RolloutError(f"rollout {rollout.id} is {rollout.data['status']}, not halted")
        rollout.data["status"], rollout.data["reason"] = "running", None
        rollout.data["ring"] += 1  # the halted ring stays as it is; the next one goes ahead
        rollout.save()
        fleet = Fleet(cfg, cfg.signing_key(), args.listen)
    except RolloutError as err:
        print(str(err), file=sys.stderr)
        return 1
    try:
        return 0 if run_rollout(rollout, fleet.send, fleet.snapshot, ring_timeout=args.ring_timeout) == "done" else 3
    finally:
        fleet.close()


def cmd_rollback(args: argparse.Namespace, cfg: HqConfig) -> int:
    try:
        rollout = Rollout.load(args.rollouts, args.rollout)
        fleet = Fleet(cfg, cfg.signing_key(), args.listen)
    except RolloutError as err:
        print(str(err), file=sys.stderr)
        return 1
    try:
        live = fleet.snapshot()
        bad = 0
        for store, row in sorted(rollout.data["stores"].items()):
            if (live.get(store) or {}).get("version") != rollout.data["version"] or not row.get("from"):
                continue  # never reached, or already back
            reply = fleet.send(store, {"action": "rollback", "version": row["from"], "rollout": rollout.id,
                                       "ignore_window": True})
            ok = bool(reply and reply.get("ok"))
            bad += not ok
            print(f"{store}: back to {row['from']}: {'sent' if ok else (reply or {}).get('error', 'no reply')}")
            row.update(state="rollback_sent" if ok else "failed", reason=None if ok else "rollback refused")
        rollout.data["status"] = "rolled_back"
        rollout.save()
    finally:
        fleet.close()
    return 1 if bad else 0


def cmd_status(args: argparse.Namespace, cfg: HqConfig) -> int:
    rollout = Rollout.load(args.rollouts, args.rollout) if args.rollout else (
        Rollout.latest(args.rollouts) if args.rollouts.is_dir() else None)
    fleet = Fleet(cfg, listen=args.listen)
    try:
        live = fleet.snapshot()
    finally:
        fleet.close()
    rows = []
    for store in sorted(set(live) | set(rollout.data["stores"] if rollout else {})):
        st, row = live.get(store) or {}, (rollout.data["stores"].get(store) if rollout else None) or {}
        rows.append({"store": store, "version": st.get("version"), "state": st.get("state") or row.get("state"),
                     "target": st.get("target"), "reason": st.get("reason") or row.get("reason"),
                     "ring": row.get("ring")})
    progress = {"id": rollout.id, "version": rollout.data["version"], **rollout.progress()} if rollout else None
    doc = {"rollout": progress, "stores": rows}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if progress is not None:
        p = progress
        print(f"rollout {p['id']} (release {p['version']}): {p['status']}, ring {p['ring']} {p['ring_name']!r}; "
              f"{p['healthy']} healthy, {p['rolled_back']} rolled back, {p['failed'] + p['refused']} failed, "
              f"{p['timeout']} no answer, of {p['stores']}" + (f"\n  {p['reason']}" if p["reason"] else ""))
    print(f"{'STORE':<20} {'VERSION':<12} {'STATE':<15} {'TARGET':<12} REASON")
    for r in rows:
        print(f"{r['store']:<20} {r['version'] or '-':<12} {r['state'] or '-':<15} {r['target'] or '-':<12} "
              f"{r['reason'] or ''}")
    return 0


def add_parsers(sub: Any, connection: argparse.ArgumentParser, signing: argparse.ArgumentParser,
                local: argparse.ArgumentParser) -> None:
    """`storelink hq release ...`; the parent parsers as in storelink.hq.cli."""
    rel = sub.add_parser("release", help="software releases: build, publish (rings), status, resume, rollback")
    rs = rel.add_subparsers(dest="release_command", required=True)

    def common(p: argparse.ArgumentParser, key: bool = True) -> None:
        p.add_argument("--rollouts", type=Path, default=Path("storelink-rollouts"), help="rollout records")
        p.add_argument("--listen", type=float, default=1.5, help="seconds to collect retained states")
        if key:
            p.add_argument("--ring-timeout", type=float, default=3600.0, help="seconds a ring may take")

    b = rs.add_parser("build", parents=[local, signing], help="sign a wheelhouse into a release bundle")
    b.add_argument("wheelhouse", type=Path)
    b.add_argument("--out", type=Path, default=Path("dist"))
    b.add_argument("--extras", default="all", help="the storelink extras the appliance installs")
    b.add_argument("--notes", default="")
    b.set_defaults(hq_handler=cmd_build)
    p = rs.add_parser("publish", parents=[connection, signing],
                      help="announce a bundle to stores with a signed command, ring by ring")
    p.add_argument("bundle", type=Path)
    p.add_argument("--url", required=True, help="HTTPS URL the stores download the bundle from")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--store", action="append")
    to.add_argument("--group")
    to.add_argument("--rings", type=Path, help="rings file (TOML): fleet, threshold, [[ring]] name + stores|percent")
    p.add_argument("--ring", help="only this ring of --rings")
    p.add_argument("--threshold", type=float, help="fraction of a ring that may fail before the rollout halts")
    p.add_argument("--allow-irreversible", action="store_true", help="the release cannot be rolled back past")
    p.add_argument("--ignore-window", action="store_true", help="install outside the stores' maintenance windows")
    common(p)
    p.set_defaults(hq_handler=cmd_publish)
    for name, handler, text in (("resume", cmd_resume, "go on with a halted rollout's next ring"),
                                ("rollback", cmd_rollback, "send every store the rollout reached back")):
        q = rs.add_parser(name, parents=[connection, signing], help=text)
        q.add_argument("rollout")
        common(q)
        q.set_defaults(hq_handler=handler)
    s = rs.add_parser("status", parents=[connection],
                      help="each store's release and update state, and the rollout's progress")
    s.add_argument("rollout", nargs="?")
    s.add_argument("--json", action="store_true")
    common(s, key=False)
    s.set_defaults(hq_handler=cmd_status)
