"""Every `storelink hq` command against a broker it cannot use: one clear line on stderr, a non-zero exit, no
traceback, and never a fleet table from a broker it never got connected to. Real refusing brokers: a closed port,
amqtt (MQTT 3.1.1 only), Mosquitto with a password file, with TLS and client certificates, with an ACL; a loopback
server that speaks the real bytes of a broker refusing MQTT 3.1.1."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.fleet import Fleet
from tests.helpers import STORELINK, GatewayProcess, Mosquitto, free_port, wait_for, write_config
from tests.hq_helpers import STORE
from tests.prices_helpers import items, write_items_csv


def hq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("STORELINK_HQ")}
    return subprocess.run([STORELINK, "hq", *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})})


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    key = tmp_path / "hq.key"
    made = hq("keygen", "--out", str(key))
    assert made.returncode == 0
    public = made.stdout.split('public_keys = ["')[1].split('"')[0]
    config = tmp_path / "store.toml"
    config.write_text(f'store_id = "{STORE}"\n')
    return {"key": key, "config": config, "csv": write_items_csv(tmp_path / "p.csv", items(3)),
            "trust": Path(f'[trust]\npublic_keys = ["{public}"]\n')}  # the [trust] lines for a store


def every_command(inputs: dict[str, Path]) -> list[list[str]]:
    return [["status"], ["cmd", STORE, "ping", "--wait", "2"],
            ["push-config", str(inputs["config"]), "--key", str(inputs["key"]), "--wait", "2"],
            ["publish-prices", str(inputs["csv"]), "--store", STORE, "--key", str(inputs["key"]), "--wait", "2"],
            ["release", "status", "--listen", "0"]]


def refused(done: subprocess.CompletedProcess[str], *expect: str, code: int = 69) -> str:
    """The command failed with one line naming the reason."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for text in expect:
        assert text in lines[0], lines[0]
    assert "store(s)" not in done.stdout and "published" not in done.stdout, done.stdout
    return lines[0]


def test_closed_port_and_malformed_broker(inputs: dict[str, Path]) -> None:
    closed = f"127.0.0.1:{free_port()}"
    for i, args in enumerate(every_command(inputs)):
        refused(hq(*args, "--broker", closed), f"storelink hq {args[0]}: connection refused by {closed}")
        refused(hq(*args, "--broker", "mqtt.example.com"), "--broker: expected HOST:PORT", code=1)
        if i % 2:  # the same connect() for all: DNS and a port out of range for half of them
            refused(hq(*args, "--broker", "no-such-broker.invalid:1883"), "cannot resolve", "(DNS)")
        else:
            refused(hq(*args, "--broker", "h:70000"), "--broker: port 70000 is out of range", code=1)


