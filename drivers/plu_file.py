"""``plu_file``: price changes for POS systems that import price (PLU) files from a directory.

A price target (price_role "till"): PREPARE renders the change into a staged file under ``<directory>/.storelink``
(temp file, fsync, rename, fsync the directory), COMMIT renames it into place under the configured name (the same
filesystem, so the POS sees either no file or the whole file, never half of one) and records the committed
version durably. A file the POS has not imported yet is never overwritten: COMMIT fails and is retried.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from storelink import safe_json
from storelink.drivers.base import (
    DeviceConfig,
    DeviceContext,
    Driver,
    Health,
    PrepareFailed,
    PriceBookView,
    PriceChange,
)
from storelink.system.files import fsync_dir, write_atomically

log = logging.getLogger(__name__)
STAGING = ".storelink"
Column = Literal["sku", "gtin", "description", "price", "unit_price", "unit_basis", "currency", "version"]
DEFAULT_COLUMNS: tuple[Column, ...] = ("sku", "gtin", "description", "price", "unit_price", "unit_basis")


class PluFileConfig(DeviceConfig):
    directory: Path = Field(description="the directory the POS imports from")
    file_name: str = Field("prices_{version}.csv", description="placeholders: {version} {store_id} {device}")
    contents: Literal["changes", "full"] = Field(
        "changes", description="changes: the items of this version only; full: the whole price book at it")
    columns: list[Column] = Field(default_factory=lambda: list(DEFAULT_COLUMNS), min_length=1)
    header: bool = Field(True, description="first line names the columns")
    header_names: dict[str, str] = Field(default_factory=dict, description="column -> header text")
    delimiter: str = Field(";", min_length=1, max_length=1)
    price_format: Literal["decimal", "minor"] = Field("decimal", description="4.99 or 499")
    decimal_separator: Literal[".", ","] = "."
    decimals: int = Field(2, ge=0, le=4, description="minor-unit digits of the currency")
    encoding: str = Field("utf-8", description="any Python codec: utf-8, utf-8-sig, cp1252, latin-1 ...")
    line_ending: Literal["crlf", "lf"] = "crlf"
    check_interval: float = Field(30.0, ge=1, le=3600, description="seconds between checks of the directory")

    @field_validator("file_name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        try:
            name = v.format(version=1, store_id="s", device="d")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"unknown or malformed placeholder in {v!r} ({err}); use {{version}} {{store_id}} "
                             "{device}") from None
        if "/" in name or "\\" in name or name.startswith(".") or not name.strip():
            raise ValueError("must be a plain file name (no directories, not hidden)")
        return v

    @field_validator("encoding")
    @classmethod
    def _check_encoding(cls, v: str) -> str:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown encoding {v!r}") from None
        return v

    @field_validator("header_names")
    @classmethod
    def _check_header_names(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = set(v) - set(Column.__args__)  # type: ignore[attr-defined]
        if unknown:
            raise ValueError(f"not a column: {', '.join(sorted(unknown))}")
        return v

    @model_validator(mode="after")
    def _separators_differ(self) -> PluFileConfig:
        if self.price_format == "decimal" and self.delimiter == self.decimal_separator:
            raise ValueError("delimiter and decimal_separator must differ")
        return self


def format_amount(value: int | None, cfg: PluFileConfig) -> str:
    if value is None:
        return ""
    if cfg.price_format == "minor" or cfg.decimals == 0:
        return str(value)
    whole, frac = divmod(abs(value), 10 ** cfg.decimals)
    return f"{'-' if value < 0 else ''}{whole}{cfg.decimal_separator}{frac:0{cfg.decimals}d}"


def full_list(book: PriceBookView, change: PriceChange) -> list[Any]:
    """Every item of the price book with this change applied, in SKU order (reads SQLite: call in a thread)."""
    changed = {i.sku: i for i in change.changed}
    items = [changed.pop(i.sku, i) for i in book.iter_items()]
    return sorted(items + list(changed.values()), key=lambda i: str(i.sku))


def render(change: PriceChange, cfg: PluFileConfig, items: list[Any] | None = None) -> tuple[bytes, list[str]]:
    """The file's bytes, and the SKUs whose text the encoding could not represent (written with '?')."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=cfg.delimiter, lineterminator="\r\n" if cfg.line_ending == "crlf" else "\n")
    if cfg.header:
        writer.writerow([cfg.header_names.get(c, c) for c in cfg.columns])
    lossy: list[str] = []
    for item in change.changed if items is None else items:
        values = {
            "sku": item.sku, "gtin": item.gtin or "", "description": item.description,
            "price": format_amount(item.price, cfg), "unit_price": format_amount(item.unit_price, cfg),
            "unit_basis": item.unit_basis or "", "currency": change.currency, "version": str(change.version),
        }
        row = [values[c] for c in cfg.columns]
        try:
            cfg.delimiter.join(row).encode(cfg.encoding)
        except UnicodeEncodeError:
            lossy.append(item.sku)
        writer.writerow(row)
    return out.getvalue().encode(cfg.encoding, errors="replace"), lossy


