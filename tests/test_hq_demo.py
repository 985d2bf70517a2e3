"""`storelink demo` runs head office's side too: the demo's overcharge scene (a till charging an old price) becomes an
alert, printed and on the fleet dashboard (a real demo process with its embedded broker and SQLite ingest)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request

from tests.helpers import STORELINK


def test_demo_overcharge_scene_shows_up_as_an_alert_at_head_office() -> None:
    proc = subprocess.Popen([STORELINK, "demo", "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "ALERT overcharge" in line:
                break
        out = "".join(lines)
        assert "till-2 rings up sale T2-" in out and "at 3.49 EUR" in out, out[-3000:]
        alert = next(line for line in lines if "ALERT overcharge" in line)
        assert "till 2 charged 3.49 EUR for 1002" in alert and "published price 2.99 EUR (version 2)" in alert
        url = re.search(r"fleet dashboard: (http://127\.0\.0\.1:\d+)/", out)
        assert url, out[-3000:]
        with urllib.request.urlopen(f"{url.group(1)}/api/v1/alerts?kind=overcharge", timeout=10) as resp:
            alerts = json.loads(resp.read())["alerts"]
        assert [(a["store_id"], a["data"]["till"], a["data"]["charged"], a["data"]["published"]) for a in alerts] \
            == [("store-demo", "2", 349, 299)]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
    assert proc.returncode == 0, rest[-3000:]
