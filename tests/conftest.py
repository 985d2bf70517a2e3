from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import GatewayProcess, Mosquitto, Subscriber, free_port, write_config
from tests.pg_helpers import Postgres


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
def postgres_server() -> Iterator[Postgres]:
    """One real PostgreSQL for the whole session (start-up costs ~2 s); tests take a fresh database each."""
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server: Postgres) -> str:
    return postgres_server.new_database()
