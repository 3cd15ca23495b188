"""big_vision / AugReg ViT ``.npz`` checkpoints <-> ``dpft.models.vit.ViT``.

A published checkpoint is a flat ``.npz`` whose keys are the '/'-joined Linen parameter
paths of big_vision's ``models/vit.py`` (or of the older ``vit_jax`` AugReg code), e.g.

    embedding/kernel [p, p, C, D]      embedding/bias [D]
    pos_embedding [1, N, D]            cls [1, 1, D]             (pool "tok" only)
    Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias} [D]
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}/kernel [D, H, D/H]
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}/bias [H, D/H]
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/out/kernel [H, D/H, D], out/bias [D]
    Transformer/encoderblock_{i}/LayerNorm_1/{scale,bias}
    Transformer/encoderblock_{i}/MlpBlock_0/Dense_{0,1}/{kernel,bias}
    Transformer/encoder_norm/{scale,bias}      head/kernel [D, classes], head/bias [classes]

Variants read (normalised in ``normalise`` before matching, as big_vision's ``load`` does):
a ``params/`` or ``opt/target/`` prefix (training checkpoints); bfloat16 stored as 2-byte
void; a scanned encoder (``Transformer/encoderblock/...`` stacked on axis 0); pre-Linen
numbering (``LayerNorm_2``, ``MultiHeadDotProductAttention_1``, ``MlpBlock_3``: renumbered per
module type); the position embedding under ``Transformer/posembed_input`` or ``Transformer``;
a position embedding with the class token's entry first (N = g^2 + 1; folded into ``cls``,
which is exact since both are added before the encoder); a ``pre_logits`` layer (dropped
with the head, with a warning: dpft's ViT has none).

The model's position-embedding grid may differ from the checkpoint's (another image size):
it is resampled bilinearly with aligned corners (``resample_posemb``, as big_vision).
"""
from __future__ import annotations

import io
import logging
import os
import re
import zipfile
from typing import Any, Iterable, Mapping

import numpy as np
import jax.numpy as jnp
from flax import nnx

from dpft import atomic_io, paths, remote_files
from dpft.models import registry
from dpft.models.checkpoints import CheckpointError, checked_weight, classes_of_head, head_keys
from dpft.models.vit import ViT

log = logging.getLogger(__name__)

_BLOCK_NAMES = {"norm_0": "LayerNorm_0", "norm_1": "LayerNorm_1", "attention": "MultiHeadDotProductAttention_0",
                "mlp_0": "MlpBlock_0/Dense_0", "mlp_1": "MlpBlock_0/Dense_1"}
_TOP_NAMES = {("pos_embedding", "embedding"): "pos_embedding", ("cls_token", "token"): "cls"}


def bv_name(path: tuple) -> str:
    """NNX parameter path of a ``ViT`` -> big_vision key, e.g. ``('blocks', 3, 'mlp_0', 'kernel')``
    -> ``Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel``."""
    path = tuple(str(p) for p in path)
    if path in _TOP_NAMES:
        return _TOP_NAMES[path]
    if path[0] == "blocks":
        return "/".join((f"Transformer/encoderblock_{path[1]}", _BLOCK_NAMES[path[2]]) + path[3:])
    if path[0] == "encoder_norm":
        return "/".join(("Transformer",) + path)
    if path[0] in ("embedding", "head"):
        return "/".join(path)
    raise CheckpointError(f"no big_vision name for ViT parameter {'.'.join(path)}")


