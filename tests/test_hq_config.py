"""hq.toml validation, the store CA's files and certificates, enrolment bundles and the broker ACL's coverage of the
MQTT contract. Fast: no broker, except one TLS connection through an Ed25519 CA."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from paho.mqtt.client import topic_matches_sub as topic_matches

from storelink.config import load_config
from storelink.contract import Topics
from storelink.hq.broker_config import STORE_READS, STORE_WRITES
from storelink.hq.config import HqConfigError, HqOverrides, load_hq_config
from storelink.hq.connect import connect
from storelink.hq.pki import PkiError, StoreCA
from tests.fleet import Fleet
from tests.helpers import STORELINK


def _load(tmp_path: Path, text: str, **env: str) -> str:
    path = tmp_path / "hq.toml"
    path.write_text(text)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        load_hq_config(path).broker_password()
    except HqConfigError as err:
        return str(err)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return "ok"


@pytest.mark.parametrize(("text", "expect"), [
    ('[broker]\nadress = "h:1"\n', "broker.adress: unknown key"),
    ('[broker]\naddress = "mqtt.example.com"\n', "broker.address: expected HOST:PORT"),
    ('[broker]\naddress = "h:0"\n', "port 0 is out of range"),
    ('[broker]\nprotocol = "3"\n', "broker.protocol: Input should be '5' or '3.1.1'"),
    ('[broker]\npassword = "x"\n', "broker.password: unknown key"),
    ('[broker]\npassword_env = "A"\npassword_file = "f"\n', "give password_env or password_file, not both"),
    ('[broker]\nusername = "u"\npassword_env = "NOT_SET_ANYWHERE"\n', "NOT_SET_ANYWHERE is not set"),
    ('[broker]\nusername = "u"\npassword_file = "missing"\n', "broker.password_file: cannot read"),
    ('[broker.tls]\ncert = "c.pem"\n', "broker.tls: cert and key must be given together"),
    ('topic_prefix = "a/b"\n', "topic_prefix: String should match pattern"),
    ('[database]\nurl = "mysql://db/x"\n', "database.url: must start with postgresql://"),
    ('[database]\nurl = "postgresql://u:secret@db/x"\n', "must not contain the password"),
    ('[database]\nurl = "postgresql://u@db"\n', "names no database"),
    ('[database]\nurl = "postgresql://u@db:99999/x"\n', "database.url"),
    ("[database]\n", "database.url: required key is missing"),
    ('[database]\nurl = "sqlite:///"\n', "database.url: names no file"),
    ('[database]\nurl = "sqlite:///hq.db"\npassword_env = "X"\n', "an SQLite file has no password"),
    ('[pki]\ncert_days = 0\n', "pki.cert_days"),
    ('[enroll]\nbroker = "nope"\n', "enroll.broker: expected HOST:PORT"),
    ("not toml ===", "not valid TOML"),
])
def test_every_bad_setting_is_one_line_naming_the_key(tmp_path: Path, text: str, expect: str) -> None:
    message = _load(tmp_path, text)
    assert expect in message and "\n" not in message, message
    assert message.startswith(str(tmp_path / "hq.toml")), message


def test_paths_are_relative_to_the_file_and_flags_override(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    path = tmp_path / "hq.toml"
    path.write_text('[broker]\naddress = "mqtt.example.com:8883"\nusername = "hq"\n'
                    'password_file = "pw"\n[broker.tls]\nca = "pki/ca.pem"\n'
                    '[database]\nurl = "postgresql://ingest@db:5432/storelink"\npassword_env = "DB_PW"\n')
    cfg = load_hq_config(path)
    assert cfg.broker.host == "mqtt.example.com" and cfg.broker.port == 8883
    assert cfg.broker.tls is not None and cfg.broker.tls.ca == tmp_path / "pki/ca.pem"
    assert cfg.pki.dir == tmp_path / "pki" and cfg.enroll.out == tmp_path / "bundles"
    assert cfg.broker_password() == "s3cret" and cfg.database is not None
    os.environ["DB_PW"] = "db-secret"
    try:
        assert cfg.database_password() == "db-secret"
    finally:
        del os.environ["DB_PW"]
    with pytest.raises(HqConfigError, match=r"database\.password_env: the environment variable DB_PW is not set"):
        cfg.database_password()
    over = load_hq_config(path, HqOverrides(broker="[::1]:1884", protocol="3.1.1", topic_prefix="acme",
                                            tls_cert=Path("c.pem"), tls_key=Path("k.pem")))
    assert (over.broker.host, over.broker.port, over.broker.protocol, over.topic_prefix) == ("::1", 1884, "3.1.1",
                                                                                            "acme")
    assert over.broker.tls is not None and over.broker.tls.cert == Path.cwd() / "c.pem"  # flags: the cwd
    assert over.broker.tls.ca == tmp_path / "pki/ca.pem"  # the file's own value stays
    os.environ["STORELINK_HQ_CONFIG"] = str(path)
    try:
        assert load_hq_config().source == str(path)
    finally:
        del os.environ["STORELINK_HQ_CONFIG"]
    assert load_hq_config().broker.address == "127.0.0.1:1883"  # no file: the defaults
    assert load_hq_config().database_url is None  # the ingest and the dashboard then use the embedded default


def test_the_database_url_is_the_file_s_or_the_flag_s(tmp_path: Path) -> None:
    path = tmp_path / "hq.toml"
    path.write_text('[database]\nurl = "sqlite:///data/hq.db"\n')
    assert load_hq_config(path).database_url == f"sqlite:///{tmp_path / 'data/hq.db'}"  # relative to the file
    flag = load_hq_config(path, HqOverrides(database="sqlite:///here.db")).database_url
    assert flag == f"sqlite:///{Path.cwd() / 'here.db'}"  # a flag's path: relative to the working directory
    path.write_text('[database]\nurl = "postgresql://ingest@db/storelink"\npassword_env = "DB_PW"\n')
    over = load_hq_config(path, HqOverrides(database="postgresql://ingest@db2/storelink"))
    assert over.database_url == "postgresql://ingest@db2/storelink" and over.database is not None
    assert over.database.password_env == "DB_PW"  # the file's password source stays with another server
    assert load_hq_config(path, HqOverrides(database="sqlite:///x.db")).database_password() is None


def test_every_topic_of_the_contract_has_a_broker_rule() -> None:
    t = Topics("%u", "p")
    uplink = [t.status, t.event("sale"), t.device_state("till-1"), t.prices_state, t.outbox_state, t.config_reported,
              t.update_state, t.command_reply("ping"), t.cart_request]
    downlink = [t.prices_batch, t.prices_desired, t.config_desired, t.command("ping"), t.cart_response]
    for topic in uplink:
        assert any(topic_matches(f"p/%u/{r}", topic) for r in STORE_WRITES), topic
        assert not any(topic_matches(f"p/%u/{r}", topic) for r in STORE_READS), topic
    for topic in downlink:
        assert any(topic_matches(f"p/%u/{r}", topic) for r in STORE_READS), topic
        assert not any(topic_matches(f"p/%u/{r}", topic) for r in STORE_WRITES), topic
    # Every topic the contract can build has its rule: a new one fails here until the ACL (and this list) has it.
    everything = set()
    for name, member in vars(Topics).items():
        if name.startswith("_") or name in ("base", "command_filter", "group_prices_batch") \
                or not (isinstance(member, property) or callable(member)):
            continue  # fields, and no topics of one store (the group topic is a per-store ACL line)
        everything.add(getattr(t, name) if isinstance(member, property) else getattr(t, name)("x"))
    assert everything <= set(uplink) | set(downlink) | {t.event("x"), t.device_state("x"), t.command("x"),
                                                       t.command_reply("x")}, everything
    assert t.command_filter == t.command("+") and topic_matches("p/%u/cmd/+", t.command_filter)


def test_the_ca_its_keys_and_refusals(tmp_path: Path) -> None:
    ca = StoreCA.create(tmp_path / "pki", key_type="ed25519")
    assert stat.S_IMODE((tmp_path / "pki/ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    with pytest.raises(PkiError, match="already there"):
        StoreCA.create(tmp_path / "pki")
    issued = ca.issue_client("store-7", role="store", days=30, groups=["north"])
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    assert cert.subject.rfc4514_string() == "CN=store-7"
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    cert.verify_directly_issued_by(ca.cert)
    for bad, why in (("groups", "reserved"), ("a/b", "not valid"), ("hq:ops", "not valid")):
        with pytest.raises(PkiError, match=why):
            ca.issue_client(bad, role="store", days=1)
    with pytest.raises(PkiError, match="hq:NAME"):
        ca.issue_client("ops", role="hq", days=1)
    assert ca.revoke("store-7") == [format(issued.serial, "x")]
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(issued.serial) is not None
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    with pytest.raises(PkiError, match="never enrolled"):
        ca.revoke("store-8")
    with pytest.raises(PkiError, match="no store CA"):
        StoreCA(tmp_path / "elsewhere")


def test_an_ed25519_fleet_connects_over_tls(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, {"store-a": []})
    fleet.ok("keygen", "--out", str(tmp_path / "hq.key"))
    fleet.ok("ca", "init", "--key-type", "ed25519")
    fleet.ok("ca", "server-cert", "127.0.0.1")
    fleet.ok("ca", "hq-cert", "ops")
    broker = fleet.broker()
    try:
        client = connect(load_hq_config(fleet.config), "test")
        client.close()
    finally:
        broker.stop()


def test_enrolment_bundle_and_template_errors(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, {})
    fleet.ok("keygen", "--out", str(tmp_path / "hq.key"))
    fleet.ok("ca", "init")
    (tmp_path / "store-template.toml").write_text('[http]\nlisten = "0.0.0.0:8080"\n[[devices]]\nid = "till-1"\n'
                                                  'driver = "till_tcp"\nlisten = "0.0.0.0:9000"\n'
                                                  'secret = "a-till-secret-of-some-length"\n')
    out = fleet.ok("enroll", "store-9", "--group", "north", "--group", "south")
    assert "enrolled store-9 in north, south" in out
    bundle = fleet.bundle("store-9")
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o700
    assert stat.S_IMODE((bundle / "client.key").stat().st_mode) == 0o600
    cfg = tomllib.loads((bundle / "storelink.toml").read_text())
    assert cfg["store_id"] == "store-9" and cfg["groups"] == ["north", "south"]
    assert cfg["mqtt"]["tls"] == {"ca": "/etc/storelink/tls/ca.pem", "cert": "/etc/storelink/tls/client.pem",
                                  "key": "/etc/storelink/tls/client.key"}
    assert cfg["mqtt"]["port"] == fleet.port and cfg["devices"][0]["driver"] == "till_tcp"
    (trust,) = (bundle / "trust").iterdir()
    assert cfg["trust"]["public_keys"] == [f"/etc/storelink/trust/{trust.name}"]
    assert load_config(fleet.gateway_config("store-9", 8080)).store_id == "store-9"  # the gateway takes it
    assert "CN=store-9" in x509.load_pem_x509_certificate((bundle / "client.pem").read_bytes()).subject.rfc4514_string()

    code, _out, err = fleet.run("enroll", "store-9")
    assert code == 1 and "is not empty" in err  # never overwrites a key by accident
    assert "earlier certificates stay valid" in fleet.ok("enroll", "store-9", "--force")

    for template, expect in (('store_id = "x"\n', "sets store_id"),
                             ('[mqtt]\ntopic_prefix = "other"\n', "is not head office's topic_prefix"),
                             ("[mqtt]\nport = 99999\n", "mqtt.port"),
                             ("[http]\nlisen = 1\n", "http.lisen: unknown key")):
        (tmp_path / "store-template.toml").write_text(template)
        code, _out, err = fleet.run("enroll", "store-10")
        assert code == 1 and expect in err and len(err.splitlines()) == 1, err
    assert not fleet.bundle("store-10").exists()  # nothing issued for a bad template
    assert StoreCA(fleet.pki).record("store-10") is None

    no_key = tmp_path / "nokey.toml"
    no_key.write_text(fleet.config.read_text().replace('[signing]\nkey = "hq.key"\n', ""))
    (tmp_path / "store-template.toml").write_text("")
    done = fleet.hq("enroll", "store-11", "--config", str(no_key))  # its own process: the CLI's exit and line
    assert done.returncode == 1 and "no head-office key to trust" in done.stderr, done.stderr


def test_hq_help_lists_every_command() -> None:
    import subprocess

    out = subprocess.run([STORELINK, "hq", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("keygen", "publish-prices", "status", "push-config", "cmd", "ca", "enroll", "revoke",
                 "broker-config", "release", "ingest", "serve"):
        assert name in out


def test_the_documented_hq_toml_is_valid(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs/head-office.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "hq.toml").write_text(example)
    cfg = load_hq_config(tmp_path / "hq.toml")
    assert cfg.broker.address == "mqtt.example.com:8883" and cfg.database is not None
