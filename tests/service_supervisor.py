"""Plays systemd's part for the update tests, as a real process of its own.

- ``storelink.service`` (``Restart=always``): runs the gateway command, starts it again 0.3 s after it exits,
  and writes ``{"pid", "starts", "restarts"}`` to the state file at every start (what
  storelink.update.service.PidFileService reads: a restart is SIGTERM to that pid; ``restarts`` counts the
  starts after an exit, systemd's NRestarts).
- ``storelink-update.path`` (``PathExists=`` pending.json / trial.json): whenever one of them exists in the
  watched directory and the updater is not running, runs the updater command once (its pid goes into the
  state file too, so a test can kill it mid-trial).

    python tests/service_supervisor.py --state S --watch DIR --updater '["cmd", ...]' --log L -- gateway cmd...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RESTART_SEC = 0.3


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--watch", type=Path, required=True)
    p.add_argument("--updater", required=True, help="JSON list: the updater's command")
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    updater_cmd = json.loads(args.updater)
    stopping = False

    def stop(*_a: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log = args.log.open("ab")
    starts, restarts = 0, 0
    child: subprocess.Popen[bytes] | None = None
    updater: subprocess.Popen[bytes] | None = None

    def write_state() -> None:
        tmp = args.state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": child.pid if child else 0, "starts": starts, "restarts": restarts,
                                   "updater_pid": updater.pid if updater else 0}))
        os.replace(tmp, args.state)
    while not stopping:
        if child is None or child.poll() is not None:
            if child is not None:
                restarts += 1
                print(f"supervisor: gateway exited {child.returncode}; restart {restarts}", file=sys.stderr,
                      flush=True)
                time.sleep(RESTART_SEC)
            child = subprocess.Popen(cmd, stdout=log, stderr=log)
            starts += 1
            write_state()
        if (updater is None or updater.poll() is not None) and any(
                (args.watch / f).exists() for f in ("pending.json", "trial.json")):
            if updater is not None:
                print(f"supervisor: updater exited {updater.returncode}", file=sys.stderr, flush=True)
            updater = subprocess.Popen(updater_cmd, stdout=log, stderr=log)
            write_state()
        time.sleep(0.05)
    for proc in (updater, child):
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
