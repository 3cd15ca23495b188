"""DeepMind Haiku checkpoints <-> Flax NNX models.

Formats read (``read_checkpoint`` picks by content):
  * DeepMind's ``F*_haiku.npz``: despite the name a (dill) pickle of
    ``{module_name: {param_name: ndarray}}`` whose dict nodes may be Haiku
    ``FlatMapping``/``FlatMap`` objects. Read with a *restricted* unpickler: only a
    whitelist of plain builders (numpy array/dtype reconstruction, dicts, the Haiku
    mapping names -> a local dict stand-in, dill's ``_create_array``) may be
    referenced; any other global raises ``CheckpointError`` naming it, before anything
    runs. Opcodes that mutate objects act on data only (BUILD on arrays/dtypes/mappings,
    SETITEM on dicts, APPEND on lists), so a pickle cannot set attributes of the
    whitelisted builders. Neither haiku nor dill is needed.
  * a plain ``.npz`` zip of flat keys ``"NFNet/~/stem_conv0/w"`` (``allow_pickle=False``);
  * an orbax checkpoint directory holding ``params`` (and optionally ``state``) as a
    Haiku tree or as the model's pure NNX state dict.

Formats written: the Haiku pickle (plain nested dicts of numpy arrays, protocol 4,
readable by the restricted unpickler) and the flat ``.npz``; round trips are exact.

Names: each model file declares how Haiku names its parameters (``Variant.haiku``, a
``dpft.models.variant.HaikuLayout``) and which module is its head (``Variant.head``); this
module holds no per-model table and imports no model family. The NNX attribute path maps to
the Haiku name by joining with ``/~/`` under the layout's root (``NFNet``) and renaming list
entries, e.g. for NFNet's ``blocks[i]`` -> ``nf_block`` (i = 0) / ``nf_block_{i}``:
``blocks[3].squeeze_excite.linear_1.w`` <-> ``("NFNet/~/nf_block_3/~/squeeze_excite/~/linear_1", "w")``.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from typing import Any, Iterable, Mapping, TypeVar

import numpy as np
try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]
import jax.numpy as jnp
from flax import nnx

from dpft import atomic_io, paths, remote_files
from dpft.errors import UsageError
from dpft.models import registry
from dpft.models.variant import HaikuLayout

HaikuTree = dict[str, dict[str, np.ndarray]]
Key = TypeVar("Key")


class CheckpointError(UsageError):
    """A checkpoint file is unreadable, unsafe, or does not fit the model."""


# --------------------------------------------------------------------------- names

def _layout(model: nnx.Module) -> HaikuLayout:
    """The Haiku layout declared by the Variant that builds ``model``."""
    v = registry.variant_of(model)
    if v.haiku is None:
        raise CheckpointError(f"model class {type(model).__name__} (family {v.family!r}) declares no Haiku "
                              "layout (Variant.haiku); it cannot read or write Haiku checkpoints")
    return v.haiku


def _module_name(layout: HaikuLayout, mods: tuple) -> str:
    """NNX module path (e.g. ``('blocks', 3, 'conv1')``) -> Haiku module name."""
    parts, i = [layout.root], 0
    while i < len(mods):
        key = mods[i]
        if key in layout.lists and i + 1 < len(mods):
            idx = int(mods[i + 1])
            prefix = layout.lists[key]
            parts.append(prefix if idx == 0 else f"{prefix}_{idx}")
            i += 2
        else:
            parts.append(str(key))
            i += 1
    return "/~/".join(parts)


def _haiku_name(layout: HaikuLayout, path: tuple) -> tuple[str, str]:
    *mods, param = path
    return _module_name(layout, tuple(mods)), str(param)


def haiku_name(model: nnx.Module, path: tuple) -> tuple[str, str]:
    """NNX parameter path (e.g. ``('blocks', 3, 'conv1', 'w')``) -> (Haiku module, param)."""
    return _haiku_name(_layout(model), path)


def param_table(model: nnx.Module) -> dict[tuple[str, str], tuple[tuple, Any]]:
    """{(Haiku module, param): (NNX path, shape)} for every ``nnx.Param`` of ``model``.

    Works on abstract models from ``nnx.eval_shape`` too (nothing is read)."""
    layout = _layout(model)
    return {_haiku_name(layout, tuple(path)): (tuple(path), tuple(var.get_value().shape))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def head_keys(table: Mapping[Key, tuple[tuple, Any]], model: nnx.Module) -> list[Key]:
    """The keys of ``table`` ({checkpoint name: (NNX path, shape)}, any format) whose NNX path lies
    under ``model``'s head (``Variant.head``); [] if it declares none. A declared head without
    parameters is a ``CheckpointError``."""
    v = registry.variant_of(model)
    head = v.head_path
    keys = [k for k, (path, _) in table.items() if tuple(str(p) for p in path[:len(head)]) == head]
    if head and not keys:
        raise CheckpointError(f"model {type(model).__name__} (family {v.family!r}): its head {v.head!r} "
                              "(Variant.head) holds no parameters")
    return keys


def classes_of_head(model: nnx.Module, table: Mapping[Key, tuple[tuple, Any]], values: Mapping[Key, Any],
                    source: str) -> int:
    """The class count of a checkpoint's head: the common last axis (w [in, classes], b [classes]) of
    ``values`` (the checkpoint by the names of ``table``, ``model``'s {name: (NNX path, shape)}) at
    ``model``'s head keys."""
    head = head_keys(table, model)
    if not head:
        raise CheckpointError(f"{source}: model {type(model).__name__} declares no head (Variant.head) to infer "
                              "num_classes from; give num_classes")
    name = lambda k: "/".join(k) if isinstance(k, tuple) else str(k)  # noqa: E731
    sizes = {name(k): (np.shape(values[k])[-1] if np.ndim(values[k]) else None) for k in head if k in values}
    if not sizes:
        raise CheckpointError(f"{source}: no head parameter ({', '.join(map(name, head))}) to infer num_classes from")
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise CheckpointError(f"{source}: head parameters disagree on the class count (last axes {sizes})")
    return int(next(iter(sizes.values())))


def to_haiku_tree(model: nnx.Module) -> HaikuTree:
    """Export all parameters as ``{module: {param: np.ndarray}}`` (float32 copies)."""
    tree: HaikuTree = {}
    layout = _layout(model)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        module, param = _haiku_name(layout, tuple(path))
        value = var.get_value()
        tree.setdefault(module, {})[param] = np.array(value)
    return tree


def apply_haiku_tree(model: nnx.Module, tree: Mapping[str, Mapping[str, Any]], *,
                     allow_missing: Iterable[str] = (), source: str = "checkpoint") -> list[str]:
    """Load ``tree`` into ``model`` in place; returns the Haiku modules left at their init.

    Every parameter of the model must be in ``tree`` with the same shape, and every
    entry of ``tree`` must be a parameter of the model, except modules named in
    ``allow_missing`` (Haiku module names, or ``"head"`` for the classifier): those
    keep their initial values if absent or shaped differently. Errors name the parameter.
    """
    table = param_table(model)
    allowed = set()
    for name in allow_missing:
        allowed.update({m for m, _ in head_keys(table, model)} if name == "head" else [name])
    kept: set[str] = set()
    for module, params in tree.items():
        for param in params:
            if (module, param) not in table and module not in allowed:
                raise CheckpointError(f"{source}: unexpected parameter {module}/{param} "
                                      f"(not in {type(model).__name__})")
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for (module, param), (path, shape) in table.items():
        value = tree.get(module, {}).get(param)
        if value is None or tuple(np.shape(value)) != shape:
            if module in allowed:
                kept.add(module)
                continue
            if value is None:
                raise CheckpointError(f"{source}: missing parameter {module}/{param} (shape {shape})")
            raise CheckpointError(f"{source}: parameter {module}/{param} has shape "
                                  f"{tuple(np.shape(value))}, model expects {shape}")
        var = flat[path]
        var.set_value(jnp.asarray(checked_weight(value, f"{source}: {module}/{param}"), dtype=var.get_value().dtype))
    nnx.update(model, state)
    return sorted(kept)


def pure_to_haiku_tree(model: nnx.Module, pure: Mapping) -> HaikuTree:
    """A nested pure-dict NNX state (as orbax restores it, list indices possibly as
    strings) -> Haiku tree."""
    tree: HaikuTree = {}
    layout = _layout(model)

    def walk(node: Any, path: tuple) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, path + (int(k) if isinstance(k, str) and k.isdigit() else k,))
        else:
            module, param = _haiku_name(layout, path)
            tree.setdefault(module, {})[param] = np.asarray(node)

    walk(pure, ())
    return tree


