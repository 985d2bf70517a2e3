"""Test-only crash points: ``STORELINK_CRASH_AT=<name>`` makes the gateway kill itself with SIGKILL there.

The kill -9 tests use it to stop the process at an exact phase of a price change (a real SIGKILL: no cleanup,
no flush), then start it again and check that every device ends on one version. Names:

- ``after_staging``: the batch is verified and staged, nothing sent to any device yet;
- ``mid_prepare``: the first target has prepared, the others not yet (or not recorded);
- ``after_decision``: the commit decision is durable, the price book not yet switched;
- ``mid_commit``: the book is switched and the first target committed, the others not yet.

Never set it in production: unset, ``crash_point`` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)
POINTS = frozenset({"after_staging", "mid_prepare", "after_decision", "mid_commit"})


def crash_point(name: str) -> None:
    if os.environ.get("STORELINK_CRASH_AT") == name:
        log.warning("STORELINK_CRASH_AT=%s: killing this process with SIGKILL (test hook)", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
