"""`storelink demo` shows a till's sale flowing to head office (a real demo process, its embedded broker)."""

from __future__ import annotations

import subprocess

from tests.helpers import STORELINK


def test_demo_shows_a_sale_from_the_simulated_till_at_head_office() -> None:
    res = subprocess.run([STORELINK, "demo", "--seconds", "7", "--listen", "127.0.0.1:0"], capture_output=True,
                         text=True, timeout=90)
    out = res.stdout
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[till 1] connected to 127.0.0.1:" in out
    assert "[till 1] SALE T1-" in out and "-> stored (seq " in out
    assert "[head office] storelink/store-demo/events/sale" in out
    assert '"device":"till-1"' in out and "[till 1] LOOKUP " in out
    assert "storelink/store-demo/devices/till-1/state" in out