# --------------------------------------------------------------- restricted pickle

class HaikuMappingStandIn(dict):
    """Local stand-in for ``haiku._src.data_structures.FlatMapping`` / ``FlatMap``
    (pickled as ``FlatMapping(dict)``); a plain dict."""

    def __setstate__(self, state: Any) -> None:
        if state:
            raise CheckpointError("Haiku FlatMapping with unsupported pickled state "
                                  f"(keys {sorted(state) if isinstance(state, dict) else type(state)})")


def _create_array(f: Any, args: tuple, state: Any, npdict: Any = None) -> np.ndarray:
    """dill's ``_create_array``: ``f(*args).__setstate__(state)``; ``f`` is itself
    resolved through the whitelist, and array ``__dict__`` extras are refused."""
    if f is not _NP_RECONSTRUCT:
        raise CheckpointError(f"dill _create_array with non-array builder {f!r}")
    if npdict:
        raise CheckpointError("dill _create_array with an array __dict__ is not supported")
    array = f(*args)
    array.__setstate__(state)
    return array


_DILL_TYPES = {"DictType": dict, "ListType": list, "TupleType": tuple}


def _load_type(name: str) -> type:
    """dill's ``_load_type`` restricted to plain container types."""
    if name not in _DILL_TYPES:
        raise CheckpointError(f"forbidden dill type {name!r} in checkpoint")
    return _DILL_TYPES[name]


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin1 text only)."""
    if not isinstance(text, str) or encoding != "latin1":
        raise CheckpointError(f"forbidden _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


_NP_RECONSTRUCT = _np_multiarray._reconstruct

_SAFE_GLOBALS: dict[tuple[str, str], Any] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _SAFE_GLOBALS[(_mod, "_reconstruct")] = _NP_RECONSTRUCT
    _SAFE_GLOBALS[(_mod, "scalar")] = _np_multiarray.scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _SAFE_GLOBALS[(_mod, "_frombuffer")] = _np_numeric._frombuffer
_SAFE_GLOBALS.update({
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): dict,
    ("builtins", "dict"): dict,
    ("_codecs", "encode"): _codecs_encode,
    ("dill._dill", "_create_array"): _create_array,
    ("dill.dill", "_create_array"): _create_array,
    ("dill._dill", "_load_type"): _load_type,
    ("dill.dill", "_load_type"): _load_type,
})
for _mod in ("haiku._src.data_structures", "haiku.data_structures"):
    for _name in ("FlatMapping", "FlatMap"):
        _SAFE_GLOBALS[(_mod, _name)] = HaikuMappingStandIn


#: The only objects a BUILD opcode may act on (through their own ``__setstate__``).
_BUILDABLE = (np.ndarray, np.dtype, HaikuMappingStandIn)
#: The only containers SETITEM(S) / APPEND(S) may fill (exact types, not subclasses).
_MAPPINGS = (dict, HaikuMappingStandIn)
_SEQUENCES = (list,)


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Unpickler that resolves only whitelisted globals and builds only data (see module docstring).

    Based on the pure-Python unpickler so that the opcodes that mutate objects can be checked:
    BUILD is allowed only on a numpy array/dtype or a Haiku mapping stand-in (never on a class
    or function, e.g. to set ``__defaults__`` of a whitelisted builder), SETITEM(S) only on a
    dict, APPEND(S) only on a list; ADDITEMS (sets), INST and OBJ are refused. Any refusal is a
    ``CheckpointError`` raised before the object is touched.
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(f"checkpoint references forbidden global {module}.{name}; "
                                  "refusing to load (only numpy arrays and dicts are allowed)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"checkpoint uses a persistent id {pid!r}; refusing to load")

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, type) or not isinstance(inst, _BUILDABLE):
            raise CheckpointError(f"pickle BUILD on a {type(inst).__name__} ({inst!r:.60}) refused: only numpy "
                                  "arrays, dtypes and Haiku mappings may be built")
        inst.__setstate__(state)
    dispatch[pickle.BUILD[0]] = load_build

    def _check_target(self, target: Any, allowed: tuple[type, ...], opcode: str) -> None:
        if type(target) not in allowed:
            raise CheckpointError(f"pickle {opcode} on a {type(target).__name__} refused: only "
                                  f"{'/'.join(t.__name__ for t in allowed)} may be filled")

    def load_setitem(self) -> None:
        self._check_target(self.stack[-3], _MAPPINGS, "SETITEM")
        super().load_setitem()
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._check_target(self.stack[-1], _MAPPINGS, "SETITEMS")
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_append(self) -> None:
        self._check_target(self.stack[-2], _SEQUENCES, "APPEND")
        super().load_append()
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._check_target(self.stack[-1], _SEQUENCES, "APPENDS")
        self.stack[-1].extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def _refuse(self, opcode: str) -> None:
        raise CheckpointError(f"pickle opcode {opcode} refused in a checkpoint")

    dispatch[pickle.ADDITEMS[0]] = lambda self: self._refuse("ADDITEMS")
    dispatch[pickle.INST[0]] = lambda self: self._refuse("INST")
    dispatch[pickle.OBJ[0]] = lambda self: self._refuse("OBJ")


def checked_weight(value: Any, where: str) -> np.ndarray:
    """`value` as an array if it is numeric (bool, int or float, bfloat16 included) and finite;
    CheckpointError naming `where` otherwise (string/object arrays, NaN or inf weights would fail
    much later, or train until update 1 and then blame the learning rate)."""
    a = np.asarray(value)
    if not (a.dtype.kind in "biu" or jnp.issubdtype(a.dtype, jnp.floating)):
        raise CheckpointError(f"{where}: dtype {a.dtype} is not numeric (weights are float, int or bool arrays)")
    if jnp.issubdtype(a.dtype, jnp.floating):
        finite = np.isfinite(a.astype(np.float32))
        if not finite.all():
            raise CheckpointError(f"{where}: {int(finite.size - finite.sum())} non-finite value(s) (NaN or inf) "
                                  f"of {finite.size} in the pre-trained weights")
    return a


def _to_plain(node: Any, where: str) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _to_plain(v, f"{where}/{k}" if where else str(k)) for k, v in node.items()}
    if isinstance(node, (np.ndarray, np.generic)):
        return np.asarray(node)
    raise CheckpointError(f"checkpoint entry {where!r} is a {type(node).__name__}, not an array")


def _check_tree(tree: Any, source: str) -> HaikuTree:
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{source}: top level is a {type(tree).__name__}, expected "
                              "{module_name: {param_name: array}}")
    for module, params in tree.items():
        if not isinstance(params, Mapping):
            raise CheckpointError(f"{source}: module {module!r} holds a {type(params).__name__}, "
                                  "expected {param_name: array}")
        for name, value in params.items():
            if not isinstance(value, (np.ndarray, np.generic)):
                raise CheckpointError(f"{source}: {module}/{name} is not an array")
    return tree  # type: ignore[return-value]


def loads_haiku_pickle(data: bytes, source: str = "<bytes>") -> HaikuTree:
    """Restricted-unpickle a Haiku params pickle -> ``{module: {param: np.ndarray}}``."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data)).load()
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    except Exception as e:  # malformed pickle
        raise CheckpointError(f"{source}: not a readable params pickle ({type(e).__name__}: {e})") from None
    _check_tree(obj, source)
    return _check_tree(_to_plain(obj, ""), source)


