"""`storelink demo`: the whole system in one command, for a newcomer.

A private Mosquitto (drivers/sim/demo_broker.py: the broker a store uses in production, MQTT 5), one gateway with
simulated devices that speak the real protocols, head office (drivers/sim/demo_hq.py) and the story
(drivers/sim/story.py): one readable line per step, round after round. The header says where the status page
is, the token for its actions, and the `storelink hq` commands to paste while the demo runs. The simulated
devices come from the modules ``demo_extensions()`` lists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

log = logging.getLogger("storelink.demo")

# (prepare, run): prepare(config_dict, workdir) adds devices/sections before the gateway starts; run(gateway),
# when there is one, runs beside it (fake peers, a till that stays connected) until cancelled.
DemoExtension = tuple[Callable[[dict[str, Any], Path], None], Callable[[Any], Coroutine[Any, Any, None]] | None]


def demo_extensions() -> list[DemoExtension]:
    """The demo's simulated parts, in order; imported here because they pull in the device libraries."""
    from storelink.drivers.sim import hq_demo, input_demo, labels_demo, prices_demo, till_demo

    return [(labels_demo.prepare, labels_demo.run), (till_demo.prepare, till_demo.run),
            (prices_demo.prepare, None), (input_demo.prepare, input_demo.run), (hq_demo.prepare, hq_demo.run)]


STORE_ID = "store-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(line: str) -> None:
    print(line, flush=True)


def _logging(verbose: bool, logfile: Path) -> None:
    """Everything to the work dir's log; on the terminal only the story (with --verbose: the log too)."""
    from storelink.system.logs import RedactFilter

    root = logging.getLogger()
    for handler in root.handlers:
        if not verbose:
            handler.setLevel(logging.ERROR)  # a real failure still shows; expected warnings (the outage) do not
    to_file = logging.FileHandler(logfile)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_file.addFilter(RedactFilter())
    root.addHandler(to_file)
    root.setLevel(logging.INFO)


def _storelink_command() -> str:
    """How to run this very storelink from another terminal (the venv's script, not necessarily on PATH)."""
    me = Path(sys.argv[0])
    return str(me.resolve()) if me.name == "storelink" and me.exists() else shutil.which("storelink") or "storelink"


def _header(url: str, token: str, broker: str, work: Path, cmds: list[tuple[str, str]]) -> list[str]:
    lines = ["", f"StoreLink demo: store {STORE_ID} with a till, a scanner, a kiosk mat, label and receipt printers "
             "and ESL tags, all simulated.", "",
             f"  status page   {url}",
             f"  access token  {token}   (paste it on the page to try its actions)",
             f"  broker        Mosquitto on {broker} (MQTT 5), this demo's own",
             f"  gateway log   {work / 'storelink.log'}", "",
             f"Play head office from another terminal while the demo runs (its files are in {work}/):"]
    for what, cmd in cmds:
        lines += [f"  # {what}", f"  {cmd}"]
    lines += ["", "The story below repeats every half minute or so; Ctrl-C stops the demo.", ""]
    return lines