@pytest.fixture
def amqtt_broker(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    conf = tmp_path / "amqtt.yaml"
    conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
                    "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "amqtt"), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def accepting() -> bool:
        assert proc.poll() is None, "amqtt exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    try:
        wait_for(accepting, 20, what="amqtt")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_311_only_broker_refuses_mqtt5_and_works_with_311(tmp_path: Path, inputs: dict[str, Path],
                                                             amqtt_broker: int) -> None:
    broker = f"127.0.0.1:{amqtt_broker}"
    for args in every_command(inputs):
        refused(hq(*args, "--broker", broker), "does not speak MQTT 5", 'broker.protocol = "3.1.1"')
    http = free_port()
    path = write_config(tmp_path / "storelink.toml", STORE, amqtt_broker, http, str(inputs["trust"]))
    path.write_text(path.read_text().replace("[mqtt]\n", '[mqtt]\nprotocol = "3.1.1"\n'))
    gw = GatewayProcess(path, http).start()
    try:
        gw.wait_online(15)
        ping = hq("cmd", STORE, "ping", "--broker", broker, "--protocol", "3.1.1")
        assert ping.returncode == 0 and '"pong": true' in ping.stdout, ping.stdout + ping.stderr
        signed = hq("cmd", STORE, "resync-prices", "--key", str(inputs["key"]), "--broker", broker,
                    "--protocol", "3.1.1")
        assert signed.returncode == 0, signed.stdout + signed.stderr
        status = hq("status", "--broker", broker, "--protocol", "3.1.1")
        assert status.returncode == 0 and any(r.startswith(STORE) for r in status.stdout.splitlines())
    finally:
        gw.stop()


@pytest.fixture
def mqtt5_only_broker() -> Iterator[int]:
    """Answers every CONNECT that is not MQTT 5 with CONNACK 0x01 (unacceptable protocol version), as a broker
    that speaks only MQTT 5 does; a real one of those is not packaged for Debian."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(1024)  # CONNECT: fixed header, length, 00 04 'MQTT' (or 00 06 'MQIsdp'), level
                level = data[data.index(b"MQ") + (4 if data[data.index(b"MQ"):].startswith(b"MQTT") else 6)]
                if level != 5:
                    conn.sendall(b"\x20\x02\x00\x01")

    threading.Thread(target=serve, daemon=True).start()
    yield port
    server.close()


def test_a_broker_refusing_311(inputs: dict[str, Path], mqtt5_only_broker: int) -> None:
    for args in every_command(inputs):
        refused(hq(*args, "--broker", f"127.0.0.1:{mqtt5_only_broker}", "--protocol", "3.1.1"),
                "does not speak MQTT 3.1.1", 'broker.protocol = "5"')


def test_a_port_that_never_answers(tmp_path: Path) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does) and never says a word
    try:
        config = tmp_path / "hq.toml"
        config.write_text(f'[broker]\naddress = "127.0.0.1:{silent.getsockname()[1]}"\nconnect_timeout = 1\n')
        refused(hq("status", "--config", str(config)), "sent no MQTT CONNACK within 1 s", "is it an MQTT broker?")
    finally:
        silent.close()


def test_mosquitto_with_passwords(tmp_path: Path, inputs: dict[str, Path]) -> None:
    pwfile = tmp_path / "passwd"
    pwfile.write_text("hq:right-password\n")
    subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-U", str(pwfile)], check=True)
    broker = Mosquitto(tmp_path)
    broker.write_conf(f"listener {broker.port} 127.0.0.1\nallow_anonymous false\npassword_file {pwfile}\n")
    broker.start()
    where = f"127.0.0.1:{broker.port}"
    secret = tmp_path / "secret"
    secret.write_text("right-password\n")
    hq_toml = tmp_path / "hq.toml"
    try:
        for args in every_command(inputs):
            refused(hq(*args, "--broker", where), "not authorised")
        refused(hq("status", "--broker", where, "--username", "hq"), "not authorised")  # no password at all
        # Mosquitto says "not authorized" for a wrong password too (EMQX: "bad user name or password").
        refused(hq("cmd", STORE, "ping", "--broker", where, "--username", "hq", env={"STORELINK_HQ_PASSWORD": "x"}),
                "not authorised", "user name/password")
        hq_toml.write_text(f'[broker]\naddress = "{where}"\nusername = "hq"\npassword_env = "HQ_PW"\n')
        refused(hq("status", "--config", str(hq_toml)), "broker.password_env", "HQ_PW is not set", code=1)
        assert hq("status", "--config", str(hq_toml), env={"HQ_PW": "right-password"}).returncode == 0
        hq_toml.write_text(f'[broker]\naddress = "{where}"\nusername = "hq"\npassword_file = "secret"\n')
        ok = hq("status", env={"STORELINK_HQ_CONFIG": str(hq_toml)})
        assert ok.returncode == 0 and "0 store(s) on" in ok.stdout, ok.stderr
        hq_toml.write_text(f'[broker]\naddress = "{where}"\nusername = "hq"\npassword = "right-password"\n')
        refused(hq("status", "--config", str(hq_toml)), "broker.password: unknown key", code=1)
        refused(hq("status", "--broker", where, "--tls-ca", str(tmp_path / "passwd")), "broker.tls.ca", code=1)
        ca = Fleet(tmp_path / "pki", {}).pki  # TLS to this plain port
        assert Fleet(tmp_path / "pki", {}).ok("ca", "init") and ca.is_dir()
        refused(hq("status", "--broker", where, "--tls-ca", str(ca / "ca.pem")), "TLS handshake failed",
                "is it a TLS port?")
    finally:
        broker.stop()


def test_mosquitto_with_tls_client_certificates_and_acl(tmp_path: Path, inputs: dict[str, Path]) -> None:
    fleet = Fleet(tmp_path / "hq", {"store-a": []}).set_up()
    broker = fleet.broker()
    where = f"127.0.0.1:{fleet.port}"
    plain = {"STORELINK_HQ_CONFIG": ""}
    try:
        for args in every_command(inputs):
            refused(hq(*args, "--broker", where, env=plain), "closed the connection without answering",
                    "then set broker.tls")
            refused(fleet.hq(*args, "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key",
                             str(tmp_path / "missing.key")), "broker.tls.cert/key (--tls-cert/--tls-key): cannot load",
                    code=1)
        bare = tmp_path / "bare.toml"
        bare.write_text(f'[broker]\naddress = "{where}"\n[broker.tls]\nca = "{fleet.pki / "ca.pem"}"\n')
        refused(hq("status", "--config", str(bare)), "requires a client certificate", "broker.tls.cert")
        # A store's certificate may connect, but not act as head office: its publish is refused.
        store = fleet.bundle("store-a")
        as_store = ["--tls-cert", str(store / "client.pem"), "--tls-key", str(store / "client.key")]
        refused(fleet.hq("cmd", "store-b", "ping", *as_store), "refused to take the message",
                "storelink/store-b/cmd/ping", "Not authorized")
        refused(fleet.hq("publish-prices", str(inputs["csv"]), "--group", "north", *as_store),
                "refused to take the message", "storelink/groups/north/prices/batch")
        assert fleet.hq("status").returncode == 0
        prefixed = fleet.hq("status", "--topic-prefix", "acme")
        assert prefixed.returncode == 0 and "under acme/" in prefixed.stdout
        refused(fleet.hq("cmd", "store-a", "ping", "--topic-prefix", "acme"), "refused to take the message",
                "acme/store-a/cmd/ping")  # the broker's ACL is for the prefix it was made with
    finally:
        broker.stop()


def test_hostile_retained_store_messages_do_not_break_hq_status(mosquitto: Mosquitto) -> None:
    """What a store publishes is untrusted at head office too: a status nested deeper than any parser's stack, a
    NaN and a lone surrogate, all retained, must not kill the tool's MQTT thread (it then lists nothing and hangs
    or crashes); the good store is still listed."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    try:
        hostile = {"store-deep": b"[" * 200_000 + b"]" * 200_000, "store-nan": b'{"state": NaN}',
                   "store-surrogate": b'{"state": "\\ud800"}', "store-good": b'{"state": "online", "version": "1"}'}
        for store, payload in hostile.items():
            client.publish(f"storelink/{store}/status", payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()
    res = subprocess.run([STORELINK, "hq", "status", "--broker", f"127.0.0.1:{mosquitto.port}"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "store-good" in res.stdout
