"""`storelink update`: the root-side commands of software updates (units in systemd/, docs/operations.md).

    storelink update apply --config /etc/storelink/storelink.toml          what storelink-update.service runs
    storelink update install-bundle FILE --config ...                      the USB-stick fallback, same checks
    storelink update seed FILE --root DIR --trust KEY                      first release of an image (no gate)
    storelink update status --config ...
    storelink update mark-good --config ...                                storelink-mark-good.service (RAUC)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from storelink.config import ConfigError, load_config
from storelink.update.manifest import BundleError, check_platform, verify_bundle
from storelink.update.models import PendingUpdate
from storelink.update.releases import InstallError, Releases
from storelink.update.service import service_from_spec
from storelink.update.updater import Updater, update_dir, write_model


def _updater(args: argparse.Namespace) -> Updater:
    cfg = load_config(args.config)
    return Updater(cfg, Releases(args.root), service_from_spec(args.service), python=args.python)


def cmd_apply(args: argparse.Namespace) -> int:
    result = _updater(args).run_once()
    if result is None:
        print("nothing to do")
        return 0
    print(json.dumps(result.model_dump(), indent=1))
    return 0 if result.outcome == "healthy" else 1


def cmd_install_bundle(args: argparse.Namespace) -> int:
    updater = _updater(args)
    bundles = update_dir(updater.config) / "bundles"
    bundles.mkdir(parents=True, exist_ok=True)
    try:  # checked here too, so that a bad stick is refused before anything is copied
        verified = verify_bundle(args.bundle, updater.config.trust.public_keys)
        check_platform(verified.manifest)
    except BundleError as err:
        print(f"{args.bundle}: refused: {err.reason}", file=sys.stderr)
        return 1
    dest = bundles / f"storelink-{verified.manifest.version}.bundle"
    shutil.copyfile(args.bundle, dest)
    write_model(updater.dir / "pending.json", PendingUpdate(
        action="install", version=verified.manifest.version, bundle=dest, allow_irreversible=args.allow_irreversible,
        requested_at=time.time()))
    return cmd_apply(args)


def cmd_seed(args: argparse.Namespace) -> int:
    """Install a release and make it current, without a running gateway to judge (image build, tests)."""
    releases = Releases(args.root)
    staging = releases.dir / ".staging-seed"
    try:
        verified = verify_bundle(args.bundle, [Path(k).read_text().strip() for k in args.trust],
                                 extract_to=staging)
        check_platform(verified.manifest)
        assert verified.wheels_dir is not None
        releases.install(verified.manifest, verified.manifest_sha256, verified.wheels_dir, python=args.python)
        releases.switch_to(verified.manifest.version)
    except (BundleError, InstallError, OSError) as err:
        print(f"{args.bundle}: {getattr(err, 'reason', None) or err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    link = releases.base / "current"
    if not link.is_symlink():
        link.symlink_to("releases/current")
    print(f"release {verified.manifest.version} installed and current in {releases.dir}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    releases = Releases(args.root)
    d = update_dir(cfg)
    out = {"current": releases.current(), "installed": releases.installed()}
    for name in ("pending", "trial", "result", "agent"):
        try:
            out[name] = json.loads((d / f"{name}.json").read_text())
        except (OSError, ValueError):
            out[name] = None
    print(json.dumps(out, indent=1))
    return 0


def cmd_mark_good(args: argparse.Namespace) -> int:
    from storelink.update.slot import mark_booted_slot

    return mark_booted_slot(load_config(args.config), wait=args.wait, rauc=args.rauc)


def _add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="update_command", required=True)

    def common(q: argparse.ArgumentParser, service: bool = True) -> None:
        q.add_argument("--config", "-c", type=Path, default=Path("/etc/storelink/storelink.toml"))
        q.add_argument("--root", type=Path, default=Path("/"), help="where opt/storelink/releases is")
        if service:
            q.add_argument("--service", default="systemd:storelink.service",
                           help="systemd:UNIT (default) or pidfile:PATH (another supervisor's state file)")
            q.add_argument("--python", default="/usr/bin/python3", help="the interpreter new venvs are made with")

    a = sub.add_parser("apply", help="act on a pending update or finish a trial (storelink-update.service)")
    common(a)
    a.set_defaults(update_handler=cmd_apply)
    i = sub.add_parser("install-bundle", help="install a bundle from a file (USB stick), with the same checks")
    i.add_argument("bundle", type=Path)
    i.add_argument("--allow-irreversible", action="store_true")
    common(i)
    i.set_defaults(update_handler=cmd_install_bundle)
    s = sub.add_parser("seed", help="install the first release of an image and make it current (no gate)")
    s.add_argument("bundle", type=Path)
    s.add_argument("--root", type=Path, required=True)
    s.add_argument("--trust", action="append", required=True, help="head-office public key file (repeatable)")
    s.add_argument("--python", default="/usr/bin/python3")
    s.set_defaults(update_handler=cmd_seed)
    st = sub.add_parser("status", help="installed releases, current, and the update files")
    common(st, service=False)
    st.set_defaults(update_handler=cmd_status)
    m = sub.add_parser("mark-good", help="RAUC: mark the booted OS slot good once the gateway is healthy")
    m.add_argument("--config", "-c", type=Path, default=Path("/etc/storelink/storelink.toml"))
    m.add_argument("--wait", type=float, default=600.0, help="seconds to wait for a healthy gateway")
    m.add_argument("--rauc", default="rauc", help="the rauc command (and global options)")
    m.set_defaults(update_handler=cmd_mark_good)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.update_handler(args))
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
        return 2


SUBCOMMAND = ("update", "software updates on this store: apply, install-bundle, seed, status, mark-good",
              _add_args, _run)