async def run_demo(args: argparse.Namespace) -> int:
    import tomli_w

    from storelink.app import Gateway
    from storelink.config import load_config
    from storelink.drivers.sim.demo_broker import BrokerError, DemoBroker
    from storelink.drivers.sim.demo_hq import DemoHeadOffice, commands, write_newcomer_files
    from storelink.drivers.sim.story import Notices, Story
    from storelink.remote.signing import keygen
    from storelink.web.server import ListenError

    with tempfile.TemporaryDirectory(prefix="storelink-demo-") as tmp:
        work = Path(tmp)
        _logging(args.verbose, work / "storelink.log")
        try:
            broker = DemoBroker(work, args.broker_port or free_port())
            await asyncio.to_thread(broker.start)
        except BrokerError as err:
            print(f"storelink demo: {err}", file=sys.stderr)
            return 2
        hq_key = keygen()
        token = f"demo-{secrets.token_hex(8)}"
        cfg: dict[str, Any] = {
            "store_id": STORE_ID,
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "reconnect_min": 0.3, "reconnect_max": 2.0},
            "storage": {"path": str(work / "storelink.db"), "synchronous": "NORMAL"},
            "http": {"listen": args.listen, "token": token},
            "trust": {"public_keys": [hq_key.public_b64]},
            "devices": [],
        }
        extensions = demo_extensions()
        for prepare, _run in extensions:
            prepare(cfg, work)
        config_path = work / "storelink.toml"
        config_path.write_text(tomli_w.dumps(cfg))
        files = write_newcomer_files(work, hq_key.private_b64, cfg)
        gateway = Gateway(load_config(config_path), config_path=config_path)
        try:
            hq = await asyncio.to_thread(DemoHeadOffice, broker.port, STORE_ID, hq_key.private_b64, args.verbose, say)
        except BrokerError as err:
            await asyncio.to_thread(broker.stop)
            print(f"storelink demo: {err}", file=sys.stderr)
            return 2
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        rounds = 0
        cannot_listen: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                gw_task = tg.create_task(gateway.run(stop))
                ready = tg.create_task(gateway.ready.wait())
                await asyncio.wait([gw_task, ready], return_when=asyncio.FIRST_COMPLETED)
                if gw_task.done():  # it could not start (the ListenError is raised by the TaskGroup)
                    ready.cancel()
                    await gw_task
                host, http_port = gateway.http.bound or ("127.0.0.1", 8080)
                url = f"http://{host}:{http_port}/"
                cmds = commands(_storelink_command(), broker.address, STORE_ID, files)
                for line in _header(url, token, broker.address, work, cmds):
                    say(line)
                extras = [tg.create_task(run(gateway)) for _p, run in extensions if run is not None]
                story = Story(gateway, url.rstrip("/"), hq, broker, say)

                async def tell() -> None:
                    nonlocal rounds
                    await story.set_up()
                    while True:
                        rounds += 1
                        say(f"-- round {rounds} -- status page {url} · token {token}")
                        await story.round()
                        say(f"-- next round in {args.pause:g} s; meanwhile try the head-office commands above --\n")
                        await asyncio.sleep(args.pause)

                async def watch(notices: Notices) -> None:
                    while True:
                        for line in notices.lines():
                            say(line)
                        await asyncio.sleep(0.3)

                extras += [tg.create_task(tell()), tg.create_task(watch(Notices(hq)))]
                if args.seconds:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(args.seconds):
                            await stop.wait()
                    stop.set()
                await stop.wait()
                for task in extras:
                    task.cancel()
        except* ListenError as group:
            cannot_listen = group.exceptions[0]
        finally:
            hq.close()
            await asyncio.to_thread(broker.stop)
        if isinstance(cannot_listen, ListenError):
            print(f"storelink demo: {cannot_listen.explain('--listen (for example --listen 127.0.0.1:8081)')}",
                  file=sys.stderr)
            return 2
        say(f"\ndemo stopped after {rounds} round(s) of the story; head office received {hq.count()} messages")
    return 0


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:8080", help="status page address (default %(default)s)")
    p.add_argument("--broker-port", type=int, default=0, help="the demo broker's port (default: a free one)")
    p.add_argument("--seconds", type=float, default=0, help="stop by itself after this long (0: run until Ctrl-C)")
    p.add_argument("--pause", type=float, default=10.0, metavar="SECONDS",
                   help="pause between rounds of the story, when the broker is up for pasted commands "
                        "(default %(default)g)")
    p.add_argument("--verbose", action="store_true", help="also print every MQTT message and the gateway's log")


def _cmd(args: argparse.Namespace) -> int:
    return asyncio.run(run_demo(args))


SUBCOMMAND = ("demo", "run a self-contained demo: its own broker, simulated devices, the status page", _add_args,
              _cmd)
