"""Book-keeping taps for standard Flax NNX layers, without changing the user's model code.

`install(module, recorder)` is called by `dpft.privacy.adapters.nnx_loss_fn` on the module it
merges inside the engine's traced function (never on the user's object). Besides the taps of
dpft's own layers (`dpft.nn.taps.install`) it swaps the class of every plain ``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Embed``, ``nnx.LayerNorm`` and ``nnx.RMSNorm``
instance of that merged graph for a subclass whose ``__call__`` goes through the
recorder (op "call", kinds "nnx_dense", "nnx_conv", "nnx_embed", "nnx_norm", the layer's
configuration in ``OpSpec.layer``). Norm layers are tapped so that their scale and bias gradients
are row reductions of (xhat, d) in `dpft.privacy.bk_layers` rather than parameter perturbations
inside the per-example ``vmap``, where the size-1 augmult axis makes XLA:CPU's fused
multiply-reductions 10-15x slower. The output is the
layer's own ``__call__`` (flax's code, with the recorder's parameter values), so the forward
pass is unchanged. A layer with options the engine's formulas do not cover (a custom
``dot_general``, a kernel ``mask``, ``input_dilation``, ``batch_axis``, a one-row embedding, extra
call arguments, a norm whose statistics span a call's axis 0 or devices (``axis_name``) or whose
features are not the trailing axes) is left untapped: its parameters are then "free" parameters (see
`dpft.nn.taps`), whose per-example gradients the engine reads off parameter perturbations.
``nnx.BatchNorm`` mixes the examples of a batch and is refused (ValueError naming the layer).
No global state: the swapped classes are cached subclasses; only the merged objects change.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx
from flax.nnx.nn import linear as nnx_linear

from dpft.nn import taps

Array = jax.Array
_OP = "call"


@dataclasses.dataclass(frozen=True)
class Dense:
    """nnx.Linear / nnx.LinearGeneral: ``in_axes`` are the contracted axes of one call's input
    (non-negative, sorted, in the kernel's order); the kernel is [*in dims, *out dims]."""

    in_axes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Conv:
    """nnx.Conv (channels last, kernel [*k, in/groups, out]): ``pre_pad`` (mode, pairs) is the
    padding flax applies before a VALID convolution (CIRCULAR, REFLECT, CAUSAL) or None;
    ``pads`` the explicit lax padding pairs of the spatial dims after that."""

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    groups: int
    pre_pad: tuple[str, tuple[tuple[int, int], ...]] | None = None


@dataclasses.dataclass(frozen=True)
class Embed:
    """nnx.Embed: table [num_embeddings, features]; inputs are integer indices."""

    num_embeddings: int


@dataclasses.dataclass(frozen=True)
class Norm:
    """nnx.LayerNorm / nnx.RMSNorm: the layer's output is xhat * scale + bias with
    scale and bias acting on the ``features`` trailing elements of each position, and xhat the
    layer's parameter-free normalisation of its input. ``normalized(x)``: that xhat in float32
    (the layer's own code with scale 1, bias 0 and float32 compute) for inputs shaped like one
    call's, batched along axis 0 (the layer's statistics never span axis 0)."""

    features: int
    normalized: Callable[[Array], Array] = dataclasses.field(compare=False, repr=False)


def _tuple(x: Any, n: int) -> tuple[int, ...]:
    if x is None:
        x = 1
    return (int(x),) * n if isinstance(x, int) else tuple(int(v) for v in x)


def _conv_config(m: nnx.Conv, x: Array) -> Conv | None:
    k = tuple(m.kernel_size)
    nd = len(k)
    if (m.mask is not None or m.conv_general_dilated is not lax.conv_general_dilated
            or any(d != 1 for d in _tuple(m.input_dilation, nd))):
        return None
    strides, dil = _tuple(m.strides, nd), _tuple(m.kernel_dilation, nd)
    spatial = tuple(x.shape[x.ndim - nd - 1:-1])
    padding = nnx_linear.canonicalize_padding(m.padding, nd)
    pre_pad = None
    dilated = [(kk - 1) * d + 1 for kk, d in zip(k, dil)]
    if padding in ("CIRCULAR", "REFLECT"):
        pre = tuple(((kd - 1) // 2, kd // 2) for kd in dilated)
        pre_pad = ({"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding], pre)
        padding = "VALID"
    elif padding == "CAUSAL":
        if nd != 1:
            return None
        pre_pad = ("constant", ((dil[0] * (k[0] - 1), 0),))
        padding = "VALID"
    if pre_pad is not None:
        spatial = tuple(s + lo + hi for s, (lo, hi) in zip(spatial, pre_pad[1]))
    if isinstance(padding, str):
        pads = tuple(tuple(p) for p in lax.padtype_to_pads(spatial, dilated, strides, padding))
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return Conv(k, strides, dil, pads, int(m.feature_group_count), pre_pad)


def _axes(axes: Any, ndim: int) -> tuple[int, ...]:
    return tuple(sorted(int(a) % ndim for a in (axes if isinstance(axes, (tuple, list)) else (axes,))))


def _normalized(m: nnx.Module, x: Array) -> Array:
    """xhat of norm layer ``m`` at x: its own ``__call__`` in float32 with scale 1, bias 0."""
    base = type(m).__dict__.get("_dpft_base", type(m))
    unit = {name: fill(getattr(m, name).shape, jnp.float32)
            for name, fill in (("scale", jnp.ones), ("bias", jnp.zeros)) if getattr(m, name, None) is not None}
    return _call_with(m, base.__call__, unit, x.astype(jnp.float32), dtype=jnp.float32)


def _norm_config(m: nnx.Module, x: Array) -> Norm | None:
    """Norm layers whose scale/bias act on trailing features and whose statistics stay inside one
    position of axis 0 (no cross-device ``axis_name``); else None (untapped)."""
    if getattr(m, "axis_name", None) is not None:
        return None
    feature, reduction = _axes(m.feature_axes, x.ndim), _axes(m.reduction_axes, x.ndim)
    if 0 in reduction or feature != tuple(range(x.ndim - len(feature), x.ndim)):
        return None
    return Norm(math.prod(int(x.shape[a]) for a in feature), functools.partial(_normalized, m))


def layer_config(m: nnx.Module, args: tuple, kwargs: dict) -> tuple[str, Any] | None:
    """(kind, configuration) of a call of a standard layer the engine taps, or None (untapped)."""
    if len(args) != 1 or any(v is not None for v in kwargs.values()) or not isinstance(args[0], jax.Array):
        return None
    x = args[0]
    base = type(m).__dict__.get("_dpft_base", type(m))
    if base is nnx.Linear:
        if m.dot_general not in (None, lax.dot_general):
            return None
        return "nnx_dense", Dense((x.ndim - 1,))
    if base is nnx.LinearGeneral:
        if m.batch_axis or m.dot_general not in (None, lax.dot_general) or m.dot_general_cls is not None:
            return None
        return "nnx_dense", Dense(tuple(sorted(a % x.ndim for a in m.axis)))
    if base is nnx.Conv:
        cfg = _conv_config(m, x)
        return None if cfg is None else ("nnx_conv", cfg)
    if base is nnx.Embed:
        if m.num_embeddings <= 1 or not jax.numpy.issubdtype(x.dtype, jax.numpy.integer):
            return None
        return "nnx_embed", Embed(int(m.num_embeddings))
    if base in NORM_TYPES:
        if all(getattr(m, n, None) is None for n in PARAM_NAMES[base]):
            return None
        cfg = _norm_config(m, x)
        return None if cfg is None else ("nnx_norm", cfg)
    return None


#: Tapped norm layers. nnx.GroupNorm stays a free-parameter layer: on a GroupNorm CNN (32x32, 8
#: channels) its tapped route (xhat again, reductions over [m, H*W, C]) cost 10-15% of the step,
#: the perturbations' reductions inside the tap pass nothing measurable (benchmarks/README.md).
NORM_TYPES = (nnx.LayerNorm, nnx.RMSNorm)
TAPPED_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Embed) + NORM_TYPES
PARAM_NAMES = {nnx.Linear: ("kernel", "bias"), nnx.LinearGeneral: ("kernel", "bias"),
               nnx.Conv: ("kernel", "bias"), nnx.Embed: ("embedding",), nnx.LayerNorm: ("scale", "bias"),
               nnx.RMSNorm: ("scale",)}


def _call_with(m: nnx.Module, call: Any, p: dict[str, Array], x: Array, **attrs: Any) -> Array:
    """``call(m', x)`` for a shallow copy m' of ``m`` whose parameters are ``p`` (new ``nnx.Param``
    objects: NNX forbids mutating variables created at another trace level) and whose other
    attributes ``attrs`` (e.g. ``dtype``) are replaced."""
    clone = object.__new__(type(m).__dict__.get("_dpft_base", type(m)))
    clone.__dict__.update(m.__dict__)
    clone.__dict__.pop(taps._ATTR, None)
    for n, v in p.items():
        object.__setattr__(clone, n, nnx.Param(v))
    for n, v in attrs.items():
        object.__setattr__(clone, n, v)
    return call(clone, x)


def _tapped_call(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
    base = type(self)._dpft_base
    slot = self.__dict__.get(taps._ATTR)
    conf = layer_config(self, args, kwargs) if slot is not None else None
    if conf is None:
        return base.__call__(self, *args, **kwargs)
    recorder, path = slot
    key = taps.op_key(path, _OP)
    if recorder.mode == "record" and key not in recorder.perturbations:
        return base.__call__(self, *args, **kwargs)
    if key in recorder.specs or key in recorder.inputs:
        raise ValueError(f"bookkeeping: layer {'/'.join(map(str, path)) or '<root>'} ({base.__name__}) is called "
                         "twice in one forward pass: its parameters are used twice (weight sharing), which the "
                         "book-keeping engine does not support; use grad_method='vmap'")
    kind, cfg = conf
    names = tuple(n for n in PARAM_NAMES[base] if getattr(self, n, None) is not None)
    params = {n: getattr(self, n)[...] for n in names}
    fn = functools.partial(_call_with, self, base.__call__)
    return recorder(path, _OP, kind, fn, params, args[0], layer=cfg)


@functools.lru_cache(maxsize=None)
def _tapped_class(cls: type) -> type:
    return type(cls.__name__, (cls,), {"__call__": _tapped_call, "_dpft_base": cls, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def install(module: nnx.Module, recorder: taps.Recorder) -> None:
    """`taps.install` plus the taps of standard layers (module doc) on a module merged inside the
    traced function. Raises ValueError naming an ``nnx.BatchNorm`` layer."""
    taps.install(module, recorder)
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.BatchNorm):
            raise ValueError(f"bookkeeping: layer {'/'.join(map(str, path)) or '<root>'} is an nnx.BatchNorm, "
                             "which mixes the examples of a batch (no per-example gradients); use GroupNorm/"
                             "LayerNorm, or grad_method='vmap' (which normalises each example alone)")
        if type(node) in TAPPED_TYPES:
            object.__setattr__(node, "__class__", _tapped_class(type(node)))


__all__ = ["install", "layer_config", "Dense", "Conv", "Embed", "Norm", "TAPPED_TYPES", "NORM_TYPES"]
