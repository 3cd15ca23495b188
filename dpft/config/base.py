"""The run config: defaults, loading a config file, command-line overrides, JSON round trip.

A run config is an `ml_collections.ConfigDict` with the fields below (see docs/interfaces.md
and configs/*.py). `base_config()` returns every field with a default and is *locked*, so an
override of a misspelt field fails instead of silently adding a new one. Experiment files
`configs/<name>.py` expose `get_config(arg=None)` (the ml_collections `config_flags`
convention) and start from `base_config(locked=False)`.

Fields (units in brackets):
  seed                       int, root of the PUBLIC random streams (init, augmentation, dropout);
                             the noise and Poisson selection use a CSPRNG secret kept in checkpoints
  model.name                 "nfnet_f0".."nfnet_f7", "nfnet_tiny", "wrn_16_4", ...
  model.checkpoint           "" = from scratch, else path to a DeepMind/own checkpoint
  model.dtype                compute dtype "float32" | "bfloat16" (params stay float32)
  data.name                  "digits" | "chexpert" | "mimic_cxr" | "imagenet" | "places365"
  data.root                  data directory ("" for digits)
  data.image_size            train resolution [pixels]; data.eval_image_size likewise
  data.augmult               K augmented views per example (>= 1)
  data.random_crop/flip      augmentations of the training views
  data.num_workers           host data-loading workers
  data.train_split           the split trained on ("train"; the demo's public pre-training: "public")
  data.crop                  "auto" | "random_resized" | "pad_crop" | "none" (when random_crop)
  data.eval_crop_fraction    centre-crop fraction at eval (0 = 0.875 with random_resized, else 1)
  data.worker_processes      > 0: decode training batches in that many spawned processes
  data.attributes            fairness attributes the run asks for (None = the data set's default)
  data.imbalance             attribute, group, fraction (0 = off), seed (-1 = config.seed): keep that
                             subgroup of the training split at that fraction (imbalance studies)
  data.options               the data set loader's options: every field of its options class
                             (dpft.data.option_defaults; e.g. mimic_iv_dir, demo_path, mask_blank,
                             val_fraction, on_bad_image, holdout, index_dir); `load_config` adds those
                             a config file leaves out, with their defaults, so each is settable as
                             --config.data.options.KEY=VALUE
  privacy.enabled            False = the non-private baseline on the same code path
  privacy.epsilon            target epsilon (used when noise_multiplier == 0)
  privacy.delta              0 = 1/N at run time
  privacy.noise_multiplier   sigma; 0 = calibrate from epsilon
  privacy.clip_norm          C, L2 bound on each example's (augmult-averaged) gradient
  privacy.clipping           a private mode of dpft.privacy.clipping.MODES: "flat" | "per_layer" |
                             "automatic" (each mode's record says which fields below it reads)
  privacy.gamma              stabiliser of "automatic" clipping, g C / (||g|| + gamma) (> 0; read by
                             automatic only); configs saved before it existed mean 0.01
  privacy.accountant         "pld" | "rdp"
  privacy.insecure_fixed_noise_seed  -1 = off (default: secret from the OS CSPRNG); >= 0 fixes
                             noise and selection for tests/debugging: NO privacy guarantee
  train.batch_size           expected batch size B = q * N per update [examples]
  train.physical_batch_size  examples per step on each host (multiple of microbatch_size)
  train.microbatch_size      examples per chunk of the per-example computation (scan over chunks)
  train.grad_method          "auto" | "bookkeeping" | "vmap": how clipped per-example gradients
                             are summed (same result); auto = bookkeeping for flat/automatic
                             clipping (no per-example backward, dpft.privacy.bookkeeping), else vmap
  train.num_updates          optimizer updates
  train.optimizer            name "sgd"|"momentum"|"adam"|"adamw", learning_rate, momentum,
                             weight_decay
  train.lr_schedule          name "constant"|"cosine"|"warmup_cosine", warmup_steps [updates]
  train.ema_decay            0 = off; else in (0, 1)
  train.polyak               also keep a uniform average of the iterates
  train.eval_every, checkpoint_every, log_every [updates], keep_checkpoints [count]
  eval.batch_size, eval.params ("ema" | "raw"), eval.splits (tuple of str)
  individual.enabled, individual.every [updates], individual.norm_grid,
  individual.min_group_size  groups smaller than this get no statistics in summaries
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
from typing import Any, Mapping, Sequence

import ml_collections

from dpft.errors import UsageError

ConfigDict = ml_collections.ConfigDict

CROPS = ("auto", "random_resized", "pad_crop", "none")

#: Run options that configs before 2026-11-29 kept inside `data.options` -> their typed field now
#: (`config_from_json` moves them, so old workdirs and checkpoints still load and resume).
LEGACY_RUN_OPTIONS: dict[str, str] = {
    "train_split": "data.train_split", "crop": "data.crop", "eval_crop_fraction": "data.eval_crop_fraction",
    "worker_processes": "data.worker_processes", "attributes": "data.attributes",
    "imbalance_attribute": "data.imbalance.attribute", "imbalance_group": "data.imbalance.group",
    "imbalance_fraction": "data.imbalance.fraction", "imbalance_seed": "data.imbalance.seed",
}


def base_config(*, locked: bool = True) -> ConfigDict:
    """Every run-config field with a sane default (a small private fine-tuning run).

    Returns a locked ConfigDict unless `locked=False` (experiment files unlock to add
    dataset-specific `data.options` keys, then call `finalize`).
    """
    c = ConfigDict()
    c.seed = 0

    c.model = ConfigDict()
    c.model.name = "nfnet_f0"
    c.model.checkpoint = ""
    c.model.dtype = "float32"

    c.data = ConfigDict()
    c.data.name = "digits"
    c.data.root = ""
    c.data.image_size = 32
    c.data.eval_image_size = 32
    c.data.augmult = 1
    c.data.random_crop = True
    c.data.random_flip = True
    c.data.num_workers = 0
    c.data.worker_processes = 0  # > 0: decode training batches in that many spawned processes
    c.data.train_split = "train"  # the split trained on (the demo's public pre-training: "public")
    c.data.crop = "auto"  # training crop when random_crop: auto = random_resized at >= 64 px, else pad_crop
    c.data.eval_crop_fraction = 0.0  # centre-crop fraction at eval; 0 = 0.875 with random_resized, else 1
    c.data.attributes = None  # fairness attributes the run asks for ("a,b" or tuple); None = data set default
    c.data.imbalance = ConfigDict()  # keep a subgroup of the training split at a fraction (imbalance studies)
    c.data.imbalance.attribute = ""
    c.data.imbalance.group = ""
    c.data.imbalance.fraction = 0.0  # 0 = off
    c.data.imbalance.seed = -1  # -1 = config.seed
    c.data.options = ConfigDict()  # the data set loader's options (dpft.data.option_defaults)

    c.privacy = ConfigDict()
    c.privacy.enabled = True
    c.privacy.epsilon = 8.0
    c.privacy.delta = 0.0
    c.privacy.noise_multiplier = 0.0
    c.privacy.clip_norm = 1.0
    c.privacy.clipping = "flat"
    c.privacy.gamma = 0.01  # = dpft.privacy.clipping.HYPER_PARAMS["gamma"].default
    c.privacy.accountant = "pld"
    c.privacy.insecure_fixed_noise_seed = -1

    c.train = ConfigDict()
    c.train.batch_size = 256
    c.train.physical_batch_size = 64
    c.train.microbatch_size = 16
    c.train.grad_method = "auto"
    c.train.num_updates = 100
    c.train.optimizer = ConfigDict()
    c.train.optimizer.name = "sgd"
    c.train.optimizer.learning_rate = 1.0
    c.train.optimizer.momentum = 0.0
    c.train.optimizer.weight_decay = 0.0
    c.train.lr_schedule = ConfigDict()
    c.train.lr_schedule.name = "constant"
    c.train.lr_schedule.warmup_steps = 0
    c.train.ema_decay = 0.999
    c.train.polyak = False
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.log_every = 10
    c.train.keep_checkpoints = 3

    c.eval = ConfigDict()
    c.eval.batch_size = 256
    c.eval.params = "ema"
    c.eval.splits = ("test",)

    c.individual = ConfigDict()
    c.individual.enabled = False
    c.individual.every = 100
    c.individual.norm_grid = 0.1
    c.individual.min_group_size = 20

    if locked:
        c.lock()
    return c


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


def _load_config_file(path_with_arg: str) -> ConfigDict:
    path, arg = _split_path_arg(path_with_arg)
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} not found")
    module = _import_config_module(path)
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise UsageError(f"config file {path!r} has no get_config()")
    config = get_config(arg) if arg is not None else get_config()
    if not isinstance(config, ConfigDict):
        raise UsageError(f"config file {path!r}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}
_NONE = {"none", "null"}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def coerce_value(text: str, current: Any, *, field: str) -> Any:
    """Parse the command-line string `text` into the type of the field's `current` value.

    bool accepts true/false/1/0/yes/no; int, float as usual (an int field refuses 2.5);
    tuple accepts "a,b,c" or "(1, 2)" (elements take the type of the current first
    element); "None"/"null" gives None for any non-string field; a string field takes
    the text verbatim. Raises UsageError naming `field`.
    """
    stripped = text.strip()
    if isinstance(current, str):
        return text
    if stripped.lower() in _NONE:
        return None
    try:
        if isinstance(current, bool):
            low = stripped.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected true/false")
        if isinstance(current, int):
            value = _literal(stripped)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError("expected an integer")
            return value
        if isinstance(current, float):
            return float(stripped)
        if isinstance(current, (tuple, list)):
            if stripped.startswith(("(", "[")):
                value = _literal(stripped)
                items = list(value) if isinstance(value, (tuple, list)) else [value]
            else:
                items = [s.strip() for s in stripped.split(",") if s.strip()] if stripped else []
            proto = current[0] if len(current) else None
            if proto is not None and not isinstance(proto, str):
                items = [coerce_value(str(i), proto, field=field) if isinstance(i, str) else i for i in items]
            else:
                items = [str(i) if proto is not None else i for i in items]
            return tuple(items)
        if current is None:
            return _literal(stripped)
    except (ValueError, TypeError) as e:
        raise UsageError(f"config field {field!r}: cannot parse {text!r} as {type(current).__name__} ({e})") from None
    raise UsageError(f"config field {field!r} has type {type(current).__name__}, which cannot be set from the command line")


def _field_value(config: ConfigDict | None, key: str) -> Any:
    """The current value of config field `key` ("a.b"), or None when unknown/no config."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def _parse_overrides(overrides: Sequence[str], config: ConfigDict | None = None) -> list[tuple[str, str, str]]:
    """['--config.a.b=1', '--config.c', '2', '--config.flag'] -> [('a.b', '1', raw), ('c', '2', raw),
    ('flag', 'true', raw)]: the ml_collections `config_flags` conventions -- `--config.x=v`,
    `--config.x v`, and a bare `--config.x` for a boolean field means True (it never takes the
    next token as its value)."""
    out = []
    tokens = list(overrides)
    i = 0
    while i < len(tokens):
        raw = tokens[i]
        body = raw.lstrip("-")
        if body.startswith("config."):
            body = body[len("config."):]
        if "=" in body:
            key, value = body.split("=", 1)
        elif isinstance(_field_value(config, body.strip()), bool) or (
                config is None and (i + 1 == len(tokens) or tokens[i + 1].startswith("--"))):
            key, value = body, "true"  # (without a config: a bare flag can only be a boolean)
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            key, value = body, tokens[i + 1]
            raw = f"{raw} {value}"
            i += 1
        else:
            raise UsageError(f"override {raw!r} has no value; use --config.FIELD=VALUE")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise UsageError(f"override {raw!r}: malformed field name {key!r}")
        out.append((key, value, raw))
        i += 1
    return out


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Set `--config.a.b=value` overrides on `config` in place (and return it).

    Unknown fields raise UsageError naming the field (with a close match if any).
    """
    for key, value, raw in _parse_overrides(overrides, config):
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts):
            here = ".".join(parts[: depth + 1])
            if not isinstance(node, ConfigDict):
                raise UsageError(f"override {raw!r}: config.{'.'.join(parts[:depth])} is not a group of fields")
            if part not in node:
                close = difflib.get_close_matches(part, list(node.keys()), n=1)
                hint = f"; did you mean {'.'.join(parts[:depth] + [close[0]])!r}?" if close else ""
                raise UsageError(f"override {raw!r}: unknown config field {'config.' + here!r}{hint}")
            if depth < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        current = node[leaf]
        if isinstance(current, ConfigDict):
            raise UsageError(f"override {raw!r}: config.{key} is a group of fields, set its members instead")
        new = coerce_value(value, current, field=f"config.{key}")
        try:
            node[leaf] = new
        except (TypeError, ValueError, AttributeError) as e:
            raise UsageError(f"override {raw!r}: cannot set config.{key} to {new!r} ({e})") from None
    return config


def load_config(path_with_optional_arg: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Load `configs/x.py[:arg]` (calls its `get_config(arg)`) and apply the overrides.

    The result is locked. Raises UsageError for a missing file or a bad override.
    """
    config = _load_config_file(path_with_optional_arg)
    add_option_defaults(config, _overridden_data_name(overrides))
    config.lock()
    return apply_overrides(config, overrides)


