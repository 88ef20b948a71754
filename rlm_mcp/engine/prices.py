"""Model prices and context windows: litellm's table, read without importing litellm where it
can be (the JSON file litellm ships), and the per-token prices a reply's cost is computed from."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

@dataclass(frozen=True)
class Prices:
    """USD per token for one model, read once from litellm's price table."""

    input: float
    output: float
    input_above_200k: float | None = None
    output_above_200k: float | None = None

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        above = input_tokens > 200_000
        per_in = self.input_above_200k if above and self.input_above_200k is not None else self.input
        per_out = self.output_above_200k if above and self.output_above_200k is not None else self.output
        return input_tokens * per_in + output_tokens * per_out

    @classmethod
    def from_info(cls, info: dict[str, Any] | None) -> Prices | None:
        """The prices in a model's table entry; None when it has none (or not as numbers)."""
        if not info:
            return None
        input_price, output_price = info.get("input_cost_per_token"), info.get("output_cost_per_token")
        if not isinstance(input_price, (int, float)) or not isinstance(output_price, (int, float)):
            return None

        def optional(key: str) -> float | None:
            value = info.get(key)
            return float(value) if isinstance(value, (int, float)) else None

        return cls(float(input_price), float(output_price), optional("input_cost_per_token_above_200k_tokens"),
                   optional("output_cost_per_token_above_200k_tokens"))


_BUNDLED_TABLE: bytes | None = None
_KEY_AT: dict[str, int] = {}  # top-level key -> offset of its entry's "{", built with the table
_TOP_LEVEL_KEY = re.compile(rb'\n    ("(?:[^"\\\n]|\\.)*"): \{')
TABLE_FILE = "model_prices_and_context_window_backup.json"


def load_bundled_table() -> bytes:
    """The bytes of litellm's shipped price table (b"" without litellm) and where each model's
    entry starts, read once. Blocking (~10 ms): the direct path's warm-up thread reads it, so
    that no run reads 3.5 MB or scans it for an unknown model on the event loop."""
    global _BUNDLED_TABLE
    if _BUNDLED_TABLE is None:
        spec = importlib.util.find_spec("litellm")  # locates the package, does not import it
        locations = list(spec.submodule_search_locations or []) if spec else []
        try:
            table = Path(locations[0], TABLE_FILE).read_bytes() if locations else b""
        except OSError:
            table = b""
        index: dict[str, int] = {}
        for match in _TOP_LEVEL_KEY.finditer(table):  # ~5 ms; a lookup then costs no scan of 3.5 MB
            raw = match.group(1)
            with contextlib.suppress(ValueError):
                key = raw[1:-1].decode() if b"\\" not in raw else json.loads(raw)
                index.setdefault(key, match.end() - 1)
        _KEY_AT.update(index)
        _BUNDLED_TABLE = table  # last: a reader in another thread never sees a partial index
    return _BUNDLED_TABLE


def bundled_model_entry(name: str) -> dict[str, Any] | None:
    """litellm's price-table entry for an OpenAI model ``name``, read from the JSON file litellm
    ships (the table it uses itself with LITELLM_LOCAL_MODEL_COST_MAP) without importing it.

    Only the one entry is decoded: parsing the whole 3.5 MB table holds the GIL for ~40 ms."""
    table = load_bundled_table()
    for key in (name, f"openai/{name}"):
        start = _KEY_AT.get(key, -1)
        if start < 0:
            continue
        size = 16_384
        while True:
            chunk = table[start:start + size].decode("utf-8", "replace")
            try:
                entry, _ = json.JSONDecoder().raw_decode(chunk)
                break
            except ValueError:
                if start + size >= len(table):
                    return None
                size *= 4
        if isinstance(entry, dict) and entry.get("litellm_provider") in (None, "openai", "text-completion-openai"):
            return entry
    return None
