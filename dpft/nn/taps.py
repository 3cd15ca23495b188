"""Layer taps: how a model shows the book-keeping engine each parameterised op.

A *tapped op* is a pure function ``fn(params: {name: Array}, x: Array) -> z`` that a module
applies to its input, ``params`` being (casts of) the module's own ``nnx.Param`` values. Rows
of ``x`` must be independent (row r of ``z`` depends on row r of ``x`` only; true of every
dpft layer, false of BatchNorm). Layers call ``tap(self, op, kind, fn, params, x)`` where
they would call ``fn(params, x)``:

* no recorder installed (normal use): returns ``fn(params, x)``, nothing else happens;
* a ``Recorder`` installed by ``install`` (``dpft.privacy.bookkeeping`` does this on a freshly
  merged module inside its traced function): in "discover" mode it notes an ``OpSpec`` (which
  params the op uses, output shape, the function); in "record" mode it keeps ``x`` and returns
  ``fn(params, x) + perturbation``, so the gradient w.r.t. the (zero) perturbation is the
  gradient w.r.t. the op's output.

``kind`` tells the engine how to get per-example gradient norms from (x, dL/dz):
"ws_conv" (``ops.ws_conv``), "linear" (``ops.linear``), or "generic" (any small op: the
engine materialises its per-example parameter gradients with a local vmap). Standard flax
layers (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Embed``, ``nnx.LayerNorm``,
``nnx.RMSNorm``) are tapped without changing their code by
`dpft.nn.nnx_layers.install`, with kinds "nnx_dense", "nnx_conv", "nnx_embed" and "nnx_norm" and
the layer's configuration in ``OpSpec.layer``.
No global state: the recorder lives on the module objects of one trace.

Two more services of the recorder, used by the engine's discovery and recording passes:
``tap_params`` {param path: value} (discover mode): taps compute with these values instead of
the module's own, so a parameter read *outside* its tap shows up as a separate use (the engine
refuses it); ``param_perturbations`` {param path: Array} (record mode): added to those
parameters before the model is built (`dpft.privacy.adapters.nnx_loss_fn`), for parameters
used outside any tapped op ("free" parameters: class tokens, position embeddings, unknown
layers), whose per-example gradient is then the gradient w.r.t. the
perturbation.

``frozen`` {param path} (both modes): an op whose parameters are all frozen (`dpft.nn.partition`) is
not tapped at all: it computes ``fn(params, x)`` with the module's own values and is listed in
``skipped``. An op with frozen and trainable parameters is tapped if its kind has a route for that
(``PARTIAL_ROUTES``: a "ws_conv" whose kernel ``w`` is frozen, its ``bias`` (and ``gain``) trained, the
NFNet form of "norms_and_head"): its ``OpSpec.param_paths`` name the trainable ones only, and
``OpSpec.frozen_paths`` the others; else it is skipped too, and its trainable parameters are used
outside any tapped op, so the engine treats them as free (exact, but a per-example copy of them).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
from flax import nnx

Array = jax.Array
OpFn = Callable[[Mapping[str, Array], Array], Array]
KINDS = ("ws_conv", "linear", "generic", "nnx_dense", "nnx_conv", "nnx_embed", "nnx_norm")
#: kind -> the parameter names that may be frozen while the others are trained, with a norm route for it.
PARTIAL_ROUTES = {"ws_conv": frozenset({"w", "gain"})}
_ATTR = "_dpft_tap"


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One tapped op. ``key`` = "module/path:op"; ``param_paths`` {param name: full path in the
    params tree}; ``z``: ShapeDtypeStruct of the op's output for ONE example (the perturbation)."""

    key: str
    kind: str
    fn: OpFn
    param_paths: Mapping[str, tuple]
    z: jax.ShapeDtypeStruct
    layer: Any = None  # kinds "nnx_*": the layer's configuration (`dpft.nn.nnx_layers`)
    frozen_paths: Mapping[str, tuple] = dataclasses.field(default_factory=dict)  # {param name: path}: not trained


def op_key(path: tuple, op: str) -> str:
    """"blocks/0/conv1:conv" for module path ('blocks', 0, 'conv1') and op "conv"."""
    return "/".join(str(p) for p in path) + ":" + op


