"""Head office for real: a fleet set up with `storelink hq` (CA, enrolment, broker-config) on a real Mosquitto that
requires TLS and client certificates. An enrolled store works end to end and every hq command works over TLS; a
store reaches only its own topics; a store without a certificate, with an expired, foreign or revoked one cannot
connect and says why in its status and log."""

from __future__ import annotations

import asyncio
import json
import signal
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from storelink.app import Gateway
from storelink.config import parse_config
from tests.fleet import Fleet, expired_cert
from tests.helpers import GatewayProcess, Mosquitto, free_port, wait_for
from tests.prices_helpers import items, write_items_csv
from tests.release_helpers import HttpsFileServer, storelink_wheel


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path, {"store-a": ["north"], "store-b": ["south"]}).set_up()


def test_enrolled_store_works_end_to_end_and_every_hq_command_over_tls(tmp_path: Path, fleet: Fleet) -> None:
    broker = fleet.broker()
    http = free_port()
    gw = GatewayProcess(fleet.gateway_config("store-a", http), http).start()
    hq_view = fleet.client(fleet.pki / "hq-ops.pem", fleet.pki / "hq-ops.key")
    try:
        gw.wait_online(15)
        uplink = gw.get("/api/v1/status")[1]["uplink"]
        assert uplink["connected"] and uplink["problem"] is None and uplink["refused_subscriptions"] == []
        hq_view.subscribe("storelink/store-a/events/#")
        assert gw.post("/api/v1/events", {"kind": "sale", "device": "till-1", "data": {"total": 5}})[0] == 202
        wait_for(lambda: hq_view.got("storelink/store-a/events/sale"), 10, what="the sale at head office")

        status = fleet.cli("status")
        line = next(r for r in status.splitlines() if r.startswith("store-a"))
        assert "online" in line, status
        ping = json.loads(fleet.cli("cmd", "store-a", "ping"))
        assert ping["ok"] and ping["result"]["pong"] is True

        csv = write_items_csv(tmp_path / "prices.csv", items(20, base=300))
        out = fleet.cli("publish-prices", str(csv), "--store", "store-a", "--version", "3", "--wait", "30")
        assert "COMMITTED version 3: 20 SKU(s) changed" in out
        fleet.cli("publish-prices", str(csv), "--group", "north", "--version", "4", "--batch-id", "north-4")
        wait_for(lambda: gw.get("/api/v1/status")[1]["prices"]["active_version"] == 4, 20,
                 what="the group's price list (store-a is in north)")
        out = fleet.cli("publish-prices", str(csv), "--group", "south", "--version", "5")
        assert "published to storelink/groups/south/prices/batch" in out

        new = tomllib.loads(gw.config.read_text())
        new["logging"] = {"level": "DEBUG"}
        pushed = tmp_path / "store-a.toml"
        pushed.write_text(tomli_w.dumps(new))
        out = fleet.cli("push-config", str(pushed), "--version", "7", "--wait", "30")
        assert "store-a: applied (running version 7)" in out
        restart = json.loads(fleet.cli("cmd", "store-a", "resync-prices"))  # signed with hq.toml's key
        assert restart["ok"] and restart["result"]["active_version"] == 4, restart
        assert gw.get("/api/v1/status")[1]["prices"]["active_version"] == 4  # south's batch never reached it
    finally:
        hq_view.close()
        gw.stop()
        broker.stop()



def test_release_commands_over_tls_with_hq_toml(tmp_path: Path, fleet: Fleet) -> None:
    """`storelink hq release` build, publish and status take the signing key, broker, TLS identity and prefix from
    hq.toml like every hq command: the signed update command reaches store-a and its reply and update/state come
    back through the broker's ACL. Nothing here runs the root-side updater, so the store stays at `installing` and
    the ring ends by its timeout (the full update is tests/test_update_e2e.py)."""
    house = tmp_path / "house"
    house.mkdir()
    wheel = storelink_wheel("2.0.0", tmp_path / "wheel")
    wheel.rename(house / wheel.name)
    out = fleet.cli("release", "build", str(house), "--out", str(tmp_path / "dist"), "--extras", "", timeout=120)
    bundle = tmp_path / "dist" / "storelink-2.0.0.bundle"
    assert out.startswith(f"{bundle}: ")
    fleet.ok("ca", "server-cert", "localhost", "--out-dir", str(tmp_path / "www-tls"))  # the release server
    (tmp_path / "www").mkdir()
    bundle.rename(tmp_path / "www" / bundle.name)
    server = HttpsFileServer(tmp_path / "www", {"server_cert": tmp_path / "www-tls" / "server.pem",
                                                "server_key": tmp_path / "www-tls" / "server.key"})
    broker = fleet.broker()
    http = free_port()
    config = fleet.gateway_config("store-a", http)
    store_cfg = tomllib.loads(config.read_text())
    store_cfg["update"] = {"ca": str(fleet.pki / "ca.pem")}
    config.write_text(tomli_w.dumps(store_cfg))
    gw = GatewayProcess(config, http).start()
    rollouts = str(tmp_path / "rollouts")
    try:
        gw.wait_online(15)
        done = fleet.hq("release", "publish", str(tmp_path / "www" / bundle.name), "--url", server.url(bundle.name),
                        "--group", "north", "--rollouts", rollouts, "--ring-timeout", "10", timeout=120)
        assert done.returncode == 3 and "store-a (timeout: no outcome within 10 s)" in done.stdout, done
        assert server.requests, "store-a never fetched the bundle"
        status = json.loads(fleet.cli("release", "status", "--json", "--rollouts", rollouts, "--listen", "1"))
        (row,) = [r for r in status["stores"] if r["store"] == "store-a"]
        assert row["state"] == "installing" and row["target"] == "2.0.0", status
        assert status["rollout"]["version"] == "2.0.0" and status["rollout"]["status"] == "halted", status
    finally:
        gw.stop()
        broker.stop()
        server.close()

