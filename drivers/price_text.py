"""How shelf labels (printed or electronic) spell prices: shared so every label in a store reads the same.

Prices arrive in minor units (cents) with an ISO 4217 currency; the number of decimals per currency comes from
ISO 4217 for the few currencies that do not use two. Labels print the currency code or a symbol in front.
"""

from __future__ import annotations

from storelink.drivers.base import PriceItem

# ISO 4217 minor-unit exponents that differ from 2 (the common case).
_DECIMALS = {"JPY": 0, "KRW": 0, "ISK": 0, "CLP": 0, "VND": 0, "HUF": 2, "BHD": 3, "KWD": 3, "OMR": 3, "TND": 3}
_SYMBOLS = {"EUR": "€", "USD": "$", "GBP": "£", "JPY": "¥", "CHF": "CHF ", "CAD": "$", "AUD": "$"}


def currency_decimals(currency: str) -> int:
    return _DECIMALS.get(currency.upper(), 2)


def format_money(minor: int, currency: str, *, symbol: bool = True) -> str:
    """1999, "EUR" -> "€19.99"; negative amounts keep their sign in front of the symbol."""
    decimals = currency_decimals(currency)
    sign = "-" if minor < 0 else ""
    whole, frac = divmod(abs(minor), 10**decimals)
    number = f"{whole}.{frac:0{decimals}d}" if decimals else str(whole)
    prefix = _SYMBOLS.get(currency.upper(), f"{currency.upper()} ") if symbol else f"{currency.upper()} "
    return f"{sign}{prefix}{number}"


def unit_price_text(item: PriceItem, currency: str) -> str:
    """"€4.99 / kg" for items sold by measure; empty when the item has no unit price."""
    if item.unit_price is None or not item.unit_basis:
        return ""
    return f"{format_money(item.unit_price, currency)} / {item.unit_basis}"
