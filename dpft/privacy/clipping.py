"""Clipping modes: one record per mode, read by everything whose behaviour depends on the mode.

A mode bounds each example's gradient g (over the whole parameter pytree, float32; ||g|| its L2
norm; C = `clip_norm`) by multiplying it with a factor. Its `ClippingMode` record states what
the engines (`engine`, `bookkeeping`), the privacy plan (sensitivity, individual accounting,
engine choice), config validation, the run set-up and the canary audit need, so none of them
compares mode names:

| mode        | factor on g                       | sensitivity S      | contribution c(n)         | engines           | audit |
|-------------|-----------------------------------|--------------------|---------------------------|-------------------|-------|
| "flat"      | min(1, C / ||g||)                 | C                  | min(n, C)                 | vmap, bookkeeping | yes   |
| "per_layer" | leaf l: min(1, C_l / ||g_l||)     | sqrt(sum_l C_l^2)  | min(n, S) (a bound)       | vmap              | no    |
| "automatic" | C / (||g|| + gamma) (Bu et al.)   | C                  | C n / (n + gamma)         | vmap, bookkeeping | no    |
| "none"      | 1: non-private, no per-example g  | 0                  | - (bounds nothing)        | vmap, bookkeeping | yes   |

c(n) is the L2 norm that an example of (augmult-averaged) gradient norm n adds to the clipped sum:
what individual accounting charges. per_layer clips each leaf to C_l, so its exact contribution
sqrt(sum_l min(n_l, C_l)^2) needs the leaf norms n_l, which the engines do not record; min(n, S)
is an upper bound of it from n alone (each term is <= n_l^2 and <= C_l^2).

"none" is the non-private baseline (`private=False`), kept as a mode so that a `ClippingConfig`
always names one: the engines then skip per-example gradients, the plan refuses it for a private
run, and the run config never names it (`config.privacy.enabled=False` does).

**Adding a mode is one record plus one registry line**: a `ClippingMode(...)` constant (here or
in a new file) and `"name": "module:CONSTANT"` in `MODES`. It may read any hyper-parameter of
`HYPER_PARAMS` (`dpft.privacy.hyper_params`: clip_norm, gamma, per_layer_norms); those marked
`run_config` are set as `config.privacy.<name>`. A new hyper-parameter also needs a `ClippingConfig`
field and, for the run config, a `config.privacy` line in `dpft.config.schema`.
tests/test_clipping_modes.py adds a toy mode this way and runs it through the engines, the plan,
the run config and the audit.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from dpft.privacy.hyper_params import HYPER_PARAMS, HyperParam
from dpft.registry import Registry

PyTree = Any

#: The engines that compute a clipped gradient sum (`dpft.privacy.plan.GRAD_METHODS`).
ENGINES = ("vmap", "bookkeeping")
#: Which supported engine `grad_method="auto"` picks for a private run, first match.
AUTO_ENGINE_ORDER = ("bookkeeping", "vmap")


class Hyper(Protocol):
    """The hyper-parameter values a mode's functions read (`dpft.privacy.engine.ClippingConfig`)."""

    clip_norm: float
    gamma: float
    per_layer_norms: PyTree | None


# --------------------------------------------------------------------------- the record


@dataclasses.dataclass(frozen=True)
class ClippingMode:
    """Everything dpft needs to know about one clipping mode (see the module doc).

    private: False only for the non-private baseline ("none").
    factor(norm, bound, hyper) -> multiplier: of a gradient of float32 L2 norm `norm` (any shape,
      jit-able, float32) under the bound `bound` (C, or C_l of a leaf for leaf-wise modes).
      None iff not private.
    sensitivity(hyper, params) -> float: L2 sensitivity of the clipped sum to adding or removing
      one example (the `clip_norm` of `privatize`); params is the parameter pytree.
    contribution(norms, hyper, sensitivity) -> float64 array like norms: the L2 norm an example of
      gradient norm n adds to the clipped sum (individual accounting), <= sensitivity. None iff
      not private.
    hyper: names in `HYPER_PARAMS` the mode reads (checked by `ClippingConfig` and validation).
    engines: the engines of `ENGINES` that implement it ("bookkeeping" needs one factor per example).
    audit: `dpft audit` can audit it.
    leaf_bounds(hyper, params) -> pytree like params of floats C_l: set for modes that clip each
      parameter leaf with its own factor (per_layer); None for one factor per example.
    """

    private: bool
    factor: Callable[[jax.Array, float, Hyper], jax.Array] | None
    sensitivity: Callable[[Hyper, PyTree], float]
    contribution: Callable[[np.ndarray, Hyper, float], np.ndarray] | None
    hyper: tuple[str, ...]
    engines: tuple[str, ...]
    audit: bool
    leaf_bounds: Callable[[Hyper, PyTree], PyTree] | None = None

    def __post_init__(self) -> None:
        unknown = [h for h in self.hyper if h not in HYPER_PARAMS]
        if unknown:
            raise ValueError(f"ClippingMode.hyper: {unknown} are not in HYPER_PARAMS ({', '.join(HYPER_PARAMS)})")
        if not self.engines or any(e not in ENGINES for e in self.engines):
            raise ValueError(f"ClippingMode.engines={self.engines!r}: a non-empty subset of {ENGINES}")
        if self.private != (self.factor is not None) or self.private != (self.contribution is not None):
            raise ValueError("ClippingMode: a private mode has a factor and a contribution, a non-private one neither")
        if self.leaf_bounds is not None and "bookkeeping" in self.engines:
            raise ValueError("ClippingMode: the book-keeping engine needs one factor per example (no leaf_bounds)")

    def supports(self, engine: str) -> bool:
        """Whether `engine` ("vmap" | "bookkeeping") implements this mode."""
        return engine in self.engines


