"""`storelink hq ingest` and `storelink hq serve`: head office's event store and its fleet view.

    storelink hq ingest [--database URL] [--broker HOST:PORT] [--worker-id ID]   # until SIGTERM/SIGINT
    storelink hq serve  [--database URL] [--listen 127.0.0.1:8090]

The database defaults to ``$STORELINK_HQ_DATABASE`` or an embedded SQLite file ``storelink-hq.db`` in the working
directory (a pilot); give ``postgresql://user@host/db`` for a fleet (password in ``PGPASSWORD`` or ~/.pgpass,
never on the command line). Broker credentials come from ``STORELINK_HQ_USERNAME``/``STORELINK_HQ_PASSWORD``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from storelink.hq.db import DATABASE_ENV, DEFAULT_DATABASE, default_database

log = logging.getLogger("storelink.hq")


def broker_options(args: argparse.Namespace) -> Any:
    from storelink.hq.link import BrokerOptions, parse_broker

    host, port = parse_broker(args.broker)
    return BrokerOptions(host=host, port=port, protocol=args.protocol,
                         username=os.environ.get("STORELINK_HQ_USERNAME") or None,
                         password=os.environ.get("STORELINK_HQ_PASSWORD") or None,
                         ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def trusted_keys(texts: list[str]) -> list[Any]:
    from storelink.remote.signing import load_public_key

    return [load_public_key(t) for t in texts]


def cmd_ingest(args: argparse.Namespace) -> int:
    from storelink.hq.db import DatabaseError
    from storelink.hq.ingest import IngestSettings, IngestWorker
    from storelink.hq.link import LinkError, ingest_client

    try:
        settings = IngestSettings(database=args.database, worker_id=args.worker_id, prefix=args.prefix,
                                  share_group=None if args.no_share else args.share_group,
                                  receive_maximum=args.receive_maximum, session_expiry=args.session_expiry,
                                  max_batch=args.max_batch, tracker=not args.no_tracker,
                                  trusted_keys=trusted_keys(args.trust_key), gap_grace=args.gap_grace,
                                  price_grace=args.price_grace, tracker_every=args.tracker_every)
        opts = broker_options(args)
        worker = IngestWorker(settings)
        worker.open()
    except (DatabaseError, LinkError, ValueError) as err:
        print(f"storelink hq ingest: {err}", file=sys.stderr)
        return 1
    try:
        client = ingest_client(opts, settings.client_id, settings.filters(), receive_maximum=args.receive_maximum,
                               session_expiry=args.session_expiry, on_link_change=worker.new_connection,
                               on_message=worker.on_message)
    except LinkError as err:
        worker.close()
        print(f"storelink hq ingest: {err}", file=sys.stderr)
        return 1
    worker.attach(client)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_a: worker.stop_event.set())
    log.info("ingest worker %s: %s -> %s", settings.worker_id, opts.where, _where(settings.database))
    try:
        worker.run()
    finally:
        client.disconnect()  # the session stays at the broker: what arrives meanwhile waits for this worker id
        client.loop_stop()
        worker.close()
    c = worker.counters
    log.info("ingest worker %s stopped: %d received, %d new events, %d duplicates, %d bad", settings.worker_id,
             c.received, c.inserted, c.duplicates, c.bad)
    return 0


def _where(url: str) -> str:
    return url.rpartition("@")[2] if url.startswith("postgres") else url


def _add_ingest(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database", default=default_database(),
                   help=f"postgresql://USER@HOST/DB or sqlite:///PATH (default ${DATABASE_ENV} or {DEFAULT_DATABASE})")
    p.add_argument("--broker", default="127.0.0.1:1883")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    p.add_argument("--tls-ca", type=Path)
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--prefix", default="storelink", help="the stores' mqtt.topic_prefix")
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


def add_fleet_subcommands(sub: Any) -> None:
    """Adds ingest and serve to the `storelink hq` subparsers (called from gateway/hq/prices.py)."""
    _add_ingest(sub.add_parser("ingest", help="land every store's events and states in head office's database"))
    from storelink.hq.dashboard import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="the read-only fleet dashboard (and /metrics)"))
