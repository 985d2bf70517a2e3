"""Central price changes, applied to tills and shelf labels in one atomic step (docs/prices.md).

The part (part.py ``PricesPart``, built in storelink.app.standard_parts) is the price book (lent to drivers as
their ``DeviceContext.prices``), the MQTT intake for batches and the desired version, the two-phase coordinator,
the audit, the retained ``prices/state`` and the "prices" section of the status API. Module map:

- models.py: `[prices]` config and every payload; staging.py + intake.py: verify and reassemble batches;
- db.py: the SQLite schema; book.py: lookups and the book's SQL; coordinator.py: the two-phase journal;
- audit.py: stale tills and drift; state.py: the retained report; targets.py: the devices that take part;
- http.py: read-only routes (price checks, the state). Head office's side is in storelink.hq.
"""