def test_a_store_reaches_only_its_own_topics(fleet: Fleet) -> None:
    broker = fleet.broker()
    a = fleet.client(fleet.bundle("store-a") / "client.pem", fleet.bundle("store-a") / "client.key")
    b = fleet.client(fleet.bundle("store-b") / "client.pem", fleet.bundle("store-b") / "client.key")
    hq = fleet.client(fleet.pki / "hq-ops.pem", fleet.pki / "hq-ops.key")
    try:
        assert a.publish("storelink/store-a/events/sale") == "ok"
        assert a.publish("storelink/store-a/cmd-reply/ping") == "ok"
        forbidden = ["storelink/store-b/events/sale", "storelink/store-b/status", "storelink/store-b/prices/state",
                     "storelink/store-b/cmd-reply/ping",  # B's uplink
                     "storelink/store-a/cmd/ping", "storelink/store-a/config/desired", "storelink/store-a/prices/batch",
                     "storelink/store-a/prices/desired", "storelink/store-a/cart/response",  # downlink, even its own
                     "storelink/store-b/cmd/ping", "storelink/groups/north/prices/batch", "elsewhere/x"]
        for topic in forbidden:
            assert a.publish(topic) == "Not authorized", topic
        assert hq.publish("storelink/store-a/events/sale") == "Not authorized"  # head office writes downlink only

        # Mosquitto grants a subscription its ACL denies and drops the messages: nothing may arrive.
        for f in ("storelink/store-b/cmd/+", "storelink/store-b/events/#", "storelink/store-b/config/desired",
                  "storelink/groups/south/prices/batch", "storelink/#"):
            a.subscribe(f)
        b.subscribe("storelink/store-b/cmd/+")
        hq.subscribe("storelink/store-b/events/#")
        assert hq.publish("storelink/store-b/cmd/ping", b'{"n": 1}') == "ok"
        assert hq.publish("storelink/store-b/config/desired", b'{"secret": 1}', retain=True) == "ok"
        assert hq.publish("storelink/groups/south/prices/batch", b'{"south": 1}') == "ok"
        assert b.publish("storelink/store-b/events/sale", b'{"b": 1}') == "ok"
        # Controls, published after: once A has these, it would have had the others before them.
        assert hq.publish("storelink/store-a/cmd/ping", b'{"a": 1}') == "ok"
        assert hq.publish("storelink/groups/north/prices/batch", b'{"north": 1}') == "ok"
        wait_for(lambda: a.got("storelink/store-a/cmd/ping") and a.got("storelink/groups/north/prices/batch"), 10,
                 what="store A's own command and its group's prices")
        wait_for(lambda: b.got("storelink/store-b/cmd/ping") and hq.got("storelink/store-b/events/sale"), 10,
                 what="store B's command and event where they belong")
        seen = {t for t, _p in a.messages}
        assert seen <= {"storelink/store-a/cmd/ping", "storelink/groups/north/prices/batch"}, seen
    finally:
        for c in (a, b, hq):
            c.close()
        broker.stop()


def _store_cfg(fleet: Fleet, store: str, work: Path, **tls: str | None) -> dict[str, Any]:
    """The store's enrolled config (as its gateway would run it) with [mqtt.tls] entries replaced."""
    cfg = tomllib.loads(fleet.gateway_config(store, free_port()).read_text())
    own = work / uuid.uuid4().hex[:8]  # each gateway its own data folder (outbox, prices, replay record)
    own.mkdir()
    cfg["storage"] = {"path": str(own / "storelink.db")}
    for k, v in tls.items():
        if v is None:
            cfg["mqtt"]["tls"].pop(k, None)
        else:
            cfg["mqtt"]["tls"][k] = v
    return cfg


