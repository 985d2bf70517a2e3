"""The plu_file driver in a real gateway: staged, atomically committed price files in the POS's layout."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from storelink.app import Gateway
from storelink.drivers.base import PrepareFailed
from storelink.drivers.plu_file import PluFileDriver
from tests.helpers import Mosquitto
from tests.till_fixtures import Change, FakeBook, Item, device_status, gateway_config, running, until

ITEMS = [Item("1001", 499, "Äpfel Boskoop", "4006381333931", 249, "kg"), Item("1002", 1299, "Café crème 1kg")]


def _plu(directory: Path, **extra: Any) -> dict[str, Any]:
    return {"id": "pos", "driver": "plu_file", "directory": str(directory), **extra}


def _driver(gw: Gateway) -> PluFileDriver:
    drv = gw.supervisor.driver("pos")
    assert isinstance(drv, PluFileDriver)
    return drv


async def test_prepare_stages_commit_renames_into_place_in_the_configured_layout(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    pos = tmp_path / "pos"
    pos.mkdir()
    dev = _plu(pos, file_name="PLU_{store_id}_{version}.TXT", encoding="cp1252", decimal_separator=",",
               columns=["sku", "description", "price", "unit_price", "unit_basis", "gtin"],
               header_names={"sku": "ARTNR", "price": "VK"})
    async with running(gateway_config(tmp_path, mosquitto.port, [dev])) as gw:
        await until(lambda: device_status(gw, "pos")["state"] == "ok", what="ok")
        drv = _driver(gw)
        await drv.price_prepare(Change(12, ITEMS))
        assert not list(pos.glob("*.TXT")), "nothing visible to the POS before COMMIT"
        assert (pos / ".storelink" / "v12.staged").exists()
        assert not await drv.price_confirmed(12)
        await drv.price_commit(12)
        await drv.price_commit(12)  # re-driven: idempotent
        target = pos / "PLU_store-0042_12.TXT"
        assert target.read_bytes() == (
            "ARTNR;description;VK;unit_price;unit_basis;gtin\r\n"
            "1001;Äpfel Boskoop;4,99;2,49;kg;4006381333931\r\n"
            "1002;Café crème 1kg;12,99;;;\r\n"
        ).encode("cp1252")
        assert await drv.price_confirmed(12) and await drv.price_reported_version() == 12
        assert not (pos / ".storelink" / "v12.staged").exists()
        await drv.price_prepare(Change(13, ITEMS[:1]))
        await drv.price_abort(13)
        await drv.price_abort(13)
        assert not (pos / ".storelink" / "v13.staged").exists() and not list(pos.glob("*_13.TXT"))
        with pytest.raises(FileNotFoundError, match="never prepared"):
            await drv.price_commit(13)
    # The committed version is on disk: a restarted gateway still reports it.
    async with running(gateway_config(tmp_path, mosquitto.port, [dev])) as gw:
        await until(lambda: gw.supervisor.driver("pos") is not None, what="driver")
        assert await _driver(gw).price_reported_version() == 12


async def test_minor_units_and_a_full_export_from_the_price_book(tmp_path: Path, mosquitto: Mosquitto) -> None:
    pos = tmp_path / "pos"
    pos.mkdir()
    dev = _plu(pos, price_format="minor", delimiter=",", header=False, line_ending="lf", contents="full",
               columns=["sku", "price", "version"])

    @dataclass
    class Book(FakeBook):  # the price book's documented interface: iter_items() of the version in force
        items: list[Item]

        def iter_items(self) -> list[Item]:
            return self.items

    async with running(gateway_config(tmp_path, mosquitto.port, [dev])) as gw:
        gw.device_services.prices = Book([Item("0999", 100), Item("1001", 450)])
        await until(lambda: device_status(gw, "pos")["state"] == "ok", what="ok")
        await _driver(gw).price_prepare(Change(4, ITEMS))
        await _driver(gw).price_commit(4)
        assert (pos / "prices_4.csv").read_text() == "0999,100,4\n1001,499,4\n1002,1299,4\n"
        gw.device_services.prices = None
        with pytest.raises(PrepareFailed, match="needs the price book"):
            await _driver(gw).price_prepare(Change(5, ITEMS))


async def test_an_unimported_file_is_never_overwritten(tmp_path: Path, mosquitto: Mosquitto) -> None:
    pos = tmp_path / "pos"
    pos.mkdir()
    async with running(gateway_config(tmp_path, mosquitto.port, [_plu(pos, file_name="PLU.CSV")])) as gw:
        await until(lambda: device_status(gw, "pos")["state"] == "ok", what="ok")
        drv = _driver(gw)
        await drv.price_prepare(Change(1, ITEMS[:1]))
        await drv.price_commit(1)
        first = (pos / "PLU.CSV").read_bytes()
        await drv.price_prepare(Change(2, ITEMS[1:]))
        with pytest.raises(FileExistsError, match="not imported it yet"):
            await drv.price_commit(2)
        assert (pos / "PLU.CSV").read_bytes() == first
        st = device_status(gw, "pos")
        assert st["state"] == "degraded" and "PLU.CSV" in st["last_error"]
        (pos / "PLU.CSV").unlink()  # the POS imports and removes it
        await drv.price_commit(2)  # the coordinator's retry
        assert b"1002" in (pos / "PLU.CSV").read_bytes() and device_status(gw, "pos")["state"] == "ok"


async def test_directory_gone_and_back(tmp_path: Path, mosquitto: Mosquitto) -> None:
    pos = tmp_path / "share"
    async with running(gateway_config(tmp_path, mosquitto.port, [_plu(pos, check_interval=1)])) as gw:
        st = await until(lambda: device_status(gw, "pos")["restarts"] >= 1 and device_status(gw, "pos"),
                         what="a failed start")
        assert st["state"] == "offline" and "does not exist" in st["last_error"]
        with pytest.raises(PrepareFailed, match="does not exist"):
            await _driver(gw).price_prepare(Change(1, ITEMS))
        pos.mkdir()
        await until(lambda: device_status(gw, "pos")["state"] == "ok", 15, what="ok once the share is back")
        shutil.rmtree(pos)
        await until(lambda: device_status(gw, "pos")["state"] == "offline", 15, what="offline again")
        assert gw.status()["state"] == "running"  # the gateway itself went on
