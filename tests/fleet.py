"""A StoreLink fleet set up the way head office does it, through the real `storelink hq` commands: signing key, store
CA, broker certificate, head office's own identity, enrolled stores, and a real Mosquitto configured with the
output of `storelink hq broker-config --broker mosquitto`."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import ipaddress
import os
import ssl
import subprocess
import threading
import tomllib
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from storelink.hq.cli import main as hq_main
from tests.helpers import STORELINK, Mosquitto, free_port

TEMPLATE = """\
# the stores' config: enrol fills in store_id, groups, [mqtt] host/port/protocol, [mqtt.tls], [trust]
[mqtt]
reconnect_min = 0.2
reconnect_max = 1.0
[remote]
rollback_after = 3
"""


class Fleet:
    def __init__(self, root: Path, stores: dict[str, list[str]]):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.stores = stores
        self.config = root / "hq.toml"
        self.config.write_text(
            f'[broker]\naddress = "127.0.0.1:{self.port}"\n'
            '[broker.tls]\nca = "pki/ca.pem"\ncert = "pki/hq-ops.pem"\nkey = "pki/hq-ops.key"\n'
            '[signing]\nkey = "hq.key"\n[enroll]\ntemplate = "store-template.toml"\n'
        )
        (root / "store-template.toml").write_text(TEMPLATE)
        self.pki = root / "pki"

    def hq(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([STORELINK, "hq", *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "STORELINK_HQ_CONFIG": str(self.config), **env})

    def cli(self, *args: str, timeout: float = 60) -> str:
        """`storelink hq ARGS` as an operator runs it (its own process, hq.toml from the environment); stdout."""
        done = self.hq(*args, timeout=timeout)
        assert done.returncode == 0, f"storelink hq {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def run(self, *args: str) -> tuple[int, str, str]:
        """`storelink hq ARGS --config hq.toml` in this process (quicker than a new one): exit code, out, err."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = hq_main([*args, "--config", str(self.config)])
        return code, out.getvalue(), err.getvalue()

    def ok(self, *args: str) -> str:
        code, out, err = self.run(*args)
        assert code == 0, f"storelink hq {' '.join(args)}: {out}{err}"
        return out

    def set_up(self) -> Fleet:
        self.ok("keygen", "--out", str(self.root / "hq.key"))
        self.ok("ca", "init")
        self.ok("ca", "server-cert", "localhost", "127.0.0.1")
        self.ok("ca", "hq-cert", "ops")
        for store, groups in self.stores.items():
            self.ok("enroll", store, *[a for g in groups for a in ("--group", g)])
        return self

    def broker(self) -> Mosquitto:
        broker = Mosquitto(self.root, self.port)
        broker.write_conf(self.broker_conf())
        return broker.start()

    def broker_conf(self) -> str:
        return self.ok("broker-config", "--broker", "mosquitto", "--listen", f"127.0.0.1:{self.port}",
                       "--persistence-dir", str(self.root))

    def bundle(self, store: str) -> Path:
        return self.root / "bundles" / store

    def gateway_config(self, store: str, http_port: int, bundle: Path | None = None, **mqtt_extra: Any) -> Path:
        """The bundle's storelink.toml as provisioning installs it, with the files where they lie in the bundle."""
        bundle = bundle or self.bundle(store)
        text = (bundle / "storelink.toml").read_text()
        text = text.replace("/etc/storelink/tls/", f"{bundle}/").replace("/etc/storelink/trust/", f"{bundle}/trust/")
        data = tomllib.loads(text)
        data["storage"] = {"path": str(bundle / "storelink.db")}
        data["http"] = {"listen": f"127.0.0.1:{http_port}", "token": "t" * 24}
        data["mqtt"].update(mqtt_extra)
        path = bundle / "storelink.local.toml"
        path.write_text(tomli_w.dumps(data))
        return path

    def client(self, cert: Path | None, key: Path | None, ca: Path | None = None) -> TlsClient:
        return TlsClient(self.port, ca or self.pki / "ca.pem", cert, key)


class TlsClient:
    """An MQTT 5 client over TLS with a given identity: collects messages, remembers each PUBACK's reason."""

    def __init__(self, port: int, ca: Path, cert: Path | None, key: Path | None):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(ca))
        if cert is not None and key is not None:
            ctx.load_cert_chain(str(cert), str(key))
        self.client.tls_set_context(ctx)
        self.lock = threading.Lock()
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, str] = {}
        self.subacks: dict[int, list[str]] = {}
        self.connack = threading.Event()
        self.client.on_connect = lambda *_a: self.connack.set()
        self.client.on_message = self._on_message
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self._note(self.acks, mid,
                                                                         str(rc) if rc.is_failure else "ok")
        self.client.on_subscribe = lambda _c, _u, mid, rcs, _p: self._note(self.subacks, mid, [str(r) for r in rcs])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connack.wait(10), "no CONNACK"

    def _note(self, into: dict[int, Any], mid: int, value: Any) -> None:
        with self.lock:
            into[mid] = value

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def publish(self, topic: str, payload: bytes = b"{}", retain: bool = False) -> str:
        """The broker's answer: "ok" (Success, No matching subscribers) or the refusal, e.g. "Not authorized"."""
        from tests.helpers import wait_for

        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return str(wait_for(lambda: self.acks.get(info.mid), 10, what=f"PUBACK for {topic}"))

    def subscribe(self, topic_filter: str) -> list[str]:
        from tests.helpers import wait_for

        mid = self.client.subscribe(topic_filter, 1)[1]
        return wait_for(lambda: self.subacks.get(mid), 10, what=f"SUBACK for {topic_filter}")  # type: ignore[no-any-return]

    def got(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def expired_cert(pki: Path, cn: str, out: Path, *, server: bool = False) -> tuple[Path, Path]:
    """A certificate from the store CA that expired yesterday (the CA never issues one: made by hand), for a client
    (CN = `cn`) or a broker (also valid for 127.0.0.1). Written as out/{client,server}.{pem,key}."""
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=30)).not_valid_after(now - dt.timedelta(days=1))
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    cert = b.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    name = "server" if server else "client"
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return out / f"{name}.pem", out / f"{name}.key"
