from __future__ import annotations

import asyncio
import fcntl
import io
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_timeout

from storelink.remote.signing import KeyPair, keygen
from tests import contract_check
from tests.helpers import GatewayProcess, Mosquitto, Subscriber, free_port, write_config
from tests.pg_helpers import Postgres
from tests.release_helpers import ReleaseKit

_thread_stacks = pytest_timeout.dump_stacks


def _stacks_and_tasks(terminal: Any) -> None:
    """pytest-timeout's dump (every other thread's stack) plus every asyncio task of the hung test's loop: an
    async test stuck in an await shows only the event loop's select() in its traceback, its tasks say where."""
    _thread_stacks(terminal)
    try:
        loop = asyncio.get_running_loop()  # the signal handler runs on the test's thread, inside its loop
    except RuntimeError:
        return
    for task in asyncio.all_tasks(loop):
        terminal.sep("~", title=f"asyncio task {task.get_name()}")
        out = io.StringIO()
        task.print_stack(limit=30, file=out)
        terminal.write(out.getvalue())


pytest_timeout.dump_stacks = _stacks_and_tasks  # looked up by name when the timeout fires


@pytest.fixture(autouse=True)
def mqtt_contract() -> Iterator[None]:
    """Fails a test whose head office received a message that breaks the MQTT contract (tests/contract_check.py)."""
    contract_check.take()
    yield
    _checked, problems = contract_check.take()
    assert not problems, "messages that break the MQTT contract (storelink.contract):\n" + "\n".join(problems[:20])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files with `slow` tests first (a stable sort, so the order is otherwise the files' own): with the files
    spread over xdist workers, a two-minute file that starts last would be the run's tail."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# Under pytest-xdist (scripts/test.sh runs the suite in parallel) the counts live in the workers: each hands its own
# to the controller when it finishes, which adds them up for the summary.
_from_workers: dict[str, Any] = {"contract_checked": 0, "fuzz_stats": {}}


def _fuzz_stats() -> dict[str, tuple[int, float]]:
    fuzz = sys.modules.get("tests.fuzz_helpers")  # only when the fuzzing suite ran here
    return dict(getattr(fuzz, "FUZZ_STATS", {}))


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker
        workeroutput["contract_checked"] = contract_check.take()[0]
        workeroutput["fuzz_stats"] = _fuzz_stats()


@pytest.hookimpl(optionalhook=True)  # an xdist hook, run in the controller as each worker ends
def pytest_testnodedown(node: Any, error: object) -> None:
    output = getattr(node, "workeroutput", {})
    _from_workers["contract_checked"] += output.get("contract_checked", 0)
    _from_workers["fuzz_stats"].update(output.get("fuzz_stats", {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    checked = contract_check.take()[0] + _from_workers["contract_checked"]
    terminalreporter.write_line(f"MQTT contract: {checked} messages received by test subscribers validated")
    _fuzz_summary(terminalreporter, {**_from_workers["fuzz_stats"], **_fuzz_stats()})


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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-minutes", type=float, default=0.0,
                     help="run the fuzzing suite (tests/test_fuzz.py) with fresh seeds for about this many minutes "
                          "in total (nightly); default: a fixed, derandomized set of cases (CI)")


@pytest.fixture(scope="session")
def fuzz_minutes(request: pytest.FixtureRequest) -> float:
    return float(request.config.getoption("--fuzz-minutes"))


def _fuzz_summary(terminalreporter: pytest.TerminalReporter, stats: dict[str, tuple[int, float]]) -> None:
    if stats:
        terminalreporter.section("fuzzing: cases per surface")
        for name, (cases, seconds) in sorted(stats.items()):
            terminalreporter.write_line(f"{name:<22} {cases:>6} cases {seconds:>7.1f} s")
        total = sum(s for _c, s in stats.values())
        terminalreporter.write_line(f"{'total':<22} {sum(c for c, _s in stats.values()):>6} cases {total:>7.1f} s")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One real PostgreSQL per session (per xdist worker; start-up costs ~2 s, each on its own port and directory);
    tests take a fresh database each."""
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server: Postgres) -> str:
    return postgres_server.new_database()


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """storelink[all] and its pinned dependencies as wheels, built once for the image and plain-Debian tests
    (image/chroot-test.sh takes it through STORELINK_TEST_WHEELHOUSE). Once per run, not per xdist worker: the
    first worker to need it builds it in the run's shared temporary directory while the others wait on a lock."""
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent
    out = shared / "wheelhouse"
    with (shared / "wheelhouse.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "requirements.lock").exists():  # copied last: its presence means the build finished
            root = Path(__file__).resolve().parent.parent
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                            "--wheel-dir", str(out), "-c", str(root / "image/requirements.lock"), f"{root}[all]"],
                           check=True, timeout=600)
            shutil.copy(root / "image/requirements.lock", out)
    return out


@pytest.fixture(scope="session")
def hq_key() -> KeyPair:
    """Head office's signing key for the release tests."""
    return keygen()


@pytest.fixture(scope="session")
def release_kit(tmp_path_factory: pytest.TempPathFactory, hq_key: KeyPair) -> ReleaseKit:
    """Signed bundles of test releases built from this tree, each built once per session."""
    return ReleaseKit(tmp_path_factory.mktemp("releases"), hq_key)
