from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storelink.remote.signing import KeyPair, keygen
from tests import contract_check
from tests.helpers import GatewayProcess, Mosquitto, Subscriber, free_port, write_config
from tests.release_helpers import ReleaseKit


@pytest.fixture(autouse=True)
def mqtt_contract() -> Iterator[None]:
    """Fails a test whose head office received a message that breaks the MQTT contract (tests/contract_check.py)."""
    contract_check.take()
    yield
    _checked, problems = contract_check.take()
    assert not problems, "messages that break the MQTT contract (storelink.contract):\n" + "\n".join(problems[:20])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    checked, _problems = contract_check.take()
    terminalreporter.write_line(f"MQTT contract: {checked} messages received by test subscribers validated")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto on a free port; `.stop()` and `.start()` simulate an outage."""
    broker = Mosquitto(tmp_path).start()
    yield broker
    broker.stop()


@pytest.fixture
def subscriber(mosquitto: Mosquitto) -> Iterator[Subscriber]:
    sub = Subscriber(mosquitto.port)
    yield sub
    sub.close()


@pytest.fixture
def gateway_config(tmp_path: Path, mosquitto: Mosquitto) -> Path:
    return write_config(tmp_path / "storelink.toml", "store-0042", mosquitto.port, free_port())


@pytest.fixture
def gateway_process(gateway_config: Path) -> Iterator[GatewayProcess]:
    """A real `storelink run` process, not yet started (call `.start()`)."""
    port = int(gateway_config.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])
    proc = GatewayProcess(gateway_config, port)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def hq_key() -> KeyPair:
    """Head office's signing key for the release tests."""
    return keygen()


@pytest.fixture(scope="session")
def release_kit(tmp_path_factory: pytest.TempPathFactory, hq_key: KeyPair) -> ReleaseKit:
    """Signed bundles of test releases built from this tree, each built once per session."""
    return ReleaseKit(tmp_path_factory.mktemp("releases"), hq_key)
