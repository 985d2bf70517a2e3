"""The `storelink` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from storelink import __version__
from storelink.config import ConfigError, load_config

log = logging.getLogger("storelink")

# Other modules add subcommands here (the demo, head-office tools): (name, help, add_arguments, handler).
Subcommand = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _setup_logging(level: str = "INFO", journal: bool = True) -> None:
    try:
        from storelink.system.logs import setup_logging
    except ImportError:  # the journal-aware logging lands with the systemd work
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        setup_logging(level, journal)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
        return 1
    print(f"{args.file}: ok (store {cfg.store_id}, {len(cfg.device_configs)} devices)")
    return 0


async def run_gateway(config_path: Path) -> int:
    from storelink.app import Gateway
    from storelink.web.server import ListenError

    cfg = load_config(config_path)
    gateway = Gateway(cfg, config_path=config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.run(stop)
    except ListenError as err:  # raised before any part starts (the HTTP server starts first)
        print(f"storelink: {err.explain(f'[http] listen in {config_path}')}", file=sys.stderr)
        return 2
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
        return 2
    _setup_logging(cfg.logging.level, cfg.logging.journal)
    return asyncio.run(run_gateway(Path(args.config)))


def _args_check_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path)


def _args_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, default=Path("/etc/storelink/storelink.toml"))


def _subcommands() -> list[Subcommand]:
    subs: list[Subcommand] = [
        ("check-config", "validate a config file; exit 0 when good", _args_check_config, cmd_check_config),
        ("run", "run the gateway until SIGTERM/SIGINT", _args_run, cmd_run),
    ]
    from storelink.drivers.sim.demo import SUBCOMMAND as demo
    from storelink.hq.cli import SUBCOMMAND as hq
    from storelink.update.cli import SUBCOMMAND as update

    subs.append(demo)
    subs.append(hq)
    subs.append(update)
    return subs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="storelink", description="StoreLink store-edge gateway")
    parser.add_argument("--version", action="version", version=f"storelink {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_args, handler in _subcommands():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(handler=handler)
    args = parser.parse_args(argv)
    if args.command != "run":
        _setup_logging("INFO", journal=False)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
