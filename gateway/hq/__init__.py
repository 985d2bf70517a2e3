"""Head office's side: the `storelink hq` commands (keys, price batches, remote config, commands, status).

prices.py: keygen, publish-prices, status; batch.py: building signed price batches; remote.py: push-config, cmd;
release.py and rollout.py: building, publishing and following software releases.
"""

from __future__ import annotations

import argparse

from storelink.hq.prices import add_price_subcommands
from storelink.hq.release import add_release_subcommand
from storelink.hq.remote import add_hq_subcommands


def _add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="hq_command", required=True)
    add_price_subcommands(sub)
    add_hq_subcommands(sub)  # push-config, cmd (remote config and commands)
    add_release_subcommand(sub)  # release build/publish/status/resume/rollback


def _run(args: argparse.Namespace) -> int:
    return int(args.hq_handler(args))


SUBCOMMAND = ("hq", "head-office tools: keygen, publish-prices, status, push-config, cmd, release", _add_args, _run)