def param_table(model: ViT) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """{big_vision key: (NNX path, shape)} of every parameter (abstract models work too)."""
    return {bv_name(tuple(path)): (tuple(path), tuple(var.get_value().shape))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def to_flat(model: ViT) -> dict[str, np.ndarray]:
    """All parameters as ``{big_vision key: float32 array}`` (the published layout)."""
    return {bv_name(tuple(path)): np.asarray(var.get_value(), np.float32)
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_npz(model: ViT, path: str | os.PathLike) -> None:
    """Write ``model`` as a big_vision ``.npz`` (flat '/'-joined keys, no prefix)."""
    flat = to_flat(model)
    atomic_io.write_bytes(path, lambda f: np.savez(f, **flat))


# --------------------------------------------------------------------------- reading

def read_flat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The raw ``{key: array}`` of a ``.npz`` (no pickles); errors name the file."""
    p = paths.to_str(path)
    if not paths.isfile(p):
        raise CheckpointError(f"checkpoint {p!r} does not exist")
    source: Any = io.BytesIO(remote_files.read_bytes(p)) if paths.is_remote(p) else p  # gs://: through epath
    if not zipfile.is_zipfile(source):
        raise CheckpointError(f"{p}: not an .npz (zip) file; ViT checkpoints are big_vision .npz files")
    if isinstance(source, io.BytesIO):
        source.seek(0)  # is_zipfile read from the end
    try:
        with np.load(source, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as e:
        raise CheckpointError(f"{p}: npz holds object arrays or is malformed ({e})") from None


def _strip_prefix(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in ("params/", "opt/target/"):
        if any(k.startswith(prefix) for k in flat):
            return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    return flat


def _to_float32(key: str, value: np.ndarray, source: str) -> np.ndarray:
    if value.dtype.kind == "V" and value.dtype.itemsize == 2:  # numpy saves bfloat16 as void
        value = value.view(jnp.bfloat16)
    if value.dtype.kind != "f" and value.dtype != jnp.bfloat16:
        raise CheckpointError(f"{source}: {key} has dtype {value.dtype}, expected floating point")
    return np.asarray(value, np.float32)


def _unstack_scan(flat: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """``Transformer/encoderblock/<rest>`` [depth, ...] -> ``Transformer/encoderblock_{i}/<rest>``."""
    prefix = "Transformer/encoderblock/"
    stacked = {k: v for k, v in flat.items() if k.startswith(prefix)}
    if not stacked:
        return flat
    depths = {v.shape[0] if v.ndim else None for v in stacked.values()}
    if len(depths) != 1 or None in depths:
        raise CheckpointError(f"{source}: scanned encoder blocks disagree on depth ({sorted(map(str, depths))})")
    out = {k: v for k, v in flat.items() if not k.startswith(prefix)}
    for k, v in stacked.items():
        for i in range(v.shape[0]):
            out[f"Transformer/encoderblock_{i}/{k[len(prefix):]}"] = v[i]
    return out


_NUMBERED = re.compile(r"^(.*)_(\d+)$")


def _renumber(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pre-Linen names (one counter across module types) -> Linen's per-type counters: under each
    parent, the ``Type_k`` children of one type are renumbered 0, 1, ... in order of k. Idempotent."""
    children: dict[tuple[str, ...], set[str]] = {}
    for key in flat:
        parts = key.split("/")
        for depth in range(len(parts) - 1):
            children.setdefault(tuple(parts[:depth]), set()).add(parts[depth])
    rename: dict[tuple[tuple[str, ...], str], str] = {}
    for parent, names in children.items():
        by_type: dict[str, list[tuple[int, str]]] = {}
        for name in names:
            m = _NUMBERED.match(name)
            if m:
                by_type.setdefault(m.group(1), []).append((int(m.group(2)), name))
        for kind, numbered in by_type.items():
            for new, (_, old) in enumerate(sorted(numbered)):
                rename[(parent, old)] = f"{kind}_{new}"
    out = {}
    for key, value in flat.items():
        parts = key.split("/")
        new_parts = [rename.get((tuple(parts[:d]), p), p) if d < len(parts) - 1 else p
                     for d, p in enumerate(parts)]
        out["/".join(new_parts)] = value
    return out


def normalise(flat: Mapping[str, np.ndarray], source: str = "<checkpoint>") -> dict[str, np.ndarray]:
    """A published ViT ``.npz``'s ``{key: array}`` -> big_vision's current layout, float32 arrays
    (see the module docstring for the variants handled)."""
    flat = _strip_prefix(dict(flat))
    flat = {k: _to_float32(k, np.asarray(v), source) for k, v in flat.items()}
    flat = _renumber(_unstack_scan(flat, source))
    for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
        if old in flat:
            if "pos_embedding" in flat:
                raise CheckpointError(f"{source}: both {old} and pos_embedding present")
            flat["pos_embedding"] = flat.pop(old)
    pe = flat.get("pos_embedding")
    if pe is not None:
        if pe.ndim != 3 or pe.shape[0] != 1:
            raise CheckpointError(f"{source}: pos_embedding has shape {pe.shape}, expected [1, N, D]")
        n = pe.shape[1]
        if int(round(np.sqrt(n - 1))) ** 2 == n - 1 and n > 1:  # class-token entry first
            pe_cls, flat["pos_embedding"] = pe[:, :1], pe[:, 1:]
            if "cls" in flat:
                flat["cls"] = flat["cls"] + pe_cls
    return flat


def resample_posemb(posemb: np.ndarray, grid: int) -> np.ndarray:
    """[1, g*g, D] -> [1, grid*grid, D]: bilinear with aligned corners (output row i samples input
    row i (g-1)/(grid-1)), as big_vision's ``resample_posemb`` (``scipy.ndimage.zoom``, order 1)."""
    _, n, d = posemb.shape
    g = int(round(np.sqrt(n)))
    if g * g != n:
        raise CheckpointError(f"pos_embedding with {n} tokens is not a square grid")
    if g == grid:
        return posemb
    old = posemb.reshape(g, g, d).astype(np.float64)

    def weights(size_in: int, size_out: int) -> np.ndarray:  # [size_out, size_in] interpolation matrix
        pos = np.arange(size_out) * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
        lo = np.clip(np.floor(pos).astype(int), 0, size_in - 1)
        hi = np.minimum(lo + 1, size_in - 1)
        frac = pos - lo
        w = np.zeros((size_out, size_in))
        np.add.at(w, (np.arange(size_out), lo), 1.0 - frac)
        np.add.at(w, (np.arange(size_out), hi), frac)
        return w

    w = weights(g, grid)
    new = np.einsum("ia,jb,abd->ijd", w, w, old)
    return new.reshape(1, grid * grid, d).astype(posemb.dtype)


# --------------------------------------------------------------------------- loading

def apply_flat(model: ViT, flat: Mapping[str, np.ndarray], *, allow_missing: Iterable[str] = ("head",),
               source: str = "checkpoint") -> list[str]:
    """Load a ``normalise``d checkpoint into ``model`` in place; returns the keys left at their init.

    Every parameter must be present with the model's shape, except: the head (``"head"`` in
    ``allow_missing``: kept at its init, zeros by default, when absent or of another class count;
    a checkpoint ``pre_logits`` layer is then dropped too) and the position embedding (resampled
    to the model's grid). Any other missing, mis-shaped or unexpected key raises
    ``CheckpointError`` naming the file and the key.
    """
    allow_head = "head" in set(allow_missing)
    table = param_table(model)
    flat = dict(flat)
    kept: list[str] = []
    head = head_keys(table, model)
    replace_head = allow_head and any(k not in flat or flat[k].shape != table[k][1] for k in head)
    pre_logits = sorted(k for k in flat if k.startswith("pre_logits/"))
    if pre_logits:
        if not replace_head:
            raise CheckpointError(f"{source}: has a pre_logits layer ({pre_logits[0]}) that dpft's ViT lacks; "
                                  "load it with a new head (another num_classes)")
        log.warning("%s: dropping the checkpoint's pre_logits layer with its head", source)
        for k in pre_logits:
            del flat[k]
    unexpected = sorted(set(flat) - set(table))
    if unexpected:
        hint = " (the model has pool_type='gap'; the checkpoint has a class token)" if "cls" in unexpected else ""
        raise CheckpointError(f"{source}: unexpected parameter {unexpected[0]}{hint} "
                              f"({len(unexpected)} not in the ViT)")
    state = nnx.state(model, nnx.Param)
    variables = dict(nnx.to_flat_state(state))
    for key, (path, shape) in table.items():
        if key in head and replace_head:
            kept.append(key)
            continue
        if key not in flat:
            raise CheckpointError(f"{source}: missing parameter {key} (model expects shape {shape})")
        value = checked_weight(flat[key], f"{source}: {key}")
        if key == "pos_embedding" and value.shape != shape and value.ndim == 3 and value.shape[2] == shape[2]:
            value = resample_posemb(value, int(round(np.sqrt(shape[1]))))
            log.info("%s: pos_embedding resampled from %s to %s", source, flat[key].shape, shape)
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{source}: parameter {key} has shape {tuple(value.shape)}, "
                                  f"model expects {shape}")
        var = variables[path]
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    nnx.update(model, state)
    return kept


def load_pretrained(path: str | os.PathLike, variant: str, num_classes: int | None, *, allow_missing: Iterable[str],
                    seed: int, dtype: Any, **overrides: Any) -> nnx.Module:
    """`dpft.models.load_pretrained` for a big_vision/AugReg ViT `.npz` (the variants' checkpoint_loader)."""
    source = os.fspath(path)
    flat = normalise(read_flat(source), source)
    if num_classes is None:
        probe = nnx.eval_shape(lambda: registry.create(variant, 1, seed=seed, dtype=dtype, **overrides))
        num_classes = classes_of_head(probe, param_table(probe), flat, source)
    model = registry.create(variant, num_classes, seed=seed, dtype=dtype, **overrides)
    apply_flat(model, flat, allow_missing=allow_missing, source=source)
    return model
