"""`storelink hq` as head office uses it: keygen, publish-prices (and its validation), status — real processes."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import STORELINK, GatewayProcess, Mosquitto, free_port, write_config
from tests.prices_helpers import STORE, items, write_items_csv


def hq(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STORELINK, "hq", *args], capture_output=True, text=True, timeout=timeout)


def test_keygen_publish_and_fleet_status(tmp_path: Path, mosquitto: Mosquitto) -> None:
    key = tmp_path / "hq.key"
    out = hq("keygen", "--out", str(key))
    assert out.returncode == 0, out.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    public = out.stdout.split('public_keys = ["')[1].split('"')[0]
    assert hq("keygen", "--out", str(key)).returncode == 1  # never overwrites a key by accident

    port = free_port()
    cfg = write_config(tmp_path / "storelink.toml", STORE, mosquitto.port, port,
                       f'[trust]\npublic_keys = ["{public}"]\n')
    gw = GatewayProcess(cfg, port).start()
    broker = f"127.0.0.1:{mosquitto.port}"
    try:
        bad = tmp_path / "bad.csv"
        bad.write_text("sku,price,colour\nA1,1.99,red\n")
        out = hq("publish-prices", str(bad), "--store", STORE, "--key", str(key), "--broker", broker)
        assert out.returncode == 1 and "unknown column" in out.stderr
        bad.write_text("sku,price\nA1,199\nA2,1.99\nA1,5\nA3,\n")
        out = hq("publish-prices", str(bad), "--store", STORE, "--key", str(key), "--broker", broker)
        assert out.returncode == 1
        assert "line 3: price must be an integer" in out.stderr and "line 4: sku 'A1' already on line 2" in out.stderr
        assert "line 5: price" in out.stderr

        good = write_items_csv(tmp_path / "prices.csv", items(300, base=250))
        out = hq("publish-prices", str(good), "--store", STORE, "--key", str(key), "--version", "7",
                 "--broker", broker, "--wait", "30")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "COMMITTED version 7: 300 SKU(s) changed" in out.stdout
        assert gw.get("/api/v1/prices/SKU000299")[1]["price"] == 250

        out = hq("publish-prices", str(good), "--store", STORE, "--key", str(key), "--version", "7",
                 "--batch-id", "again", "--broker", broker, "--wait", "30")
        assert out.returncode == 2 and "REJECTED: stale" in out.stdout

        out = hq("status", "--broker", broker)
        assert out.returncode == 0, out.stderr
        line = next(r for r in out.stdout.splitlines() if r.startswith(STORE))
        assert "online" in line and " 7 " in line
    finally:
        gw.stop()
