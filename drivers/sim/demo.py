"""`storelink demo`: the whole system in one command, for a newcomer.

An embedded broker (amqtt, demo only: it speaks MQTT 3.1.1, so the demo also shows the 3.1.1 fallback), a
gateway with simulated devices, an in-store system posting events to the ingest API, and a "head office"
subscriber that prints what arrives. The simulated devices come from the modules ``demo_extensions()`` lists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import socket
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from aiohttp import ClientSession
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger("storelink.demo")

# (prepare, run): prepare(config_dict, workdir) adds devices/sections before the gateway starts; run(gateway)
# runs beside it (fake peers, simulated customers) until cancelled.
DemoExtension = tuple[Callable[[dict[str, Any], Path], None], Callable[[Any], Coroutine[Any, Any, None]]]


def demo_extensions() -> list[DemoExtension]:
    """The demo's simulated parts, in order; imported here because they pull in the device libraries."""
    from storelink.drivers.sim import input_demo, labels_demo, prices_demo, till_demo

    return [(labels_demo.prepare, labels_demo.run), (till_demo.prepare, till_demo.run),
            (prices_demo.prepare, prices_demo.run), (input_demo.prepare, input_demo.run)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def head_office_printer(port: int, store_id: str, lines: list[str]) -> mqtt.Client:
    """Subscribes like head office would and prints each message in one line."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-head-office", protocol=mqtt.MQTTv311)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        text = msg.payload.decode(errors="replace")
        if len(text) > 160:
            text = text[:157] + "..."
        line = f"[head office] {msg.topic}  {text}"
        lines.append(line)
        print(line, flush=True)

    client.on_message = on_message
    client.on_connect = lambda c, *_a: c.subscribe(f"storelink/{store_id}/#", 1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


async def kiosk_app(base_url: str, stop: asyncio.Event) -> None:
    """A stand-in for an in-store system (a pickup locker) posting events to the ingest API."""
    async with ClientSession() as http:
        n = 0
        while not stop.is_set():
            n += 1
            event = {"kind": "pickup.collected", "device": "locker-1",
                     "data": {"order": f"W{100000 + n}", "bay": random.randint(1, 24)}}
            async with http.post(f"{base_url}/api/v1/events", json=event) as resp:
                body = await resp.json()
                print(f"[locker-1] POST /api/v1/events -> {resp.status} {json.dumps(body)}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 3.0)


async def run_demo(args: argparse.Namespace) -> int:
    from amqtt.broker import Broker

    from storelink.app import Gateway
    from storelink.config import parse_config

    port = args.broker_port or free_port()
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    store_id = "store-demo"
    lines: list[str] = []
    ho = await asyncio.to_thread(head_office_printer, port, store_id, lines)
    with tempfile.TemporaryDirectory(prefix="storelink-demo-") as tmp:
        work = Path(tmp)
        cfg: dict[str, Any] = {
            "store_id": store_id,
            "mqtt": {"host": "127.0.0.1", "port": port, "protocol": "3.1.1", "reconnect_min": 0.5},
            "storage": {"path": str(work / "storelink.db"), "synchronous": "NORMAL"},
            "http": {"listen": args.listen},
            "devices": [],
        }
        extensions = demo_extensions()
        for prepare, _run in extensions:
            prepare(cfg, work)
        gateway = Gateway(parse_config(cfg, "<demo>"))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            import signal

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        async with asyncio.TaskGroup() as tg:
            gw_task = tg.create_task(gateway.run(stop))
            await gateway.ready.wait()
            host, http_port = gateway.http.bound or ("127.0.0.1", 8080)
            print(f"\nStoreLink demo: broker 127.0.0.1:{port}, status page http://{host}:{http_port}/", flush=True)
            print("Ctrl-C to stop.\n", flush=True)
            extras = [tg.create_task(kiosk_app(f"http://{host}:{http_port}", stop))]
            extras += [tg.create_task(run(gateway)) for _p, run in extensions]
            if args.seconds:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.seconds)
                stop.set()
            await stop.wait()
            for task in extras:
                task.cancel()
            await gw_task
    ho.loop_stop()
    ho.disconnect()
    await broker.shutdown()
    print(f"\ndemo stopped; head office received {len(lines)} messages", flush=True)
    return 0


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:8080", help="status page address (default %(default)s)")
    p.add_argument("--broker-port", type=int, default=0, help="embedded broker port (default: a free one)")
    p.add_argument("--seconds", type=float, default=0, help="stop by itself after this long (0: run until Ctrl-C)")


def _cmd(args: argparse.Namespace) -> int:
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    return asyncio.run(run_demo(args))


SUBCOMMAND = ("demo", "run a self-contained demo: embedded broker, simulated devices, status page", _add_args, _cmd)