class PluFileDriver(Driver):
    config_model = PluFileConfig
    price_role = "till"

    def __init__(self, config: DeviceConfig, ctx: DeviceContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, PluFileConfig)
        self.cfg = config
        self.staging = config.directory / STAGING
        self._lock = asyncio.Lock()
        self._problem: str | None = None
        self.last_file: str | None = None

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self._check_directory)
            self.ctx.set_health(Health.DEGRADED if self._problem else Health.OK, self._problem)
            await asyncio.sleep(self.cfg.check_interval)

    def details(self) -> dict[str, Any]:
        return {"directory": str(self.cfg.directory), "last_file": self.last_file}

    def _check_directory(self) -> None:
        d = self.cfg.directory
        if not d.is_dir():
            raise FileNotFoundError(f"price file directory {d} does not exist (share not mounted?)")
        self.staging.mkdir(exist_ok=True)
        if not os.access(d, os.W_OK) or not os.access(self.staging, os.W_OK):
            raise PermissionError(f"price file directory {d} is not writable")

    def target(self, version: int) -> Path:
        return self.cfg.directory / self.cfg.file_name.format(version=version, store_id=self.ctx.store_id,
                                                              device=self.cfg.id)

    def _staged(self, version: int) -> Path:
        return self.staging / f"v{version}.staged"

    def _state(self) -> dict[str, Any]:
        try:
            state = safe_json.loads((self.staging / "state.json").read_bytes())
        except FileNotFoundError:
            return {}
        except safe_json.JsonRejected as err:  # written atomically by us: damaged by hand or by the disk
            log.warning("%s: %s/state.json is unreadable (%s); the committed version is unknown", self.cfg.id,
                        STAGING, err.reason, extra={"device": self.cfg.id})
            return {}
        return state if isinstance(state, dict) else {}

    # -- PriceTarget ------------------------------------------------------------------------------------------
    @property
    def price_can_hold(self) -> bool:
        """A POS that imports a price file keeps no holds: the price coordinator commits it to a change that raises
        a price only once the labels show it (docs/till-protocol.md, "Older tills")."""
        return False

    async def price_prepare(self, change: PriceChange) -> None:
        items = None
        if self.cfg.contents == "full":
            book = self.ctx.prices
            if book is None:
                raise PrepareFailed(f"{self.cfg.id}: contents = 'full' needs the price book (no 'prices')")
            items = await asyncio.to_thread(full_list, book, change)
        data, lossy = await asyncio.to_thread(render, change, self.cfg, items)
        if lossy:
            log.warning("%s: %d item texts not representable in %s were written with '?' (sku %s...)",
                        self.cfg.id, len(lossy), self.cfg.encoding, ", ".join(lossy[:5]),
                        extra={"device": self.cfg.id})
        async with self._lock:
            try:
                await asyncio.to_thread(self._prepare, change.version, data)
            except OSError as err:
                self._report(f"cannot stage version {change.version}: {err.strerror or err}")
                raise PrepareFailed(f"{self.cfg.id}: cannot stage price file: {err.strerror or err}") from None

    def _prepare(self, version: int, data: bytes) -> None:
        self._check_directory()
        write_atomically(self._staged(version), data)

    async def price_commit(self, version: int) -> None:
        async with self._lock:
            try:
                name = await asyncio.to_thread(self._commit, version)
            except OSError as err:
                self._report(f"cannot commit version {version}: {err.strerror or err}")
                raise
        if name:
            log.info("%s: price file %s written (version %d)", self.cfg.id, name, version,
                     extra={"device": self.cfg.id})
        self._report(None)

    def _commit(self, version: int) -> str | None:
        if self._state().get("committed") == version:
            return None  # repeated COMMIT after a crash: already in place
        staged, target = self._staged(version), self.target(version)
        if not staged.exists():
            raise FileNotFoundError(2, f"version {version} was never prepared here")
        if target.exists():
            # The POS has not imported the previous file: overwriting it would drop those changes.
            raise FileExistsError(17, f"{target.name} is still there (the POS has not imported it yet)")
        os.replace(staged, target)
        fsync_dir(self.cfg.directory)
        fsync_dir(self.staging)
        write_atomically(self.staging / "state.json",
                         json.dumps({"committed": version, "file": target.name}).encode())
        self.last_file = target.name
        return target.name

    async def price_abort(self, version: int) -> None:
        async with self._lock:
            await asyncio.to_thread(self._staged(version).unlink, missing_ok=True)

    async def price_confirmed(self, version: int) -> bool:
        return await self.price_reported_version() == version

    async def price_reported_version(self) -> int | None:
        try:
            committed = (await asyncio.to_thread(self._state)).get("committed")
        except (OSError, ValueError):
            return None
        return committed if isinstance(committed, int) else None

    def _report(self, problem: str | None) -> None:
        self._problem = problem
        self.ctx.set_health(Health.DEGRADED if problem else Health.OK, problem)
