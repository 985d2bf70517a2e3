"""The uplink against a real Mosquitto: TLS + client certificates + password, 3.1.1, Last Will, persistent session."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from storelink.app import Gateway
from storelink.config import parse_config
from storelink.downlink import Downlink
from tests.helpers import GatewayProcess, Mosquitto, Subscriber, free_port, wait_for, write_config
from tests.tls_certs import make_pki

STORE = "store-0042"


def _base_cfg(tmp_path: Path, port: int, **mqtt_extra: object) -> dict[str, object]:
    return {
        "store_id": STORE,
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min": 0.2, "reconnect_max": 1.0, **mqtt_extra},
        "storage": {"path": str(tmp_path / "gw.db")},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
    }


async def _run_until(gw: Gateway, cond: object, limit_s: float = 15) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    try:
        deadline = asyncio.get_running_loop().time() + limit_s
        while not cond():  # type: ignore[operator]
            assert not task.done(), task.exception()
            assert asyncio.get_running_loop().time() < deadline, "timed out"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task


@pytest.fixture
def tls_broker(tmp_path: Path) -> tuple[Mosquitto, dict[str, Path]]:
    pki = make_pki(tmp_path)
    pwfile = tmp_path / "passwd"
    pwfile.write_text("store-0042:s3cret-pass\n")
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([passwd, "-U", str(pwfile)], check=True)
    port = free_port()
    broker = Mosquitto(tmp_path, port)
    broker.write_conf(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pwfile}\n"
        f"cafile {pki['ca']}\ncertfile {pki['server_cert']}\nkeyfile {pki['server_key']}\n"
        "require_certificate true\npersistence false\n"
    )
    broker.start()
    yield broker, pki  # type: ignore[misc]
    broker.stop()


async def test_tls_with_client_certificate_and_password(tmp_path: Path, tls_broker: tuple[Mosquitto, dict[str, Path]]
                                                        ) -> None:
    broker, pki = tls_broker
    tls = {"ca": str(pki["ca"]), "cert": str(pki["client_cert"]), "key": str(pki["client_key"])}
    gw = Gateway(parse_config(_base_cfg(tmp_path, broker.port, username=STORE, password="s3cret-pass", tls=tls)))
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    try:
        await asyncio.wait_for(gw.ready.wait(), 10)
        # 2,000 events and their PUBACKs in bursts over TLS: paho's socket is read from the loop, and records
        # that hold several packets must all be read (the SSL object's pending bytes are invisible to epoll).
        await gw.outbox.put_many([("sale", "till-1", {"n": i}) for i in range(2000)])
        deadline = asyncio.get_running_loop().time() + 20
        while gw.outbox.stats.delivered_total < 2000:
            assert asyncio.get_running_loop().time() < deadline, (gw.outbox.status(), gw.uplink.status())
            await asyncio.sleep(0.05)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("paho")]  # no paho thread
    finally:
        stop.set()
        await task

    (tmp_path / "bad").mkdir()
    bad_cfg = _base_cfg(tmp_path / "bad", broker.port, username=STORE, password="wrong-password", tls=tls)
    bad = Gateway(parse_config(bad_cfg))
    await _run_until(bad, lambda: bad.uplink.last_error and "refused" in bad.uplink.last_error)
    assert not bad.uplink.connected
    assert "wrong-password" not in str(bad.status())  # no secrets in the status either


async def test_mqtt_311_delivers_events(tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber) -> None:
    gw = Gateway(parse_config(_base_cfg(tmp_path, mosquitto.port, protocol="3.1.1")))
    sent: list[int] = []

    async def send() -> None:
        sent.append((await gw.emit("sale", "till-1", {"total": 5})).seq)

    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    await gw.ready.wait()
    await send()
    await asyncio.to_thread(wait_for, lambda: len(subscriber.events(STORE)) == 1, 10)
    stop.set()
    await task
    assert subscriber.events(STORE)[0]["seq"] == sent[0]


def test_last_will_says_offline_after_kill9(
    gateway_process: GatewayProcess, subscriber: Subscriber, mosquitto: Mosquitto
) -> None:
    gw = gateway_process.start()
    topic = f"storelink/{STORE}/status"
    wait_for(lambda: subscriber.json(topic) and subscriber.json(topic)[-1]["state"] == "online", 10)
    birth = subscriber.json(topic)[-1]
    assert birth["store_id"] == STORE and birth["version"] and birth["started_at"]
    gw.kill9()
    # The broker publishes the will once it sees the connection is gone (immediately on a closed socket).
    wait_for(lambda: subscriber.json(topic)[-1]["state"] == "offline", 15, what="the Last Will")
    late = Subscriber(mosquitto.port)  # a newcomer sees it retained
    wait_for(lambda: late.json(topic), 5)
    assert late.json(topic)[-1]["state"] == "offline"
    late.close()


async def test_downlink_qos1_waits_at_the_broker_while_the_store_is_offline(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    got: list[bytes] = []

    async def handler(msg: Downlink) -> None:
        got.append(msg.payload)

    def gateway() -> Gateway:
        gw = Gateway(parse_config(_base_cfg(tmp_path, mosquitto.port)))
        gw.uplink.subscribe(f"{gw.topics.base}/test/downlink", handler)
        return gw

    first = gateway()
    await _run_until(first, lambda: first.uplink.connected)  # subscribes, then goes offline
    hq = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    hq.connect("127.0.0.1", mosquitto.port)
    hq.loop_start()
    for i in range(3):
        hq.publish(f"{first.topics.base}/test/downlink", f"while-offline-{i}".encode(), qos=1).wait_for_publish(5)
    hq.loop_stop()
    hq.disconnect()
    second = gateway()
    await _run_until(second, lambda: len(got) == 3)
    assert got == [b"while-offline-0", b"while-offline-1", b"while-offline-2"]


def test_gateway_process_config_with_write_config(tmp_path: Path, mosquitto: Mosquitto) -> None:
    # write_config produces a file check-config accepts (guards the helper the other tests rely on).
    p = write_config(tmp_path / "c.toml", STORE, mosquitto.port, free_port())
    from storelink.config import load_config

    assert load_config(p).mqtt.port == mosquitto.port


@pytest.mark.filterwarnings("ignore:The .acl. option is deprecated:DeprecationWarning")
async def test_a_subscription_the_broker_refuses_is_reported(tmp_path: Path) -> None:
    # A broker ACL that does not let the store read its own topics: it would never hear of a price change or a
    # command. The status says so instead of claiming to be subscribed. (Mosquitto 2.0 grants denied
    # subscriptions and silently drops the messages; amqtt refuses them in the SUBACK, as MQTT allows.)
    from amqtt.broker import Broker

    port = free_port()
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
                    "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {
                        "acl": {"anonymous": ["somebody/else/#"]}}},
    })
    await broker.start()
    try:
        gw = Gateway(parse_config(_base_cfg(tmp_path, port, protocol="3.1.1")))
        seen: list[dict[str, object]] = []
        await _run_until(gw, lambda: "refused a subscription" in str(gw.uplink.last_error)
                         and bool(seen.append(gw.uplink.status())) is False)
        assert seen[-1]["connected"] and not seen[-1]["subscribed"], seen[-1]
        assert f"storelink/{STORE}/prices/batch" in seen[-1]["refused_subscriptions"], seen[-1]  # type: ignore[operator]
    finally:
        await broker.shutdown()


async def test_subscribed_once_the_broker_granted_every_subscription(tmp_path: Path, mosquitto: Mosquitto) -> None:
    gw = Gateway(parse_config(_base_cfg(tmp_path, mosquitto.port)))
    assert not gw.uplink.status()["subscribed"]
    seen: list[dict[str, object]] = []
    await _run_until(gw, lambda: bool(seen.append(gw.uplink.status())) or seen[-1]["subscribed"])
    assert seen[-1]["connected"] and seen[-1]["last_error"] is None, seen[-1]


async def test_an_event_the_broker_refuses_is_kept_and_retried_alone(tmp_path: Path) -> None:
    # The broker's ACL does not (yet) allow one event kind. That event stays in the outbox and is retried with
    # backoff; the events after it are delivered once each (no cursor rewind resending what is in flight).
    import signal

    acl = tmp_path / "acl"
    allowed = f"topic readwrite storelink/{STORE}/status\ntopic readwrite storelink/{STORE}/events/sale\n" \
              f"topic read storelink/{STORE}/#\n"
    acl.write_text(allowed)
    port = free_port()
    broker = Mosquitto(tmp_path, port, extra_conf=f"acl_file {acl}\n").start()
    hq = Subscriber(port, f"storelink/{STORE}/events/#")
    try:
        gw = Gateway(parse_config(_base_cfg(tmp_path, port)))
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop))
        await asyncio.wait_for(gw.ready.wait(), 10)
        for i in range(30):
            await gw.outbox.put("loyalty.redeemed" if i == 3 else "sale", "till-1", {"n": i})
        deadline = asyncio.get_running_loop().time() + 15
        while len(hq.events(STORE)) < 29 or gw.uplink.status()["refused_events"] != 1:
            assert asyncio.get_running_loop().time() < deadline, (len(hq.events(STORE)), gw.uplink.status())
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # at least one retry, refused again
        status = gw.uplink.status()
        assert gw.outbox.stats.depth == 1 and "Not authorized" in status["last_error"], status
        seqs = [e["seq"] for e in hq.events(STORE)]
        assert len(seqs) == len(set(seqs)) == 29, seqs  # nothing delivered twice

        acl.write_text(allowed + f"topic write storelink/{STORE}/events/loyalty.redeemed\n")
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)  # mosquitto reloads its ACL
        deadline = asyncio.get_running_loop().time() + 20
        while gw.outbox.stats.depth:
            assert asyncio.get_running_loop().time() < deadline, gw.uplink.status()
            await asyncio.sleep(0.1)
        late = [e for e in hq.events(STORE) if e["kind"] == "loyalty.redeemed"]
        assert len(late) == 1 and late[0]["data"] == {"n": 3} and gw.uplink.status()["refused_events"] == 0
        stop.set()
        await task
    finally:
        hq.close()
        broker.stop()
