"""`storelink hq push-config` / `storelink hq cmd` as operators run them, against a real broker and gateway."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from storelink.remote.signing import keygen
from tests.helpers import STORELINK, Mosquitto
from tests.hq_helpers import STORE, start_gateway


def hq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STORELINK, "hq", *args], capture_output=True, text=True, timeout=60)


def test_push_config_and_commands_from_the_command_line(tmp_path: Path, mosquitto: Mosquitto) -> None:
    key = keygen()
    key_file = tmp_path / "hq.key"
    key_file.write_text(key.private_b64 + "\n")
    broker = f"127.0.0.1:{mosquitto.port}"
    gw = start_gateway(tmp_path, mosquitto.port, key)
    try:
        gw.wait_online(10, what="connected")
        pos = tmp_path / "pos"
        pos.mkdir()
        new = tmp_path / "store-0042.toml"
        new.write_text(gw.config.read_text().replace(f'token = "{"t" * 24}"\n', "")
                       + f'[[devices]]\nid = "pos1"\ndriver = "plu_file"\ndirectory = "{pos}"\n')
        done = hq("push-config", str(new), "--key", str(key_file), "--version", "12", "--broker", broker)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{STORE}: applied (running version 12)" in done.stdout
        assert gw.get("/api/v1/status")[1]["config"]["version"] == 12

        bad = tmp_path / "bad.toml"
        bad.write_text(new.read_text().replace("[mqtt]", "[mqtt]\nhots = 1"))
        refused = hq("push-config", str(bad), "--key", str(key_file), "--version", "13", "--broker", broker)
        assert refused.returncode == 1 and "mqtt.hots: unknown key" in refused.stderr
        assert "nothing was published" in refused.stderr

        ping = hq("cmd", STORE, "ping", "--broker", broker)
        assert ping.returncode == 0 and json.loads(ping.stdout)["result"]["config_version"] == 12
        unsigned = hq("cmd", STORE, "restart-device", "--arg", "device=pos1", "--broker", broker)
        assert unsigned.returncode == 1 and json.loads(unsigned.stdout)["code"] == "unauthorized"
        signed = hq("cmd", STORE, "restart-device", "--arg", "device=pos1", "--key", str(key_file),
                    "--broker", broker)
        assert signed.returncode == 0, signed.stdout + signed.stderr
        assert json.loads(signed.stdout)["result"] == {"restarting": "pos1"}
    finally:
        gw.stop()
