"""Replay protection that survives a restart: each signed one-shot message (a command) is accepted once.

The rule, for a message with a unique ``id`` and the time head office issued it: accepted only when it is recent
(issued within the last ``max_age`` seconds, a minute of clock skew either way), issued after the *floor*, and its
id was never seen. Seen ids are written to a small file, and the file is on disk (fsync) before the message is
acted on, so a gateway killed or restarted a moment later still refuses a captured copy.

The file stays bounded in age and size: an id is forgotten once its message is too old to pass the age check, or
when more than ``max_entries`` are kept; either way the floor rises to that message's issue time, so forgetting
can never re-open a replay (not even when the clock later jumps back). A missing or unreadable file starts with the
floor at "now": whatever was issued before is refused, because nobody knows any more whether it ran.

Remote config and price batches are desired states with versions, not one-shot messages: their rule is "newer
than every version seen", and the versions are durable where they live (``config_version`` in the config file and
the rolled-back versions in remote-config.json; the price database's batches: gateway/prices/staging.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from storelink.system.files import write_atomically

log = logging.getLogger(__name__)
CLOCK_SKEW = 60.0  # seconds head office's and the store's clocks may differ


class Replayed(Exception):
    """Refused; the message says why (safe to report to head office)."""


class ReplayGuard:
    def __init__(self, path: Path, *, max_entries: int = 1000):
        self.path = path
        self.max_entries = max_entries
        self.floor = 0.0
        self.seen: dict[str, float] = {}  # id -> issued_at
        self._lock = threading.Lock()  # two commands may be checked at once (in threads)

    def load(self) -> None:
        """Blocking. Reads the record; without a usable one, refuses everything issued before now."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            floor, seen = float(data["floor"]), {str(k): float(v) for k, v in dict(data["seen"]).items()}
        except FileNotFoundError:
            self.floor = time.time()
            log.info("no replay record in %s yet: signed commands issued before now are refused", self.path)
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            self.floor = time.time()
            log.error("replay record %s is unreadable (%s): signed commands issued before now are refused",
                      self.path, err)
            return
        self.floor, self.seen = floor, seen

    def accept(self, msg_id: str, issued_at: float, max_age: float) -> None:
        """Blocking (writes the record). Raises Replayed (or OSError), or records `msg_id` as used."""
        with self._lock:
            now = time.time()
            if not -CLOCK_SKEW <= now - issued_at <= max_age:
                raise Replayed(f"issued_at is outside the last {max_age:g}s: refused as a replay")
            if issued_at <= self.floor:
                raise Replayed("issued before the oldest command this store still remembers: refused as a replay")
            if msg_id in self.seen:
                raise Replayed(f"command id {msg_id} was already used: refused as a replay")
            seen = dict(self.seen)
            seen[msg_id] = issued_at
            floor = self.floor
            too_old = now - max_age - CLOCK_SKEW
            for old_id, t in sorted(seen.items(), key=lambda kv: kv[1]):
                if t >= too_old and len(seen) <= self.max_entries:
                    break
                del seen[old_id]
                floor = max(floor, t)
            # Raises OSError when it cannot be recorded: then the command must not run (a restart would let a
            # captured copy run again).
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps({"floor": floor, "seen": seen}).encode(), 0o640)
            self.floor, self.seen = floor, seen
