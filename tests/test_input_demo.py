"""`storelink demo` shows scans (one garbled) and a kiosk session flowing to head office, and the kiosk's
customer data gone after the customer steps off (a real demo process with its embedded broker)."""

from __future__ import annotations

import subprocess

from tests.helpers import STORELINK


def test_demo_shows_scans_and_a_kiosk_session_at_head_office() -> None:
    res = subprocess.run([STORELINK, "demo", "--seconds", "10", "--listen", "127.0.0.1:0"], capture_output=True,
                         text=True, timeout=90)
    out = res.stdout
    assert res.returncode == 0, res.stderr[-2000:]
    scans = [line for line in out.splitlines() if line.startswith("[head office] storelink/store-demo/events/scan")]
    # (head office's lines are cut at 160 characters: the start of the data is what is left to check)
    assert any('"device":"scanner-1","data":{"valid":true' in line for line in scans), out[-3000:]
    assert any('"device":"scanner-1","data":{"valid":false' in line for line in scans), out[-3000:]
    assert "[head office] storelink/store-demo/events/kiosk.session_started" in out
    assert "[head office] storelink/store-demo/events/kiosk.session_ended" in out
    assert "[kiosk-1] session over; customer data left: cart=None loyalty_card=None" in out
    assert "rejected scan: garbled" in res.stderr and "\\xff" not in res.stderr