async def test_refused_stores_say_why_in_status_and_log(tmp_path: Path, fleet: Fleet,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    other = Fleet(tmp_path / "other", {"store-a": []}).set_up()  # a second CA, same store name
    fleet.ok("enroll", "store-r")
    fleet.ok("revoke", "store-r")
    work = tmp_path / "dbs"
    work.mkdir()
    expired = expired_cert(fleet.pki, "store-a", tmp_path / "expired")
    # More brokers from the same CA: one whose certificate names another host, one whose certificate expired.
    fleet.ok("ca", "server-cert", "broker.invalid", "--out-dir", str(tmp_path / "misnamed"))
    expired_cert(fleet.pki, "127.0.0.1", tmp_path / "outdated", server=True)
    others = {name: Mosquitto(tmp_path / name) for name in ("misnamed", "outdated")}
    for name, other_broker in others.items():
        other_broker.write_conf(fleet.broker_conf().replace(str(fleet.pki / "broker" / "server."),
                                                            str(tmp_path / name / "server."))
                                .replace(f"listener {fleet.port}", f"listener {other_broker.port}"))
    broker = fleet.broker()
    for other_broker in others.values():
        other_broker.start()
    r = fleet.bundle("store-r")
    cases: dict[str, tuple[dict[str, Any], str, tuple[str, ...]]] = {
        "no certificate": (_store_cfg(fleet, "store-a", work, cert=None, key=None),
                           "requires a client certificate", ("client_cert_missing",)),
        "expired": (_store_cfg(fleet, "store-a", work, cert=str(expired[0]), key=str(expired[1])),
                    "expired on", ("client_cert_expired",)),
        "another CA": (_store_cfg(fleet, "store-a", work, cert=str(other.bundle("store-a") / "client.pem"),
                                  key=str(other.bundle("store-a") / "client.key")),
                       "a CA the broker does not trust", ("client_cert_unknown_ca",)),
        "revoked": (_store_cfg(fleet, "store-r", work, cert=str(r / "client.pem"), key=str(r / "client.key")),
                    "revoked", ("client_cert_revoked", "client_cert_refused")),
        "broker from a foreign CA": (_store_cfg(fleet, "store-a", work, ca=str(other.pki / "ca.pem")),
                                     "certificate verify failed: unknown CA", ("tls_unknown_ca",)),
        "broker misnamed": ({**_store_cfg(fleet, "store-a", work)}, "hostname mismatch", ("tls_hostname",)),
        "broker certificate expired": ({**_store_cfg(fleet, "store-a", work)}, "verify failed: expired",
                                       ("tls_expired",)),
        "no such host": (_store_cfg(fleet, "store-a", work), "(DNS)", ("dns",)),
    }
    cases["broker misnamed"][0]["mqtt"] = {**cases["broker misnamed"][0]["mqtt"], "port": others["misnamed"].port}
    cases["broker certificate expired"][0]["mqtt"] = {**cases["broker certificate expired"][0]["mqtt"],
                                                      "port": others["outdated"].port}
    cases["no such host"][0]["mqtt"] = {**cases["no such host"][0]["mqtt"], "host": "no-such-broker.invalid"}
    gateways = {name: Gateway(parse_config(cfg)) for name, (cfg, _m, _c) in cases.items()}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(gw.run(stop)) for gw in gateways.values()]
    try:
        def settled() -> bool:
            return all(gw.uplink.problem in cases[name][2] for name, gw in gateways.items())

        deadline = asyncio.get_running_loop().time() + 20
        while not settled() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        report = {name: (gw.uplink.status()["problem"], gw.uplink.status()["last_error"])
                  for name, gw in gateways.items()}
        for name, gw in gateways.items():
            status = gw.status()["uplink"]
            assert not status["connected"], name
            assert status["problem"] in cases[name][2] and cases[name][1] in status["last_error"], (name, report)
            assert any(cases[name][1] in rec.getMessage() for rec in caplog.records
                       if rec.name == "storelink.uplink"), (name, "not in the log")
            assert "Unspecified error" not in status["last_error"] and "cannot reach" not in status["last_error"]
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        broker.stop()
        for other_broker in others.values():
            other_broker.stop()


def test_a_revoked_store_is_cut_off_and_its_gateway_says_so(tmp_path: Path, fleet: Fleet) -> None:
    """Through `storelink run`: the HTTP status API and the log file. A reload (SIGHUP) with the new ACL and CRL
    takes a connected store's rights at once; its next connection is refused."""
    broker = fleet.broker()
    http = free_port()
    gw = GatewayProcess(fleet.gateway_config("store-b", http), http).start()
    b = fleet.client(fleet.bundle("store-b") / "client.pem", fleet.bundle("store-b") / "client.key")
    try:
        gw.wait_online(15)
        assert b.publish("storelink/store-b/events/sale") == "ok"
        fleet.ok("revoke", "store-b")
        fleet.broker_conf()  # rewrites the broker's ACL and CRL
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: b.publish("storelink/store-b/events/sale") == "Not authorized", 10,
                 what="the reload to deny the revoked store")
        broker.stop()
        broker = fleet.broker()  # a restart ends B's connections; its reconnect meets the CRL
        wait_for(lambda: "revoked" in (gw.get("/api/v1/status")[1]["uplink"]["last_error"] or ""), 20,
                 what="the revocation in the status")
        assert not gw.get("/api/v1/status")[1]["uplink"]["connected"]
        wait_for(lambda: "client certificate refused" in gw.log.read_text(), 5, what="the log line")
    finally:
        b.close()
        gw.stop()
        broker.stop()