def read_haiku_pickle(path: str | os.PathLike) -> HaikuTree:
    """Read a DeepMind ``*_haiku.npz`` (a dill pickle) without dill or haiku."""
    with open(path, "rb") as f:
        return loads_haiku_pickle(f.read(), os.fspath(path))


def unflatten(flat: Mapping[str, Any], source: str = "<flat>") -> HaikuTree:
    """``{"NFNet/~/stem_conv0/w": a}`` -> ``{"NFNet/~/stem_conv0": {"w": a}}``."""
    tree: HaikuTree = {}
    for key, value in flat.items():
        if "/" not in key:
            raise CheckpointError(f"{source}: key {key!r} is not of the form module/param")
        module, param = key.rsplit("/", 1)
        tree.setdefault(module, {})[param] = np.asarray(value)
    return tree


def flatten(tree: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Inverse of ``unflatten``."""
    return {f"{m}/{p}": np.asarray(v) for m, params in tree.items() for p, v in params.items()}


def read_npz(path: str | os.PathLike | io.BytesIO, source: str | None = None) -> HaikuTree:
    """Read a flat ``.npz`` of ``module/param`` keys (no pickles allowed); ``source`` names it in errors."""
    source = source or os.fspath(path)  # type: ignore[arg-type]
    try:
        with np.load(path, allow_pickle=False) as data:
            flat = {k: data[k] for k in data.files}
    except ValueError as e:
        raise CheckpointError(f"{source}: npz holds object arrays or is malformed ({e})") from None
    return unflatten(flat, source)


def read_orbax(path: str | os.PathLike, model: nnx.Module | None = None) -> HaikuTree:
    """Read an orbax checkpoint with ``params`` (and optional ``state``) entries, or the bare
    ``WORKDIR/checkpoints/<step>/params`` item of a dpft training run (e.g. public pre-training).

    ``params`` may be a Haiku tree (keys with ``/``) or the model's pure NNX state
    (then ``model`` is needed for the names). A non-empty ``state`` is merged in.
    A remote directory (``gs://...``) is downloaded through etils.epath into a private
    temporary directory first (removed after reading).
    """
    if paths.is_remote(path):
        url = paths.to_str(path).rstrip("/")
        with remote_files.local_copy(url) as local:
            try:
                return read_orbax(local, model)
            except CheckpointError as e:  # name the URL, not the temporary copy
                raise CheckpointError(str(e).replace(local, url)) from None
    import orbax.checkpoint as ocp  # local: orbax is slow to import

    path = os.path.abspath(os.fspath(path))
    try:
        restored = ocp.StandardCheckpointer().restore(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot restore orbax checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(restored, Mapping) and "params" not in restored and os.path.basename(path) == "params":
        # the `params` item of a dpft training checkpoint (checkpoints/<step>/params): NNX state, leaves {"value": x}
        unwrap = lambda t: (t["value"] if set(t) == {"value"} else {k: unwrap(v) for k, v in t.items()}  # noqa: E731
                            ) if isinstance(t, Mapping) else t
        restored = {"params": unwrap(restored)}
    if not isinstance(restored, Mapping) or "params" not in restored:
        keys = sorted(restored) if isinstance(restored, Mapping) else type(restored).__name__
        raise CheckpointError(f"{path}: orbax checkpoint has no 'params' entry (found {keys})")
    tree: HaikuTree = {}
    for part in ("params", "state"):
        node = restored.get(part) or {}
        if node and all(isinstance(k, str) and "/" in k for k in node):
            sub = _to_plain(node, part)
        elif node:
            if model is None:
                raise CheckpointError(f"{path}: '{part}' is an NNX state tree; pass the model to map names")
            sub = pure_to_haiku_tree(model, node)
        else:
            sub = {}
        for module, params in sub.items():
            tree.setdefault(module, {}).update(params)
    return _check_tree(tree, path)


def read_checkpoint(path: str | os.PathLike, model: nnx.Module | None = None) -> HaikuTree:
    """Read any supported checkpoint (format from the content, not the name); local, or remote
    (``gs://...``: files read through etils.epath, orbax directories downloaded first)."""
    p = paths.to_str(path)
    if paths.isdir(p):
        return read_orbax(p, model)
    if not paths.isfile(p):
        raise CheckpointError(f"checkpoint {p!r} does not exist")
    if paths.is_remote(p):
        data = remote_files.read_bytes(p)
        if zipfile.is_zipfile(io.BytesIO(data)):
            return read_npz(io.BytesIO(data), p)
        if data[:1] == b"\x80":
            return loads_haiku_pickle(data, p)
    else:
        with open(p, "rb") as f:
            head = f.read(4)
        if zipfile.is_zipfile(p):
            return read_npz(p)
        if head[:1] == b"\x80":
            return read_haiku_pickle(p)
    raise CheckpointError(f"{p}: unknown checkpoint format (neither pickle, npz nor orbax directory)")


def write_haiku_pickle(tree: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write the DeepMind layout as a plain pickle (nested dicts of numpy arrays)."""
    plain = {m: {p: np.array(v) for p, v in params.items()} for m, params in tree.items()}
    atomic_io.write_bytes(path, lambda f: pickle.dump(plain, f, protocol=4))


def write_npz(tree: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write a flat ``.npz`` of ``module/param`` keys."""
    atomic_io.write_bytes(path, lambda f: np.savez(f, **flatten(tree)))


def save_model(model: nnx.Module, path: str | os.PathLike, fmt: str = "pickle") -> None:
    """Export ``model``'s parameters: ``fmt`` "pickle" (Haiku layout) or "npz" (flat)."""
    writers = {"pickle": write_haiku_pickle, "npz": write_npz}
    if fmt not in writers:
        raise CheckpointError(f"unknown export format {fmt!r}; use pickle or npz")
    writers[fmt](to_haiku_tree(model), path)


def load_into(model: nnx.Module, path: str | os.PathLike, *,
              allow_missing: Iterable[str] = ()) -> list[str]:
    """Read ``path`` and load it into ``model`` in place; returns modules kept at init."""
    return apply_haiku_tree(model, read_checkpoint(path, model), allow_missing=allow_missing,
                            source=os.fspath(path))


def load_pretrained(path: str | os.PathLike, variant: str, num_classes: int | None, *, allow_missing: Iterable[str],
                    seed: int, dtype: Any, **overrides: Any) -> nnx.Module:
    """`dpft.models.load_pretrained` for a Haiku pickle, flat npz or orbax checkpoint (the default
    ``Variant.checkpoint_loader``): names from ``Variant.haiku``, the head from ``Variant.head``."""
    source = os.fspath(path)
    probe = nnx.eval_shape(lambda: registry.create(variant, 1, seed=seed, dtype=dtype, **overrides))
    tree = read_checkpoint(path, probe)
    if num_classes is None:
        values = {(m, p): v for m, params in tree.items() for p, v in params.items()}
        num_classes = classes_of_head(probe, param_table(probe), values, source)
    model = registry.create(variant, num_classes, seed=seed, dtype=dtype, **overrides)
    apply_haiku_tree(model, tree, allow_missing=allow_missing, source=source)
    return model