class Recorder:
    """Collects what tapped ops see during one forward pass.

    mode "discover": ``specs`` {key: OpSpec}, in call order; with ``tap_params`` the ops
    compute with those values (by param path). mode "record": needs ``perturbations`` {key:
    Array shaped like z}; fills ``inputs`` {key: x}; ``param_perturbations`` {param path: Array}
    are added to those parameters by the loss function (see the module doc).
    """

    def __init__(self, mode: str, perturbations: Mapping[str, Array] | None = None, *,
                 tap_params: Mapping[tuple, Array] | None = None,
                 param_perturbations: Mapping[tuple, Array] | None = None, frozen: frozenset = frozenset()):
        if mode not in ("discover", "record"):
            raise ValueError(f"Recorder: mode must be 'discover' or 'record', got {mode!r}")
        if mode == "record" and perturbations is None:
            raise ValueError("Recorder: mode 'record' needs perturbations")
        self.mode = mode
        self.perturbations = perturbations
        self.tap_params = tap_params
        self.param_perturbations = dict(param_perturbations or {})
        self.frozen = frozenset(frozen)
        self.skipped: list[str] = []  # keys of the ops not tapped because they use a frozen parameter
        self.specs: dict[str, OpSpec] = {}
        self.inputs: dict[str, Array] = {}

    def __call__(self, path: tuple, op: str, kind: str, fn: OpFn, params: Mapping[str, Array],
                 x: Array, layer: Any = None) -> Array:
        if kind not in KINDS:
            raise ValueError(f"tap {op_key(path, op)}: unknown kind {kind!r}; use one of {KINDS}")
        key = op_key(path, op)
        frozen = {n for n in params if tuple(path) + (n,) in self.frozen}
        if frozen and (frozen == set(params) or not frozen <= PARTIAL_ROUTES.get(kind, frozenset())):
            self.skipped.append(key)
            return fn(params, x)
        if self.mode == "discover" and self.tap_params is not None:
            missing = [n for n in params if tuple(path) + (n,) not in self.tap_params and n not in frozen]
            if missing:
                raise ValueError(f"tap {key}: params {missing} are not nnx.Param attributes of the module "
                                 "(a tap must name the module's own parameters)")
            for n, v in params.items():
                if n in frozen:
                    continue
                full = self.tap_params[tuple(path) + (n,)]
                if tuple(full.shape) != tuple(v.shape):
                    raise ValueError(f"tap {key}: parameter {n} has shape {tuple(v.shape)} in the layer's call but "
                                     f"{tuple(full.shape)} in the model (a layer applied inside nnx.scan/nnx.vmap "
                                     "over stacked parameters?); the book-keeping engine needs each layer called "
                                     "once with its own parameters; use grad_method='vmap'")
            params = {n: v if n in frozen else self.tap_params[tuple(path) + (n,)] for n, v in params.items()}
        z = fn(params, x)
        if key in self.specs or key in self.inputs:
            raise ValueError(f"tap {key}: called twice in one forward pass (weight sharing is not "
                             "supported by the book-keeping engine; use grad_method='vmap')")
        if self.mode == "discover":
            self.specs[key] = OpSpec(key, kind, fn, {n: tuple(path) + (n,) for n in params if n not in frozen},
                                     jax.ShapeDtypeStruct(z.shape, z.dtype), layer,
                                     {n: tuple(path) + (n,) for n in sorted(frozen)})
            return z
        if key not in self.perturbations:
            raise ValueError(f"tap {key}: no perturbation for this op (the model's ops changed "
                             "between discovery and recording)")
        self.inputs[key] = x
        return z + self.perturbations[key]


def tap(module: nnx.Module, op: str, kind: str, fn: OpFn, params: Mapping[str, Array], x: Array) -> Array:
    """``fn(params, x)``, seen by the recorder installed on ``module`` if any (see module doc)."""
    slot = module.__dict__.get(_ATTR)
    if slot is None:
        return fn(params, x)
    recorder, path = slot
    return recorder(path, op, kind, fn, params, x)


def install(module: nnx.Module, recorder: Recorder) -> None:
    """Attach ``recorder`` to ``module`` and every sub-module (with its path from ``module``).

    Use on a module merged inside the traced function only: the attribute is plain Python
    state on those objects and is never split into a graph.
    """
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Module):
            object.__setattr__(node, _ATTR, (recorder, tuple(path)))


def param_path(key_path: tuple) -> tuple:
    """Path of a params-tree leaf as plain keys: ('blocks', 0, 'conv1', 'w'), dropping the
    ``.value`` of NNX variables."""
    out: list[Any] = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        else:
            out.append(getattr(k, "name", getattr(k, "key", str(k))))
    return tuple(out)
