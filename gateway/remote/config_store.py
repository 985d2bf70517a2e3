"""Saving a remotely received config as the last-known-good file, and remote config's own small state file.

The config file is replaced atomically (temp file in the same directory, fsync, rename, fsync the directory) so
that a power cut leaves either the old or the new file, never half of one. The TOML written is checked by
parsing it back before the rename: a file that would not load the same config is never installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomli_w

from storelink import safe_json
from storelink.config import ConfigError, GatewayConfig, parse_config_text
from storelink.system.files import write_atomically


def _drop_nulls(value: Any) -> Any:
    """TOML has no null: an absent key means the default, which is what a JSON null means in a desired config."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value if v is not None]
    return value


def render_toml(data: dict[str, Any], expected: GatewayConfig) -> str:
    """TOML text for `data`, verified to load as `expected`. Raises ConfigError when it would not."""
    clean = _drop_nulls(data)
    # Plain keys first, then tables: tomli-w does that itself, but devices must stay an array of tables.
    try:
        text = tomli_w.dumps(clean)
    except (TypeError, ValueError) as err:
        raise ConfigError("last-known-good file", [f"cannot be written as TOML: {err}"]) from None
    header = (
        "# Written by StoreLink remote config (last-known-good). Head office changes this file through\n"
        f"# storelink/{expected.store_id}/config/desired; local edits are replaced by the next remote config.\n"
    )
    text = header + text
    again = parse_config_text(text, "last-known-good file")
    if again.model_dump() != expected.model_dump():
        raise ConfigError("last-known-good file", ["TOML round trip changed the config; not written"])
    return text


class RemoteState:
    """What remote config must remember across restarts: the last report, rolled-back versions, a trial."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"last_report": None, "rolled_back": [], "trial": None, "applied_hash": None}

    def load(self) -> None:
        try:
            loaded = safe_json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            return  # unreadable state only costs the memory of rolled-back versions; the config file is intact
        if isinstance(loaded, dict):
            self.data.update({k: v for k, v in loaded.items() if k in self.data})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(self.data, indent=1).encode(), 0o640)

    @property
    def rolled_back(self) -> set[int]:
        versions = self.data.get("rolled_back")
        return {v for v in versions if isinstance(v, int)} if isinstance(versions, list) else set()

    def add_rolled_back(self, version: int) -> None:
        versions = sorted(self.rolled_back | {version})[-50:]
        self.data["rolled_back"] = versions
