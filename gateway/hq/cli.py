"""`storelink hq`: the head-office command group. Each command reads hq.toml (storelink.hq.config), flags override it.

Errors are one line on stderr and a non-zero exit: 1 for a bad input or setting (it names the file and key),
69 (EX_UNAVAILABLE) when the broker or head office's database cannot be used (unreachable, refused us or a
message; the reason says which).
Commands that wait for a store have their own codes (docs/head-office.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from storelink.hq import broker_config, enroll, fleet_cli, prices, release, remote
from storelink.hq.config import CONFIG_ENV, HqConfig, HqConfigError, HqOverrides, load_hq_config, parse_address
from storelink.hq.connect import HqLinkError
from storelink.hq.db import DEFAULT_DATABASE, DatabaseError
from storelink.hq.pki import PkiError

EXIT_UNAVAILABLE = 69


def _parents() -> tuple[argparse.ArgumentParser, ...]:
    local = argparse.ArgumentParser(add_help=False)
    local.add_argument("--config", type=Path, metavar="HQ.TOML", help=f"head office's settings (default: "
                                                                      f"${CONFIG_ENV}, else built-in defaults)")
    local.add_argument("--topic-prefix", help="overrides topic_prefix")
    connection = argparse.ArgumentParser(add_help=False, parents=[local])
    g = connection.add_argument_group("broker (each overrides hq.toml; passwords only from hq.toml's "
                                      "password_env/password_file or $STORELINK_HQ_PASSWORD)")
    g.add_argument("--broker", metavar="HOST:PORT", help="broker.address")
    g.add_argument("--protocol", choices=["5", "3.1.1"], help="broker.protocol")
    g.add_argument("--username", help="broker.username")
    g.add_argument("--tls-ca", type=Path, metavar="PEM", help="broker.tls.ca")
    g.add_argument("--tls-cert", type=Path, metavar="PEM", help="broker.tls.cert (head office's certificate)")
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="broker.tls.key")
    signing = argparse.ArgumentParser(add_help=False)
    signing.add_argument("--key", type=Path, metavar="FILE", help="signing key (overrides signing.key)")
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument("--database", metavar="URL", help=f"head office's database, postgresql://USER@HOST/DB or "
                                                            f"sqlite:///PATH (overrides database.url; default "
                                                            f"{DEFAULT_DATABASE.removeprefix('sqlite:///')} here)")
    return local, connection, signing, database


def _add_args(p: argparse.ArgumentParser) -> None:
    local, connection, signing, database = _parents()
    sub = p.add_subparsers(dest="hq_command", required=True)
    prices.add_parsers(sub, connection, signing, local, database)
    remote.add_parsers(sub, connection, signing)
    enroll.add_parsers(sub, connection, local)
    broker_config.add_parsers(sub, local)
    release.add_parsers(sub, connection, signing, local)  # release build/publish/status/resume/rollback
    fleet_cli.add_parsers(sub, connection, local, database)  # ingest, serve


def settings(args: argparse.Namespace) -> HqConfig:
    """hq.toml with this command's flags on top."""
    broker = getattr(args, "broker", None)
    if broker is not None:
        try:
            parse_address(broker)
        except ValueError as err:
            raise HqConfigError(f"--broker: {err}") from None
    overrides = HqOverrides(
        broker=broker, protocol=getattr(args, "protocol", None), username=getattr(args, "username", None),
        tls_ca=getattr(args, "tls_ca", None), tls_cert=getattr(args, "tls_cert", None),
        tls_key=getattr(args, "tls_key", None), topic_prefix=getattr(args, "topic_prefix", None),
        signing_key=getattr(args, "key", None), database=getattr(args, "database", None),
    )
    return load_hq_config(args.config, overrides)


def _run(args: argparse.Namespace) -> int:
    name = f"storelink hq {args.hq_command}"
    try:
        return int(args.hq_handler(args, settings(args)))
    except (HqConfigError, PkiError) as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 1
    except (HqLinkError, DatabaseError) as err:
        print(f"{name}: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except OSError as err:  # a file head office named cannot be read or written
        print(f"{name}: {err.filename or ''}{': ' if err.filename else ''}{err.strerror or err}", file=sys.stderr)
        return 1


def main(argv: list[str]) -> int:
    """`storelink hq ARGV...` in this process (what `storelink hq` runs, without the process around it)."""
    parser = argparse.ArgumentParser(prog="storelink hq")
    _add_args(parser)
    return _run(parser.parse_args(argv))


SUBCOMMAND = ("hq", "head-office tools: status, publish-prices, push-config, cmd, keys, the store CA and "
                    "enrolment, broker-config, release, ingest, serve", _add_args, _run)
