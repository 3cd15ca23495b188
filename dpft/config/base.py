"""The run config: loading a config file with its overrides, and the JSON round trip.

A run config is an `ml_collections.ConfigDict` whose fields, defaults, ranges and choices are the
schema `dpft.config.schema.FIELDS` (the reference: docs/config.md, generated from it).
`base_config()` returns every field at its default and is *locked*, so an override of a misspelt
field fails instead of silently adding a new one. Experiment files `configs/<name>.py` expose
`get_config(arg=None)` (the ml_collections `config_flags` convention) and start from
`base_config(locked=False)`; `load_config` applies `--config.FIELD=VALUE` overrides
(`dpft.config.overrides`), and `config_from_json` reads a saved config through
`dpft.config.upgrade.upgrade`, so every consumer reads today's fields.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import traceback
from typing import Any, Iterator, Sequence

import ml_collections

from dpft.config.overrides import apply_config_arg, apply_overrides, coerce_value, overridden
from dpft.config.schema import base_config
from dpft.config.upgrade import fill_option_defaults, upgrade
from dpft.errors import ConfigError, DpftError, UsageError

ConfigDict = ml_collections.ConfigDict


def finalize(config: ConfigDict) -> ConfigDict:
    """Lock `config` (recursively) and return it; experiment files end with this."""
    config.lock()
    return config


# --------------------------------------------------------------------------- loading


def _split_path_arg(path_with_arg: str) -> tuple[str, str | None]:
    """'configs/x.py:eps=4' -> ('configs/x.py', 'eps=4'); the arg is optional."""
    if ".py:" in path_with_arg:
        path, arg = path_with_arg.split(".py:", 1)
        return path + ".py", arg
    return path_with_arg, None


def _import_config_module(path: str) -> Any:
    """The module of config file `path`. A file inside a package directory (one with __init__.py,
    like `configs/`) is imported as `<package>.<name>`, so recipes import their shared parts as
    `from configs import _medical`; a lone file is loaded by path."""
    path = os.path.abspath(path)
    folder, name = os.path.split(os.path.splitext(path)[0])
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        root, package = os.path.split(folder)
        loaded = sys.modules.get(package)
        if loaded is not None and os.path.abspath(list(getattr(loaded, "__path__", [""]))[0]) != folder:
            for key in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
                del sys.modules[key]  # another checkout's package of the same name
        sys.path.insert(0, root)
        try:
            full = f"{package}.{name}"
            if full in sys.modules:  # the file as it is now (a sweep may have edited it)
                return importlib.reload(sys.modules[full])
            return importlib.import_module(full)
        finally:
            sys.path.remove(root)
    spec = importlib.util.spec_from_file_location("dpft_config_" + name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"config file {path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _config_file_errors(path: str) -> Iterator[None]:
    """A config file that does not import or whose get_config() raises: one line naming the file and
    the line (`ConfigError`); the full traceback with DPFT_DEBUG=1."""
    try:
        yield
    except DpftError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: any error, one line
        if os.environ.get("DPFT_DEBUG") == "1":
            raise
        line = e.lineno if isinstance(e, SyntaxError) and e.filename == path else None
        if line is None:
            frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)]
            line = frames[-1].lineno if frames else None
        where = f"config file {path!r}" + (f", line {line}" if line else "")
        raise ConfigError(f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                          f"(DPFT_DEBUG=1 shows the traceback)") from None


def _load_config_file(path_with_arg: str) -> ConfigDict:
    path, arg = _split_path_arg(path_with_arg)
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} not found")
    with _config_file_errors(path):
        module = _import_config_module(path)
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise UsageError(f"config file {path!r} has no get_config()")
    with _config_file_errors(path):
        config = get_config(arg) if arg is not None else get_config()
    if not isinstance(config, ConfigDict):
        raise UsageError(f"config file {path!r}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def load_config(path_with_optional_arg: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Load `configs/x.py[:arg]` (calls its `get_config(arg)`), add the data set's loader options it
    leaves out (with their defaults: each is settable) and apply the overrides.

    The result is locked. Raises UsageError for a missing file or a bad override.
    """
    config = add_option_defaults(_load_config_file(path_with_optional_arg), overridden(overrides, "data.name"))
    config.lock()
    return apply_overrides(config, overrides)


def add_option_defaults(config: ConfigDict, data_name: str | None = None) -> ConfigDict:
    """Add every loader option of the data set (`data_name`, default `config.data.name`) that
    `config.data.options` lacks, with its default (in place; `dpft.data.option_defaults`)."""
    with config.unlocked():
        if config.data.options is None:
            config.data.options = ConfigDict()
        fill_option_defaults(config.data.options, data_name or config.data.name)
    return config


# --------------------------------------------------------------------------- JSON


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c.d": 2} -> {"a.b": 1, "c.d": 2} (lists become tuples): configs compared field by field."""
    out: dict[str, Any] = {}
    if isinstance(config, dict):
        for k, v in config.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tuple(config) if isinstance(config, list) else config}


def config_to_json(config: ConfigDict) -> str:
    """The config as indented JSON (tuples become lists); the workdir's config.json."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def config_from_json(text: str) -> ConfigDict:
    """Inverse of `config_to_json`, brought to today's schema (`upgrade`): a locked ConfigDict (JSON lists
    become tuples)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"config JSON is malformed: {e}") from None
    if not isinstance(data, dict):
        raise UsageError("config JSON must be an object")
    return upgrade(data)


__all__ = ["ConfigDict", "add_option_defaults", "apply_config_arg", "apply_overrides", "base_config", "coerce_value",
           "config_from_json", "config_to_json", "finalize", "flatten", "load_config", "upgrade"]
