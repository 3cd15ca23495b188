"""Command-line overrides `--config.FIELD=VALUE` (ml_collections `config_flags` conventions).

`--config.a.b=v` and `--config.a.b v` set a field; a bare `--config.flag` sets a boolean field to
True (it never takes the next token as its value). Each value is read as its field's kind
(`dpft.config.schema.FIELDS`; a loader option in `data.options` as the kind of its current value):
bool true/false/1/0/yes/no, int (2e3 is 2000, 2.5 is refused), float, a tuple as "a,b" or "(1, 2)",
"None"/"null" for None in every non-string field, a string verbatim. A bad value or an unknown
field raises `UsageError` naming it (with a close match if any).
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping, Sequence

import ml_collections

from dpft.config import fields
from dpft.config.schema import kind_at, lookup
from dpft.errors import UsageError

ConfigDict = ml_collections.ConfigDict


def coerce_value(text: str, current: Any, *, field: str) -> Any:
    """`text` read as the kind of `current` (a field known only by its value); UsageError naming `field`."""
    return _parse(fields.kind_of(current), text, field, current)


def _parse(kind: fields.Kind | None, text: str, field: str, current: Any) -> Any:
    if kind is None or kind is fields.GROUP:
        raise UsageError(f"config field {field!r} has type {type(current).__name__}, which cannot be set "
                         "from the command line")
    try:
        return fields.parse(kind, text)
    except (ValueError, TypeError) as e:
        raise UsageError(f"config field {field!r}: cannot parse {text!r} as {kind.name} ({e})") from None


def parse_overrides(overrides: Sequence[str], config: ConfigDict | None = None) -> list[tuple[str, str, str]]:
    """['--config.a.b=1', '--config.c', '2', '--config.flag'] -> [('a.b', '1', raw), ('c', '2', raw),
    ('flag', 'true', raw)]. Without `config`, a bare flag before another flag (or last) is a boolean."""
    out = []
    tokens = list(overrides)
    i = 0
    while i < len(tokens):
        raw = tokens[i]
        body = raw.lstrip("-")
        body = body[len("config."):] if body.startswith("config.") else body
        key, eq, value = body.partition("=")
        key = key.strip()
        if not eq and _is_bool(config, key, tokens[i + 1:]):
            value = "true"
        elif not eq and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            i += 1
            value, raw = tokens[i], f"{raw} {tokens[i]}"
        elif not eq:
            raise UsageError(f"override {raw!r} has no value; use --config.FIELD=VALUE")
        if not key or any(not part for part in key.split(".")):
            raise UsageError(f"override {raw!r}: malformed field name {key!r}")
        out.append((key, value, raw))
        i += 1
    return out


def _is_bool(config: ConfigDict | None, key: str, rest: Sequence[str]) -> bool:
    if config is None:  # a bare flag can only be a boolean when no value follows it
        return not rest or rest[0].startswith("--")
    return kind_at(key, lookup(config, key)) is fields.BOOL


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Set `--config.a.b=value` overrides on `config` in place (and return it)."""
    for key, value, raw in parse_overrides(overrides, config):
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts):
            if not isinstance(node, ConfigDict):
                raise UsageError(f"override {raw!r}: config.{'.'.join(parts[:depth])} is not a group of fields")
            if part not in node:
                close = difflib.get_close_matches(part, list(node.keys()), n=1)
                hint = f"; did you mean {'.'.join(parts[:depth] + [close[0]])!r}?" if close else ""
                raise UsageError(f"override {raw!r}: unknown config field {'config.' + '.'.join(parts[:depth + 1])!r}"
                                 f"{hint}")
            if depth < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        if isinstance(current, ConfigDict):
            raise UsageError(f"override {raw!r}: config.{key} is a group of fields, set its members instead")
        new = _parse(kind_at(key, current), value, f"config.{key}", current)
        try:
            node[parts[-1]] = new
        except (TypeError, ValueError, AttributeError) as e:
            raise UsageError(f"override {raw!r}: cannot set config.{key} to {new!r} ({e})") from None
    return config


def overridden(overrides: Sequence[str], key: str) -> str | None:
    """The last value (text) `overrides` give field `key`, or None."""
    values = [v for k, v, _ in parse_overrides(overrides) if k == key]
    return values[-1] if values else None


def apply_config_arg(config: ConfigDict, arg: str | None, aliases: Mapping[str, str]) -> ConfigDict:
    """Apply a `get_config` argument such as "eps=4,steps=100" in place (and return it).

    `aliases` maps short names to config fields, e.g. {"eps": "privacy.epsilon"}; a full
    field path ("privacy.clip_norm=0.5") is accepted too. None or "" does nothing.
    """
    if not arg:
        return config
    overrides = []
    for item in arg.split(","):
        if "=" not in item:
            raise UsageError(f"config argument {item!r} must look like NAME=VALUE (aliases: {', '.join(aliases)})")
        key, value = item.split("=", 1)
        overrides.append(f"{aliases.get(key.strip(), key.strip())}={value}")
    return apply_overrides(config, overrides)
