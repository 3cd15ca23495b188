"""Name -> implementation tables, one per kind (models, data sets), resolved lazily.

A `Registry` maps each name to a "module:attribute" string; `get(name)` imports the module
only then, so listing names or validating a config loads nothing heavy and adding an entry is
one line. Unknown names raise `UsageError` naming the kind and the choices.

    MODEL_FAMILIES = Registry("model family", {"nfnet": "dpft.models.nfnet:VARIANTS"})
    MODEL_FAMILIES.get("nfnet")      # the VARIANTS dict of dpft/models/nfnet.py
"""
from __future__ import annotations

import importlib
from typing import Any, Iterator, Mapping

from dpft.errors import UsageError


class Registry:
    """The table `entries` {name: "module:attribute"} of one kind of thing (one line per entry)."""

    def __init__(self, kind: str, entries: Mapping[str, str]):
        for name, target in entries.items():
            if ":" not in target:
                raise ValueError(f"{kind} {name!r}: target {target!r} is not 'module:attribute'")
        self.kind = kind
        self.entries = dict(entries)

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def target(self, name: str) -> str:
        """The "module:attribute" string of `name` (UsageError if unknown)."""
        if name not in self.entries:
            raise UsageError(f"unknown {self.kind} {name!r}; choose from {', '.join(self.entries)}")
        return self.entries[name]

    def get(self, name: str) -> Any:
        """Imports and returns the object registered as `name`."""
        module, _, attr = self.target(name).partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"{self.kind} {name!r}: cannot load {self.target(name)} ({e})") from e