def _overridden_data_name(overrides: Sequence[str]) -> str | None:
    names = [v for k, v, _ in _parse_overrides(overrides) if k == "data.name"]
    return names[-1] if names else None


def add_option_defaults(config: ConfigDict, data_name: str | None = None) -> ConfigDict:
    """Add every loader option of the data set (`dpft.data.option_defaults`) that
    `config.data.options` lacks, with its default (in place)."""
    from dpft.data import option_defaults

    name = data_name or config.data.name
    with config.unlocked():
        if config.data.options is None:
            config.data.options = ConfigDict()
        for key, value in option_defaults(name).items():
            if key not in config.data.options:
                config.data.options[key] = value
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


def _tuples(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def config_from_json(text: str) -> ConfigDict:
    """Inverse of `config_to_json`: a locked ConfigDict (JSON lists become tuples)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"config JSON is malformed: {e}") from None
    if not isinstance(data, dict):
        raise UsageError("config JSON must be an object")
    config = ConfigDict(_tuples(upgrade(data)))
    config.lock()
    return config


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict as written by an older dpft, brought to today's schema (a new dict): run
    options kept in `data.options` move to their typed fields (`LEGACY_RUN_OPTIONS`; None = the
    default), and typed data fields and privacy fields (e.g. `privacy.gamma`) it lacks get their defaults."""
    data = json.loads(json.dumps(data))
    privacy = data.get("privacy")
    if isinstance(privacy, dict):
        for key, value in base_config(locked=False).privacy.to_dict().items():
            privacy.setdefault(key, value)
    section = data.get("data")
    if not isinstance(section, dict):
        return data
    defaults = base_config(locked=False).data.to_dict()
    options = section.get("options") if isinstance(section.get("options"), dict) else {}
    for old, new in LEGACY_RUN_OPTIONS.items():
        if old in options:
            value = options.pop(old)
            if value is not None:
                node = data
                *parents, leaf = new.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = value
    for key, value in defaults.items():
        if key == "imbalance" and isinstance(section.get("imbalance"), dict):
            section["imbalance"] = {**value, **section["imbalance"]}
        else:
            section.setdefault(key, value)
    return data


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
