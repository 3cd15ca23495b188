"""Bring a config saved by an older dpft to today's schema: the one place that knows its history.

A workdir's config.json and a checkpoint's config item are read through `upgrade` (by
`dpft.config.base.config_from_json`), so a run started before a field existed evaluates and
resumes, and every consumer reads the fields directly. What changed is data in the schema
(`dpft.config.schema.FIELDS`): `was` (where older configs kept a field: moved), `added` (configs
saved before lack it: its default); `REMOVED` lists the fields that no longer exist; and the data
set's loader options a config lacks get their defaults (`fill_option_defaults`).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, MutableMapping

import ml_collections

from dpft.config.schema import FIELDS, MISSING, lookup

#: Fields removed from the schema -> the value that is today's behaviour: a saved config with that
#: value loses the field; another value stays (so resuming such a run is refused as a change).
REMOVED: dict[str, Any] = {"privacy.sampling": "poisson"}  # shuffled batches, removed 2026-11-29


def fill_option_defaults(options: MutableMapping[str, Any], data_name: str) -> None:
    """Add every loader option of data set `data_name` (`dpft.data.option_defaults`) that `options`
    (`config.data.options`, a dict or an unlocked ConfigDict) lacks, with its default (in place)."""
    from dpft.data import option_defaults

    for key, value in option_defaults(data_name).items():
        if key not in options:
            options[key] = value


def upgrade(config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`config` (a dict or ConfigDict as an older dpft wrote it) brought to today's schema: a new,
    locked ConfigDict (lists become tuples). A config of today comes back unchanged."""
    data = json.loads(json.dumps(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config))
    for path, field in FIELDS.items():
        if field.was:
            old = _pop(data, field.was)
            if old is not MISSING and old is not None:  # None: the default
                _put(data, path, old)
    for path, value in REMOVED.items():
        if lookup(data, path) == value:
            _pop(data, path)
    for path, field in FIELDS.items():
        if field.added and lookup(data, path) is MISSING:
            _put(data, path, field.default)
    options = lookup(data, "data.options")
    if isinstance(options, dict) and isinstance(lookup(data, "data.name"), str):
        fill_option_defaults(options, data["data"]["name"])
    upgraded = ml_collections.ConfigDict(_tuples(data))
    upgraded.lock()
    return upgraded


def _pop(data: dict[str, Any], path: str) -> Any:
    *parents, leaf = path.split(".")
    node = lookup(data, ".".join(parents)) if parents else data
    return node.pop(leaf, MISSING) if isinstance(node, dict) else MISSING


def _put(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _tuples(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x
