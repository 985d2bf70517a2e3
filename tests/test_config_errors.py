"""Errors a person can act on: check-config reports every problem of a file in one pass (the sample in
docs/config.md is its real output), a port written as a string is an error, a listen address in use stops
`storelink run` with one line naming the address and the setting, and files a config names are checked."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from storelink.config import ConfigError, parse_config
from tests.helpers import STORELINK, write_config

DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def _problems(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "<test>")
    return err.value.problems


def test_the_sample_in_docs_config_md_is_real_output(tmp_path: Path) -> None:
    text = DOCS.read_text()
    sample = re.search(r"This file:\n\n```toml\n(.*?)```", text, re.S)
    shown = re.search(r"\n    \$ storelink check-config store.toml\n((?:    .*\n)+)", text)
    assert sample and shown, "docs/config.md lost its check-config sample"
    (tmp_path / "store.toml").write_text(sample.group(1))
    res = subprocess.run([STORELINK, "check-config", "store.toml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1
    expected = [line[4:] for line in shown.group(1).splitlines()]
    assert res.stderr.splitlines() == expected
    # One pass: a top-level problem and device problems side by side.
    assert any(line.startswith("  - mqtt.") for line in expected)
    assert any(line.startswith("  - devices[") for line in expected)


def test_top_level_and_device_problems_come_together() -> None:
    problems = _problems({"store_id": "bad id!", "mqtt": {"keepalive": 1}, "devices": [
        {"id": "till-1", "driver": "till_tcp", "listen": "nowhere"},
        "not a table",
        {"id": "pos", "driver": "plu_file"},
    ]})
    assert [p.split(":")[0] for p in problems] == ["store_id", "mqtt.keepalive", "devices[1]",
                                                   "devices[0] (id='till-1').listen", "devices[2] (id='pos').directory"]
    assert problems[0].startswith("store_id: must be 1 to 64 letters")


@pytest.mark.parametrize("where", ["mqtt", "device"])
def test_a_port_given_as_a_string_is_an_error(where: str) -> None:
    if where == "mqtt":
        data: dict[str, object] = {"store_id": "s", "mqtt": {"port": "8883"}}
        key, port = "mqtt.port", "8883"
    else:
        data = {"store_id": "s", "devices": [{"id": "labels-1", "driver": "zpl_printer", "host": "10.0.0.5",
                                             "port": "9100"}]}
        key, port = "devices[0] (id='labels-1').port", "9100"
    assert _problems(data) == [f"{key}: a TCP port is a number, not the string '{port}' (write {port} without quotes)"]
    for bad in (8883.5, True, "eighty"):
        assert _problems({"store_id": "s", "mqtt": {"port": bad}})[0].startswith("mqtt.port: ")
    assert parse_config({"store_id": "s", "mqtt": {"port": 8883}}).mqtt.port == 8883


def test_unknown_keys_name_the_likely_fix() -> None:
    problems = _problems({"store_id": "s", "mqtt": {"tls": {"certfile": "/x"}}, "storage": {"synchronus": "FULL"}})
    assert problems == ["mqtt.tls.certfile: unknown key (did you mean 'cert'?)",
                        "storage.synchronus: unknown key (did you mean 'synchronous'?)"]


def test_files_the_config_names_are_checked(tmp_path: Path) -> None:
    problems = _problems({"store_id": "s", "trust": {"public_keys": [str(tmp_path / "missing.pub")]},
                          "devices": [{"id": "esl", "driver": "openepaperlink", "url": "http://10.0.0.9",
                                       "tags_file": str(tmp_path / "tags.csv")}]})
    assert problems[0].startswith("trust.public_keys[0]: not base64 key bytes and not a readable key file")
    assert problems[1] == f"devices[0] (id='esl'): cannot read tags_file {tmp_path / 'tags.csv'}: " \
                          "no such file or directory"


def test_a_listen_address_in_use_is_one_line_naming_it_and_the_setting(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path / "storelink.toml", "store-0042", 1, port)
        res = subprocess.run([STORELINK, "run", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.splitlines()[-1] == (
        f"storelink: cannot listen on 127.0.0.1:{port}: address already in use (another program, or another "
        f"StoreLink, is using it); change [http] listen in {config}")
