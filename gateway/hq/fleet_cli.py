"""`storelink hq ingest` and `storelink hq serve`: head office's event store and its fleet view.

    storelink hq ingest [--config hq.toml] [--database URL] [--broker HOST:PORT] [--worker-id ID]  # until SIGTERM
    storelink hq serve  [--config hq.toml] [--database URL] [--listen 127.0.0.1:8090]

Both read hq.toml like every `storelink hq` command (storelink.hq.config; flags override it): the broker, its TLS
identity, protocol and topic prefix for the ingest (through storelink.hq.connect, the one connection of all hq
commands), and ``[database]`` for both: ``postgresql://user@host/db`` for a fleet (the password from
``password_env``/``password_file``, never on the command line) or ``sqlite:///PATH``; without one, the embedded
SQLite file ``storelink-hq.db`` in the working directory (a pilot).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import Any

from storelink.hq.config import HqConfig
from storelink.hq.db import DEFAULT_DATABASE

log = logging.getLogger("storelink.hq")


def trusted_keys(texts: list[str]) -> list[Any]:
    from storelink.remote.signing import load_public_key

    return [load_public_key(t) for t in texts]


def cmd_ingest(args: argparse.Namespace, cfg: HqConfig) -> int:
    from storelink.hq.ingest import IngestSettings, IngestWorker

    settings = IngestSettings(database=cfg.database_url or DEFAULT_DATABASE, database_password=cfg.database_password(),
                              worker_id=args.worker_id, prefix=cfg.topic_prefix,
                              share_group=None if args.no_share else args.share_group,
                              receive_maximum=args.receive_maximum, session_expiry=args.session_expiry,
                              max_batch=args.max_batch, tracker=not args.no_tracker,
                              trusted_keys=trusted_keys(args.trust_key), gap_grace=args.gap_grace,
                              price_grace=args.price_grace, tracker_every=args.tracker_every)
    worker = IngestWorker(settings)
    # Broker first, then the database, and nothing logged before both work: either failure is the one line
    # storelink.hq.cli prints (exit 69). Messages that come meanwhile wait in the worker's queue, unacknowledged.
    client = worker.connect(cfg)  # HqLinkError
    try:
        worker.open()  # DatabaseError
    except BaseException:
        worker.close()  # first: it marks the worker stopping, so our own disconnect is not logged as a loss
        client.close()
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_a: worker.stop_event.set())
    log.info("subscribed on %s: %s", cfg.broker.address, ", ".join(settings.filters()))
    log.info("ingest worker %s: %s -> %s", settings.worker_id, cfg.broker.address, _where(settings.database))
    try:
        worker.run()
    finally:
        client.close()  # the session stays at the broker: what arrives meanwhile waits for this worker id
        worker.close()
    c = worker.counters
    log.info("ingest worker %s stopped: %d received, %d new events, %d duplicates, %d bad", settings.worker_id,
             c.received, c.inserted, c.duplicates, c.bad)
    return 0


def _where(url: str) -> str:
    return url.rpartition("@")[2] if url.startswith("postgres") else url


def _add_ingest(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker-id", default=os.environ.get("STORELINK_HQ_WORKER") or _hostname(),
                   help="stable per worker: the broker keeps this worker's session (and its queue) under it")
    p.add_argument("--share-group", default="storelink-ingest", help="MQTT 5 shared subscription group")
    p.add_argument("--no-share", action="store_true", help="plain subscription (one worker only)")
    p.add_argument("--max-batch", type=int, default=5000, help="messages per commit at most")
    p.add_argument("--receive-maximum", type=int, default=10_000,
                   help="MQTT 5: unacknowledged messages the broker may send (bounds a batch)")
    p.add_argument("--session-expiry", type=int, default=7 * 86400,
                   help="seconds the broker keeps this worker's queue while it is away")
    p.add_argument("--gap-grace", type=float, default=60.0,
                   help="seconds a seq gap may wait for late events and the store's eviction report")
    p.add_argument("--price-grace", type=float, default=10.0,
                   help="seconds of clock skew and batch transit allowed around a price change")
    p.add_argument("--tracker-every", type=float, default=2.0, help="seconds between two tracker passes")
    p.add_argument("--trust-key", action="append", default=[],
                   help="a head-office public key: recorded price batches must verify with one (repeatable)")
    p.add_argument("--no-tracker", action="store_true", help="never run the tracker in this worker")
    p.set_defaults(hq_handler=cmd_ingest)


def _hostname() -> str:
    import socket

    return socket.gethostname()


def add_parsers(sub: Any, connection: argparse.ArgumentParser, local: argparse.ArgumentParser,
                database: argparse.ArgumentParser) -> None:
    """Parent parsers (storelink.hq.cli): `connection` --config and the broker flags, `local` --config alone,
    `database` --database."""
    _add_ingest(sub.add_parser("ingest", parents=[connection, database],
                               help="land every store's events and states in head office's database"))
    from storelink.hq.dashboard import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", parents=[local, database],
                                       help="the read-only fleet dashboard (and /metrics)"))