# --------------------------------------------------------------------------- the modes


def _flat_factor(norm: jax.Array, bound: float, hyper: Hyper) -> jax.Array:
    # min(1, C/||g||) without dividing by zero: C / max(||g||, C).
    return bound / jnp.maximum(norm, bound)


def _automatic_factor(norm: jax.Array, bound: float, hyper: Hyper) -> jax.Array:
    return bound / (norm + hyper.gamma)


def _clip_norm_sensitivity(hyper: Hyper, params: PyTree) -> float:
    return float(hyper.clip_norm)


def _leaf_sensitivity(hyper: Hyper, params: PyTree) -> float:
    return math.sqrt(sum(c * c for c in jax.tree.leaves(_layer_bounds(hyper, params))))


def _no_sensitivity(hyper: Hyper, params: PyTree) -> float:
    return 0.0


def _flat_contribution(norms: np.ndarray, hyper: Hyper, sensitivity: float) -> np.ndarray:
    return np.minimum(norms, hyper.clip_norm)


def _automatic_contribution(norms: np.ndarray, hyper: Hyper, sensitivity: float) -> np.ndarray:
    return hyper.clip_norm * norms / (norms + hyper.gamma)


def _sensitivity_bound_contribution(norms: np.ndarray, hyper: Hyper, sensitivity: float) -> np.ndarray:
    return np.minimum(norms, sensitivity)


def _layer_bounds(hyper: Hyper, params: PyTree) -> PyTree:
    """The per-leaf bounds C_l of per_layer: `per_layer_norms`, or C / sqrt(#leaves) each."""
    if hyper.per_layer_norms is None:
        n = len(jax.tree.leaves(params))
        return jax.tree.map(lambda _: hyper.clip_norm / math.sqrt(n), params)
    try:
        return jax.tree.map(lambda _, c: float(c), params, hyper.per_layer_norms)
    except ValueError as e:
        raise ValueError(f"ClippingConfig.per_layer_norms: structure does not match params: {e}") from e


FLAT = ClippingMode(private=True, factor=_flat_factor, sensitivity=_clip_norm_sensitivity,
                    contribution=_flat_contribution, hyper=("clip_norm",), engines=("vmap", "bookkeeping"),
                    audit=True)
PER_LAYER = ClippingMode(private=True, factor=_flat_factor, sensitivity=_leaf_sensitivity,
                         contribution=_sensitivity_bound_contribution, hyper=("clip_norm", "per_layer_norms"),
                         engines=("vmap",), audit=False, leaf_bounds=_layer_bounds)
AUTOMATIC = ClippingMode(private=True, factor=_automatic_factor, sensitivity=_clip_norm_sensitivity,
                         contribution=_automatic_contribution, hyper=("clip_norm", "gamma"),
                         engines=("vmap", "bookkeeping"), audit=False)
NONE = ClippingMode(private=False, factor=None, sensitivity=_no_sensitivity, contribution=None, hyper=(),
                    engines=("vmap", "bookkeeping"), audit=True)

#: name -> "module:ClippingMode constant"; one line per mode.
MODES = Registry("clipping mode", {
    "flat": "dpft.privacy.clipping:FLAT",
    "per_layer": "dpft.privacy.clipping:PER_LAYER",
    "automatic": "dpft.privacy.clipping:AUTOMATIC",
    "none": "dpft.privacy.clipping:NONE",
})


# --------------------------------------------------------------------------- look-ups


def get(name: str) -> ClippingMode:
    """The record of mode `name`; UsageError (a ValueError) naming the value and the choices if unknown."""
    record = MODES.get(name)
    if not isinstance(record, ClippingMode):
        raise TypeError(f"clipping mode {name!r}: {MODES.target(name)} is a {type(record).__name__}, "
                        "not a ClippingMode")
    return record


def names(*, private: bool | None = None, audit: bool | None = None, engine: str | None = None
          ) -> tuple[str, ...]:
    """Registered mode names in registration order; optionally only the (non-)private ones, the
    (non-)audited ones, or those `engine` supports. The run config's `privacy.clipping` choices
    are `names(private=True)`."""
    return tuple(n for n in MODES if (private is None or get(n).private == private)
                 and (audit is None or get(n).audit == audit) and (engine is None or get(n).supports(engine)))


def hyper_problems(mode: str, values: Mapping[str, Any]) -> list[str]:
    """'<name>: <problem>' for each hyper-parameter in `values` that `mode` refuses: one it reads
    outside its range, or one it does not read set although its default is None (unset)."""
    record = get(mode)
    out = []
    for name, param in HYPER_PARAMS.items():
        value = values.get(name, param.default)
        if name in record.hyper:
            problem = param.check(value)
            if problem:
                got = f", got {value!r}" if isinstance(value, (numbers.Number, str)) else ""
                out.append(f"{name}: {problem}{got}")
        elif param.default is None and value is not None:
            out.append(f"{name}: not read by mode {mode!r} (only by {', '.join(readers(name))})")
    return out


def readers(hyper_param: str) -> tuple[str, ...]:
    """The modes that read hyper-parameter `hyper_param`, in registration order."""
    return tuple(n for n in MODES if hyper_param in get(n).hyper)


def run_config_values(mode: str, privacy: Mapping[str, Any]) -> dict[str, float]:
    """The hyper-parameters of `mode` settable in the run config, from its `config.privacy`
    section, as floats."""
    return {name: float(privacy[name]) for name in get(mode).hyper if HYPER_PARAMS[name].run_config}


__all__ = ["ClippingMode", "HyperParam", "HYPER_PARAMS", "MODES", "ENGINES", "AUTO_ENGINE_ORDER", "get", "names",
           "hyper_problems", "readers", "run_config_values"]
