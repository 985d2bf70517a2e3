"""`storelink hq ca ...`, `storelink hq enroll` and `storelink hq revoke`: store identities.

    storelink hq ca init [--key-type p256|ed25519]       the store CA, in [pki] dir (key mode 600)
    storelink hq ca server-cert mqtt.example.com         a broker certificate, for a broker that has none
    storelink hq ca hq-cert ops                          head office's own client certificate (identity hq:ops)
    storelink hq ca list                                 every identity: groups, certificates, expiry, revoked
    storelink hq enroll store-0042 --group north         a provisioning bundle in [enroll] out/store-0042/
    storelink hq revoke store-0042                       revokes its certificates; rewrites the CRL

The bundle holds exactly what the appliance's first boot takes from the boot partition (image/provision/
storelink-provision): ``storelink.toml`` (the [enroll] template with store_id, groups, [mqtt] and [mqtt.tls]
filled in), ``ca.pem`` (the CA that signed the broker), ``client.pem`` and ``client.key`` (the store's identity)
and ``trust/*.pub`` (head office's signing keys). Copy the folder's contents to ``storelink/`` on the card's boot
partition; the first boot moves them to /etc/storelink and removes them from the card.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives import serialization

from storelink.config import ConfigError, parse_config
from storelink.hq.config import HqConfig, HqConfigError, parse_address
from storelink.hq.pki import StoreCA, active, check_store_id, hq_identity, write_secret
from storelink.system.files import write_atomically

# Where storelink-provision installs the bundle's files on the store (keep in step with that script).
STORE_TLS = Path("/etc/storelink/tls")
STORE_TRUST = Path("/etc/storelink/trust")


def _ca(cfg: HqConfig) -> StoreCA:
    return StoreCA(cfg.pki.dir)


def cmd_ca_init(args: argparse.Namespace, cfg: HqConfig) -> int:
    ca = StoreCA.create(cfg.pki.dir, key_type=args.key_type, days=args.days, name=args.name)
    print(f"store CA ({ca.key_type}, valid until {ca.cert.not_valid_after_utc:%Y-%m-%d}) in {ca.dir}:")
    print(f"  {ca.cert_path}  the broker's cafile (verifies store certificates)")
    print(f"  {ca.key_path}  private key, mode 600: keep it off the broker, with a backup")
    print(f"  {ca.crl_path}  the revocation list (crlfile)")
    return 0


def cmd_server_cert(args: argparse.Namespace, cfg: HqConfig) -> int:
    issued = _ca(cfg).issue_server(args.hosts, days=args.days)
    out = args.out_dir or cfg.pki.dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.pem").write_bytes(issued.cert_pem)
    write_secret(out / "server.key", issued.key_pem)
    print(f"broker certificate for {', '.join(args.hosts)} (until {issued.not_after:%Y-%m-%d}): "
          f"{out / 'server.pem'}, key {out / 'server.key'}")
    return 0


def cmd_hq_cert(args: argparse.Namespace, cfg: HqConfig) -> int:
    identity = hq_identity(args.name)
    issued = _ca(cfg).issue_client(identity, role="hq", days=args.days or cfg.pki.cert_days)
    out = args.out_dir or cfg.pki.dir
    out.mkdir(parents=True, exist_ok=True)
    cert, key = out / f"hq-{args.name}.pem", out / f"hq-{args.name}.key"
    cert.write_bytes(issued.cert_pem)
    write_secret(key, issued.key_pem)
    print(f"head-office identity {identity} (until {issued.not_after:%Y-%m-%d}): {cert}, key {key}")
    print(f'in hq.toml:\n[broker.tls]\ncert = "{cert}"\nkey = "{key}"')
    return 0


def cmd_ca_list(_args: argparse.Namespace, cfg: HqConfig) -> int:
    ca = _ca(cfg)
    print(f"{'IDENTITY':<24} {'ROLE':<6} {'GROUPS':<20} {'STATE':<8} CERTIFICATES (serial until, newest last)")
    records = ca.records()
    for r in records:
        live = [c for c in r["certificates"] if c["revoked_at"] is None]
        state = "active" if active(r) else ("revoked" if not live else "expired")
        certs = ", ".join(f"{c['serial']} {c['not_after'][:10]}" for c in live) or "-"
        print(f"{r['identity']:<24} {r['role']:<6} {','.join(r.get('groups') or []) or '-':<20} {state:<8} {certs}")
    print(f"{len(records)} identities; CA valid until {ca.cert.not_valid_after_utc:%Y-%m-%d}")
    return 0


# -- enrolment ------------------------------------------------------------------------------------------------
def store_config(cfg: HqConfig, store_id: str, groups: list[str], trust: dict[str, bytes]) -> str:
    """The store's storelink.toml: the template with store_id, groups, [mqtt], [mqtt.tls], [trust] filled in.

    ``trust`` are the PEM files the bundle carries in trust/; the config names them where provisioning puts them.
    """
    template = cfg.enroll.template
    data: dict[str, Any] = {}
    if template is not None:
        try:
            data = tomllib.loads(template.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise HqConfigError(f"enroll.template: cannot read {template}: "
                                f"{getattr(err, 'strerror', None) or err}") from None
        except tomllib.TOMLDecodeError as err:
            raise HqConfigError(f"enroll.template: {template}: not valid TOML: {err}") from None
        if "store_id" in data:
            raise HqConfigError(f"enroll.template: {template} sets store_id; enrol fills it in for each store")
    data["store_id"] = store_id
    all_groups = sorted(set(data.get("groups") or []) | set(groups))
    if all_groups:
        data["groups"] = all_groups
    mqtt = data.setdefault("mqtt", {})
    if not isinstance(mqtt, dict):
        raise HqConfigError(f"enroll.template: {template}: mqtt must be a table")
    host, port = parse_address(cfg.enroll.broker or cfg.broker.address)
    mqtt.setdefault("host", host)
    mqtt.setdefault("port", port)
    mqtt.setdefault("protocol", cfg.broker.protocol)
    if mqtt.setdefault("topic_prefix", cfg.topic_prefix) != cfg.topic_prefix:
        raise HqConfigError(f"enroll.template: mqtt.topic_prefix {mqtt['topic_prefix']!r} is not head office's "
                            f"topic_prefix {cfg.topic_prefix!r}")
    mqtt["tls"] = {"ca": str(STORE_TLS / "ca.pem"), "cert": str(STORE_TLS / "client.pem"),
                   "key": str(STORE_TLS / "client.key")}
    table = data.setdefault("trust", {})
    if not isinstance(table, dict):
        raise HqConfigError(f"enroll.template: {template}: trust must be a table")
    template_keys = list(table.get("public_keys") or [])
    table["public_keys"] = list(dict.fromkeys([*template_keys, *(str(STORE_TRUST / name) for name in trust)]))
    # The gateway's own validation. It loads every trusted key, and trust/ is not yet where the config names it
    # (that happens at first boot): the check reads the same keys from the PEM text the bundle carries.
    check = {**data, "trust": {**table, "public_keys": [*template_keys, *(p.decode() for p in trust.values())]}}
    try:
        parse_config(check, f"storelink.toml for {store_id}")
    except ConfigError as err:
        raise HqConfigError(f"{err} (from enroll.template {template})") from None
    header = (f"# StoreLink store {store_id}: written by `storelink hq enroll` on {dt.date.today()} from "
              f"{template or 'the built-in defaults'}.\n")
    return header + tomli_w.dumps(data)


def _public_keys(cfg: HqConfig) -> dict[str, bytes]:
    """Head office's signing keys as PEM files for trust/: the signing key's public half plus signing.trust."""
    from storelink.remote.signing import key_id, load_public_key

    keys = [cfg.signing_key().public_key()] if cfg.signing.key is not None else []
    for i, text in enumerate(cfg.signing.trust):
        try:
            keys.append(load_public_key(text))
        except ValueError as err:
            raise HqConfigError(f"{cfg.source}: signing.trust[{i}]: {err}") from None
    if not keys:
        raise HqConfigError(f"{cfg.source}: signing.key: no head-office key to trust: a store that trusts none can "
                            "never be configured or priced (set [signing] key, or give --key)")
    return {f"head-office-{key_id(k)}.pub": k.public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)
            for k in keys}


def _broker_ca(cfg: HqConfig, ca: StoreCA) -> bytes:
    """The CA the store checks the broker against: what head office checks it against, else the store CA."""
    path = cfg.broker.tls.ca if cfg.broker.tls is not None and cfg.broker.tls.ca is not None else ca.cert_path
    try:
        return path.read_bytes()
    except OSError as err:
        raise HqConfigError(f"broker.tls.ca: cannot read {path}: {err.strerror or err}") from None


def cmd_enroll(args: argparse.Namespace, cfg: HqConfig) -> int:
    check_store_id(args.store)
    ca = _ca(cfg)
    out: Path = (args.out or cfg.enroll.out / args.store).absolute()
    if out.exists() and any(out.iterdir()) and not args.force:
        raise HqConfigError(f"{out} is not empty (an earlier bundle with a private key?); remove it or use --force")
    trust = _public_keys(cfg)
    toml = store_config(cfg, args.store, args.group or [], trust)
    broker_ca = _broker_ca(cfg, ca)
    groups = tomllib.loads(toml).get("groups", [])
    issued = ca.issue_client(args.store, role="store", days=args.days or cfg.pki.cert_days, groups=groups)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, mode=0o700)
    write_atomically(out / "storelink.toml", toml.encode(), 0o600)
    write_atomically(out / "ca.pem", broker_ca, 0o600)
    write_atomically(out / "client.pem", issued.cert_pem, 0o600)
    write_secret(out / "client.key", issued.key_pem)
    (out / "trust").mkdir(mode=0o700)
    for name, pem in trust.items():
        write_atomically(out / "trust" / name, pem, 0o600)
    print(f"enrolled {args.store}{' in ' + ', '.join(groups) if groups else ''}: certificate serial "
          f"{issued.serial:x}, valid until {issued.not_after:%Y-%m-%d}")
    print(f"bundle: {out}/ -> copy its contents to storelink/ on the SD card's boot partition")
    if len(ca.record(args.store)["certificates"]) > 1:  # type: ignore[index]
        print(f"the store's earlier certificates stay valid until revoked: storelink hq revoke {args.store} "
              "--serial OLD (see storelink hq ca list)")
    print("then regenerate the broker's ACL: storelink hq broker-config --broker mosquitto", file=sys.stderr)
    return 0


def cmd_revoke(args: argparse.Namespace, cfg: HqConfig) -> int:
    ca = _ca(cfg)
    serials = ca.revoke(args.identity, args.serial)
    if not serials:
        print(f"{args.identity}: nothing to revoke (every certificate already is)")
        return 0
    print(f"revoked {args.identity}: serial(s) {', '.join(serials)}; {ca.crl_path} rewritten")
    print("the broker refuses them once it reloads: storelink hq broker-config --broker mosquitto, then "
          "systemctl reload mosquitto", file=sys.stderr)
    return 0


def add_parsers(sub: Any, connection: argparse.ArgumentParser, local: argparse.ArgumentParser) -> None:
    ca = sub.add_parser("ca", help="the store CA: init, server-cert, hq-cert, list")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_sub.add_parser("init", parents=[local], help="create the store CA in [pki] dir")
    init.add_argument("--key-type", choices=["p256", "ed25519"], default="p256",
                      help="p256 (default: every broker takes it) or ed25519")
    init.add_argument("--days", type=int, default=3650)
    init.add_argument("--name", default="StoreLink store CA", help="the CA's common name")
    init.set_defaults(hq_handler=cmd_ca_init)
    srv = ca_sub.add_parser("server-cert", parents=[local], help="a broker certificate signed by the store CA")
    srv.add_argument("hosts", nargs="+", metavar="HOST", help="DNS names and IP addresses the stores dial")
    srv.add_argument("--days", type=int, default=825)
    srv.add_argument("--out-dir", type=Path, help="default: [pki] dir")
    srv.set_defaults(hq_handler=cmd_server_cert)
    hq = ca_sub.add_parser("hq-cert", parents=[local], help="a head-office client certificate (identity hq:NAME)")
    hq.add_argument("name")
    hq.add_argument("--days", type=int, default=0, help="default: [pki] cert_days")
    hq.add_argument("--out-dir", type=Path, help="default: [pki] dir")
    hq.set_defaults(hq_handler=cmd_hq_cert)
    ls = ca_sub.add_parser("list", parents=[local], help="every enrolled identity and its certificates")
    ls.set_defaults(hq_handler=cmd_ca_list)
    en = sub.add_parser("enroll", parents=[connection], help="issue a store's certificate and provisioning bundle")
    en.add_argument("store", metavar="STORE_ID")
    en.add_argument("--group", action="append", metavar="G", help="a price group the store belongs to (repeat)")
    en.add_argument("--out", type=Path, help="bundle folder (default: [enroll] out/STORE_ID)")
    en.add_argument("--days", type=int, default=0, help="certificate validity (default: [pki] cert_days)")
    en.add_argument("--key", type=Path, metavar="FILE", help="head office's signing key (overrides signing.key)")
    en.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    en.set_defaults(hq_handler=cmd_enroll)
    rv = sub.add_parser("revoke", parents=[local], help="revoke a store's (or hq:NAME's) certificates")
    rv.add_argument("identity", metavar="STORE_ID")
    rv.add_argument("--serial", help="only this certificate (hex, from storelink hq ca list)")
    rv.set_defaults(hq_handler=cmd_revoke)

