"""Model prices and context windows: litellm's table, read without importing litellm where it
can be (the JSON file litellm ships), and the per-token prices a reply's cost is computed from."""

from __future__ import annotations

import importlib.util
import json
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
TABLE_FILE = "model_prices_and_context_window_backup.json"


def bundled_model_entry(name: str) -> dict[str, Any] | None:
    """litellm's price-table entry for an OpenAI model ``name``, read from the JSON file litellm
    ships (the table it uses itself with LITELLM_LOCAL_MODEL_COST_MAP) without importing it.

    Only the one entry is decoded: parsing the whole 3.5 MB table holds the GIL for ~40 ms."""
    global _BUNDLED_TABLE
    if _BUNDLED_TABLE is None:
        spec = importlib.util.find_spec("litellm")  # locates the package, does not import it
        locations = list(spec.submodule_search_locations or []) if spec else []
        try:
            _BUNDLED_TABLE = Path(locations[0], TABLE_FILE).read_bytes() if locations else b""
        except OSError:
            _BUNDLED_TABLE = b""
    table = _BUNDLED_TABLE
    for key in (name, f"openai/{name}"):
        at = table.find(b'\n    ' + json.dumps(key).encode() + b': {')  # top-level keys only
        if at < 0:
            continue
        start = table.index(b"{", at)
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
