"""`storelink hq broker-config --broker mosquitto`: the production broker's TLS listener and access rules.

Writes what the broker needs (the store CA, the CRL, the ACL, the broker's certificate and key when the store CA
issued it) into one folder and prints a mosquitto.conf that uses them. Run it again after every enrol and revoke,
then reload the broker: the ACL names each store's groups, and the CRL and the ACL deny revoked identities.

The rules (docs/head-office.md has the same for EMQX and HiveMQ):

- a store's identity is its certificate's CN (``use_identity_as_username``), so the pattern ACLs with ``%u`` let
  it write only its own uplink topics and read only its own downlink;
- its price groups are per-store ``user`` blocks (``%u`` cannot say which groups a store is in);
- head-office identities (``hq:NAME``) read everything under the prefix and write only downlink topics;
- revoked identities are denied everything (a connection made before the revocation keeps its session, not its
  rights, once the broker has reloaded).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path
from typing import Any

from storelink.hq.config import HqConfig, HqConfigError
from storelink.hq.pki import StoreCA, active, write_secret
from storelink.system.files import write_atomically

# The store's side of the contract (gateway/contract.py), as topic levels below {prefix}/{store}/; a test checks
# that every topic of storelink.contract.Topics has its rule.
STORE_WRITES = ("status", "events/#", "devices/+/state", "prices/state", "outbox/state", "config/reported",
                "update/state", "cmd-reply/#", "cart/request")
STORE_READS = ("prices/batch", "prices/desired", "config/desired", "cmd/+", "cart/response")


def mosquitto_acl(cfg: HqConfig, records: list[dict[str, Any]]) -> str:
    prefix = cfg.topic_prefix
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# StoreLink broker ACL, written by `storelink hq broker-config` on {stamp}. Regenerated: do not edit.",
           "# A store (user = the CN of its certificate = its store id) writes its uplink and reads its downlink:"]
    out += [f"pattern write {prefix}/%u/{t}" for t in STORE_WRITES]
    out += [f"pattern read {prefix}/%u/{t}" for t in STORE_READS]
    stores = hqs = revoked = 0
    for r in sorted(records, key=lambda r: str(r["identity"])):
        identity = str(r["identity"])
        if re.search(r"[\s#+/]", identity):
            raise HqConfigError(f"enrolment record {identity!r}: not a usable broker identity")
        out.append(f"\nuser {identity}")
        if not active(r):  # revoked (or expired): nothing, even what the patterns above would grant
            out.append("topic deny #")
            revoked += 1
        elif r["role"] == "hq":
            out.append(f"topic read {prefix}/#")
            out += [f"topic write {prefix}/+/{t}" for t in STORE_READS]
            out.append(f"topic write {prefix}/groups/+/prices/batch")
            hqs += 1
        else:
            out += [f"topic read {prefix}/groups/{g}/prices/batch" for g in r.get("groups") or []]
            stores += 1
    out.insert(1, f"# {stores} store(s), {hqs} head-office identity(ies), {revoked} revoked.")
    return "\n".join(out) + "\n"


def mosquitto_conf(*, listen: str, files: Path, persistence: Path) -> str:
    host, _, port = listen.rpartition(":")
    lines = [
        "# StoreLink production broker, written by `storelink hq broker-config --broker mosquitto`.",
        f"# Files in {files}: regenerate them after every enrol/revoke, then reload (SIGHUP re-reads the ACL",
        "# and the CRL). Mosquitto 2.x; put this in /etc/mosquitto/conf.d/storelink.conf.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {files / 'acl'}",
        "# A store's downlink (price batches, configs, commands) waits in its persistent session while it is",
        "# offline; persistence keeps it across a broker restart (a snapshot every autosave_interval).",
        "persistence true",
        f"persistence_location {persistence}/",
        "autosave_interval 60",
        "# per offline store: a price list's chunks, configs and commands for a few days (default 1000)",
        "max_queued_messages 10000",
        "",
        f"listener {port}{' ' + host if host else ''}",
        "protocol mqtt",
        f"cafile {files / 'ca.pem'}",
        f"certfile {files / 'server.pem'}",
        f"keyfile {files / 'server.key'}",
        f"crlfile {files / 'crl.pem'}",
        "tls_version tlsv1.2",
        "# Every client shows a certificate from the store CA; its CN is its identity for the ACL.",
        "require_certificate true",
        "use_identity_as_username true",
    ]
    return "\n".join(lines) + "\n"


def cmd_broker_config(args: argparse.Namespace, cfg: HqConfig) -> int:
    m = re.fullmatch(r"(?:[0-9A-Za-z.-]+:|\[[0-9A-Fa-f:]+\]:)?(\d{1,5})", args.listen)
    if m is None or not 0 < int(m.group(1)) < 65536:
        raise HqConfigError(f"--listen: expected PORT or HOST:PORT, got {args.listen!r}")
    ca = StoreCA(cfg.pki.dir)
    out: Path = (args.out_dir or cfg.pki.dir / "broker").absolute()
    out.mkdir(parents=True, exist_ok=True)
    server_cert = args.server_cert or cfg.pki.dir / "server.pem"
    server_key = args.server_key or cfg.pki.dir / "server.key"
    for path, what in ((server_cert, "--server-cert"), (server_key, "--server-key")):
        if not path.is_file():
            raise HqConfigError(f"{what}: {path} does not exist (the broker's certificate: storelink hq ca "
                                "server-cert HOST, or your own with --server-cert/--server-key)")
    records = ca.records()
    ca.write_crl()  # fresh, so that its next-update date never passes unnoticed
    write_atomically(out / "acl", mosquitto_acl(cfg, records).encode(), 0o644)
    write_atomically(out / "ca.pem", ca.cert_path.read_bytes(), 0o644)
    write_atomically(out / "crl.pem", ca.crl_path.read_bytes(), 0o644)
    write_atomically(out / "server.pem", server_cert.read_bytes(), 0o644)
    write_secret(out / "server.key", server_key.read_bytes())
    files = args.broker_dir or out
    stores = sum(1 for r in records if r["role"] == "store" and active(r))
    print(mosquitto_conf(listen=args.listen, files=files, persistence=args.persistence_dir), end="")
    print(f"broker files for {stores} store(s) written to {out}"
          + (f" (the config expects them in {files})" if files != out else "")
          + "; the broker must be able to read server.key (chown it to the mosquitto user)", file=sys.stderr)
    return 0


def add_parsers(sub: Any, local: argparse.ArgumentParser) -> None:
    p = sub.add_parser("broker-config", parents=[local],
                       help="print a production broker config (TLS, client certificates, ACL, CRL)")
    p.add_argument("--broker", dest="broker_kind", choices=["mosquitto"], required=True,
                   help="mosquitto (EMQX and HiveMQ: docs/head-office.md)")
    p.add_argument("--listen", default="8883", metavar="[HOST:]PORT", help="the TLS listener (default 8883)")
    p.add_argument("--out-dir", type=Path, help="where to write the broker's files (default: [pki] dir/broker)")
    p.add_argument("--broker-dir", type=Path, help="where the broker will find them, when copied elsewhere")
    p.add_argument("--server-cert", type=Path, help="the broker's certificate (default: [pki] dir/server.pem)")
    p.add_argument("--server-key", type=Path, help="its key (default: [pki] dir/server.key)")
    p.add_argument("--persistence-dir", type=Path, default=Path("/var/lib/mosquitto"),
                   help="mosquitto's persistence_location (default /var/lib/mosquitto)")
    p.set_defaults(hq_handler=cmd_broker_config)
